"""The book's heavy stages, each skipped when its outputs already match its inputs.

- ``ensure_trained``: train a sweep (or a per-layer SAE), resume an interrupted one, or just
  return the folders of a finished one. A run is finished when its checkpoint says so and was
  made with the same options; the CLI (``python -m mlsae.train --config_path
  profiles/<name>.yaml``) and the notebook are interchangeable.
- ``ensure_evaluated``: ``mlsae.evaluate`` on one SAE, unless its results JSON was written with the
  same options after the SAE's weights.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd

from mlsae import native
from mlsae.formats import mlsae_name, sae_name
from mlsae.train import RESUMABLE, TrainConfig, train
from mlsae.utils import MLSAEError, atomic_write_text

from mlsae.book.profile import EvalConfig


# The modules whose code decides each cached stage's results: a change to any of them recomputes
# the stage (training is keyed on its options only: delete runs/<profile> to retrain after
# changing the training code).
EVAL_CODE = ("mlsae.evaluate", "mlsae.metrics", "mlsae.positions", "mlsae.model", "mlsae.formats", "mlsae.kernels", "mlsae.transformer", "mlsae.data")
PASS_CODE = ("mlsae.analysis.run", "mlsae.analysis.stream", "mlsae.positions", "mlsae.analysis.dists", "mlsae.analysis.variances",
             "mlsae.analysis.examples", "mlsae.analysis.common", "mlsae.model", "mlsae.formats", "mlsae.kernels", "mlsae.transformer",
             "mlsae.data")
RESID_CODE = ("mlsae.analysis.resid", "mlsae.analysis.common", "mlsae.positions", "mlsae.metrics", "mlsae.transformer", "mlsae.data")
DECODER_CODE = ("mlsae.analysis.decoder", "mlsae.analysis.dists", "mlsae.model", "mlsae.formats", "mlsae.transformer")


def code_digest(modules: tuple[str, ...]) -> str:
    """A hash of the source files of ``modules`` (part of every cached stage's key)."""
    import hashlib
    import importlib.util

    h = hashlib.sha256()
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin and Path(spec.origin).is_file():
            h.update(name.encode() + Path(spec.origin).read_bytes())
    return h.hexdigest()[:16]


def _stamp_path(folder: Path) -> Path:
    return folder / "book-stages.json"


def _stamp_ok(folder: Path, stage: str, digest: str) -> bool:
    path = _stamp_path(folder)
    return path.is_file() and json.loads(path.read_text()).get(stage) == digest


def _stamp(folder: Path, stage: str, digest: str) -> None:
    path = _stamp_path(folder)
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[stage] = digest
    atomic_write_text(path, json.dumps(data, indent=1))


def run_dirs(cfg: TrainConfig) -> list[Path]:
    """The folders ``train(cfg)`` writes its SAEs to, in sweep order."""
    return [Path(cfg.out_dir) / mlsae_name(cfg.model_name, ef, k) for ef, k in cfg.sweep()]


def _comparable(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in RESUMABLE}


def checkpoint_state(out_dir: str | Path) -> dict | None:
    path = Path(out_dir) / "checkpoint" / "trainer.json"
    return json.loads(path.read_text()) if path.is_file() else None


def train_status(cfg: TrainConfig) -> str:
    """``done``, ``partial`` (same options, can resume), ``stale`` (other options) or ``none``."""
    state = checkpoint_state(cfg.out_dir)
    if state is None:
        return "none"
    if _comparable(state["config"]) != _comparable(asdict(cfg)):
        return "stale"
    if state["step"] >= cfg.steps and all((d / "model.safetensors").is_file() for d in run_dirs(cfg)):
        return "done"
    return "partial"


def _remove_stale(cfg: TrainConfig) -> None:
    """Delete what an earlier run with other options wrote into ``cfg.out_dir`` (and only that)."""
    out = Path(cfg.out_dir)
    old = TrainConfig(**{k: v for k, v in checkpoint_state(out)["config"].items()
                         if k in TrainConfig.__dataclass_fields__})
    for path in [out / "checkpoint", out / "checkpoint.old", out / "checkpoint.tmp", *run_dirs(old), *run_dirs(cfg)]:
        shutil.rmtree(path, ignore_errors=True)


def ensure_trained(cfg: TrainConfig, *, retrain_stale: bool = True) -> tuple[list[Path], dict]:
    """Folders of the trained SAEs of ``cfg``, training (or resuming) only what is missing.

    Returns ``(folders, info)``; ``info`` says what happened (``status``) and the seconds spent.
    A checkpoint made with other options is replaced when ``retrain_stale`` (the book's runs
    folders belong to their profile), else it is an error.
    """
    status = train_status(cfg)
    start = time.perf_counter()
    if status == "stale":
        if not retrain_stale:
            raise MLSAEError(f"{cfg.out_dir} holds a run made with other options; remove it or choose another folder")
        _remove_stale(cfg)
    if status != "done":
        if cfg.malloc_tuning:
            native.tune_malloc()  # as the training command line does (the book runs in its own process)
        train(replace(cfg, resume=status == "partial"))
    return run_dirs(cfg), {"status": status, "seconds": time.perf_counter() - start}


def eval_path(out_dir: str | Path, run_dir: str | Path) -> Path:
    return Path(out_dir) / f"test_{sae_name(run_dir)}.json"


def ensure_evaluated(cfg: EvalConfig) -> tuple[dict, dict]:
    """``mlsae.evaluate`` results of ``cfg.sae`` (a local folder), computed unless up to date.

    Returns ``(results, info)``: the flat dict of CSV columns, and what happened.
    """
    from mlsae.evaluate import evaluate, write_results

    path = eval_path(cfg.out_dir, cfg.sae)
    weights = Path(cfg.sae) / "model.safetensors"
    digest = code_digest(EVAL_CODE)
    if path.is_file() and weights.is_file():
        saved = json.loads(path.read_text())
        if (saved.get("config") == asdict(cfg) and saved.get("code") == digest
                and path.stat().st_mtime >= weights.stat().st_mtime):
            return saved["results"], {"status": "cached", "seconds": saved.get("seconds", 0.0)}
    start = time.perf_counter()
    results = evaluate(cfg)
    seconds = time.perf_counter() - start
    write_results(results, cfg, sae_name(cfg.sae), extra={"seconds": seconds, "code": digest})
    return results, {"status": "computed", "seconds": seconds}


def main_run(cfg: TrainConfig, analysis: dict | None = None) -> Path:
    """The MLSAE of the sweep that the analyses look at: the profile's ``analysis``
    ``expansion_factor`` and ``k`` if the sweep has it, else the sweep's last (largest)."""
    analysis = analysis or {}
    want = (analysis.get("expansion_factor"), analysis.get("k"))
    for folder, pair in zip(run_dirs(cfg), cfg.sweep()):
        if pair == want:
            return folder
    return run_dirs(cfg)[-1]


def sae_config(run_dir: str | Path) -> dict:
    """A trained SAE's ``config.json`` as a dict."""
    return json.loads((Path(run_dir) / "config.json").read_text())


def sae_positions(run_dir: str | Path) -> str:
    """The position rule a trained SAE records, in words (``mlsae.positions``)."""
    from mlsae.model import MLSAE

    return MLSAE.from_pretrained(run_dir).config.positions.describe()


def _fresh(path: Path, config: dict, weights: Path) -> dict | None:
    """The JSON at ``path`` if it was written after ``weights`` with the same ``config``, else None."""
    if not (path.is_file() and weights.is_file()) or path.stat().st_mtime < weights.stat().st_mtime:
        return None
    saved = json.loads(path.read_text())
    return saved if saved.get("config") == json.loads(json.dumps(config)) else None


def analysis_dir(out_dir: str | Path, sae_folder: str | Path) -> Path:
    """Where the analyses of one SAE go: ``<out>/analysis/<SAE name>``."""
    return Path(out_dir) / "analysis" / sae_name(sae_folder)


def data_options(analysis: dict):
    """``mlsae.analysis`` data options from a profile's ``analysis`` section."""
    from dataclasses import fields

    from mlsae.analysis.common import DataOptions

    return DataOptions(**{f.name: analysis[f.name] for f in fields(DataOptions) if f.name in analysis})


def ensure_analysis_pass(sae_folder: str | Path, out_dir: str | Path, analysis: dict,
                         analyses: tuple[str, ...] = ("dists", "variances", "examples")) -> tuple[dict, dict]:
    """dists, variances and examples of one MLSAE from one pass over the held-out data
    (``mlsae.analysis.run``), unless ``run.json`` says they were made with the same options.

    Returns ``(run.json as a dict, info)``; the files are in ``analysis_dir(out_dir, sae_folder)``.
    """
    from mlsae.analysis.run import RunOptions, run

    out = analysis_dir(out_dir, sae_folder)
    opts = RunOptions(sae=str(sae_folder), data=data_options(analysis), out_dir=str(out),
                      n_examples=int(analysis.get("n_examples", 32)), n_tokens=int(analysis.get("n_tokens", 4)),
                      analyses=list(analyses))
    digest = code_digest(PASS_CODE)
    saved = _fresh(out / "run.json", asdict(opts), Path(sae_folder) / "model.safetensors")
    if saved is not None and _stamp_ok(out, "pass", digest):
        return saved, {"status": "cached", "seconds": 0.0}
    start = time.perf_counter()
    run(opts)
    _stamp(out, "pass", digest)
    saved = json.loads((out / "run.json").read_text())
    return saved, {"status": "computed", "seconds": time.perf_counter() - start}


def ensure_resid(model_name: str, out_dir: str | Path, analysis: dict) -> tuple[pd.DataFrame, dict, dict]:
    """Residual-stream geometry of ``model_name`` (``mlsae.analysis.resid``) over the profile's
    ``resid_tokens`` held-out tokens, unless ``resid.json`` holds it for the same options.

    Returns ``(per-layer table, resid.json, info)``; files in ``<out>/analysis/resid-<model>``.
    """
    from mlsae.analysis import resid

    data = data_options({**analysis, "max_tokens": analysis.get("resid_tokens", analysis.get("max_tokens"))})
    out = Path(out_dir) / "analysis" / f"resid-{sae_name(model_name)}"
    opts = resid.ResidOptions(model_name=model_name, data=data, out_dir=str(out))
    path = out / "resid.json"
    status, start = "cached", time.perf_counter()
    saved = json.loads(path.read_text()) if path.is_file() else None
    digest = code_digest(RESID_CODE)
    if (saved is None or saved.get("config") != json.loads(json.dumps(asdict(opts)))
            or not _stamp_ok(out, "resid", digest)):
        resid.run(opts)
        _stamp(out, "resid", digest)
        saved, status = json.loads(path.read_text()), "computed"
    return pd.read_csv(out / "resid.csv"), saved, {"status": status, "seconds": time.perf_counter() - start}


def ensure_decoder(sae_folder: str | Path, out_dir: str | Path, *, embeddings: bool = True) -> tuple[dict, dict]:
    """Decoder geometry of one MLSAE (``mlsae.analysis.decoder``: MMCS, embedding similarities,
    and, when the analysis pass's ``dists`` is there, cosine similarity against mean-layer
    difference), unless ``decoder.json`` is newer than the weights and the dists with the same options."""
    from mlsae.analysis import decoder

    out = analysis_dir(out_dir, sae_folder)
    path = out / "decoder.json"
    inputs = [Path(sae_folder) / "model.safetensors", out / "dists.safetensors"]
    newest = max((p.stat().st_mtime for p in inputs if p.exists()), default=0)
    status, start = "cached", time.perf_counter()
    saved = json.loads(path.read_text()) if path.is_file() else None
    digest = code_digest(DECODER_CODE)
    fresh = (saved is not None and path.stat().st_mtime >= newest and _stamp_ok(out, "decoder", digest)
             and saved["config"].get("embeddings") == embeddings and saved["config"].get("sae") == str(sae_folder))
    if not fresh:
        decoder.run(decoder.DecoderOptions(sae=str(sae_folder), embeddings=embeddings, out_dir=str(out)))
        _stamp(out, "decoder", digest)
        saved, status = json.loads(path.read_text()), "computed"
    return saved, {"status": status, "seconds": time.perf_counter() - start}


def write_tables(out_dir: str | Path) -> Path:
    """``mlsae.analysis.tables``: every evaluation under ``<out>/eval`` as ``<out>/analysis/tables.csv``
    (one row per SAE) and ``tables_layers.csv`` (one row per SAE, metric and layer)."""
    from mlsae.analysis import tables

    return tables.write(tables.collect(Path(out_dir) / "eval"), Path(out_dir) / "analysis")


def read_metrics(run_dir: str | Path):
    """A run's training log (``metrics.jsonl``) as a DataFrame."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return pd.DataFrame()
    return pd.DataFrame([json.loads(line) for line in path.read_text().splitlines() if line.strip()])
