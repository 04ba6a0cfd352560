"""Timings for the book's performance chapter, read from what the other stages wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from book.stages import read_metrics


def training_rows(folders: list[Path], cfg) -> pd.DataFrame:
    """Throughput at the end of training: the sweep's one pass (its MLSAEs, per-layer baselines and
    tuned-lens copy share one log rate). In positions read (steps x tokens per step), the unit of the
    recipe and of its budget curve: the log counts the kept tokens the SAEs trained on."""
    rows = []
    if folders and (folders[0] / "metrics.jsonl").is_file():
        last = read_metrics(folders[0]).iloc[-1]  # logged at the last step
        positions = int(last["step"]) * cfg.tokens_per_step
        baselines = f" + {len(cfg.baselines)} per-layer SAEs" if cfg.baselines else ""
        lens = " + its tuned-lens copy" if cfg.lens_copy else ""
        rows.append({"run": f"sweep ({len(folders)} MLSAEs{baselines}{lens})", "tokens": positions,
                     "tokens/s": float(last["tokens_per_s"] * positions / last["tokens"])})
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame["minutes"] = frame["tokens"] / frame["tokens/s"] / 60
        frame = frame.set_index("run")
    return frame


def stage_rows(out: Path) -> pd.DataFrame:
    """Seconds and tokens of every evaluation (``mlsae.evaluate``) and analysis pass under ``out``."""
    rows = []
    for path in sorted((out / "eval").rglob("test_*.json")):
        data = json.loads(path.read_text())
        if "seconds" not in data:
            continue
        where = path.parent.relative_to(out / "eval").as_posix()
        name = path.stem.removeprefix("test_") + ("" if where == "." else f" ({where})")
        rows.append({"stage": f"evaluate {name}", "seconds": data["seconds"], "tokens": data["config"]["max_tokens"]})
    for path in sorted((out / "analysis").glob("*/run.json")):
        data = json.loads(path.read_text())
        info = data.get("pass") or {}
        if info.get("seconds"):
            rows.append({"stage": f"analysis pass {path.parent.name}", "seconds": info["seconds"], "tokens": info["tokens"]})
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame["tokens/s"] = frame["tokens"] / frame["seconds"]
        frame = frame.set_index("stage")
    return frame


def notebook_timings(out: Path) -> pd.DataFrame:
    """Wall seconds of each executed notebook (``<out>/timings.json``): its slowest recorded
    execution (what producing its results cost; its share of the total) and its last one."""
    from book.build import NOTEBOOKS, read_timings

    timings = read_timings(out)
    names = [n for n in NOTEBOOKS if n in timings]
    frame = pd.DataFrame({"seconds": [timings[n]["slowest"] for n in names],
                          "last run (s)": [timings[n]["last"] for n in names]}, index=names)
    if not frame.empty:
        frame.insert(1, "share", frame["seconds"] / frame["seconds"].sum())
    frame.index.name = "notebook"
    return frame


def time_budget(fit: pd.DataFrame, tokens: int, tokens_per_s: float, other_seconds: float,
                budget_seconds: float) -> pd.DataFrame:
    """Training budgets against the notebooks' wall time on this machine, one row each: this build's
    (``tokens``), the most that fits ``budget_seconds`` here, and what each target needs (``fit``, from
    ``book.evals.budget_curve``). Each row gives its tokens, the notebooks' minutes they imply (the
    ``other_seconds`` the notebooks spent beside training kept, training at this build's
    ``tokens_per_s``) and the metrics the fitted curves give there."""
    from book.evals import at_budget

    most = (budget_seconds - other_seconds) * tokens_per_s
    budgets = {"this build": tokens, f"the most within {budget_seconds / 60:.0f} min": most}
    budgets |= {f"{metric} at its target": row["tokens to reach the target"] for metric, row in fit.iterrows()}
    rows = []
    for name, n in budgets.items():
        ok = n > 0  # NaN (no fit) and a budget spent before training are not budgets
        rows.append({"budget": name, "tokens": n if ok else float("nan"),
                     "notebook minutes": (other_seconds + n / tokens_per_s) / 60 if ok else float("nan"),
                     **(at_budget(fit, n) if ok else {})})
    return pd.DataFrame(rows).set_index("budget")


def flatten(data, prefix: str = "") -> pd.DataFrame:
    """A benchmark JSON of any shape as a table: a list of records as rows, else ``key: value``
    rows with nested keys joined by '/'."""
    if isinstance(data, dict):
        for key in ("results", "rows", "benchmarks"):
            if isinstance(data.get(key), list) and all(isinstance(r, dict) for r in data[key]):
                return pd.json_normalize(data[key], sep="/")
    if isinstance(data, list) and all(isinstance(r, dict) for r in data):
        return pd.json_normalize(data, sep="/")
    flat = pd.json_normalize(data, sep="/") if isinstance(data, dict) else pd.DataFrame({"value": [data]})
    return flat.T.rename(columns={0: "value"})


def bench_results(report: dict) -> pd.DataFrame | None:
    """The training-step benchmark (``benchmarks/bench.py --json``): one row per shape, precision
    and contestant with milliseconds per step, vectors per second and the comparison it reports;
    None if the report has another shape."""
    rows = report.get("results") if isinstance(report, dict) else None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and "contestant" in r for r in rows):
        return None
    out = []
    for r in rows:
        shape = f"d {r.get('d')}, latents {r.get('n_latents')}, k {r.get('k')}"
        out.append({"shape": shape, "precision": r.get("precision"), "contestant": r["contestant"],
                    "ms per step": r["seconds"] * 1e3 if r.get("seconds") is not None else None,
                    "vectors/s": r.get("vectors_per_s"),
                    "mlsae speed-up": r.get("mlsae_speedup"), "share of GEMM roofline": r.get("roofline_fraction"),
                    "error": r.get("error", "")})
    frame = pd.DataFrame(out).set_index(["shape", "precision", "contestant"])
    if not frame["error"].astype(bool).any():
        frame = frame.drop(columns="error")
    return frame.dropna(axis=1, how="all")


def recorded_runs(folder: Path, device: str) -> list[tuple[str, dict, pd.DataFrame]]:
    """The step benchmarks kept in ``folder`` (``benchmarks/results/*.json``) that ran on ``device``:
    (file name, report, table as ``bench_results`` makes it), oldest first."""
    runs = []
    for path in sorted(Path(folder).glob("*.json")):
        report = json.loads(path.read_text())
        table = bench_results(report)
        if report.get("device") == device and table is not None:
            runs.append((path.name, report, table))
    return sorted(runs, key=lambda run: run[1].get("date", ""))


def recipe_study(config: dict | None = None, path: Path | None = None) -> dict | None:
    """The recorded training-recipe study (``benchmarks/recipes.py``): the machine it ran on, its
    token budget, and one row per recipe at that budget (marking the recipe of ``config``, a
    TrainConfig as a dict); None where none was recorded."""
    from book.evals import same_recipe
    from book.profile import repo_root

    path = path or repo_root() / "benchmarks" / "results" / "recipes.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    records = data["records"]
    first = [r for r in records if r["tokens"] == records[0]["tokens"]]  # the comparison at one budget
    table = pd.DataFrame([{"recipe": r["recipe"], "steps": r["steps"], "FVU": r["fvu"], "CE recovered": r["ce_recovered"],
                           "ΔCE": r["delta_ce"], "dead": r["dead_overall"], "silent at a layer": r["dead"],
                           "used here": "yes" if config and same_recipe(r["config"], config) else ""}
                          for r in first]).set_index("recipe")
    machine = data["machine"]
    return {"machine": f"{machine['cpu']} ({machine['threads']} threads, torch {machine['torch']})",
            "tokens": records[0]["tokens"], "table": table, "records": records}


def recipe_points(records: list[dict], config: dict) -> pd.DataFrame:
    """The study's results for the recipe of ``config`` (a TrainConfig as a dict), one row per token
    budget, with the evaluation's column names (``mlsae.evaluate``)."""
    from book.evals import same_recipe

    rows = [{"tokens": r["tokens"], "train/fvu/avg": r["fvu"], "val/loss/recovered/avg": r["ce_recovered"],
             "train/dead/rel": r["dead_overall"], "source": "recipe study"}
            for r in records if same_recipe(r["config"], config)]
    return pd.DataFrame(rows, columns=["tokens", "train/fvu/avg", "val/loss/recovered/avg", "train/dead/rel", "source"])
