"""Pure-torch sparse autoencoders: models, SAELens-format files, sharding, training.

Never imports ray.
"""

from featurewatch.sae.model import (
    SAE,
    BatchTopKSAE,
    JumpReLUSAE,
    ReLUSAE,
    SparseAutoencoder,
    TopKSAE,
    build,
    load,
)

__all__ = [
    "SAE",
    "BatchTopKSAE",
    "JumpReLUSAE",
    "ReLUSAE",
    "SparseAutoencoder",
    "TopKSAE",
    "build",
    "load",
]
