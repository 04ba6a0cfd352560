"""Export an MLSAE for other tools: ``python -m mlsae.export --sae S --to saelens --out DIR``.

SAELens (and through it SAEBench, SAEDashboard and Neuronpedia) has no multi-layer SAE, so an
MLSAE becomes one SAELens TopK SAE per layer, ``DIR/layer_<l>/`` with ``cfg.json`` and
``sae_weights.safetensors``, all sharing the MLSAE's weights:

- ``W_enc = W_enc.T``, ``b_enc = 0``, ``W_dec = W_dec``, ``b_dec = b_pre``, ``apply_b_dec_to_input``:
  SAELens computes ``TopK(ReLU)((x' - b_dec) W_enc + b_enc)`` and ``a W_dec + b_dec``, as the MLSAE does;
- the per-token standardization is SAELens' ``normalize_activations: layer_norm`` (mean, unbiased
  std, ``/ (std + 1e-5)``), the same encoder input; SAELens de-standardizes with ``std`` where the
  MLSAE uses ``std + 1e-5``, a relative difference of 1e-5 / std in the reconstruction;
- ``metadata``: the model, the hook of the layer's block output (TransformerLens'
  ``blocks.<l>.hook_resid_post``), and under ``mlsae`` the source, the layer and the position rule
  (the positions the MLSAE leaves out, which the user of the export should leave out too).

What SAELens cannot express is refused with a one-line reason, rather than written as an SAE that
computes something else: a tuned lens in front of the SAE (an affine map per layer before the
encoder and its inverse after the decoder).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from simple_parsing import ArgumentParser
from simple_parsing import field as flag

from mlsae.model import MLSAE, STD_EPS
from mlsae.utils import MLSAEError, check_out_dir, run_cli, sae_option

SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_CONFIG = "cfg.json"
# The SAELens release whose cfg.json format this writes (tests/test_export.py loads it with that
# release); SAELens reads a config without it as a pre-6.0 one and drops the metadata.
SAELENS_FORMAT = "6.54.12"


@dataclass
class ExportConfig:
    """Options of ``python -m mlsae.export``."""

    sae: str = sae_option()
    out: str = ""
    """Folder to write (one sub-folder per layer); it must not exist yet, or be empty."""
    to: str = flag(default="saelens", choices=["saelens"])
    """The format."""
    model_name: str | None = None
    """The model name written into the metadata (default: the MLSAE's; give the hub id that SAELens
    or SAEBench should load)."""


def saelens_refusal(sae: MLSAE) -> str | None:
    """Why this MLSAE cannot be written as SAELens SAEs that compute the same thing, or None."""
    if sae.config.tuned_lens:
        return ("it reads residuals through a tuned lens (an affine map per layer before the encoder and its inverse "
                "after the decoder), which SAELens cannot express")
    return None


def saelens_layers(sae: MLSAE, model_name: str | None = None) -> dict[int, tuple[dict, dict[str, torch.Tensor]]]:
    """Per transformer layer: the SAELens ``cfg.json`` and weights of the MLSAE at that layer."""
    reason = saelens_refusal(sae)
    if reason:
        raise MLSAEError(f"cannot export to SAELens: {reason}")
    cfg = sae.config
    weights = {"W_enc": sae.W_enc.detach().T.contiguous().float(), "b_enc": torch.zeros(cfg.n_latents),
               "W_dec": sae.W_dec.detach().contiguous().float(), "b_dec": sae.b_pre.detach().contiguous().float()}
    layers = cfg.layers or list(range(cfg.n_layers))
    out = {}
    for layer in layers:
        metadata = {
            "sae_lens_version": SAELENS_FORMAT,
            "model_name": model_name or cfg.model_name,
            "hook_name": f"blocks.{layer}.hook_resid_post",
            "hook_head_index": None,
            "prepend_bos": True,
            "exclude_special_tokens": cfg.skip_special_tokens,
            "mlsae": {"layer": layer, "layers": layers, "n_layers": cfg.n_layers,
                      "position_rule": asdict(cfg.positions), "position_rule_text": cfg.positions.describe(),
                      "standardize_eps": STD_EPS if cfg.standardize else None},
        }
        config = {"architecture": "topk", "d_in": cfg.n_inputs, "d_sae": cfg.n_latents, "k": cfg.k,
                  "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
                  "normalize_activations": "layer_norm" if cfg.standardize else "none",
                  "reshape_activations": "none", "rescale_acts_by_decoder_norm": False, "metadata": metadata}
        out[layer] = (config, weights)
    return out


def export_saelens(sae: MLSAE, out: str | Path, model_name: str | None = None, source: str | None = None) -> list[Path]:
    """Write ``out/layer_<l>/`` for every layer of ``sae``, all or nothing (a temporary folder renamed
    into place); returns the folders."""
    out = check_out_dir(out, "--out")
    if out.exists() and any(out.iterdir()):
        raise MLSAEError(f"--out {out} is not empty: choose a new folder")
    layers = saelens_layers(sae, model_name)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for layer, (config, weights) in layers.items():
            folder = tmp / f"layer_{layer}"
            folder.mkdir(parents=True)
            if source:
                config["metadata"]["mlsae"]["source"] = source
            (folder / SAELENS_CONFIG).write_text(json.dumps(config, indent=2))
            save_file(weights, folder / SAELENS_WEIGHTS)
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [out / f"layer_{layer}" for layer in layers]


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], add_config_path_arg=False)
    parser.add_arguments(ExportConfig, dest="cfg")
    cfg = parser.parse_args(argv).cfg
    if not cfg.out:
        raise MLSAEError("--out is required: the folder to write")
    check_out_dir(cfg.out, "--out")
    sae = MLSAE.from_pretrained(cfg.sae)
    for folder in export_saelens(sae, cfg.out, cfg.model_name, cfg.sae):
        print(folder)


if __name__ == "__main__":
    run_cli(main)
