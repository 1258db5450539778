"""Which token positions get copied. Reproducible: the same seed picks the same positions."""

from __future__ import annotations

import torch


class TokenSampler:
    """Bernoulli sampling of token positions at a fixed fraction."""

    def __init__(self, fraction: float, seed: int = 0):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"sample fraction must be in [0, 1], got {fraction}")
        self.fraction = fraction
        self._generator = torch.Generator().manual_seed(seed)

    def mask(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A boolean mask of `shape`; each entry is True with probability `fraction`."""
        if self.fraction >= 1.0:
            return torch.ones(shape, dtype=torch.bool)
        if self.fraction <= 0.0:
            return torch.zeros(shape, dtype=torch.bool)
        return torch.rand(shape, generator=self._generator) < self.fraction
