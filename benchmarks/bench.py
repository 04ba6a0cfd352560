"""Training-step benchmark: mlsae side by side with EleutherAI sparsify, SAELens and a plain GEMM.

One process, identical random inputs (a fresh batch each step, the same sequence for everyone),
same d, n_latents, k and batch, rounds interleaved (so that the machine's background load hits
every contestant alike):

- ``mlsae``: MLSAE.loss + backward + decoder-gradient projection + fused Adam + renormalisation
  + dead-latent bookkeeping, as mlsae.train runs it;
- ``sparsify``: EleutherAI sparsify's TopK SparseCoder with its trainer's step (default SignSGD
  in a ScheduleFree wrapper, decoder projection and renormalisation, fired-latent bookkeeping);
- ``saelens``: SAELens' TopKTrainingSAE stepped by its own SAETrainer._train_step (Adam, grad clip);
- ``gemm``: the encoder's one dense product alone, ``x @ W_enc.T`` in the same precision: the
  roofline of a TopK step (2*B*d*n FLOPs; every other part can be sparse).

bf16 means autocast with fp32 master weights for everyone (sparsify autocasts only on CUDA by
itself, so on CPU its forward is wrapped like the others). Prints the machine (CPU, cores and
the fp32 and bf16 GEMM rates mlsae.precision measured, which choose mlsae's kernel paths),
vectors/s, the encode path each mlsae row took, mlsae's ratio to each competitor and its
fraction of the roofline, and a PASS/FAIL line per target (TARGETS); ``--json PATH`` writes the same.
``--sweep`` also measures end to end on the default model: a 4-config sweep in one pass versus
the 4 runs one after another, with tokens/s and peak memory of the default run, and that run's
steady tokens/s over the limit set by its transformer forward plus its encoder product, both
timed in this run (target: END_TO_END_TARGET).

    make bench                     # sets up .venv-bench with the competitors, then runs this
    python benchmarks/bench.py --quick
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# On a shared CPU, OpenMP workers that spin at every barrier while the OS runs someone else's
# thread make a step of many small kernels collapse (3x here under a load of 5 on 2 cores); a
# passive wait costs microseconds on an idle machine. Set before torch loads libgomp; applies to
# every contestant alike. Export OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(576, 4608, 32), (512, 32768, 32)]  # SmolLM2 x8, Pythia-70m x64
Step = Callable[[torch.Tensor], None]  # one training step on a batch [B, d]
# What mlsae must reach at every shape and precision: speed-up over each competitor, and the
# fraction of the roofline (the encoder's dense product in the same run and precision).
TARGETS = {"sparsify": 1.5, "saelens": 2.0, "gemm": 0.5}
# The default run's steady tokens/s over the limit its transformer forward plus encoder product set.
END_TO_END_TARGET = 0.7


# ----------------------------------------------------------------------------- contestants


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def make_mlsae(x: torch.Tensor, n: int, k: int, bf16: bool) -> Step:
    from mlsae.kernels import encode_path, gemm_dtype
    from mlsae.model import MLSAE, SAEConfig

    sae = MLSAE(SAEConfig(n_inputs=x.shape[1], n_latents=n, k=k)).to(x.device).train()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3, eps=6.25e-10, fused=True)  # as mlsae.train.make_sweep

    def step(x: torch.Tensor) -> None:
        with autocast(x.device, bf16):
            out = sae.loss(x.unsqueeze(0))  # [L=1, N, d]: any L*N = batch costs the same
        out.loss.backward()
        out.loss.item()  # the trainer logs it
        fired = sae.fired(out.topk)
        sae.project_decoder_grad()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.normalize_decoder()
        sae.update_dead(fired, x.shape[0])

    def path() -> str:  # the next step's encode path and product dtype: "fp32 mixed-select", "bf16 tiled", ...
        with autocast(x.device, bf16):
            name, dtype = encode_path(x, sae.W_enc, k), gemm_dtype(x)
        return f"{'bf16' if dtype == torch.bfloat16 else 'fp32'} {name}"

    step.path = path
    return step


def make_sparsify(x: torch.Tensor, n: int, k: int, bf16: bool) -> Step:
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    sae = SparseCoder(x.shape[1], SparseCoderConfig(k=k, num_latents=n), x.device, dtype=torch.float32)
    lr = 5e-3 / (n / 2**14) ** 0.5  # sparsify.trainer's default for its default optimizer ("signum")
    opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=lr)]), momentum=0.95)
    opt.train()
    did_fire = torch.zeros(n, dtype=torch.bool, device=x.device)
    since_fired = torch.zeros(n, dtype=torch.long, device=x.device)

    def step(x: torch.Tensor) -> None:  # sparsify.trainer.Trainer.fit, one hookpoint, loss_fn="fvu", auxk_alpha=0
        sae.set_decoder_norm_to_unit_norm()
        total_variance = (x - x.mean(0)).pow(2).sum()
        with autocast(x.device, bf16):
            out = sae(x=x, y=x, dead_mask=None, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        float(out.fvu.detach())
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        since_fired.add_(x.shape[0])
        since_fired[did_fire] = 0
        did_fire.zero_()

    return step


def make_saelens(x: torch.Tensor, n: int, k: int, bf16: bool) -> Step:
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=n, k=k, device=str(x.device)))
    cfg = SAETrainerConfig(  # lr and lr_end as LanguageModelSAERunnerConfig sets them by default
        total_training_samples=10**12, train_batch_size_samples=x.shape[0], device=str(x.device), autocast=bf16,
        lr=3e-4, lr_end=3e-5,
    )
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=iter(()))
    return lambda x: trainer._train_step(sae, x)


def make_gemm(x: torch.Tensor, n: int, k: int, bf16: bool) -> Step:
    dtype = torch.bfloat16 if bf16 else torch.float32
    W = (torch.randn(n, x.shape[1], device=x.device) / x.shape[1] ** 0.5).to(dtype)
    return lambda x: x @ W.T  # x comes in its dtype already (see bench_config): the product alone


CONTESTANTS: dict[str, Callable[..., Step]] = {
    "gemm": make_gemm, "mlsae": make_mlsae, "sparsify": make_sparsify, "saelens": make_saelens,
}


# ----------------------------------------------------------------------------- timing


class Clock:
    """Seconds of one call: CUDA events on a GPU, the wall clock on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


def bench_config(d: int, n: int, k: int, batch: int, bf16: bool, device: torch.device, names: list[str],
                 warmup: int, rounds: int) -> list[dict]:
    """Median seconds per step of each contestant, rounds interleaved; one record per contestant."""
    # A fresh batch every step, the same sequence for every contestant: an SAE trains on new
    # vectors each step (a batch seen again and again is memorised, which is not training).
    g = torch.Generator(device=device).manual_seed(0)
    batches = [torch.randn(batch, d, device=device, generator=g) for _ in range(warmup + rounds)]
    steps: dict[str, Step] = {}
    errors: dict[str, str] = {}
    for name in names:
        torch.manual_seed(0)
        try:
            steps[name] = CONTESTANTS[name](batches[0], n, k, bf16)
            for x in batches[:warmup]:
                steps[name](x.to(torch.bfloat16) if name == "gemm" and bf16 else x)
        except ImportError as e:
            errors[name] = f"not installed ({e.name}): run `make bench`"
            steps.pop(name, None)
    clock = Clock(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    low = [x.to(torch.bfloat16) for x in batches] if bf16 else batches  # the GEMM's inputs, cast beforehand
    for r in range(warmup, warmup + rounds):
        for name, step in steps.items():
            x = low[r] if name == "gemm" else batches[r]
            times[name].append(clock(lambda: step(x)))
    paths = {name: step.path() for name, step in steps.items() if hasattr(step, "path")}
    del steps
    gc.collect()
    records = []
    precision = "bf16" if bf16 else "fp32"
    med = {name: statistics.median(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}
    for name in names:
        rec = {"d": d, "n_latents": n, "k": k, "batch": batch, "precision": precision, "contestant": name}
        if name in errors:
            records.append({**rec, "error": errors[name]})
            continue
        t = med[name]
        rec.update(seconds=t, seconds_best=best[name], vectors_per_s=batch / t, seconds_all=times[name])
        if name == "gemm":
            rec["gflops"] = 2 * batch * d * n / t / 1e9
        if name in paths:
            rec["path"] = paths[name]
        if name == "mlsae" and "gemm" in med:
            rec["roofline_fraction"] = med["gemm"] / t
            rec["roofline_fraction_best"] = best["gemm"] / best[name]
        if name not in ("mlsae", "gemm") and "mlsae" in med:
            rec["mlsae_speedup"] = t / med["mlsae"]
            rec["mlsae_speedup_best"] = best[name] / best["mlsae"]
        if name not in ("mlsae", "gemm") and "gemm" in med:
            rec["gemm_speedup"] = t / med["gemm"]  # what mlsae/name would be if mlsae's step were the product alone
        records.append(rec)
    return records


# ----------------------------------------------------------------------------- sweep (end to end)


# Runs ``python -m mlsae.train`` and writes the process's own peak RSS (VmHWM, kB) to argv[1]:
# getrusage's figure for a child also counts the parent's memory it was forked from.
TRAIN = """
import runpy, sys
peak_file = sys.argv.pop(1)
sys.argv[0] = "mlsae.train"
try:
    runpy.run_module("mlsae.train", run_name="__main__")
finally:
    try:
        hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
        open(peak_file, "w").write(hwm.split()[1])
    except OSError:
        pass
"""


def run_train(args: list[str], out: Path) -> dict:
    """One ``python -m mlsae.train`` in a subprocess: wall and CPU seconds, peak RSS, logged tokens/s."""
    peak_file = out.with_suffix(".peak")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", TRAIN, str(peak_file), "--out_dir", str(out), *args], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    peak = int(peak_file.read_text()) / 2**20 if peak_file.is_file() else None  # kB -> GB
    logs = [[json.loads(line) for line in p.read_text().splitlines()] for p in sorted(out.glob("*/metrics.jsonl"))]
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_gb": peak, "tokens_per_s": [log[-1]["tokens_per_s"] for log in logs],
            "steady_tokens_per_s": [steady_rate(log) for log in logs], "precision": logs[0][-1].get("precision") if logs else None}


def steady_rate(log: list[dict]) -> float:
    """Tokens/s after the first logged step (which also initialises the pre-encoder bias), from the
    log's cumulative rates (elapsed = tokens / tokens_per_s)."""
    if len(log) < 2:
        return log[-1]["tokens_per_s"]
    elapsed = [r["tokens"] / r["tokens_per_s"] for r in (log[0], log[-1])]
    return (log[-1]["tokens"] - log[0]["tokens"]) / (elapsed[1] - elapsed[0])


@torch.no_grad()
def bench_limit(precision: str, n_latents: int = 4608, rounds: int = 5) -> dict:
    """What bounds the default run: its transformer forward (to the deepest layer, no LM head) and its
    encoder product (every kept vector of every layer by all latents), timed on one micro-batch of
    real training text in ``precision``; the limit is kept tokens over their summed time."""
    from mlsae.data import load_chunks
    from mlsae.precision import autocast as precision_autocast
    from mlsae.train import TrainConfig
    from mlsae.transformer import Transformer, load_transformer

    cfg = TrainConfig()
    tf = Transformer(*load_transformer(cfg.model_name))
    ids = load_chunks(cfg.path, "train", tf.tokenizer, cfg.max_length, max_tokens=cfg.batch_size * cfg.max_length)
    layers = list(range(tf.n_layers))
    autocast = precision_autocast(precision, torch.device("cpu"))
    W = torch.randn(n_latents, tf.d_model)
    times = {"forward": [], "encoder_product": []}
    for _ in range(rounds + 1):
        with autocast:
            start = time.perf_counter()
            acts = tf.residuals(ids, layers)
            times["forward"].append(time.perf_counter() - start)
            x = acts[:, cfg.positions.keep(tf.special_mask(ids), acts)].flatten(0, 1).float()
            start = time.perf_counter()
            torch.nn.functional.linear(x, W)
            times["encoder_product"].append(time.perf_counter() - start)
    kept = x.shape[0] // len(layers)
    median = {k: statistics.median(v[1:]) for k, v in times.items()}
    return {"precision": precision, "kept_tokens": kept, **{f"{k}_seconds": v for k, v in median.items()},
            "limit_tokens_per_s": kept / sum(median.values())}


def bench_sweep(max_tokens: int) -> dict:
    """A 4-config sweep (ef 4 8 x k 16 32) in one pass against the 4 runs one after another.

    The sweep runs between the single runs (2 before, 2 after), so that a change in the
    machine's background load tilts the comparison less; CPU seconds are reported too.
    """
    efs, ks = ["4", "8"], ["16", "32"]
    base = ["--max_tokens", str(max_tokens), "--log_every", "1", "--checkpoint_every", "1000000"]
    configs = [(ef, k) for ef in efs for k in ks]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        default = run_train(base, tmp / "default")
        singles = [run_train([*base, "--expansion_factor", ef, "-k", k], tmp / f"ef{ef}-k{k}") for ef, k in configs[:2]]
        sweep = run_train([*base, "--expansion_factor", *efs, "-k", *ks], tmp / "sweep")
        singles += [run_train([*base, "--expansion_factor", ef, "-k", k], tmp / f"ef{ef}-k{k}") for ef, k in configs[2:]]
    sequential = sum(r["seconds"] for r in singles)
    sequential_cpu = sum(r["cpu_seconds"] for r in singles)
    return {
        "max_tokens": max_tokens,
        "sweep_seconds": sweep["seconds"],
        "sequential_seconds": sequential,
        "sweep_over_sequential": sweep["seconds"] / sequential,
        "sweep_cpu_seconds": sweep["cpu_seconds"],
        "sequential_cpu_seconds": sequential_cpu,
        "sweep_over_sequential_cpu": sweep["cpu_seconds"] / sequential_cpu,
        "default_run_seconds": default["seconds"],
        "default_tokens_per_s": default["tokens_per_s"][0] if default["tokens_per_s"] else None,
        "default_steady_tokens_per_s": default["steady_tokens_per_s"][0] if default["steady_tokens_per_s"] else None,
        "default_precision": default["precision"],
        "default_peak_rss_gb": default["peak_rss_gb"],
    }


# ----------------------------------------------------------------------------- report


def machine(device: torch.device) -> dict:
    from mlsae import precision

    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": precision.cpu_model(), "cores": os.cpu_count(), "load_average": os.getloadavg(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "gemm_rates": precision.gemm_rates(device),
            "auto_precision": precision.resolve("auto", device),
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA")}  # a cap stands in for a CPU without AMX or bf16
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    for pkg in ("eai-sparsify", "sae-lens"):
        try:
            from importlib.metadata import version

            info[pkg] = version(pkg)
        except Exception:
            info[pkg] = None
    return info


def print_machine(info: dict) -> None:
    rates = info["gemm_rates"]
    print(f"{info['cpu']} ({info.get('gpu', 'CPU only')}), {info['cores']} cores, torch {info['torch']}, "
          f"{info['threads']} threads, {datetime.date.today()}, load average {info['load_average'][0]:.1f}"
          + (f", oneDNN capped at {info['onednn_max_cpu_isa']}" if info.get("onednn_max_cpu_isa") else ""))
    print(f"GEMM [{' x '.join(map(str, rates['shape']))}]: fp32 {rates['fp32']:.0f} GFLOP/s, bf16 {rates['bf16']:.0f} "
          f"GFLOP/s, int8 {rates['int8']:.0f} GOP/s (bf16/fp32 {rates['bf16'] / rates['fp32']:.2f}, int8/fp32 "
          f"{rates['int8'] / rates['fp32']:.2f}; mlsae.precision, measured {rates['measured']}); "
          f"auto precision: {info['auto_precision']}")


def print_table(records: list[dict]) -> None:
    """Medians over the rounds; in brackets the same from each contestant's best round."""
    print(f"{'shape':>22} {'prec':>5} {'contestant':>9} {'ms/step':>9} {'(best)':>8} {'vectors/s':>10}  "
          f"{'path':<18} note")
    for r in records:
        shape = f"d={r['d']} n={r['n_latents']} k={r['k']}"
        if "error" in r:
            print(f"{shape:>22} {r['precision']:>5} {r['contestant']:>9} {'-':>9} {'':>8} {'-':>10}  {'':<18} "
                  f"{r['error']}")
            continue
        note = ""
        if "gflops" in r:
            note = f"{r['gflops']:.0f} GFLOP/s (roofline)"
        if "roofline_fraction" in r:
            note = f"{r['roofline_fraction']:.2f} of roofline ({r['roofline_fraction_best']:.2f})"
        if "mlsae_speedup" in r:
            note = f"mlsae/{r['contestant']} = {r['mlsae_speedup']:.2f}x ({r['mlsae_speedup_best']:.2f}x)"
            if "gemm_speedup" in r:
                note += f"; product alone {r['gemm_speedup']:.2f}x"
        print(f"{shape:>22} {r['precision']:>5} {r['contestant']:>9} {r['seconds'] * 1e3:>9.1f} "
              f"{r['seconds_best'] * 1e3:>8.1f} {r['vectors_per_s']:>10.0f}  {r.get('path', ''):<18} {note}")


def check_targets(records: list[dict]) -> list[dict]:
    """mlsae's ratio to each competitor and to the roofline against TARGETS, per shape and precision."""
    checks = []
    for r in records:
        if r["contestant"] == "mlsae" and "roofline_fraction" in r:
            value = r["roofline_fraction"]
        elif r["contestant"] in TARGETS and "mlsae_speedup" in r:
            value = r["mlsae_speedup"]
        else:  # mlsae, or the one compared with, did not run
            continue
        against = "gemm" if r["contestant"] == "mlsae" else r["contestant"]
        checks.append({"d": r["d"], "n_latents": r["n_latents"], "precision": r["precision"], "against": against,
                       "value": value, "target": TARGETS[against], "pass": value >= TARGETS[against],
                       "product_alone": r.get("gemm_speedup")})
    return checks


def print_targets(checks: list[dict]) -> None:
    for c in checks:
        what = "fraction of roofline" if c["against"] == "gemm" else f"mlsae/{c['against']}"
        alone = c.get("product_alone")
        print(f"{'PASS' if c['pass'] else 'FAIL'}  d={c['d']} n={c['n_latents']} {c['precision']}: "
              f"{what} {c['value']:.2f} (target >= {c['target']}"
              + (f"; a step that were the dense product alone: {alone:.2f}" if alone and not c["pass"] else "") + ")")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced version (batch 512, 3 rounds): under a minute")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--rounds", type=int, default=None, help="timed steps per contestant (default 9, quick 3)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=None, help="vectors per step (default 4096, quick 512)")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--contestants", nargs="+", default=list(CONTESTANTS), choices=list(CONTESTANTS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's)")
    parser.add_argument("--no-malloc-tuning", action="store_true",
                        help="keep glibc's default allocator settings (mlsae.train tunes them; see mlsae.native)")
    parser.add_argument("--sweep", action="store_true", help="also the end-to-end sweep on the default model")
    parser.add_argument("--sweep-tokens", type=int, default=32768, help="training tokens per run of --sweep")
    parser.add_argument("--sweep-only", action="store_true", help="run --sweep alone, without the step benchmark")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress shows when piped to a log

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    batch = args.batch or (512 if args.quick else 4096)
    rounds = args.rounds or (3 if args.quick else 9)
    warmup = 1 if args.quick else args.warmup
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.no_malloc_tuning:
        from mlsae import native

        native.tune_malloc()  # process-wide: every contestant gets it, as training with mlsae does
    info = machine(device)
    print_machine(info)
    records = []
    for d, n, k in [] if args.sweep_only else SHAPES:
        for precision in args.precision:
            recs = bench_config(d, n, k, batch, precision == "bf16", device, args.contestants, warmup, rounds)
            print_table(recs)
            records += recs
    checks = check_targets(records)
    if checks:
        print("targets" + (" (--quick: batch 512, indicative only; see benchmarks/README.md)" if args.quick else ""))
        print_targets(checks)
    info["load_average_after"] = os.getloadavg()
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": device.type,
              "machine": info, "batch": batch, "rounds": rounds, "malloc_tuned": not args.no_malloc_tuning,
              "results": records, "targets": checks}
    if args.sweep or args.sweep_only:
        sweep = bench_sweep(args.sweep_tokens)
        report["sweep"] = sweep
        print(f"sweep of 4 in one pass: {sweep['sweep_seconds']:.1f} s; 4 runs one after another: "
              f"{sweep['sequential_seconds']:.1f} s; ratio {sweep['sweep_over_sequential']:.2f} (target <= 0.6); "
              f"CPU seconds {sweep['sweep_cpu_seconds']:.0f} vs {sweep['sequential_cpu_seconds']:.0f}, "
              f"ratio {sweep['sweep_over_sequential_cpu']:.2f}")
        peak = sweep["default_peak_rss_gb"]
        print(f"default run: {sweep['default_tokens_per_s']} tokens/s ({sweep['default_steady_tokens_per_s']:.0f} after "
              f"the first step), {sweep['default_precision']}, peak RSS {'n/a' if peak is None else f'{peak:.2f} GB'} "
              f"(the whole process)")
        limit = report["limit"] = bench_limit(sweep["default_precision"])
        ratio = sweep["default_steady_tokens_per_s"] / limit["limit_tokens_per_s"]
        report["end_to_end"] = {"ratio": ratio, "target": END_TO_END_TARGET, "pass": ratio >= END_TO_END_TARGET}
        print(f"limit of the default run ({limit['precision']}): forward {limit['forward_seconds'] * 1e3:.0f} ms + encoder "
              f"product {limit['encoder_product_seconds'] * 1e3:.0f} ms per {limit['kept_tokens']} kept tokens = "
              f"{limit['limit_tokens_per_s']:.0f} tokens/s")
        print(f"{'PASS' if ratio >= END_TO_END_TARGET else 'FAIL'}  default run / its limit = {ratio:.2f} "
              f"(target >= {END_TO_END_TARGET})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
