"""Multi-Layer Sparse Autoencoders: one TopK SAE trained on the residual stream of every layer."""

from mlsae.model import MLSAE, SAEConfig, repo_id

__all__ = ["MLSAE", "SAEConfig", "repo_id"]
