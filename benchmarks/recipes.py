"""The training-recipe study behind the default profile: ``python benchmarks/recipes.py``.

Trains the default profile's main MLSAE (SmolLM2-135M-Instruct, expansion factor 8, k 32, on
the Brown training split) with each recipe of ``RECIPES`` and evaluates it on the Brown test
split with the same options as the book (``profiles/default.yaml``, ``evaluate:``), every recipe
with the same positions left out (special tokens and the first position), so that the numbers
compare. Metrics (``mlsae.metrics``): FVU and CE loss recovered averaged over layers, delta CE
(nats), and dead latents (the fraction of latents that never fire at a layer over the
evaluation tokens, averaged over layers). Writes ``--out`` (JSON, one record per recipe) and
prints the table. Trained recipes are reused (delete ``--runs`` to retrain).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import yaml

from mlsae import native
from mlsae.precision import cpu_model
from mlsae.evaluate import EvalConfig, evaluate
from mlsae.train import TrainConfig, train
from mlsae.utils import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]

# The recipe the first release shipped, then one change at a time (name -> TrainConfig overrides).
RECIPES: dict[str, dict] = {
    "first release (sink in data)": dict(tokens_per_step=4096, lr=1e-3, skip_first=0),
    "sink out": dict(tokens_per_step=4096, lr=1e-3),
    "sink out, 1,024 tokens/step": dict(tokens_per_step=1024, lr=1e-3),
    "+ lr 2e-3, warm-up, linear decay": dict(tokens_per_step=1024, lr=2e-3, warmup_steps=16, lr_schedule="linear"),
    "+ 512 tokens/step": dict(tokens_per_step=512, batch_size=2, lr=2e-3, warmup_steps=32, lr_schedule="linear"),
    "+ 256 tokens/step": dict(tokens_per_step=256, batch_size=1, lr=2e-3, warmup_steps=64, lr_schedule="linear"),
    "+ lr 4e-3": dict(tokens_per_step=1024, lr=4e-3, warmup_steps=16, lr_schedule="linear"),
    "+ lr 8e-3": dict(tokens_per_step=1024, lr=8e-3, warmup_steps=16, lr_schedule="linear"),
    "+ 512 tokens/step, lr 4e-3": dict(tokens_per_step=512, batch_size=2, lr=4e-3, warmup_steps=32,
                                       lr_schedule="linear"),
    "+ 256 tokens/step, lr 4e-3": dict(tokens_per_step=256, batch_size=1, lr=4e-3, warmup_steps=64,
                                       lr_schedule="linear"),
    "+ dead after 20k tokens": dict(tokens_per_step=1024, lr=2e-3, warmup_steps=16, lr_schedule="linear",
                                    dead_tokens_threshold=20_000),
}


def base_configs(profile: Path) -> tuple[TrainConfig, EvalConfig]:
    """The profile's main MLSAE (its largest expansion factor and k) and its evaluation options."""
    spec = yaml.safe_load(profile.read_text())
    # the main MLSAE alone: no per-layer baselines, no tuned-lens copy
    train_opts = {k: v for k, v in spec["train"].items() if k not in ("baselines", "lens_copy")}
    train_opts.update(expansion_factor=[max(train_opts["expansion_factor"])], k=[max(train_opts["k"])])
    test_opts = {k: v for k, v in spec["evaluate"].items() if k in EvalConfig.__dataclass_fields__}
    return TrainConfig(**train_opts), EvalConfig(sae="", skip_first=1, **test_opts)


def run_recipe(name: str, overrides: dict, base: TrainConfig, eval_base: EvalConfig, runs: Path,
               max_tokens: int) -> dict:
    out = runs / re.sub(r"[^A-Za-z0-9.]+", "-", name.replace("+", "plus")).strip("-")  # one folder per recipe
    cfg = replace(base, **overrides, max_tokens=max_tokens, out_dir=str(out), log_every=8, checkpoint_every=32)
    started = time.perf_counter()
    folders = sorted(out.glob("mlsae-*/model.safetensors"))
    if folders:
        folder, seconds = folders[0].parent, None
    else:
        (folder,) = train(replace(cfg, resume=(out / "checkpoint").exists()))
        seconds = time.perf_counter() - started
    results = evaluate(replace(eval_base, sae=str(folder), out_dir=str(out))).results
    return {"recipe": name, "overrides": overrides, "tokens": max_tokens, "steps": cfg.steps,
            "train_seconds": seconds, "fvu": results["train/fvu/avg"],
            "ce_recovered": results["val/loss/recovered/avg"], "delta_ce": results["val/loss/delta/avg"],
            "dead": results["train/dead/avg"], "dead_overall": results["train/dead/rel"],
            "config": asdict(cfg)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", type=Path, default=ROOT / "profiles" / "default.yaml")
    parser.add_argument("--max_tokens", type=int, nargs="+", default=[131_072], help="training tokens of every recipe")
    parser.add_argument("--recipes", nargs="*", help="names of RECIPES to run (default: all)")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "recipes")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "recipes.json")
    args = parser.parse_args()
    base, eval_base = base_configs(args.profile)
    if base.malloc_tuning:
        native.tune_malloc()  # as python -m mlsae.train does
    # Records of earlier invocations are kept (a recipe at a budget measured again replaces its record).
    records = {(r["recipe"], r["tokens"]): r for r in json.loads(args.out.read_text())["records"]} if args.out.is_file() else {}
    for tokens in args.max_tokens:
        for name in args.recipes or RECIPES:
            record = run_recipe(name, RECIPES[name], base, eval_base, args.runs / str(tokens), tokens)
            records[name, tokens] = record
            print(json.dumps({k: v for k, v in record.items() if k != "config"}))
    machine = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    ordered = sorted(records.values(), key=lambda r: (r["tokens"], list(RECIPES).index(r["recipe"])))
    atomic_write_text(args.out, json.dumps({"machine": machine, "records": ordered}, indent=2) + "\n")
    print(f"{'recipe':<36} {'tokens':>8} {'FVU':>6} {'CE rec.':>8} {'dCE':>6} {'dead':>6}")
    for r in ordered:
        print(f"{r['recipe']:<36} {r['tokens']:>8} {r['fvu']:6.3f} {r['ce_recovered']:8.3f} {r['delta_ce']:6.3f} "
              f"{r['dead']:6.3f}")


if __name__ == "__main__":
    main()
