"""Pure-torch sparse autoencoders: models, SAELens-format files, sharding, training.

May import: errors. Never ray.
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
