"""Multi-Layer Sparse Autoencoders: one TopK SAE trained on the residual stream of every layer."""

from mlsae.model import MLSAE, SAEConfig, mlsae_name

__all__ = ["MLSAE", "SAEConfig", "mlsae_name"]
