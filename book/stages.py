"""The book's heavy stages, each computed once and reused while its inputs stay the same.

One rule decides every derived stage (evaluation, the analysis pass, residual geometry, decoder
geometry): a stage is fresh when the stamp file of its output folder (``book-stages.json``)
records the same key, and its outputs exist. The key is the stage's options, a hash of the
source of the modules that compute it, and hashes of the files it reads (the SAE's weights).
``cached`` applies it.

Training is the exception, on purpose: its checkpoint records its options and training resumes
from it (``mlsae.train --resume``), so the CLI and the book share one rule there, and a change
to the training code does not retrain (delete ``runs/<profile>`` for that).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd

from mlsae import native
from mlsae.formats import sae_name
from mlsae.train import RESUMABLE, TrainConfig, train
from mlsae.utils import MLSAEError, atomic_write_text

from book.profile import EvalConfig, LensConfig


# The modules whose code decides each cached stage's results: a change to any of them recomputes
# the stage.
EVAL_CODE = ("mlsae.evaluate", "mlsae.metrics", "mlsae.analysis.dists", "mlsae.positions", "mlsae.model", "mlsae.formats", "mlsae.kernels", "mlsae.transformer", "mlsae.data")
PASS_CODE = ("mlsae.analysis.run", "mlsae.analysis.stream", "mlsae.positions", "mlsae.analysis.dists", "mlsae.analysis.variances",
             "mlsae.analysis.examples", "mlsae.analysis.cards", "mlsae.analysis.common", "mlsae.model", "mlsae.formats",
             "mlsae.kernels", "mlsae.transformer", "mlsae.data")
RESID_CODE = ("mlsae.analysis.resid", "mlsae.lens", "mlsae.analysis.common", "mlsae.positions", "mlsae.metrics", "mlsae.transformer", "mlsae.data")
DECODER_CODE = ("mlsae.analysis.decoder", "mlsae.analysis.dists", "mlsae.model", "mlsae.formats", "mlsae.transformer")


def code_digest(modules: tuple[str, ...]) -> str:
    """A hash of the source files of ``modules`` (part of every cached stage's key)."""
    h = hashlib.sha256()
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin and Path(spec.origin).is_file():
            h.update(name.encode() + Path(spec.origin).read_bytes())
    return h.hexdigest()[:16]


def file_digest(path: Path) -> str | None:
    """A hash of a file's bytes (None if it does not exist)."""
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()[:16]


STAMPS = "book-stages.json"


def stage_key(options: dict, code: tuple[str, ...], inputs: tuple[Path, ...] = ()) -> dict:
    """What decides a stage's results: its options, the source of its ``code`` modules, the bytes of its ``inputs``."""
    return {"options": json.loads(json.dumps(options, default=str)), "code": code_digest(code),
            "inputs": {p.name: file_digest(p) for p in inputs}}


def _stamps(folder: Path) -> dict:
    path = folder / STAMPS
    return json.loads(path.read_text()) if path.is_file() else {}


def fresh(folder: Path, stage: str, key: dict, outputs: tuple[Path, ...]) -> dict | None:
    """The stamp of ``stage`` in ``folder`` if it holds ``key`` and every output exists, else None."""
    saved = _stamps(folder).get(stage) or {}
    return saved if saved.get("key") == key and all(p.exists() for p in outputs) else None


def unstamp(folder: Path, stage: str) -> None:
    """Forget ``stage`` before computing it, so that a stage killed half-way is computed again."""
    folder.mkdir(parents=True, exist_ok=True)
    stamps = _stamps(folder)
    if stamps.pop(stage, None) is not None:
        atomic_write_text(folder / STAMPS, json.dumps(stamps, indent=1))


def stamp(folder: Path, stage: str, key: dict, seconds: float) -> None:
    stamps = _stamps(folder)
    stamps[stage] = {"key": key, "seconds": seconds}
    atomic_write_text(folder / STAMPS, json.dumps(stamps, indent=1))


def cached(folder: Path, stage: str, *, options: dict, code: tuple[str, ...], inputs: tuple[Path, ...] = (),
           outputs: tuple[Path, ...], compute: Callable[[], object]) -> dict:
    """Run ``compute`` (which writes ``outputs``) unless ``folder``'s stamps hold this ``stage``
    with the same ``stage_key``.

    Returns ``{"status": "cached" | "computed", "seconds": ...}`` (the seconds computing took,
    also when cached).
    """
    key = stage_key(options, code, inputs)
    saved = fresh(folder, stage, key, outputs)
    if saved is not None:
        return {"status": "cached", "seconds": saved["seconds"]}
    unstamp(folder, stage)
    start = time.perf_counter()
    compute()
    seconds = time.perf_counter() - start
    stamp(folder, stage, key, seconds)
    return {"status": "computed", "seconds": seconds}


def member_dirs(cfg: TrainConfig) -> list[Path]:
    """The folders ``train(cfg)`` writes every SAE to (``TrainConfig.members``)."""
    return [Path(cfg.out_dir) / name for name, *_ in cfg.members()]


def run_dirs(cfg: TrainConfig) -> list[Path]:
    """The folders of the sweep's SAEs, in sweep order (the ``baselines`` and the lens copy aside)."""
    aside = {*baseline_dirs(cfg).values(), lens_dir(cfg)}
    return [folder for folder in member_dirs(cfg) if folder not in aside]


def baseline_dirs(cfg: TrainConfig) -> dict[int, Path]:
    """The folder of each per-layer baseline of ``cfg`` (``TrainConfig.baselines``), by layer."""
    return {layer: Path(cfg.out_dir) / cfg.baseline_name(*cfg.baseline_size, layer) for layer in cfg.baselines or []}


# The build's time budget: make passes its start (epoch seconds) to the notebooks it runs, and
# book.build turns it into a deadline (the profile's performance.budget_minutes later), by which
# ensure_trained plans training to end early enough for the chapters after it.
BUILD_START, DEADLINE = "MLSAE_BUILD_START", "MLSAE_DEADLINE"


def build_deadline() -> float | None:
    value = os.environ.get(DEADLINE)
    return float(value) if value else None


def _comparable(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in RESUMABLE}


def checkpoint_state(out_dir: str | Path) -> dict | None:
    path = Path(out_dir) / "checkpoint" / "trainer.json"
    return json.loads(path.read_text()) if path.is_file() else None


def train_status(cfg: TrainConfig) -> str:
    """``done``, ``partial`` (same options, can resume), ``stale`` (other options) or ``none``.

    A run that a time budget cut short is done under a budget (any: the plan is kept), and stale
    without one (the whole recipe is asked for)."""
    state = checkpoint_state(cfg.out_dir)
    if state is None:
        return "none"
    planned = state.get("steps", cfg.steps)
    budgeted = cfg.max_minutes is not None or build_deadline() is not None
    if _comparable(state["config"]) != _comparable(asdict(cfg)) or (planned < cfg.steps and not budgeted):
        return "stale"
    if state["step"] >= planned and all((d / "model.safetensors").is_file() for d in member_dirs(cfg)):
        return "done"
    return "partial"


def trained_tokens(cfg: TrainConfig) -> int:
    """The tokens that the run of ``cfg`` trains on: ``cfg.max_tokens``, or fewer where a time budget
    cut its plan (``mlsae.train.Pace``), as its checkpoint records."""
    state = checkpoint_state(cfg.out_dir) or {}
    return state.get("steps", cfg.steps) * cfg.tokens_per_step


def _remove_stale(cfg: TrainConfig) -> None:
    """Delete what an earlier run with other options wrote into ``cfg.out_dir`` (and only that)."""
    out = Path(cfg.out_dir)
    old = TrainConfig(**{k: v for k, v in checkpoint_state(out)["config"].items()
                         if k in TrainConfig.__dataclass_fields__})
    for path in [out / "checkpoint", out / "checkpoint.old", out / "checkpoint.tmp", *member_dirs(old), *member_dirs(cfg)]:
        shutil.rmtree(path, ignore_errors=True)


def ensure_trained(cfg: TrainConfig, *, retrain_stale: bool = True) -> tuple[list[Path], dict]:
    """Folders of the trained sweep of ``cfg`` (``run_dirs``; its baselines are in ``baseline_dirs``),
    training (or resuming) only what is missing.

    Returns ``(folders, info)``; ``info`` says what happened (``status``), the seconds spent, the
    tokens trained (``trained_tokens``) and what a time budget measured to plan them (``budget``,
    ``mlsae.train.Pace``; None where no budget was set or the run ended before it was planned).
    A checkpoint made with other options is replaced when ``retrain_stale`` (the book's runs
    folders belong to their profile), else it is an error. Under ``make`` training fits the build's
    time budget (``build_deadline``; ``cfg.reserve_steps`` leaves time for the chapters after it).
    """
    if cfg.tuned_lens and not Path(cfg.tuned_lens).exists():
        raise MLSAEError(f"{cfg.out_dir} trains on the tuned lens {cfg.tuned_lens}, which is not fitted yet: "
                         "run the train chapter first (book.ensure_lens)")
    status = train_status(cfg)
    start = time.perf_counter()
    if status == "stale":
        if not retrain_stale:
            raise MLSAEError(f"{cfg.out_dir} holds a run made with other options; remove it or choose another folder")
        _remove_stale(cfg)
    if status != "done":
        if cfg.malloc_tuning:
            native.tune_malloc()  # as the training command line does (the book runs in its own process)
        deadline = build_deadline()
        if deadline is not None and cfg.max_minutes is None:
            cfg = replace(cfg, max_minutes=max((deadline - time.time()) / 60, 0.1))
        train(replace(cfg, resume=status == "partial"))
    budget = (checkpoint_state(cfg.out_dir) or {}).get("budget")
    return run_dirs(cfg), {"status": status, "seconds": time.perf_counter() - start, "tokens": trained_tokens(cfg),
                           "budget": budget}


def ensure_lens(cfg: LensConfig) -> dict:
    """The tuned lens of ``cfg`` (``mlsae.lens``), fitted unless its folder already holds it; returns
    its ``lens.json`` report. Like training, a lens is made once per options (the profile names its
    folder after them), so that the MLSAE trained on it and the lens stay a pair."""
    from mlsae.lens import FILE, run

    out = Path(cfg.out_dir)
    if not ((out / FILE).is_file() and (out / "lens.json").is_file()):
        run(cfg)
    return json.loads((out / "lens.json").read_text())


def lens_dir(cfg: TrainConfig) -> Path | None:
    """The folder of the sweep's tuned-lens MLSAE (``TrainConfig.lens_copy``), if it trains one."""
    return next((Path(cfg.out_dir) / m.name for m in cfg.members() if m.lens and cfg.lens_copy), None)


def eval_path(out_dir: str | Path, run_dir: str | Path) -> Path:
    return Path(out_dir) / f"test_{sae_name(run_dir)}.json"


def eval_dists_path(out_dir: str | Path, run_dir: str | Path) -> Path:
    """Where an evaluation wrote its latents' counts and totals per layer (``Dists.load`` reads it)."""
    return Path(out_dir) / f"test_{sae_name(run_dir)}.dists.safetensors"


def ensure_evaluated(cfg: EvalConfig) -> tuple[dict, dict]:
    """``mlsae.evaluate`` results of ``cfg.sae`` (a local folder), computed unless up to date.

    Returns ``(results, info)``: the flat dict of CSV columns, and what happened.
    """
    return ensure_evaluated_many([cfg])[0]


def ensure_evaluated_many(cfgs: list[EvalConfig]) -> list[tuple[dict, dict]]:
    """``ensure_evaluated`` of each of ``cfgs``; those not up to date are computed together
    (``mlsae.evaluate.evaluate_many``: one transformer pass for the evaluations that share their data),
    each stamped with its share of the pass's time."""
    from mlsae.evaluate import evaluate_many, write_results

    def parts(cfg: EvalConfig) -> tuple[Path, str, dict, tuple[Path, ...]]:
        key = stage_key(asdict(cfg), EVAL_CODE, (Path(cfg.sae) / "model.safetensors",))
        outputs = (eval_path(cfg.out_dir, cfg.sae), eval_dists_path(cfg.out_dir, cfg.sae))
        return Path(cfg.out_dir), f"evaluate {sae_name(cfg.sae)}", key, outputs

    infos = [fresh(*parts(cfg)) for cfg in cfgs]
    infos = [None if saved is None else {"status": "cached", "seconds": saved["seconds"]} for saved in infos]
    stale = [i for i, info in enumerate(infos) if info is None]
    for i in stale:
        unstamp(*parts(cfgs[i])[:2])
    for i, evaluation in zip(stale, evaluate_many([cfgs[i] for i in stale]) if stale else []):
        folder, stage, key, _ = parts(cfgs[i])
        write_results(evaluation, cfgs[i], sae_name(cfgs[i].sae), extra={"seconds": evaluation.seconds})
        stamp(folder, stage, key, evaluation.seconds)
        infos[i] = {"status": "computed", "seconds": evaluation.seconds}
    return [(json.loads(eval_path(cfg.out_dir, cfg.sae).read_text())["results"], info) for cfg, info in zip(cfgs, infos)]


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


def analysis_dir(out_dir: str | Path, sae_folder: str | Path) -> Path:
    """Where the analyses of one SAE go: ``<out>/analysis/<SAE name>``."""
    return Path(out_dir) / "analysis" / sae_name(sae_folder)


def resid_dir(out_dir: str | Path, model_name: str) -> Path:
    """Where the residual-stream geometry of one transformer goes: ``<out>/analysis/resid-<model>``."""
    return Path(out_dir) / "analysis" / f"resid-{sae_name(model_name)}"


def data_options(analysis: dict):
    """``mlsae.analysis`` data options from a profile's ``analysis`` section."""
    from dataclasses import fields

    from mlsae.analysis.common import DataOptions

    return DataOptions(**{f.name: analysis[f.name] for f in fields(DataOptions) if f.name in analysis})


def ensure_analysis_pass(sae_folder: str | Path, out_dir: str | Path, analysis: dict,
                         analyses: tuple[str, ...] = ("dists", "variances", "examples", "histograms")) -> tuple[dict, dict]:
    """dists, variances, examples and histograms of one MLSAE from one pass over the held-out data
    (``mlsae.analysis.run``), unless made with the same options, code and weights.

    Returns ``(run.json as a dict, info)``; the files are in ``analysis_dir(out_dir, sae_folder)``.
    """
    from mlsae.analysis.run import RunOptions, run

    out = analysis_dir(out_dir, sae_folder)
    opts = RunOptions(sae=str(sae_folder), data=data_options(analysis), out_dir=str(out),
                      n_examples=int(analysis.get("n_examples", 32)), n_tokens=int(analysis.get("n_tokens", 4)),
                      analyses=list(analyses))
    info = cached(out, "pass", options=asdict(opts), code=PASS_CODE, inputs=(Path(sae_folder) / "model.safetensors",),
                  outputs=(out / "run.json",), compute=lambda: run(opts))
    return json.loads((out / "run.json").read_text()), info


def ensure_resid(model_name: str, out_dir: str | Path, analysis: dict,
                 lens: str | Path | None = None) -> tuple[pd.DataFrame, dict, dict]:
    """Residual-stream geometry of ``model_name`` (``mlsae.analysis.resid``) over the profile's
    ``resid_tokens`` held-out tokens (with ``lens``, a tuned lens's folder: the translated residuals'
    cosines too), unless made with the same options, code and lens.

    Returns ``(per-layer table, resid.json, info)``; files in ``resid_dir(out_dir, model_name)``.
    """
    from mlsae.analysis import resid

    data = data_options({**analysis, "max_tokens": analysis.get("resid_tokens", analysis.get("max_tokens"))})
    out = resid_dir(out_dir, model_name)
    opts = resid.ResidOptions(model_name=model_name, data=data, out_dir=str(out), tuned_lens=str(lens) if lens else None)
    inputs = (Path(lens) / "lens.safetensors",) if lens else ()
    info = cached(out, "resid", options=asdict(opts), code=RESID_CODE, inputs=inputs,
                  outputs=(out / "resid.json", out / "resid.csv"), compute=lambda: resid.run(opts))
    return pd.read_csv(out / "resid.csv"), json.loads((out / "resid.json").read_text()), info


def ensure_decoder(sae_folder: str | Path, out_dir: str | Path, *, embeddings: bool = True) -> tuple[dict, dict]:
    """Decoder geometry of one MLSAE (``mlsae.analysis.decoder``: MMCS, embedding similarities,
    and, when the analysis pass's ``dists`` is there, cosine similarity against mean-layer
    difference), unless made with the same options, code, weights and dists."""
    from mlsae.analysis import decoder

    out = analysis_dir(out_dir, sae_folder)
    opts = decoder.DecoderOptions(sae=str(sae_folder), embeddings=embeddings, out_dir=str(out))
    info = cached(out, "decoder", options=asdict(opts), code=DECODER_CODE,
                  inputs=(Path(sae_folder) / "model.safetensors", out / "dists.safetensors"),
                  outputs=(out / "decoder.json",), compute=lambda: decoder.run(opts))
    return json.loads((out / "decoder.json").read_text()), info


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
