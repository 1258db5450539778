"""SAE encoder workers: Ray Data callable classes that turn vectors into features.

Weights arrive once per actor as an object reference (never pickled per batch).

One shard: `SAEEncoder` holds the whole SAE and adds feature_ids, feature_values and
recon_error in one pass. S shards (`sharded_encode`): a chain of actor pools, each
holding one slice of the dictionary, so no worker holds it all:

    EncodeShard 0 .. S-1  (each adds its candidates)  -> merge (global top-k / union)
    -> DecodeShard 0 .. S-1 (each adds its rows' share of the reconstruction)
    -> recon_error
"""

from __future__ import annotations

import numpy as np
import ray
import torch
from ray.data import ActorPoolStrategy

from featurewatch.sae.model import DTYPES, SparseAutoencoder, TopKSAE, build
from featurewatch.sae.shard import (
    DecoderShard,
    EncoderShard,
    decoder_shards,
    encoder_shards,
    merge_candidates,
)


def sae_payload(sae: SparseAutoencoder) -> dict:
    """What the pipeline puts in the object store: cfg plus numpy weights."""
    return {
        "config": sae.config(),
        "tensors": {n: p.detach().float().numpy() for n, p in sae.named_parameters()},
    }


def sae_from_payload(payload: dict) -> SparseAutoencoder:
    cfg = payload["config"]
    sae = build(
        cfg["architecture"],
        cfg["d_in"],
        cfg["d_sae"],
        k=cfg.get("k"),
        apply_b_dec_to_input=cfg["apply_b_dec_to_input"],
        dtype=DTYPES[cfg["dtype"]],  # numpy has no bfloat16: weights travel as float32
    )
    with torch.no_grad():
        for name, value in payload["tensors"].items():
            getattr(sae, name).copy_(torch.from_numpy(value))
    return sae.eval()


def _resolve(ref):
    # Object refs in fn_constructor_kwargs arrive unresolved.
    return ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref


def padded_2d(column: np.ndarray, dtype) -> np.ndarray:
    """A sparse column as one [rows, width] array. Threshold SAEs (ReLU, JumpReLU) give
    each batch as many columns as its busiest token, and Ray Data hands batches of
    blocks with different widths over as an object array of rows: pad those with
    zeros (value 0 is inactive)."""
    if column.dtype != object:
        return np.asarray(column, dtype=dtype)
    rows = [np.asarray(r, dtype=dtype) for r in column]
    width = max((len(r) for r in rows), default=0)
    out = np.zeros((len(rows), width), dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _vectors(batch: dict[str, np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(batch["vector"], dtype=np.float32))


def _recon_error(x: torch.Tensor, x_hat: torch.Tensor) -> np.ndarray:
    """||x - x_hat||^2 / ||x||^2 per token."""
    err = (x - x_hat.float()).pow(2).sum(dim=1) / x.pow(2).sum(dim=1).clamp_min(1e-12)
    return err.numpy()


class SAEEncoder:
    """map_batches callable: adds feature_ids, feature_values and recon_error columns."""

    def __init__(self, sae_ref, torch_threads: int = 1):
        torch.set_num_threads(torch_threads)
        self.sae = sae_from_payload(_resolve(sae_ref))

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = _vectors(batch)
        del batch["vector"]
        indices, values = self.sae.encode_sparse(x)
        batch["feature_ids"] = indices.to(torch.int32).numpy()
        batch["feature_values"] = values.float().numpy()
        batch["recon_error"] = _recon_error(x, self.sae.decode_sparse(indices, values))
        return batch


class EncodeShard:
    """One slice of the encoder: adds `cand_ids_<s>` and `cand_values_<s>`."""

    def __init__(self, shard_ref, index: int, torch_threads: int = 1):
        torch.set_num_threads(torch_threads)
        self.shard: EncoderShard = _resolve(shard_ref)
        self.index = index

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        indices, values = self.shard.candidates(_vectors(batch))
        batch[f"cand_ids_{self.index}"] = indices.to(torch.int32).numpy()
        batch[f"cand_values_{self.index}"] = values.float().numpy()
        return batch


def merge_shards(
    batch: dict[str, np.ndarray], num_shards: int, architecture: str, k: int | None
) -> dict[str, np.ndarray]:
    """Candidates of every shard -> feature_ids, feature_values (a plain task)."""
    parts = [
        (
            torch.from_numpy(padded_2d(batch.pop(f"cand_ids_{s}"), np.int64)),
            torch.from_numpy(padded_2d(batch.pop(f"cand_values_{s}"), np.float32)),
        )
        for s in range(num_shards)
    ]
    indices, values = merge_candidates(parts, architecture, k)
    batch["feature_ids"] = indices.to(torch.int32).numpy()
    batch["feature_values"] = values.numpy()
    return batch


class DecodeShard:
    """One slice of the decoder: adds its share to `recon`; the last one turns the sum
    into recon_error and drops the vectors."""

    def __init__(self, shard_ref, b_dec: np.ndarray, last: bool, torch_threads: int = 1):
        torch.set_num_threads(torch_threads)
        self.shard: DecoderShard = _resolve(shard_ref)
        self.b_dec = torch.from_numpy(b_dec)
        self.last = last

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        indices = torch.from_numpy(padded_2d(batch["feature_ids"], np.int64))
        values = torch.from_numpy(padded_2d(batch["feature_values"], np.float32))
        if "recon" in batch:
            recon = torch.from_numpy(np.asarray(batch["recon"], dtype=np.float32))
        else:
            recon = self.b_dec.expand(indices.shape[0], -1)
        recon = recon + self.shard.contribution(indices, values).float()
        if not self.last:
            batch["recon"] = recon.numpy()
            return batch
        batch["recon_error"] = _recon_error(_vectors(batch), recon)
        batch.pop("recon", None)
        del batch["vector"]
        return batch


def sharded_encode(
    ds: ray.data.Dataset,
    sae: SparseAutoencoder,
    num_shards: int,
    *,
    batch_size: int,
    actors_per_shard: int = 1,
    cpus_per_actor: float = 1.0,
    torch_threads: int = 1,
    resources: dict | None = None,
) -> ray.data.Dataset:
    """`ds` (with a `vector` column) -> feature_ids, feature_values, recon_error.

    num_shards = 1 runs the single-pass SAEEncoder; more chains one actor pool per
    shard for encoding and one per shard for decoding, each holding only its slice.
    `cpus_per_actor` is the Ray CPU budget of one encoder: the S encode shards share
    it, and the (much lighter) decode shards and merge tasks share half of it again,
    so a chain never claims every CPU and starves the tasks that read the spool.
    `resources` places every stage (cfg.role_resources("encoding")).
    """
    resources = resources or None
    pool = ActorPoolStrategy(size=actors_per_shard)
    if num_shards == 1:
        return ds.map_batches(
            SAEEncoder,
            fn_constructor_kwargs={
                "sae_ref": ray.put(sae_payload(sae)),
                "torch_threads": torch_threads,
            },
            batch_size=batch_size,
            compute=pool,
            resources=resources,
            num_cpus=cpus_per_actor,
        )
    encode_cpus = cpus_per_actor / num_shards
    light_cpus = cpus_per_actor / (2 * num_shards + 1)
    for s, shard in enumerate(encoder_shards(sae, num_shards)):
        ds = ds.map_batches(
            EncodeShard,
            fn_constructor_kwargs={
                "shard_ref": ray.put(shard),
                "index": s,
                "torch_threads": torch_threads,
            },
            batch_size=batch_size,
            compute=pool,
            resources=resources,
            num_cpus=encode_cpus,
        )
    ds = ds.map_batches(
        merge_shards,
        fn_kwargs={
            "num_shards": num_shards,
            "architecture": sae.architecture,
            "k": sae.k if isinstance(sae, TopKSAE) else None,
        },
        batch_size=batch_size,
        resources=resources,
        num_cpus=light_cpus,
    )
    b_dec = sae.b_dec.detach().float().numpy()
    for s, shard in enumerate(decoder_shards(sae, num_shards)):
        ds = ds.map_batches(
            DecodeShard,
            fn_constructor_kwargs={
                "shard_ref": ray.put(shard),
                "b_dec": b_dec,
                "last": s == num_shards - 1,
                "torch_threads": torch_threads,
            },
            batch_size=batch_size,
            compute=pool,
            resources=resources,
            num_cpus=light_cpus,
        )
    return ds
