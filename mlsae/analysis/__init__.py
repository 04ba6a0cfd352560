"""Analyses of trained MLSAEs and of the residual stream (arXiv 2409.04185, sections 4-5).

One pass over held-out data feeds the per-token analyses (``dists``, ``variances``,
``examples``; ``python -m mlsae.analysis.run`` runs them together); the others read weights
(``decoder``), run the transformer alone (``resid``), one prompt (``prompt``) or collect
evaluation results (``tables``). Every module is also a CLI: ``python -m mlsae.analysis.<name> -h``.
Outputs are open formats (safetensors, parquet, CSV, JSON) under ``out/analysis/<name>/``.
"""
