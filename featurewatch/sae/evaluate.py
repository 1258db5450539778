"""CE-loss recovered: how much of the language model's next-token loss survives when a
layer's activations are replaced by the SAE's reconstruction.

    recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean)

CE_clean is the unmodified model, CE_sae splices the reconstruction into the monitored
site, CE_zero zero-ablates the site. 1.0 means the SAE loses nothing the model uses;
0.0 means it is as bad as deleting the layer's output. Position 0 of each sequence is
left untouched in every run, and the SAE run leaves attention-sink tokens untouched too
(norm over 10x the median: not in the SAE's training data, see train.typical_rows);
zero-ablation zeroes every position but the first.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from featurewatch.sae.model import SparseAutoencoder
from featurewatch.sae.train import typical_rows


@torch.inference_mode()
def ce_loss_recovered(
    model: nn.Module,
    site: nn.Module,
    sae: SparseAutoencoder,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
) -> dict:
    """`site` is the module whose output the SAE reads (a decoder block for resid_post);
    `batches` yields (input_ids, attention_mask)."""
    mode = "clean"

    def splice(module, inputs, output):
        if mode == "clean":
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        new = hidden.clone()
        if mode == "zero":
            new[:, 1:] = 0
        else:
            x = hidden[:, 1:].reshape(-1, hidden.shape[-1])
            spliced = sae(x).to(hidden.dtype)
            # Attention sinks keep their own activations: the SAE never saw them.
            typical = typical_rows(x)
            spliced[~typical] = x[~typical]
            new[:, 1:] = spliced.reshape(hidden[:, 1:].shape)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    totals = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    count = 0
    was_training = sae.training
    sae.eval()
    handle = site.register_forward_hook(splice)
    try:
        for input_ids, mask in batches:
            targets = input_ids[:, 1:]
            valid = mask[:, 1:].bool()
            count += int(valid.sum())
            for mode in totals:  # noqa: B007 (read by the hook)
                logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
                losses = F.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]),
                    targets.reshape(-1),
                    reduction="none",
                ).reshape(targets.shape)
                totals[mode] += float(losses[valid].sum())
    finally:
        handle.remove()
        sae.train(was_training)
    ce = {name: total / max(count, 1) for name, total in totals.items()}
    gap = ce["zero"] - ce["clean"]
    return {
        "ce_clean": ce["clean"],
        "ce_sae": ce["sae"],
        "ce_zero": ce["zero"],
        "ce_loss_recovered": (ce["zero"] - ce["sae"]) / gap if gap != 0 else float("nan"),
        "ce_tokens": count,
    }
