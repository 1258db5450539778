"""Pure-torch sparse autoencoders: model, SAELens-format files, training step, metrics.

Never imports ray.
"""

from featurewatch.sae.model import SAE, TopKSAE, load

__all__ = ["SAE", "TopKSAE", "load"]
