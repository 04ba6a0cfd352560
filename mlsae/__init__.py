"""Multi-Layer Sparse Autoencoders: one TopK SAE trained on the residual stream of every layer."""

from mlsae.formats import mlsae_name
from mlsae.model import MLSAE, SAEConfig

__all__ = ["MLSAE", "SAEConfig", "mlsae_name"]
