"""Evaluation results of a sweep as one table: ``python -m mlsae.analysis.tables --root out``.

Collects every ``test_*.json`` written by ``mlsae.evaluate`` under ``--root`` (``test_*.csv`` where
no JSON sits beside it) into one row per MLSAE with its model, expansion factor, k and layers,
read from the MLSAE's config.json when its folder still exists, else parsed from its name
(``mlsae-{model}-x{ef}-k{k}``). Metric columns keep mlsae.evaluate's names (``train/fvu/avg``,
``val/loss/delta/layer_3``, ...; definitions in ``mlsae.metrics``). Writes ``tables.csv``
(wide) and ``tables_layers.csv`` (long: one row per MLSAE, metric and layer).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mlsae.analysis.common import parse
from mlsae.formats import sae_name
from mlsae.utils import MLSAEError, atomic_path, run_cli

NAME = re.compile(r"^mlsae-(?P<model>.+)-x(?P<ef>\d+)-k(?P<k>\d+)(?:-tfm)?$")
PER_LAYER = re.compile(r"^(?P<metric>.+)/layer_(?P<layer>\d+)$")
KEYS = ["name", "model", "expansion_factor", "k", "n_latents", "layers", "n_layers", "source"]


def find_results(root: str | Path) -> list[Path]:
    """``test_*.json`` files, and ``test_*.csv`` files without a JSON twin, under ``root``."""
    root = Path(root)
    found = sorted(root.rglob("test_*.json"))
    stems = {p.with_suffix("") for p in found}
    found += [p for p in sorted(root.rglob("test_*.csv")) if p.with_suffix("") not in stems]
    return sorted(found)


def layers_label(layers: list[int] | None) -> str | None:
    """``[0, 1, 2, 3]`` -> ``"0-3"``, ``[5]`` -> ``"5"``, others comma-separated."""
    if not layers:
        return None
    if len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def describe_sae(sae: str, stem: str) -> dict:
    """Model, expansion factor, k and layers of an MLSAE, from its config.json or else its name."""
    name = sae_name(sae) if sae else stem
    info: dict = {"name": name, "model": None, "expansion_factor": None, "k": None, "n_latents": None,
                  "layers": None, "n_layers": None}
    config = Path(sae) / "config.json" if sae else None
    if config is not None and config.is_file():
        raw = json.loads(config.read_text())
        if "n_latents" in raw and "n_inputs" in raw:
            info.update(expansion_factor=raw["n_latents"] // raw["n_inputs"], n_latents=raw["n_latents"],
                        k=raw.get("k"), layers=layers_label(raw.get("layers")), n_layers=raw.get("n_layers"))
        if raw.get("model_name"):
            info["model"] = sae_name(raw["model_name"])
    match = NAME.match(name)
    if match:
        info["model"] = info["model"] or match["model"]
        info["expansion_factor"] = info["expansion_factor"] or int(match["ef"])
        info["k"] = info["k"] or int(match["k"])
    return info


def read_result(path: Path) -> dict:
    """One row: the MLSAE's description and its metrics."""
    if path.suffix == ".json":
        raw = json.loads(path.read_text())
        config = raw.get("config", {})
        results, sae = raw.get("results", {}), config.get("sae", config.get("repo_id", ""))  # older files: repo_id
    else:
        rows = pd.read_csv(path).to_dict("records")
        if len(rows) != 1:
            raise MLSAEError(f"{path} should hold one row of results, found {len(rows)}")
        results, sae = rows[0], ""
    stem = path.stem.removeprefix("test_")
    return {**describe_sae(sae, stem), "source": str(path), **results}


def collect(root: str | Path) -> pd.DataFrame:
    """Every result under ``root``, one row each, sorted by model, layers, expansion factor and k."""
    paths = find_results(root)
    if not paths:
        raise MLSAEError(f"no test_*.json or test_*.csv under {root}: run python -m mlsae.evaluate first")
    df = pd.DataFrame([read_result(p) for p in paths])
    return df.sort_values(["model", "layers", "expansion_factor", "k", "name"], na_position="last",
                          ignore_index=True)


def per_layer(df: pd.DataFrame) -> pd.DataFrame:
    """Long format of the ``<metric>/layer_<l>`` columns: the description columns, metric, layer, value."""
    keys = [c for c in KEYS if c in df.columns]
    cols = {c: PER_LAYER.match(c) for c in df.columns}
    cols = {c: m for c, m in cols.items() if m}
    long = df.melt(id_vars=keys, value_vars=list(cols), var_name="column", value_name="value").dropna(subset=["value"])
    long["metric"] = long["column"].map(lambda c: cols[c]["metric"])
    long["layer"] = long["column"].map(lambda c: int(cols[c]["layer"]))
    return long.drop(columns="column").sort_values(keys[:1] + ["metric", "layer"], ignore_index=True)


@dataclass
class TablesOptions:
    root: str = "out"
    """Folder searched (recursively) for test_*.json / test_*.csv."""
    out_dir: str = "out/analysis"
    """Where tables.csv and tables_layers.csv go."""


def write(df: pd.DataFrame, out: Path) -> Path:
    """``tables.csv`` (one row per SAE) and ``tables_layers.csv`` (per SAE, metric and layer) in ``out``."""
    with atomic_path(out / "tables.csv") as tmp:
        df.to_csv(tmp, index=False)
    with atomic_path(out / "tables_layers.csv") as tmp:
        per_layer(df).to_csv(tmp, index=False)
    return out / "tables.csv"


def main(argv: list[str] | None = None) -> None:
    cfg = parse(TablesOptions, argv, __doc__.split("\n\n")[0])
    df = collect(cfg.root)
    path = write(df, Path(cfg.out_dir))
    show = [c for c in ["name", "layers", "train/fvu/avg", "train/mse/avg", "train/l0/avg", "val/loss/delta/avg",
                        "val/logit/kldiv/avg"] if c in df.columns]
    print(df[show].to_string(index=False))
    print(path)


if __name__ == "__main__":
    run_cli(main)
