"""SAE training pieces in plain torch: initialisation, one step, metrics.

The Ray Train job (featurewatch/platform/train_sae.py) wraps these; they run the same
in a single process.
"""

from __future__ import annotations

import torch

from featurewatch.sae.model import SparseAutoencoder


@torch.no_grad()
def init_from_data(sae: SparseAutoencoder, sample: torch.Tensor, seed: int = 0) -> None:
    """b_dec at the data mean; decoder rows at unit norm; encoder = decoder transposed.

    Decoder rows start as a random mix of centred data points and noise: on small
    activation sets this leaves far fewer dead latents than pure noise.
    """
    gen = torch.Generator().manual_seed(seed)
    sample = sample.float()
    w = torch.randn(sae.d_sae, sae.d_in, generator=gen)
    w /= w.norm(dim=1, keepdim=True)
    if sample.shape[0] > 1:
        centred = sample - sample.mean(dim=0)
        picks = centred[torch.randint(sample.shape[0], (sae.d_sae,), generator=gen)]
        picks /= picks.norm(dim=1, keepdim=True).clamp_min(1e-8)
        w = picks + 0.5 * w
        w /= w.norm(dim=1, keepdim=True).clamp_min(1e-8)
    sae.W_dec.copy_(w)
    sae.W_enc.copy_(w.T)
    sae.b_enc.zero_()
    sae.b_dec.copy_(sample.float().mean(dim=0))


@torch.no_grad()
def normalize_decoder(sae: SparseAutoencoder) -> None:
    """Keep decoder rows at unit norm so latent magnitudes stay comparable."""
    sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean squared error normalised by the batch variance (an FVU estimate)."""
    var = (x - x.mean(dim=0)).pow(2).sum(dim=-1).mean().clamp_min(1e-8)
    return (x - x_hat).pow(2).sum(dim=-1).mean() / var


@torch.no_grad()
def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained over a set of vectors."""
    x, x_hat = x.float(), x_hat.float()
    total = (x - x.mean(dim=0)).pow(2).sum()
    return float((x - x_hat).pow(2).sum() / total.clamp_min(1e-12))


@torch.no_grad()
def evaluate(sae: SparseAutoencoder, x: torch.Tensor) -> dict:
    """FVU, mean L0 and dead fraction (latents that never fire on x)."""
    indices, values = sae.encode_sparse(x)
    x_hat = sae.decode_sparse(indices, values)
    active = values > 0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    fired[indices[active]] = True
    return {
        "fvu": fvu(x, x_hat),
        "l0": float(active.sum(dim=-1).float().mean()),
        "dead_fraction": float(1.0 - fired.float().mean()),
        "tokens": int(x.shape[0]),
    }
