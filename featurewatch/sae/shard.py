"""An SAE split by latent ranges, so no worker needs the whole dictionary.

Encoding: shard s holds W_enc[:, start:stop] (and that range of b_enc and threshold)
plus b_dec, and emits its candidate latents with global ids. For TopK each shard emits
its local top-k of the pre-activations; the global top-k is always among them, so the
merge (top-k of the union, then ReLU) gives exactly the unsharded result. For the
threshold architectures (ReLU, JumpReLU) a latent's activity depends only on its own
pre-activation, so the merge is the union.

Decoding: shard s holds W_dec[start:stop] and adds the contribution of its own active
latents; the reconstruction is b_dec plus the sum over shards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from featurewatch.sae.model import (
    JumpReLUSAE,
    SparseAutoencoder,
    TopKSAE,
    row_topk,
    sparse_from_dense,
)


def shard_ranges(d_sae: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) latent ranges of near-equal size."""
    if not 1 <= num_shards <= d_sae:
        raise ValueError(f"num_shards must be in [1, d_sae={d_sae}], got {num_shards}")
    bounds = np.linspace(0, d_sae, num_shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


@dataclass
class EncoderShard:
    """The encoder slice for latents [start, stop)."""

    architecture: str
    start: int
    stop: int
    k: int | None
    apply_b_dec_to_input: bool
    W_enc: torch.Tensor  # [d_in, stop - start]
    b_enc: torch.Tensor
    b_dec: torch.Tensor  # [d_in], whole: every shard needs the centred input
    threshold: torch.Tensor | None

    def candidates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(global latent ids, values), each [batch, L]. TopK values are raw
        pre-activations (the merge applies ReLU after choosing)."""
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = torch.addmm(self.b_enc, x, self.W_enc)
        if self.architecture == "topk":
            values, indices = row_topk(pre, min(self.k, pre.shape[1]))
        else:
            z = F.relu(pre)
            if self.threshold is not None:
                z = z * (pre > self.threshold).to(z.dtype)
            indices, values = sparse_from_dense(z)
        return indices + self.start, values


@dataclass
class DecoderShard:
    """The decoder rows of latents [start, stop)."""

    start: int
    stop: int
    W_dec: torch.Tensor  # [stop - start, d_in]

    def contribution(self, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """sum of value x decoder row over the active latents in this shard's range."""
        mine = (indices >= self.start) & (indices < self.stop) & (values != 0)
        local = torch.where(mine, indices - self.start, torch.zeros_like(indices))
        weights = torch.where(mine, values, torch.zeros_like(values)).to(self.W_dec.dtype)
        if local.shape[1] == 0:
            return torch.zeros(indices.shape[0], self.W_dec.shape[1], dtype=self.W_dec.dtype)
        return F.embedding_bag(local, self.W_dec, per_sample_weights=weights, mode="sum")


def encoder_shards(sae: SparseAutoencoder, num_shards: int) -> list[EncoderShard]:
    k = sae.k if isinstance(sae, TopKSAE) else None
    threshold = sae.threshold.detach() if isinstance(sae, JumpReLUSAE) else None
    return [
        EncoderShard(
            architecture=sae.architecture,
            start=start,
            stop=stop,
            k=k,
            apply_b_dec_to_input=sae.apply_b_dec_to_input,
            W_enc=sae.W_enc.detach()[:, start:stop].contiguous(),
            b_enc=sae.b_enc.detach()[start:stop].clone(),
            b_dec=sae.b_dec.detach().clone(),
            threshold=None if threshold is None else threshold[start:stop].clone(),
        )
        for start, stop in shard_ranges(sae.d_sae, num_shards)
    ]


def decoder_shards(sae: SparseAutoencoder, num_shards: int) -> list[DecoderShard]:
    return [
        DecoderShard(start, stop, sae.W_dec.detach()[start:stop].contiguous())
        for start, stop in shard_ranges(sae.d_sae, num_shards)
    ]


def merge_candidates(
    parts: list[tuple[torch.Tensor, torch.Tensor]], architecture: str, k: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unsharded (indices, values) from every shard's candidates."""
    indices = torch.cat([i for i, _ in parts], dim=1)
    values = torch.cat([v for _, v in parts], dim=1)
    if architecture == "topk":
        values, pick = values.topk(k, dim=-1, sorted=False)
        return indices.gather(1, pick), F.relu(values)
    # Union: drop the padding columns no row needs.
    width = int((values > 0).sum(dim=-1).max()) if values.numel() else 0
    values, pick = values.topk(width, dim=-1, sorted=False)
    return indices.gather(1, pick), values
