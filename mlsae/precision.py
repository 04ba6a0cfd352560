"""The encoder product's precision, chosen per machine by measuring rather than assuming.

Whether bf16 pays depends on the CPU, and its vendor or feature flags do not say by how much
(PyTorch's bf16 kernels emulate what a chip lacks): on an AMD EPYC with avx512_bf16 (2 cores) bf16
GEMMs run 2-4.6x faster than fp32; on an Intel Xeon without AMX bf16 (130-150 GFLOP/s) is slower
than fp32 (200-250 GFLOP/s); on a Xeon with AMX it is 4x faster or more; on an EPYC with AVX2 and
no AVX-512 (Zen 3) bf16 runs at 19 GFLOP/s, an eighth of fp32's 160. So ``gemm_rates`` times one
encoder-shaped product in each precision (well under a second), once per machine (CPU model,
cores, torch threads, torch version, oneDNN's instruction-set cap: what the rates depend on), and
caches the result as JSON in ``cache_dir()/machine``, with the rate of an int8 product
(``torch._int_mm``, int32 sums). ``precision="auto"`` takes bf16 where it is clearly faster, and
mlsae.kernels uses the same rates to decide whether fp32 encoding ranks latents by a bf16 or an
int8 product. On CUDA auto is bf16 (tensor cores) without measuring. Delete the cache file to
re-measure (e.g. if it was measured under heavy load).
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import re
import time
from pathlib import Path

import torch

from mlsae.utils import MLSAEError, atomic_write_text, cache_dir

PRECISIONS = ("fp32", "bf16")
AUTO_BF16_SPEEDUP = 1.2  # auto takes bf16 only when at least this much faster: it also costs accuracy
SHAPE = (512, 576, 4608)  # vectors x d x latents: one tile of the encoder product (2.7 GFLOP)
REPEATS = 5  # timed products per precision, after a warm-up; the fastest counts (noise only slows)

_rates: dict[tuple[str, ...], dict] = {}  # per machine facts: this process measures or reads once


def resolve(precision: str, device: torch.device | str) -> str:
    """``"fp32"`` or ``"bf16"``: the choice itself, or for ``"auto"`` the faster one on ``device``
    (bf16 on CUDA; on a CPU bf16 only if measured ``AUTO_BF16_SPEEDUP`` times faster; else fp32)."""
    if precision in PRECISIONS:
        return precision
    if precision != "auto":
        raise MLSAEError(f"precision must be one of auto, {', '.join(PRECISIONS)}; got {precision!r}")
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16"
    if device.type != "cpu":
        return "fp32"
    return "bf16" if bf16_speedup(device) >= AUTO_BF16_SPEEDUP else "fp32"


def autocast(precision: str, device: torch.device | str) -> torch.autocast:
    """bf16 autocast on ``device`` when ``precision`` resolves to bf16, else a disabled autocast."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=resolve(precision, device) == "bf16")


def bf16_speedup(device: torch.device | str) -> float:
    """How many times faster a bf16 encoder product is than an fp32 one on ``device`` (measured)."""
    rates = gemm_rates(device)
    return rates["bf16"] / rates["fp32"]


def int8_speedup(device: torch.device | str) -> float:
    """How many times faster an int8 product (``torch._int_mm``, int32 sums) is than an fp32 one on
    ``device`` (measured on CPUs; 0 elsewhere or where it does not run)."""
    rates = gemm_rates(device)
    return rates["int8"] / rates["fp32"]


def gemm_rates(device: torch.device | str = "cpu") -> dict:
    """GFLOP/s of an encoder-shaped product in fp32, bf16 and int8 (GOP/s; CPUs only, else 0) on
    ``device``, with the machine facts.

    ``{"fp32": ..., "bf16": ..., "int8": ..., "device": "cpu", "cpu": model, "nproc": ..., "threads": ...,
    "torch": ..., "shape": [n, d, latents], "measured": date}``; measured once per machine and cached (a
    cache file that cannot be read or does not match is measured again).
    """
    device = torch.device(device)
    facts = machine(device)
    key = tuple(map(str, facts.values()))  # asked for per encoder product: no file path built for a known key
    rates = _rates.get(key)
    if rates is None:
        path = cache_dir() / "machine" / f"{_slug(facts)}.json"
        rates = _load(path, facts)
        if rates is None:
            rates = {**facts, **_measure(device), "measured": datetime.datetime.now().isoformat(timespec="seconds")}
            atomic_write_text(path, json.dumps(rates, indent=2) + "\n")
        _rates[key] = rates
    return rates


def machine(device: torch.device) -> dict:
    """What GEMM rates depend on: the processor (CPU model, cores, torch threads, oneDNN's instruction-set
    cap if set; or the GPU) and torch."""
    if device.type == "cuda":
        return {"device": "cuda", "gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
                "shape": list(SHAPE)}
    facts = {"device": device.type, "cpu": cpu_model(), "nproc": os.cpu_count(), "threads": torch.get_num_threads(),
             "torch": torch.__version__, "shape": list(SHAPE)}
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    if cap:  # oneDNN's instruction-set cap changes the bf16 kernels (AMX off: several times slower)
        facts["onednn_max_cpu_isa"] = cap
    return facts


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else platform's)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _slug(facts: dict) -> str:
    name = "-".join(str(v) for k, v in facts.items() if k != "shape")
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")


def _load(path: Path, facts: dict) -> dict | None:
    """The cached rates, or None if missing, corrupt or made for other facts."""
    try:
        rates = json.loads(path.read_text())
        ok = all(rates[k] == v for k, v in facts.items()) and all(
            isinstance(rates[p], float) and rates[p] > 0 for p in PRECISIONS) and isinstance(rates["int8"], float)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return rates if ok else None


@torch.no_grad()
def _measure(device: torch.device) -> dict[str, float]:
    """Rates from the fastest of REPEATS products per precision, all interleaved so that a
    background load slows each alike (their ratios are what decisions use)."""
    n, d, f = SHAPE
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, d, generator=g, device=device)
    W = torch.randn(f, d, generator=g, device=device)
    products = {p: functools.partial(torch.mm, x.to(t), W.to(t).T, out=torch.empty(n, f, dtype=t, device=device))
                for p, t in zip(PRECISIONS, (torch.float32, torch.bfloat16))}
    if device.type == "cpu" and _int_mm_runs():
        products["int8"] = functools.partial(torch._int_mm, x.to(torch.int8), W.to(torch.int8).T)
    seconds: dict[str, list[float]] = {p: [] for p in products}
    with torch.autocast(device.type, enabled=False):
        for _ in range(1 + REPEATS):  # the first round warms up (threads, kernel selection, pages)
            for p, product in products.items():
                start = time.perf_counter()
                product()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds[p].append(time.perf_counter() - start)
    return {"int8": 0.0} | {p: 2 * n * d * f / min(s[1:]) / 1e9 for p, s in seconds.items()}


def _int_mm_runs() -> bool:
    """Whether this torch has a CPU int8 product with int32 sums (and it gives the right answer)."""
    a = torch.arange(-64, 64, dtype=torch.int8).view(32, 4)
    try:
        return torch.equal(torch._int_mm(a, a.T.contiguous()), a.int() @ a.int().T)
    except (RuntimeError, AttributeError):
        return False
