"""The SAE encoder worker: a Ray Data callable class that turns vectors into features.

Weights arrive once per actor as an object reference (never pickled per batch).
"""

from __future__ import annotations

import numpy as np
import ray
import torch

from featurewatch.sae.model import TopKSAE


def sae_payload(sae: TopKSAE) -> dict:
    """What the pipeline puts in the object store: cfg plus numpy weights."""
    return {
        "config": sae.config(),
        "tensors": {n: p.detach().float().numpy() for n, p in sae.named_parameters()},
    }


def sae_from_payload(payload: dict) -> TopKSAE:
    cfg = payload["config"]
    sae = TopKSAE(
        cfg["d_in"], cfg["d_sae"], cfg["k"], apply_b_dec_to_input=cfg["apply_b_dec_to_input"]
    )
    with torch.no_grad():
        for name, value in payload["tensors"].items():
            getattr(sae, name).copy_(torch.from_numpy(value))
    return sae.eval()


class SAEEncoder:
    """map_batches callable: adds feature_ids, feature_values and recon_error columns."""

    def __init__(self, sae_ref, torch_threads: int = 1):
        # Object refs in fn_constructor_kwargs arrive unresolved.
        payload = ray.get(sae_ref) if isinstance(sae_ref, ray.ObjectRef) else sae_ref
        torch.set_num_threads(torch_threads)
        self.sae = sae_from_payload(payload)

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(batch.pop("vector"), dtype=np.float32))
        indices, values = self.sae.encode_sparse(x)
        x_hat = self.sae.decode_sparse(indices, values)
        err = (x - x_hat).pow(2).sum(dim=1) / x.pow(2).sum(dim=1).clamp_min(1e-12)
        batch["feature_ids"] = indices.to(torch.int32).numpy()
        batch["feature_values"] = values.float().numpy()
        batch["recon_error"] = err.float().numpy()
        return batch
