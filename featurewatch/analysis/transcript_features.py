"""SAE features of assistant responses: transcripts -> model -> SAE -> pooled per transcript.

Each transcript is tokenized as the model would see it while answering: the chat
template up to the generation prompt, then the response's own tokens. One forward pass
(stopped at the monitored layer) gives the residual stream; only the response positions
are encoded, and each feature is pooled over them by max and by mean. Attention-sink
positions (norms far above the median, left out of SAE training too) are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from featurewatch.analysis.transcripts import Transcript
from featurewatch.capture.generation import prompt_text
from featurewatch.capture.hooks import SiteRecorder
from featurewatch.sae.train import typical_rows


@dataclass
class PooledFeatures:
    """Per transcript (rows, in input order) and feature (columns)."""

    max: torch.Tensor  # [n, d_sae] float32: the strongest activation on any response token
    mean: torch.Tensor  # [n, d_sae] float32: the mean over response tokens
    tokens: list[int]  # response tokens encoded per transcript

    def pooled(self, how: str) -> torch.Tensor:
        if how not in ("max", "mean"):
            raise ValueError(f"pooling must be max or mean, got {how!r}")
        return self.max if how == "max" else self.mean


def token_ids(
    tokenizer, transcript: Transcript, *, max_context: int = 512, max_response: int = 256
) -> tuple[list[int], int]:
    """(ids, index of the first response token). The context keeps its last
    `max_context` tokens and the response its first `max_response`."""
    context = tokenizer(prompt_text(tokenizer, transcript.context), add_special_tokens=False)
    response = tokenizer(transcript.response, add_special_tokens=False)
    ids = context["input_ids"][-max_context:]
    return ids + response["input_ids"][:max_response], len(ids)


@torch.inference_mode()
def pooled_features(
    model,
    tokenizer,
    sae,
    transcripts: list[Transcript],
    *,
    layer: int,
    site: str,
    batch_size: int = 8,
    progress: bool = False,
) -> PooledFeatures:
    """Encode the response tokens of every transcript and pool each feature over them."""
    encoded = [token_ids(tokenizer, t) for t in transcripts]
    # Similar lengths together: less padding. Results go back to input order.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    n, d_sae = len(transcripts), sae.d_sae
    pooled_max = torch.zeros(n, d_sae)
    pooled_mean = torch.zeros(n, d_sae)
    tokens = [0] * n
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    recorder = SiteRecorder(model, layer, site)
    bar = tqdm(total=n, unit="transcript", desc="encode", disable=not progress)
    try:
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            width = max(len(encoded[i][0]) for i in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids = encoded[i][0]
                input_ids[r, : len(ids)] = torch.tensor(ids)
                mask[r, : len(ids)] = 1
            hidden = recorder.run(model, input_ids, mask)  # right padding: causal, unaffected
            for r, i in enumerate(rows):
                ids, first = encoded[i]
                h = hidden[r, first : len(ids)]
                typical = typical_rows(h)
                h = h[typical] if typical.any() else h
                z = sae.encode(h.to(sae.dtype)).float()
                pooled_max[i], pooled_mean[i] = z.max(dim=0).values, z.mean(dim=0)
                tokens[i] = len(h)
            bar.update(len(rows))
    finally:
        bar.close()
        recorder.remove()
    return PooledFeatures(pooled_max, pooled_mean, tokens)
