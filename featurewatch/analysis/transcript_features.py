"""SAE features of assistant responses: transcripts -> model -> SAE -> pooled per transcript.

Each transcript is tokenized as the model would see it while answering: the chat
template up to the generation prompt, then the response's own tokens. One forward pass
(stopped at the deepest layer asked for) gives the residual stream; only the response
positions are encoded, and each feature is pooled over them by max and by mean.
Attention-sink positions (norms far above the median, left out of SAE training too) are
skipped. The raw residual stream can be pooled too (mean over the same response
positions, at any layers): what the residual probe families read (analysis/probes.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    # layer -> [n, d_model] float32: the raw residual stream's mean over response tokens
    residual: dict[int, torch.Tensor] = field(default_factory=dict)

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
    residual_layers: tuple[int, ...] = (),
    batch_size: int = 8,
    progress: bool = False,
) -> PooledFeatures:
    """Encode the response tokens of every transcript and pool each feature over them
    (no SAE: `sae` None), and pool the residual stream at `residual_layers`."""
    encoded = [token_ids(tokenizer, t) for t in transcripts]
    # Similar lengths together: less padding. Results go back to input order.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    n, d_sae = len(transcripts), sae.d_sae if sae is not None else 0
    pooled_max = torch.zeros(n, d_sae)
    pooled_mean = torch.zeros(n, d_sae)
    residual = {at: torch.zeros(n, model.config.hidden_size) for at in residual_layers}
    tokens = [0] * n
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    recorder = SiteRecorder(model, layer, site, tuple(residual_layers))
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
            recorder.run(model, input_ids, mask)  # right padding: causal, unaffected
            for r, i in enumerate(rows):
                ids, first = encoded[i]
                response = {at: out[r, first : len(ids)] for at, out in recorder.outputs.items()}
                one = pool_response(response, layer, sae, residual_layers)
                tokens[i] = one.tokens[0]
                for at in residual_layers:
                    residual[at][i] = one.residual[at][0]
                if sae is not None:
                    pooled_max[i], pooled_mean[i] = one.max[0], one.mean[0]
            bar.update(len(rows))
    finally:
        bar.close()
        recorder.remove()
    return PooledFeatures(pooled_max, pooled_mean, tokens, residual)


@torch.inference_mode()
def pool_response(
    response: dict[int, torch.Tensor], layer: int, sae, residual_layers=()
) -> PooledFeatures:
    """One response pooled as every score reads it (one row): `response` holds, per
    layer, the residual stream at the response's tokens. Through the SAE (at `layer`),
    each feature's max and mean; at each of `residual_layers`, the residual mean.
    Attention sinks are left out at each layer. What offline scoring does per transcript
    and a replica does per answer (analysis/verdicts.py)."""
    h = _typical(response[layer])
    d_sae = sae.d_sae if sae is not None else 0
    pooled_max, pooled_mean = torch.zeros(1, d_sae), torch.zeros(1, d_sae)
    if sae is not None:
        z = sae.encode(h.to(sae.dtype)).float()
        pooled_max[0], pooled_mean[0] = z.max(dim=0).values, z.mean(dim=0)
    residual = {at: _typical(response[at]).float().mean(0, keepdim=True) for at in residual_layers}
    return PooledFeatures(pooled_max, pooled_mean, [len(h)], residual)


def _typical(h: torch.Tensor) -> torch.Tensor:
    """The response rows without attention sinks (all of them when every row is one)."""
    typical = typical_rows(h)
    return h[typical] if typical.any() else h
