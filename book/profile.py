"""Profiles: one YAML file per way of running the whole pipeline (``profiles/<name>.yaml``).

A profile holds the parameters of every stage, so that ``make all PROFILE=<name>`` and every
notebook of the book agree on them:

- ``train``: options of ``mlsae.train`` for the sweep and its per-layer baselines (the file
  doubles as its config: ``python -m mlsae.train --config_path profiles/<name>.yaml``);
- ``transfer``: ``mlsae.evaluate`` options that differ from ``evaluate`` for evaluating each
  per-layer SAE at every layer (the baselines chapter's transfer matrix);
- ``evaluate``: options of ``mlsae.evaluate`` for every trained SAE;
- ``lens``: options of ``mlsae.lens`` for the tuned lens that ``train.lens_copy`` trains a copy of
  the main MLSAE on (fitted once per options, into ``<sweep folder>/lens-<digest>``);
- ``analysis``: which MLSAE of the sweep the analyses look at, token budgets and prompts;
- ``fetch``: what ``make fetch`` prepares (``embedded``, ``tiny`` or ``hub``).

Every notebook's ``parameters`` cell names the profile and may override single values.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from mlsae.train import TrainConfig
from mlsae.utils import MLSAEError

from mlsae.evaluate import EvalConfig
from mlsae.lens import LensConfig


def repo_root() -> Path:
    """The project folder: the book package lives in its ``book/`` folder, beside the notebooks."""
    return Path(__file__).resolve().parents[1]


def profile_path(name: str | Path) -> Path:
    """``profiles/<name>.yaml`` (looked up in the working folder, then in the project), or a path."""
    name = str(name)
    if name.endswith((".yaml", ".yml")) or "/" in name:
        path = Path(name)
        if not path.is_file():
            raise MLSAEError(f"profile file {name!r} not found")
        return path
    for base in (Path.cwd(), repo_root()):
        path = base / "profiles" / f"{name}.yaml"
        if path.is_file():
            return path
    known = sorted(p.stem for p in (repo_root() / "profiles").glob("*.yaml"))
    raise MLSAEError(f"unknown profile {name!r}; known profiles: {', '.join(known) or 'none'}")


def _only_known(cls, values: dict, where: str) -> dict:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise MLSAEError(f"{where}: unknown option(s) {', '.join(unknown)} for {cls.__name__}")
    return values


def _digest(values: dict) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _drop_none(overrides: dict) -> dict:
    return {k: v for k, v in overrides.items() if v is not None}


@dataclass
class Profile:
    """A loaded profile; ``data`` is the YAML as a dict."""

    name: str
    path: Path
    data: dict

    @classmethod
    def load(cls, name: str | Path) -> Profile:
        path = profile_path(name)
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict) or "train" not in data:
            raise MLSAEError(f"{path}: a profile needs a top-level 'train:' section (the train options)")
        return cls(data.get("name", path.stem), path, data)

    def section(self, key: str) -> dict:
        return copy.deepcopy(self.data.get(key) or {})

    @property
    def description(self) -> str:
        return " ".join(str(self.data.get("description", "")).split())

    # ----- paths

    def runs_dir(self, override: str | None = None) -> Path:
        """Where trained SAEs go: ``runs/<profile>`` unless overridden."""
        return Path(override) if override else Path("runs") / self.name

    def out_dir(self, override: str | None = None) -> Path:
        """Where evaluations, analyses, results and executed notebooks go: ``out/<profile>``."""
        return Path(override) if override else Path("out") / self.name

    def deadline(self, build_start: str | None) -> float | None:
        """When a build that started at ``build_start`` (epoch seconds; ``make`` passes its own start)
        must be done: plus ``performance.budget_minutes``. None without either."""
        minutes = self.section("performance").get("budget_minutes")
        return float(build_start) + 60 * minutes if build_start and minutes else None

    # ----- stage configurations

    def train_config(self, runs_dir: str | Path | None = None, **overrides: Any) -> TrainConfig:
        """The sweep's ``TrainConfig``; ``None`` overrides keep the profile's value.

        ``runs_dir`` moves the sweep to ``<runs_dir>/sweep`` (the profile's own ``out_dir``
        is ``runs/<profile>/sweep``).
        """
        values = self.section("train")
        changed = {k: v for k, v in _drop_none(overrides).items() if values.get(k) != v}
        values.update(changed)
        # Overridden options train into their own folder, so that an experiment never replaces the
        # profile's runs (a run whose options changed is retrained in place).
        sweep = "sweep" if not changed else "sweep-" + _digest(changed)
        if runs_dir is not None:
            values["out_dir"] = str(Path(runs_dir) / sweep)
        elif changed or "out_dir" not in values:
            values["out_dir"] = str(Path(values.get("out_dir", self.runs_dir() / "sweep")).with_name(sweep))
        if values.get("lens_copy") and "tuned_lens" not in changed:
            lens = self.lens_values(values["model_name"]) if "model_name" in values else None
            if lens is None:
                raise MLSAEError(f"{self.path}: train.lens_copy needs a lens: section (the mlsae.lens options)")
            values["tuned_lens"] = str(Path(values["out_dir"]) / f"lens-{_digest(lens)}")
        return TrainConfig(**_only_known(TrainConfig, values, f"{self.path} train"))

    def lens_values(self, model_name: str) -> dict | None:
        """The ``lens`` section's ``mlsae.lens`` options for ``model_name`` (None without a section)."""
        if "lens" not in self.data:
            return None
        return _only_known(LensConfig, {**self.section("lens"), "model_name": model_name}, f"{self.path} lens")

    def lens_config(self, cfg: TrainConfig) -> LensConfig:
        """The ``mlsae.lens`` options of the tuned lens that ``cfg`` trains with (``cfg.tuned_lens``)."""
        values = self.lens_values(cfg.model_name)
        if values is None or not cfg.tuned_lens:
            raise MLSAEError(f"{self.path}: this sweep trains with no tuned lens (train.lens_copy and a lens: section)")
        return LensConfig(**values, out_dir=cfg.tuned_lens)

    def eval_config(self, sae: str | Path, out_dir: str | Path, **overrides: Any) -> EvalConfig:
        """``mlsae.evaluate`` options for one trained SAE; results go to ``out_dir``."""
        values = self.section("evaluate")
        values.update(_drop_none(overrides))
        values.update(sae=str(sae), out_dir=str(out_dir))
        return EvalConfig(**_only_known(EvalConfig, values, f"{self.path} evaluate"))

    def analysis(self, **overrides: Any) -> dict:
        values = self.section("analysis")
        values.update(_drop_none(overrides))
        return values



def load_profile(name: str | Path) -> Profile:
    return Profile.load(name)
