"""Why fp32 encoding ranks latents with bf16 and not int8: the candidates an exact TopK must rescore.

``mlsae.kernels._encode_mixed`` ranks each vector's latents by a low-precision product, rescores the
best few in fp32, and proves with an error bound that no other latent can enter the fp32 TopK. The
number of candidates the proof needs grows with the bound. This script measures it for bf16 and for
int8 (symmetric, per row; 7-bit inputs are what an AVX2 int8 kernel can take without saturating its
16-bit pair sums) on random data at the benchmark's large shape, and times the products:
``python benchmarks/ranking_bound.py``.
"""

from __future__ import annotations

import time

import torch

N, D, LATENTS, K = 256, 512, 32768, 32  # vectors, d, latents, k (Pythia-70m x64, as in bench.py)


def quantize(t: torch.Tensor, levels: int) -> torch.Tensor:
    """``t`` rounded to ``levels`` steps either side of zero, per row (dequantized)."""
    scale = t.abs().amax(1, keepdim=True) / levels
    return torch.round(t / scale) * scale


def candidates(x: torch.Tensor, W: torch.Tensor, xq: torch.Tensor, Wq: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """Per vector: the latents whose low-precision score is within twice the bound of the k-th fp32 score."""
    kth = (x @ W.T).topk(K, dim=1).values[:, -1]
    return ((xq @ Wq.T) >= (kth - 2 * bound)[:, None]).sum(1).float()


def rate(fn, flops: float) -> float:
    fn()
    return flops / min(_time(fn) for _ in range(5)) / 1e9


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    W = torch.nn.functional.normalize(torch.randn(LATENTS, D, generator=g), dim=1)
    bf16_bound = x.norm(dim=1) * (2**-7 + 2**-15 + 2 * D * 2**-24)  # the bound _encode_mixed uses
    print(f"{N} random vectors, d {D}, {LATENTS} latents, k {K}: candidates an exact TopK must rescore")
    for name, xq, Wq in [("bf16", x.bfloat16().float(), W.bfloat16().float()),
                         ("int8, 7-bit inputs", quantize(x, 63), quantize(W, 127)),
                         ("int8, 8-bit inputs", quantize(x, 127), quantize(W, 127))]:
        # |u.w - uq.wq| <= |u - uq| |w| + |uq| |w - wq|, with the actual rounding errors
        bound = bf16_bound if name == "bf16" else (
            (x - xq).norm(dim=1) * W.norm(dim=1).max() + xq.norm(dim=1) * (W - Wq).norm(dim=1).max())
        need = candidates(x, W, xq, Wq, bound)
        print(f"  {name:20s} bound {float((bound / x.norm(dim=1)).mean()):.4f} |u| |w|: "
              f"median {need.median():.0f}, most {need.max():.0f}")
    n, d, f = 1024, 576, 4608
    a, b = torch.randn(n, d), torch.randn(f, d)  # b laid out as W_enc, as mlsae.precision times it
    a16, b16 = a.bfloat16(), b.bfloat16()
    a8, b8 = torch.randint(-127, 128, (n, d), dtype=torch.int8), torch.randint(-127, 128, (f, d), dtype=torch.int8)
    flops = 2 * n * d * f
    print(f"products of {n} x {d} x {f}: fp32 {rate(lambda: a @ b.T, flops):.0f} GFLOP/s, "
          f"bf16 {rate(lambda: a16 @ b16.T, flops):.0f} GFLOP/s, "
          f"int8 (torch._int_mm) {rate(lambda: torch._int_mm(a8, b8.T), flops):.0f} GOP/s")


if __name__ == "__main__":
    main()
