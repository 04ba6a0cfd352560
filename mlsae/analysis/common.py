"""What the analysis CLIs share: options, loading an MLSAE with its transformer, output folders."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from simple_parsing import ArgumentParser

from mlsae.data import DataOptions
from mlsae.formats import sae_name
from mlsae.model import MLSAE
from mlsae.train import pick_device
from mlsae.transformer import Transformer, transformer_for
from mlsae.utils import MLSAEError, atomic_write_text, check_out_dir, sae_option

C = TypeVar("C")


@dataclass
class PassOptions:
    """An MLSAE, its transformer, held-out data and where the results go."""

    sae: str = sae_option()
    model_name: str | None = None
    """Transformer (default: the one named in the MLSAE's config)."""
    data: DataOptions = field(default_factory=DataOptions)
    """Held-out data (the MLSAE's position rule applies to every analysis)."""
    out_dir: str | None = None
    """Output folder (default: out/analysis/<MLSAE name>)."""

    @property
    def out(self) -> Path:
        return output_dir(self.out_dir, self.sae)


def output_dir(out_dir: str | None, name: str) -> Path:
    """``out_dir`` if given, else ``out/analysis/<name of the MLSAE or model>``."""
    return Path(out_dir) if out_dir else Path("out") / "analysis" / sae_name(name)


def parse(config: type[C], argv: list[str] | None, description: str | None) -> C:
    """Parse ``argv`` into ``config`` (field docstrings are the help texts)."""
    parser = ArgumentParser(description=description, add_config_path_arg=False)
    parser.add_arguments(config, dest="cfg")
    cfg = parser.parse_args(argv).cfg
    if getattr(cfg, "out_dir", None):
        check_out_dir(cfg.out_dir)
    return cfg


def load_sae(name: str, device: str | torch.device = "cpu") -> MLSAE:
    return MLSAE.from_pretrained(name).to(device).eval().requires_grad_(False)


def load_pair(name: str, model_name: str | None = None,
              device: str = "auto") -> tuple[MLSAE, Transformer, list[int]]:
    """The MLSAE, its transformer and the transformer layers it reads (in its order)."""
    dev = pick_device(device)
    sae = load_sae(name, dev)
    transformer = transformer_for(sae, model_name, dev, name)
    layers = list(sae.config.layers) if sae.config.layers else list(range(transformer.n_layers))
    if len(layers) != sae.config.n_layers:
        raise MLSAEError(f"the MLSAE reads {sae.config.n_layers} layers but {transformer.name} has {transformer.n_layers}")
    return sae, transformer, layers


def finite(x: Any) -> Any:
    """Floats (possibly nested in dicts and lists) with NaN and inf as None, so JSON stays standard."""
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_json(path: Path, data: dict) -> Path:
    atomic_write_text(path, json.dumps(finite(data), indent=2) + "\n")
    return path


def config_dict(cfg: Any) -> dict:
    return asdict(cfg)
