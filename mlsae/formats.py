"""Where MLSAEs come from and what they are called: this project's folders (config.json +
model.safetensors, never a pickle), the reference implementation's two layouts (plain and
``-tfm``), hub repo ids, and the reference's naming (``mlsae-{model}-x{ef}-k{k}``)."""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from safetensors.torch import load_file
from torch import Tensor

from mlsae.model import MLSAE, SAEConfig, SAEOptions
from mlsae.utils import MLSAEError


def load(name: str, map_location: str = "cpu", lens: str | Path | None = None, **hub_kwargs) -> MLSAE:
    """An MLSAE from a local folder or a hub repo id, in this project's or the reference's layout."""
    return load_folder(_resolve(name, hub_kwargs), map_location, lens)


def load_folder(folder: Path, map_location: str = "cpu", lens: str | Path | None = None) -> MLSAE:
    """Load an MLSAE from a folder in this project's layout or either of the reference's layouts
    (``lens``: the tuned lens of a reference ``-lens`` checkpoint)."""
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    for p in (config_path, weights_path):
        if not p.is_file():
            raise MLSAEError(f"{p} not found: an MLSAE folder holds config.json and model.safetensors")
    try:
        raw = json.loads(config_path.read_text())
        state = load_file(weights_path, device=str(map_location))
    except Exception as e:  # JSON, I/O, and safetensors' own error types
        raise MLSAEError(f"cannot read MLSAE weights in {folder}: {e}") from e
    if "W_enc" in state:
        known = {f.name for f in fields(SAEConfig)}
        raw.setdefault("skip_first", 0)  # format 1 predates the rule: those MLSAEs saw position 0
        if raw.get("auxk", 0) is None:
            raw["auxk"] = 0  # older configs wrote null for off
        model = MLSAE(SAEConfig(**{k: v for k, v in raw.items() if k in known}))
        _load_state(model, state, folder)
    else:
        model = _from_reference(raw, state, lens)
    return model.to(map_location).eval()


def _load_state(model: MLSAE, state: dict[str, Tensor], folder: Path) -> None:
    """The weights into ``model``, or a one-line error naming what config.json and the weights disagree on."""
    expected = model.state_dict()
    wrong = [f"{k} is {list(state[k].shape)} in the weights, {list(v.shape)} by config.json"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if wrong or missing or extra:
        parts = wrong + ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unexpected {', '.join(extra)}"] if extra else [])
        raise MLSAEError(f"{folder}: config.json does not match model.safetensors ({'; '.join(parts)})")
    model.load_state_dict(state)


def _from_reference(raw: dict, state: dict[str, Tensor], lens: str | Path | None = None) -> MLSAE:
    """Translate a checkpoint written by the reference implementation (plain, ``-tfm`` or ``-lens``)."""
    from mlsae.lens import TunedLens

    prefix = "autoencoder." if "autoencoder.encoder.weight" in state else ""
    if f"{prefix}encoder.weight" not in state:
        raise MLSAEError(f"unrecognised MLSAE checkpoint: tensors {sorted(state)[:5]}...")
    if raw.get("tuned_lens") and lens is None:
        raise MLSAEError("this reference checkpoint was trained on tuned-lens residuals, and its lens is not stored with "
                         "it: load it with lens=<lens.safetensors of the same model> (mlsae.lens)")
    W_enc = state[f"{prefix}encoder.weight"]
    n_latents, n_inputs = W_enc.shape
    layers = raw.get("layers")
    n_layers = len(layers) if layers else _count_blocks(state) or 1
    options = {k: raw.get(k, default) for k, default in SAEOptions().sae_options().items()}
    options.update(auxk=options["auxk"] or 0,  # the reference writes null for off
                   skip_first=0)  # the reference trains on every non-special position
    config = SAEConfig(n_inputs=n_inputs, n_latents=n_latents, k=raw.get("k", SAEConfig.k), n_layers=n_layers,
                       layers=list(layers) if layers else None, model_name=raw.get("model_name"),
                       tuned_lens=bool(raw.get("tuned_lens")), **options)
    model = MLSAE(config)
    with torch.no_grad():
        model.W_enc.copy_(W_enc)
        model.W_dec.copy_(state[f"{prefix}decoder.weight"].T)
        model.b_pre.copy_(state[f"{prefix}pre_encoder_bias"])
        if config.tuned_lens:
            model.set_lens(TunedLens.load(lens))
    return model


def _count_blocks(state: dict[str, Tensor]) -> int:
    """Number of transformer blocks in a ``-tfm`` checkpoint (``...layers.{i}.`` keys)."""
    ids = {int(part) for key in state if key.startswith("transformer.")
           for prev, part in zip(key.split("."), key.split(".")[1:]) if prev in ("layers", "h") and part.isdigit()}
    return len(ids)


def _resolve(model_id: str, hub_kwargs: dict) -> Path:
    """A local folder as is; a hub repo id downloaded (config.json and model.safetensors only)."""
    if os.path.isdir(model_id):
        return Path(model_id)
    allowed = ("revision", "cache_dir", "force_download", "token", "local_files_only")
    opts = {k: v for k, v in hub_kwargs.items() if k in allowed}
    try:
        config = hf_hub_download(model_id, "config.json", **opts)
        hf_hub_download(model_id, "model.safetensors", **opts)
    except Exception as e:  # offline, unknown repo, no safetensors file (we never unpickle)
        raise MLSAEError(f"cannot load MLSAE '{model_id}': not a local folder, and from the hub: {e}") from e
    return Path(config).parent


def sae_name(name: str) -> str:
    """The last part of a folder, hub id or model name, without a scheme: ``runs/default/mlsae-x-x8-k32/``
    and ``owner/mlsae-x-x8-k32`` are both ``mlsae-x-x8-k32``; ``embedded:SmolLM2-135M-Instruct`` is
    ``SmolLM2-135M-Instruct``."""
    return Path(str(name).rstrip("/")).name.split(":")[-1]


def mlsae_name(model_name: str, expansion_factor: int, k: int, *, lens: bool = False, tfm: bool = False,
               owner: str | None = None) -> str:
    """Hub repo id in the reference's naming: ``[owner/]mlsae-{model}-x{ef}-k{k}[-lens][-tfm]`` (``sae_name``
    of the model's name)."""
    name = f"mlsae-{sae_name(model_name)}-x{expansion_factor}-k{k}" + ("-lens" if lens else "") + ("-tfm" if tfm else "")
    return f"{owner}/{name}" if owner else name
