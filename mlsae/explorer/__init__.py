"""The prompt explorer: ``core`` computes every view's values (tested directly), ``figures`` draws
them with plotly, ``app`` wires them to ipywidgets (``make explore`` serves it with Voilà)."""

from mlsae.explorer.core import Explorer, ExplorerInputError, PromptRun, load_explorer

__all__ = ["Explorer", "ExplorerInputError", "PromptRun", "load_explorer"]
