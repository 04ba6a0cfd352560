"""How an exact fp32 TopK can rank latents with a cheaper product: the candidates its proof needs.

``mlsae.kernels._encode_mixed`` ranks each vector's latents by an upper bound of their fp32 scores
(a low-precision score plus a proven bound on its error), rescores the best few in fp32, and proves
that no other latent can enter the fp32 TopK. The fewer latents whose upper bound reaches the k-th
fp32 score, the fewer candidates the proof needs. This script counts them for bf16 with one bound
per vector (the largest row of W in it: the first version of that path), bf16 with a bound per
latent (the path now), int8 (symmetric, per row; 7-bit inputs are what an AVX2 int8 kernel can
take without saturating its 16-bit pair sums) with one bound per vector, and int8 as the path
takes it (outlier features moved into W, a bound per latent), and times the products:

    python benchmarks/ranking_bound.py                 # random data, the benchmark's large shape
    python benchmarks/ranking_bound.py --sae runs/default/sweep/mlsae-SmolLM2-135M-Instruct-x8-k32

With ``--sae``, the vectors are residuals of the Brown test split as that trained MLSAE's encoder
sees them (its position rule, standardized, minus b_pre), and the script also times its fp32 encode
three ways: ranked by the bf16 product, by the int8 product, and the plain fp32 product.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import Tensor

from mlsae import kernels
from mlsae.precision import cpu_model

N, D, LATENTS, K = 256, 512, 32768, 32  # vectors, d, latents, k (Pythia-70m x64, as in bench.py)


def quantize(t: Tensor, levels: int) -> Tensor:
    """``t`` rounded to ``levels`` steps either side of zero, per row (dequantized)."""
    scale = t.abs().amax(1, keepdim=True) / levels
    return torch.round(t / scale) * scale


def needed(upper: Tensor, kth: Tensor) -> Tensor:
    """Per vector: the latents whose upper bound reaches the k-th fp32 score (a proof must rescore them)."""
    return (upper >= kth[:, None]).sum(1).float()


def bounds(u: Tensor, W: Tensor) -> dict[str, Tensor]:
    """Upper bounds of ``u @ W.T``, one tensor per ranking: a low-precision score plus a bound on its
    error, |u.w - uq.wq| <= |u - uq| |w| + |uq| |w - wq| (with the actual rounding errors, and
    the fp32 sums' rounding), or the first version's 2^-7 |u| |w| taken at the largest row of W."""
    d = u.shape[1]
    u_norm, W_norm = u.norm(dim=1, keepdim=True), W.norm(dim=1)
    u16, W16 = u.bfloat16().float(), W.bfloat16().float()
    score = u16 @ W16.T
    out = {"bf16, one bound per vector": score + u_norm * W_norm.max() * (2**-7 + 2**-15 + 2 * d * 2**-24),
           "bf16, a bound per latent": score + ((u - u16).norm(dim=1, keepdim=True) * W_norm
                                                + u16.norm(dim=1, keepdim=True) * (W - W16).norm(dim=1)
                                                + 3 * d * 2**-24 * u_norm * W_norm)}
    for bits, levels in [(7, 63), (8, 127)]:
        uq, Wq = quantize(u, levels), quantize(W, 127)
        error = ((u - uq).norm(dim=1, keepdim=True) * W_norm.max()
                 + uq.norm(dim=1, keepdim=True) * (W - Wq).norm(dim=1).max())
        out[f"int8 ({bits}-bit inputs), per vector"] = uq @ Wq.T + error
    c = kernels.int8_smoothing(u.abs().amax(0), W)  # as _encode_mixed: outliers moved into W, exactly
    us, Ws = u / c, W * c
    uq, Wq = quantize(us, 127), quantize(Ws, 127)
    out["int8, smoothed, a bound per latent"] = uq @ Wq.T + (
        (us - uq).norm(dim=1, keepdim=True) * Ws.norm(dim=1) + uq.norm(dim=1, keepdim=True) * (Ws - Wq).norm(dim=1)
        + 3 * d * 2**-24 * us.norm(dim=1, keepdim=True) * Ws.norm(dim=1))
    return out


def report(u: Tensor, W: Tensor, k: int) -> None:
    kth = (u @ W.T).topk(k, dim=1).values[:, -1]
    print(f"{len(u)} vectors, d {u.shape[1]}, {W.shape[0]} latents, k {k}: latents a proof must rescore "
          f"(the first round takes 3k = {3 * k} candidates for bf16, 6k = {6 * k} for int8)")
    for name, upper in bounds(u, W).items():
        need = needed(upper, kth)
        first = (3 if name.startswith("bf16") else 6) * k
        print(f"  {name:36s} median {need.median():5.0f}, 90th percentile {need.quantile(0.9):5.0f}, "
              f"most {need.max():5.0f}; first round settles {(need <= first).float().mean():.1%}")


def seconds(fn) -> float:
    fn()
    return min(_time(fn) for _ in range(5))


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def products() -> None:
    n, d, f = 1024, 576, 4608
    a, b = torch.randn(n, d), torch.randn(f, d)  # b laid out as W_enc, as mlsae.precision times it
    a16, b16 = a.bfloat16(), b.bfloat16()
    a8, b8 = torch.randint(-127, 128, (n, d), dtype=torch.int8), torch.randint(-127, 128, (f, d), dtype=torch.int8)
    flops = 2 * n * d * f
    print(f"products of {n} x {d} x {f}: fp32 {flops / seconds(lambda: a @ b.T) / 1e9:.0f} GFLOP/s, "
          f"bf16 {flops / seconds(lambda: a16 @ b16.T) / 1e9:.0f} GFLOP/s, "
          f"int8 (torch._int_mm) {flops / seconds(lambda: torch._int_mm(a8, b8.T)) / 1e9:.0f} GOP/s")


@torch.no_grad()
def trained(sae_dir: str, n_tokens: int) -> tuple[Tensor, Tensor, int]:
    """Residual vectors of the Brown test split as the encoder of the MLSAE in ``sae_dir`` sees them,
    its W_enc and its k."""
    from mlsae.data import DataOptions, load_chunks
    from mlsae.model import MLSAE
    from mlsae.positions import read_residuals, rule_of
    from mlsae.transformer import transformer_for

    sae = MLSAE.from_pretrained(sae_dir)
    transformer = transformer_for(sae, None, torch.device("cpu"), sae_dir)
    data = DataOptions()
    chunks = load_chunks(data.path, "test", transformer.tokenizer, data.max_length, max_tokens=n_tokens)
    layers = sae.config.layers or list(range(sae.config.n_layers))
    x = read_residuals(transformer, chunks, layers, rule_of(sae.config)).kept
    z = sae.standardize(sae.to_sae_space(x)).x.reshape(-1, x.shape[-1])
    return (z - sae.b_pre).contiguous(), sae.W_enc.detach().contiguous(), sae.config.k


def encode_times(u: Tensor, W: Tensor, k: int, rounds: int = 3) -> None:
    """The fp32 encode of ``u`` ranked by a bf16 product, by an int8 product, and by the plain fp32
    product, in alternating rounds (so that background load hits each alike); the best time of each."""
    choose = kernels.ranking_dtype
    best = {dtype: float("inf") for dtype in (torch.bfloat16, torch.int8, None)}
    try:
        for _ in range(rounds):
            for dtype in best:
                kernels.ranking_dtype = lambda device, n_latents, dtype=dtype: dtype
                best[dtype] = min(best[dtype], seconds(lambda: kernels.topk_encode(u, W, k)))
    finally:
        kernels.ranking_dtype = choose
    plain = best.pop(None)
    print(f"  fp32 encode: plain {plain * 1e3:.0f} ms; " + ", ".join(
        f"{kernels.RANKED_PATHS[dtype]} {t * 1e3:.0f} ms ({t / plain:.2f} of plain)" for dtype, t in best.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sae", help="a trained MLSAE's folder: its W_enc and real residuals instead of random data")
    parser.add_argument("--tokens", type=int, default=512, help="with --sae: tokens of the test split to read")
    args = parser.parse_args()
    print(f"{cpu_model()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    if args.sae:
        u, W, k = trained(args.sae, args.tokens)
        report(u, W, k)
        encode_times(u, W, k)
    else:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(N, D, generator=g)
        report(x, torch.nn.functional.normalize(torch.randn(LATENTS, D, generator=g), dim=1), K)
    products()


if __name__ == "__main__":
    main()
