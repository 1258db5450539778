"""Which token positions get copied: the sampling policy of one model's replicas.

Four rules, applied per generate call:
- request_fraction: a request is chosen (all of its tokens eligible) with this probability;
- token_fraction: each eligible token position is kept with this probability;
- always: requests flagged by the client (header or tag) keep every token, whatever the
  fractions and the budget say;
- max_vectors_per_s: a token bucket per replica caps the vectors copied per second; when
  a call wants more than the bucket holds, a random subset is kept.

Decisions come from one seeded generator, so the same seed and the same traffic pick the
same positions (the budget depends on wall time, so it is reproducible only when it does
not bind).
"""

from __future__ import annotations

import time

import torch


class SamplingPolicy:
    def __init__(
        self,
        token_fraction: float = 1.0,
        *,
        request_fraction: float = 1.0,
        max_vectors_per_s: float | None = None,
        seed: int = 0,
        clock=time.monotonic,
    ):
        for name, value in (
            ("token_fraction", token_fraction),
            ("request_fraction", request_fraction),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if max_vectors_per_s is not None and max_vectors_per_s <= 0:
            raise ValueError(f"max_vectors_per_s must be positive, got {max_vectors_per_s}")
        self.token_fraction = token_fraction
        self.request_fraction = request_fraction
        self.max_vectors_per_s = max_vectors_per_s
        self._generator = torch.Generator().manual_seed(seed)
        self._clock = clock
        # The bucket holds at most one second of budget and starts full.
        self._bucket = float(max_vectors_per_s or 0.0)
        self._last_refill = clock()
        self.budget_dropped = 0  # vectors the budget refused

    def _bernoulli(self, shape: tuple[int, ...], p: float) -> torch.Tensor:
        if p >= 1.0:
            return torch.ones(shape, dtype=torch.bool)
        if p <= 0.0:
            return torch.zeros(shape, dtype=torch.bool)
        return torch.rand(shape, generator=self._generator) < p

    def select_requests(self, always: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, always) boolean vectors over the rows of one generate call."""
        flags = torch.tensor(always, dtype=torch.bool)
        chosen = self._bernoulli((len(always),), self.request_fraction) | flags
        return chosen, flags

    def token_mask(
        self,
        shape: tuple[int, int],
        chosen: torch.Tensor | None = None,
        always: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Positions to copy in a [batch, seq] block (before padding is masked out)."""
        mask = self._bernoulli(shape, self.token_fraction)
        if chosen is not None:
            mask &= chosen[:, None]
        if always is not None:
            mask |= always[:, None]
        return mask

    def apply_budget(self, mask: torch.Tensor, always: torch.Tensor | None = None) -> torch.Tensor:
        """Trim `mask` to what the per-replica vectors/s budget allows; always-rows pass."""
        if self.max_vectors_per_s is None:
            return mask
        now = self._clock()
        rate = self.max_vectors_per_s
        self._bucket = min(rate, self._bucket + (now - self._last_refill) * rate)
        self._last_refill = now
        exempt = always[:, None].expand_as(mask) & mask if always is not None else None
        limited = mask & ~exempt if exempt is not None else mask
        wanted = int(limited.sum())
        allowed = int(self._bucket)
        if wanted <= allowed:
            self._bucket -= wanted
            return mask
        flat = limited.flatten().nonzero().squeeze(1)
        keep = flat[torch.randperm(len(flat), generator=self._generator)[:allowed]]
        trimmed = torch.zeros(mask.numel(), dtype=torch.bool)
        trimmed[keep] = True
        trimmed = trimmed.view_as(mask)
        self._bucket -= allowed
        self.budget_dropped += wanted - allowed
        return trimmed | exempt if exempt is not None else trimmed


class TokenSampler(SamplingPolicy):
    """Only a token fraction: the simplest policy."""

    def __init__(self, fraction: float, seed: int = 0):
        super().__init__(fraction, seed=seed)

    def mask(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self._bernoulli(shape, self.token_fraction)
