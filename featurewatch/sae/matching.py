"""Which latent of a child SAE is which latent of its parent: a one-to-one matching.

A refreshed dictionary keeps its meaning only where its latents are its parent's under
another id (or the same one). Each pair is scored by the cosine of their decoder
directions and, given held-out activations, by the correlation of their activations on
them (the mean of the two); an optimal assignment (the Hungarian method, scipy's
linear_sum_assignment) then pairs every latent of the smaller dictionary with one of
the other, maximising the total score. A greedy pairing would give a contested latent
to whichever pair came first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment

from featurewatch.errors import SAEFormatError


@dataclass(frozen=True)
class Match:
    parent_id: int
    child_id: int
    cosine: float  # of the decoder directions
    correlation: float | None  # of the activations on the vectors given (None: none given)


def decoder_cosines(parent, child) -> torch.Tensor:
    """[parent d_sae, child d_sae]: the cosine of every pair of decoder directions."""
    a = torch.nn.functional.normalize(parent.W_dec.detach().float(), dim=1)
    b = torch.nn.functional.normalize(child.W_dec.detach().float(), dim=1)
    return a @ b.T


@torch.no_grad()
def activation_correlations(parent, child, vectors: torch.Tensor) -> torch.Tensor:
    """[parent d_sae, child d_sae]: the Pearson correlation of every pair of latents'
    activations over `vectors` (a latent that never varies correlates 0 with all)."""

    def standardized(sae) -> torch.Tensor:
        z = sae.encode(vectors).float()
        z = z - z.mean(0)
        norm = z.norm(dim=0)
        return z / torch.where(norm > 0, norm, torch.ones_like(norm))

    return standardized(parent).T @ standardized(child)


def match_latents(parent, child, vectors: torch.Tensor | None = None) -> list[Match]:
    """The optimal one-to-one matching of the two SAEs' latents (min(d_sae) pairs), by
    decoder cosine, averaged with activation correlation when `vectors` are given."""
    if parent.d_in != child.d_in:
        raise SAEFormatError(
            f"the SAEs read different widths ({parent.d_in} and {child.d_in}): no matching"
        )
    cosine = decoder_cosines(parent, child)
    correlation = None
    score = cosine
    if vectors is not None:
        if vectors.ndim != 2 or vectors.shape[1] != parent.d_in or len(vectors) < 2:
            raise SAEFormatError(
                f"matching needs at least 2 vectors of width {parent.d_in}, not "
                f"{tuple(vectors.shape)}"
            )
        correlation = activation_correlations(parent, child, vectors.float())
        score = (cosine + correlation) / 2
    rows, cols = linear_sum_assignment(score.double().numpy(), maximize=True)
    return [
        Match(int(p), int(c), float(cosine[p, c]),
              None if correlation is None else float(correlation[p, c]))
        for p, c in zip(rows.tolist(), cols.tolist(), strict=True)
    ]  # fmt: skip


def holds(match: Match, min_cosine: float, min_correlation: float) -> bool:
    """Whether a pair keeps its meaning: decoder cosine at least `min_cosine` and, when
    activations were compared, correlation at least `min_correlation`."""
    if match.cosine < min_cosine:
        return False
    return match.correlation is None or match.correlation >= min_correlation


def carried_over(
    matches: list[Match], parent_ids: list[int], min_cosine: float, min_correlation: float
) -> tuple[dict[int, Match], list[int]]:
    """For the parent's latents `parent_ids` (its tagged features, say): ({parent id:
    its pair} where the pair holds, [the parent ids whose pair does not, or that have
    none])."""
    by_parent = {m.parent_id: m for m in matches}
    held, lost = {}, []
    for parent_id in sorted(set(parent_ids)):
        match = by_parent.get(parent_id)
        if match is not None and holds(match, min_cosine, min_correlation):
            held[parent_id] = match
        else:
            lost.append(parent_id)
    return held, lost
