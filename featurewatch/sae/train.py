"""SAE training in plain torch: initialisation, the loss with AuxK, schedule, metrics.

The Ray Train job (featurewatch/platform/jobs/train_sae.py) wraps these; the same step runs
in a single process (benchmarks/sae_train.py compares the two). What the field has
learned, and where it lives here:
- decoder rows kept at unit norm after every step (`normalize_decoder`);
- b_dec initialised at the geometric median of the data (`init_from_data`);
- AuxK (Gao et al. 2024): latents that have not fired for `dead_after_tokens` tokens
  try to reconstruct the residual the live ones leave, which pulls them back to life;
- linear learning-rate warm-up and a linear decay to zero over the last 20% of steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from featurewatch.sae.model import (
    BatchTopKSAE,
    ReLUSAE,
    SparseAutoencoder,
    TopKSAE,
    row_topk,
)


@dataclass
class TrainSettings:
    lr: float = 2e-3
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # the last fraction of steps decays linearly to zero
    aux_k: int = 256  # dead latents used by AuxK for the residual
    aux_coefficient: float = 1 / 32
    dead_after_tokens: int = 200_000
    l1_coefficient: float = 5.0  # ReLU SAEs only: the sparsity penalty


# Attention-sink tokens (the first positions of a sequence, some newlines) carry
# residual norms 100x the median: in SmolLM2's layer 15 they are 0.03% of tokens but 85%
# of the variance, so an SAE fitted to them would spend its capacity (and FVU would
# measure) a handful of directions. They are left out of training and evaluation.
OUTLIER_NORM_FACTOR = 10.0


def typical_rows(x: torch.Tensor, factor: float = OUTLIER_NORM_FACTOR) -> torch.Tensor:
    """Rows whose norm is at most `factor` times the median norm of `x`."""
    norms = x.float().norm(dim=-1)
    return norms <= factor * norms.median()


@torch.no_grad()
def geometric_median(x: torch.Tensor, iterations: int = 50, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the summed distance to every row.
    Less pulled by outliers than the mean; the usual start for b_dec."""
    x = x.float()
    median = x.mean(dim=0)
    for _ in range(iterations):
        weights = 1.0 / (x - median).norm(dim=1).clamp_min(eps)
        updated = (weights[:, None] * x).sum(dim=0) / weights.sum()
        if (updated - median).norm() < eps * median.norm().clamp_min(1.0):
            return updated
        median = updated
    return median


@torch.no_grad()
def init_from_data(
    sae: SparseAutoencoder, sample: torch.Tensor, seed: int = 0, b_dec: str = "geometric_median"
) -> None:
    """b_dec at the data's geometric median (or mean); decoder rows at unit norm, each a
    random mix of a centred data point and noise (far fewer dead latents on small
    activation sets than pure noise); encoder = decoder transposed."""
    gen = torch.Generator().manual_seed(seed)
    sample = sample.float()
    centre = geometric_median(sample) if b_dec == "geometric_median" else sample.mean(dim=0)
    w = torch.randn(sae.d_sae, sae.d_in, generator=gen)
    w /= w.norm(dim=1, keepdim=True)
    if sample.shape[0] > 1:
        centred = sample - centre
        picks = centred[torch.randint(sample.shape[0], (sae.d_sae,), generator=gen)]
        picks /= picks.norm(dim=1, keepdim=True).clamp_min(1e-8)
        w = picks + 0.5 * w
        w /= w.norm(dim=1, keepdim=True).clamp_min(1e-8)
    sae.W_dec.copy_(w)
    sae.W_enc.copy_(w.T)
    sae.b_enc.zero_()
    sae.b_dec.copy_(centre)
    # With W_enc = W_dec^T the k active latents each carry about the input's full length,
    # so the first reconstruction is k times too long (FVU in the hundreds). Latents are
    # positively homogeneous in W_enc while b_enc = 0, so one least-squares scale fixes it.
    was_training = sae.training
    sae.train()  # BatchTopK's batch rule; its threshold is not learned yet
    probe = sample[:4096].to(sae.dtype)
    shape = (sae.decode(sae.encode(probe)) - sae.b_dec).float()
    scale = float((shape * (probe.float() - centre)).sum() / shape.pow(2).sum().clamp_min(1e-12))
    if scale > 0:
        sae.W_enc.mul_(scale)
    sae.train(was_training)
    if isinstance(sae, BatchTopKSAE):
        sae.reset_threshold()


@torch.no_grad()
def normalize_decoder(sae: SparseAutoencoder) -> None:
    """Keep decoder rows at unit norm so latent magnitudes stay comparable."""
    sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)


def lr_factor(step: int, total_steps: int, settings: TrainSettings) -> float:
    """Multiplier on the base learning rate at `step` (0-based)."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    decay_start = int(total_steps * (1 - settings.decay_fraction))
    if step >= decay_start and total_steps > decay_start:
        return max(0.0, (total_steps - step) / (total_steps - decay_start))
    return 1.0


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean squared error normalised by the batch variance (an FVU estimate)."""
    var = (x - x.mean(dim=0)).pow(2).sum(dim=-1).mean().clamp_min(1e-8)
    return (x - x_hat).pow(2).sum(dim=-1).mean() / var


class DeadLatents:
    """Tokens since each latent last fired; a latent is dead past a threshold."""

    def __init__(self, d_sae: int, dead_after_tokens: int):
        self.since_fired = torch.zeros(d_sae, dtype=torch.long)
        self.dead_after_tokens = dead_after_tokens

    def update(self, fired: torch.Tensor, tokens: int) -> None:
        self.since_fired += tokens
        self.since_fired[fired] = 0

    def mask(self) -> torch.Tensor:
        return self.since_fired >= self.dead_after_tokens

    def fraction(self) -> float:
        return float(self.mask().float().mean())


class SAETrainingStep(nn.Module):
    """One forward pass of training: loss and statistics. A module so DDP can wrap it
    (its parameters are the SAE's)."""

    def __init__(self, sae: SparseAutoencoder, settings: TrainSettings):
        super().__init__()
        self.sae, self.settings = sae, settings

    def forward(self, x: torch.Tensor, dead: torch.Tensor) -> tuple[torch.Tensor, dict]:
        sae, s = self.sae, self.settings
        x = x.to(sae.dtype)
        pre = sae.pre_activations(x)
        if isinstance(sae, TopKSAE):
            # Sparse decode: k decoder rows per token instead of a dense [d_sae] product,
            # which halves the work of a step.
            values, indices = row_topk(pre, sae.k)
            values = F.relu(values)
            x_hat = sae.decode_sparse(indices, values)
            active, active_ids = values > 0, indices
        else:
            z = sae.activate(pre)
            x_hat = sae.decode(z)
            active, active_ids = z > 0, None
        mse = reconstruction_loss(x, x_hat)
        loss = mse
        aux = torch.zeros((), dtype=mse.dtype)
        if isinstance(sae, TopKSAE | BatchTopKSAE) and bool(dead.any()):
            # AuxK: the top dead latents reconstruct what the live ones missed.
            k_aux = min(s.aux_k, int(dead.sum()))
            aux_values, aux_ids = pre.masked_fill(~dead, float("-inf")).topk(
                k_aux, dim=-1, sorted=False
            )
            aux_hat = F.embedding_bag(
                aux_ids, sae.W_dec, per_sample_weights=F.relu(aux_values), mode="sum"
            )
            aux = reconstruction_loss((x - x_hat).detach(), aux_hat)
            loss = loss + s.aux_coefficient * aux
        if isinstance(sae, ReLUSAE):
            norm = x.pow(2).sum(dim=-1).mean().sqrt().clamp_min(1e-8)
            loss = loss + s.l1_coefficient * (z * sae.W_dec.norm(dim=1)).sum(dim=-1).mean() / norm
        fired = torch.zeros(sae.d_sae, dtype=torch.bool)
        if active_ids is None:
            fired = active.any(dim=0)
        else:
            fired[active_ids[active]] = True
        stats = {
            "mse": mse.detach(),
            "aux": aux.detach(),
            "l0": active.sum(dim=-1).float().mean().detach(),
            "fired": fired,
        }
        return loss, stats


def optimizer_step(
    step_fn: nn.Module, opt: torch.optim.Optimizer, sae: SparseAutoencoder, x, dead, lr: float
) -> tuple[torch.Tensor, dict]:
    """One training step: set the learning rate, forward, backward, update, renormalise.
    `step_fn` is an SAETrainingStep, possibly wrapped in DDP."""
    for group in opt.param_groups:
        group["lr"] = lr
    loss, stats = step_fn(x, dead)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    normalize_decoder(sae)
    return loss, stats


@torch.no_grad()
def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained over a set of vectors."""
    x, x_hat = x.float(), x_hat.float()
    total = (x - x.mean(dim=0)).pow(2).sum()
    return float((x - x_hat).pow(2).sum() / total.clamp_min(1e-12))


@torch.no_grad()
def evaluate(sae: SparseAutoencoder, x: torch.Tensor, batch_size: int = 4096) -> dict:
    """FVU, mean L0 and dead fraction (latents that never fire on x), in eval mode."""
    was_training = sae.training
    sae.eval()
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    squared_error, l0 = 0.0, 0.0
    x = x.float()
    for chunk in x.split(batch_size):
        indices, values = sae.encode_sparse(chunk)
        x_hat = sae.decode_sparse(indices, values).float()
        squared_error += float((chunk - x_hat).pow(2).sum())
        active = values > 0
        l0 += float(active.sum())
        fired[indices[active]] = True
    sae.train(was_training)
    total = float((x - x.mean(dim=0)).pow(2).sum())
    return {
        "fvu": squared_error / max(total, 1e-12),
        "l0": l0 / max(x.shape[0], 1),
        "dead_fraction": float(1.0 - fired.float().mean()),
        "tokens": int(x.shape[0]),
    }
