"""Sparse TopK encode and decode: the training hot path never builds a dense [vectors, n_latents] gradient.

The encoder's forward needs one dense product (the pre-activations); everything after
the TopK touches only the k selected latents of each vector (AuxK, over the few dead latents, is
dense over those alone: ``auxk_sq_error``):

- encode:   pre = (x - b) @ W_enc.T into reused, cache-sized buffers, never as a whole [N, F]:
            by chunks of vectors (all latents), or for many latents by tiles (a block of
            latents by a chunk of vectors) folded into a running TopK per vector; in fp32 on a
            CPU whose bf16 or int8 product is measured (mlsae.precision) to be fast enough,
            latents are ranked by that product plus a proven bound on its error, and the best
            few rescored in fp32 (the same TopK; 1.4-2.6x faster where bf16 GEMMs are 4x faster,
            about 2x where int8 is 5x faster, at 32,768 latents); under bf16 autocast
            on a CPU whose bf16 product is the slower, in fp32 (``gemm_dtype``). ``encode_path``
            says which path.
- decode:   out[i] = sum_j values[i, j] * W_dec[indices[i, j]]           (gathers of W_dec's rows)
- backward: grad_W[f] = sum over (i, j) with indices[i, j] == f of g[i, j] * x[i]   (scatter)
            grad_x[i] = sum_j g[i, j] * W_enc[indices[i, j]]            (embedding_bag)
            grad_b    = -sum_f (sum of g at f) * W_enc[f]              (no per-vector pass)

The loss's dense passes live here too, so that mlsae.model reads as the method: ``standardize``
(one pass, with the encoder's bf16 input), ``scaled_error`` (the raw-space error and its MSE,
one pass each way) and ``project_rows_`` (the decoder-gradient constraint).

TopK, the scatters and the decode's backward run in mlsae.native's C loops when that compiles
(fp32/bf16 tensors on a CPU), otherwise in PyTorch ops (CUDA included); both paths are checked
against naive dense autograd in tests/test_kernels.py. The decoder's backward hands its sort of
the TopK indices to the encoder's through the TopK that ``topk_encode`` returns, not through
module state. The scratch buffers are module-level: not for concurrent calls from several threads.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mlsae import native, precision

# Bytes of pre-activations per chunk of vectors on the row-chunk path: W_enc is read once per
# chunk, so chunks must be large for large F; the buffer is reused across steps.
CHUNK_BYTES = 64 << 20
GPU_CHUNK_BYTES = 1 << 30  # fewer, larger products on a GPU
# The tiled path (native TopK, no AuxK): latents per block and bytes per tile (cache-sized).
# Measured: below ~8k latents one product per chunk of vectors is as fast or faster.
LATENT_BLOCK = 2048
TILE_BYTES = 4 << 20
TILED_MIN_LATENTS = 4 * LATENT_BLOCK
SPAN_ROWS = 16384  # vectors per pass over W_enc on the tiled path
# fp32 without autocast: rank latents with a bf16 product, then rescore in fp32 (exact; see
# _encode_mixed), where mlsae.precision measures the bf16 product at least this many times faster
# than fp32. Measured break-even on random data (batch 4096, k 32): ~2.0x at 4608 latents, ~1.25x
# at 32768 (the rescoring costs per vector, the saving per latent); AMX Xeon ~4-7x, EPYC 2.2-2.6x,
# no-AMX Xeon 0.6x. On a trained MLSAE and real residuals (benchmarks/ranking_bound.py --sae), a
# Zen 4 EPYC (bf16 2.4x fp32): 0.8 of the plain fp32 encode's time.
MIXED_SELECT_SPEEDUP = 2.0
# Else int8 (torch._int_mm), where at least this many times faster than fp32 and for more latents
# than this: its operands cost more to make (smoothing, rounding, a pass to bound each tile) and it
# takes twice the candidates, costs per vector, while it saves per latent. On real residuals, int8
# 4.8x fp32 (a Zen 4 EPYC, oneDNN capped at AVX512_CORE_VNNI): 1.0 of the plain fp32 encode's time
# with the trained x8 MLSAE (4,608 latents), 0.4-0.6 at 32,768 latents (benchmarks/ranking_bound.py).
INT8_SELECT_SPEEDUP = 3.0
INT8_SELECT_MIN_LATENTS = 8192


class TopK(NamedTuple):
    """The k largest pre-activations of each vector, after ReLU, and their latent indices."""

    values: Tensor  # [..., k] float32
    indices: Tensor  # [..., k] int64

    def reshape(self, *shape: int) -> TopK:
        """Values and indices reshaped to ``[*shape, k]``."""
        return TopK(self.values.reshape(*shape, -1), self.indices.reshape(*shape, -1))


class _Encoded(TopK):
    """``topk_encode``'s TopK, which also carries the ``native.IndexSort`` that its decoder's backward
    fills in for the encoder's backward (both scatter over these indices). Unpacks like a TopK."""

    def __new__(cls, values: Tensor, indices: Tensor, sort: native.IndexSort) -> _Encoded:
        self = super().__new__(cls, values, indices)
        self.sort = sort
        return self


def gemm_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the encoder product: the autocast dtype when autocast is on, else x's dtype;
    but fp32 for an fp32 ``x`` under bf16 autocast where bf16 products are the slower
    (``bf16_slower``): there fp32 is both faster and exact."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        if dtype == torch.bfloat16 and x.dtype == torch.float32 and bf16_slower(x.device):
            return torch.float32
        return dtype
    return x.dtype


def bf16_slower(device: torch.device) -> bool:
    """Whether a bf16 encoder product is slower than an fp32 one on this CPU (measured by
    mlsae.precision: an Intel Xeon without AMX, 0.6x; an EPYC without AVX-512, 0.1x)."""
    return device.type == "cpu" and precision.bf16_speedup(device) < 1


# ----------------------------------------------------------------------------- building blocks


FP32 = (torch.float32,)


def _native(*tensors: Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.int64)) -> bool:
    """Whether the C kernels take these tensors: loaded, contiguous CPU tensors of ``dtypes``."""
    return all(t.dtype in dtypes for t in tensors) and native.usable(*tensors)


def _topk_relu(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """ReLU of the k largest values of each row of ``pre`` and their columns (int64), unordered.

    Values are fp32 (fp64 for fp64 input).
    """
    if _native(pre):
        out = native.topk_rows(pre, k)
        if out is not None:
            return out
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return values.to(torch.promote_types(values.dtype, torch.float32)).relu_(), indices


def _chunk_rows(n_latents: int, itemsize: int, device: torch.device) -> int:
    budget = GPU_CHUNK_BYTES if device.type == "cuda" else CHUNK_BYTES
    return max(16, budget // (n_latents * itemsize))


_buffers: dict[tuple, Tensor] = {}


def _buffer(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A scratch tensor reused across calls (fresh large allocations cost page faults on every step)."""
    key = (name, dtype, device)
    buf = _buffers.get(key)
    size = int(torch.Size(shape).numel())
    if buf is None or buf.numel() < size:
        buf = _buffers[key] = torch.empty(size, dtype=dtype, device=device)
    return buf[:size].view(shape)


def scatter_rows(weights: Tensor, indices: Tensor, x: Tensor, n_latents: int, shift: Tensor | None = None,
                 check: bool = True, sort: native.IndexSort | None = None) -> tuple[Tensor, Tensor]:
    """``sum_{(i,j): indices[i,j]==f} weights[i,j] * (x[i] - shift)`` as a dense [F, d], and
    ``sum weights`` per f [F] (fp32 for bf16 x). Never materialises the [N*k, d] outer products
    (nor x - shift). ``check=False`` skips the range check of indices made by the encoder itself;
    ``sort``: a decode backward's sort of the same indices (``native.IndexSort``).
    """
    low = x.dtype in (torch.bfloat16, torch.float16)
    weights = weights.to(torch.float32 if low else x.dtype).contiguous()
    if x.dtype in (torch.float32, torch.bfloat16) and _native(weights, indices, x) and (
        shift is None or shift.dtype == torch.float32
    ):
        if check:
            _check_indices(indices, n_latents)
        return native.scatter_rows(weights, indices, x, n_latents, True, None if shift is None else shift.contiguous(),
                                   sort)
    if low:
        x = x.float()
    if check:
        _check_indices(indices, n_latents)
    # Sorted by latent, each latent's entries are one bag of rows of x: a weighted embedding_bag
    # sums them (no [N*k, d] temporaries, no sparse coalescing, no host sync on a GPU).
    flat, weights = indices.reshape(-1), weights.reshape(-1)
    latents, order = flat.sort()
    offsets = torch.searchsorted(latents, torch.arange(n_latents, device=x.device))
    out = F.embedding_bag(order // indices.shape[1], x, offsets, mode="sum", per_sample_weights=weights[order])
    wsum = torch.zeros(n_latents, dtype=x.dtype, device=x.device).index_add_(0, flat, weights)
    if shift is not None:
        out.addr_(wsum, shift.to(out.dtype), alpha=-1)
    return out, wsum


def _check_indices(indices: Tensor, n_latents: int) -> None:
    """The C kernels trust their indices; out-of-range ones must fail here, as PyTorch's ops would."""
    if indices.numel():
        low, high = torch.aminmax(indices)
        if int(low) < 0 or int(high) >= n_latents:
            raise IndexError(f"latent indices out of range [0, {n_latents})")


# ----------------------------------------------------------------------------- encode


class _TopKEncode(torch.autograd.Function):
    """TopK over ``(x - b) @ W_enc.T`` then ReLU: one dense product, computed chunk by chunk or tile
    by tile; a sparse backward."""

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b: Tensor | None, k: int, x_low: Tensor | None,
                sort: native.IndexSort):
        u_low = x_low if x_low is not None else _low_precision_input(x, b)
        values, indices = _encode_chunks(x, W_enc, b, k, u_low)
        ctx.save_for_backward(x, W_enc, b, u_low, values, indices)
        ctx.sort = sort
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values, _grad_indices):
        x, W_enc, b, u_low, values, indices = ctx.saved_tensors
        grad = grad_values * (values > 0)
        sort = ctx.sort
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, W_enc, per_sample_weights=grad.to(W_enc.dtype), mode="sum").to(x.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            if u_low is not None:  # under autocast, from the product's own inputs (as autocast's linear does)
                grad_W, per_latent = scatter_rows(grad, indices, u_low, W_enc.shape[0], check=False, sort=sort)
            else:  # the encoder saw x - b
                shift = None if b is None else b.detach().to(x.dtype)
                grad_W, per_latent = scatter_rows(grad, indices, x, W_enc.shape[0], shift, check=False, sort=sort)
            grad_W = grad_W.to(W_enc.dtype)
            if b is not None and ctx.needs_input_grad[2]:
                grad_b = -(per_latent.to(W_enc.dtype) @ W_enc)
        return grad_x, grad_W, grad_b, None, None, None


@torch.no_grad()
def _low_precision_input(x: Tensor, b: Tensor | None) -> Tensor | None:
    """``x - b`` in the autocast dtype when that is below x's (the encoder product's input, kept
    for the weight gradient), else None."""
    dtype = gemm_dtype(x)
    if dtype not in (torch.bfloat16, torch.float16) or x.dtype == dtype:
        return None
    with torch.autocast(x.device.type, enabled=False):
        return x.to(dtype) if b is None else torch.sub(x, b.detach(), out=torch.empty_like(x, dtype=dtype))


def ranking_dtype(device: torch.device, n_latents: int) -> torch.dtype | None:
    """The cheaper product that ranks the latents of an fp32 TopK on this machine (its measured GEMM
    rates): bf16 where it is MIXED_SELECT_SPEEDUP times faster than fp32, else int8 where that is
    INT8_SELECT_SPEEDUP times faster and there are many latents; None (the plain fp32 product)
    otherwise and off CPUs."""
    if device.type != "cpu":
        return None
    if precision.bf16_speedup(device) >= MIXED_SELECT_SPEEDUP:
        return torch.bfloat16
    if n_latents > INT8_SELECT_MIN_LATENTS and precision.int8_speedup(device) >= INT8_SELECT_SPEEDUP:
        return torch.int8
    return None


RANKED_PATHS = {torch.bfloat16: "mixed-select", torch.int8: "int8-select"}


def encode_path(x: Tensor, W_enc: Tensor, k: int) -> str:
    """How ``topk_encode`` computes the TopK of ``x`` (under the current autocast):

    - ``"mixed-select"``, ``"int8-select"``: fp32, ranked by a bf16 or int8 product, then rescored
      in fp32 (``_encode_mixed``);
    - ``"tiled"``: tiles of the product folded into a running TopK (many latents, native kernels);
    - ``"rows"``: chunks of vectors by all latents (few latents, CUDA, no native kernels).

    The product's dtype is ``gemm_dtype``'s.
    """
    if x.dtype != torch.float32 or not _native(x, W_enc):
        return "rows"
    if gemm_dtype(x) == torch.float32 and W_enc.shape[0] >= 8 * k:
        ranking = ranking_dtype(x.device, W_enc.shape[0])
        if ranking is not None:
            return RANKED_PATHS[ranking]
    return "tiled" if W_enc.shape[0] > TILED_MIN_LATENTS else "rows"


@torch.no_grad()
def _encode_chunks(x: Tensor, W_enc: Tensor, b: Tensor | None, k: int, u_low: Tensor | None = None
                   ) -> list[Tensor]:
    """[values, indices] of every vector, without an [N, F] product.

    ``u_low``: ``x - b`` already in the product's dtype, when lower than fp32."""
    dtype = gemm_dtype(x)
    path = encode_path(x, W_enc, k)
    with torch.autocast(x.device.type, enabled=False):
        W = W_enc.detach() if W_enc.dtype == dtype else _buffer("W", W_enc.shape, dtype, x.device).copy_(W_enc)

        def inputs(r0: int, r1: int) -> Tensor:  # (x - b)[r0:r1] in the product's dtype
            return u_low[r0:r1] if u_low is not None else _shifted(x[r0:r1], b, dtype)

        if path in RANKED_PATHS.values():
            return _encode_mixed(x, W, b, k, ranking_dtype(x.device, W.shape[0]))
        if path == "tiled":
            out = _encode_tiles(inputs, x.shape[0], W, k)
            if out is not None:
                return out
        return _encode_rows(inputs, x, W, k)


def _encode_mixed(x: Tensor, W: Tensor, b: Tensor | None, k: int, dtype: torch.dtype) -> list[Tensor]:
    """The fp32 TopK from a cheaper product, bf16 or int8 (``ranking_dtype``).

    The cheaper product ranks each vector's latents by an upper bound of their fp32 scores: its
    score plus a proven bound on the error, |u - uq| |W_f| + |uq| |W_f - Wq_f| for the rounded
    operands uq, Wq (and the fp32 sums' rounding). Its best candidates (3k for bf16, 6k for int8)
    are rescored in fp32, and the bounds prove that no other latent can be in the fp32 TopK. A
    bound per latent, not one for the largest row of W, is what settles most vectors of a trained
    MLSAE in the first round (its rows differ in norm, and its scores crowd near the k-th). Rows
    it cannot prove get a second round with 16k candidates, and what remains is computed in fp32.
    Same latents and values as the fp32 product, up to fp32 rounding.
    """
    n, n_latents = x.shape[0], W.shape[0]
    first = min(n_latents, (3 if dtype == torch.bfloat16 else 6) * k)
    values = torch.empty(n, k, dtype=torch.float32, device=x.device)
    indices = torch.empty(n, k, dtype=torch.long, device=x.device)
    if dtype == torch.bfloat16:
        ranked_W, c = _bf16_operand(W, "W_mixed", latents=True), None
    else:  # every span shares W's operand: c from |x - b| <= |x| + |b| (any c > 0 keeps u.w exact)
        c = int8_smoothing(x.abs().amax(0) if b is None else x.abs().amax(0).add_(b.detach().abs()), W)
        ranked_W = _int8_operand(torch.mul(W, c, out=_buffer("W_smooth", W.shape, torch.float32, W.device)),
                                 "W8", latents=True)
    for s0 in range(0, n, SPAN_ROWS):
        s1 = min(s0 + SPAN_ROWS, n)
        u = _shifted(x[s0:s1], b, torch.float32)
        if c is None:
            ranked_u = _bf16_operand(u, "u_mixed", latents=False)
        else:
            ranked_u = _int8_operand(torch.div(u, c, out=_buffer("u_smooth", u.shape, torch.float32, u.device)),
                                     "u8", latents=False)
        v, i, left = _mixed_round(u, ranked_u, ranked_W, W, k, first)
        if left.any():  # a second round, wider, for the rows the first could not settle
            rows = left.nonzero().flatten()
            v2, i2, left2 = _mixed_round(u[rows], ranked_u.take(rows), ranked_W, W, k, min(n_latents, 16 * k))
            if left2.any():
                rows2 = left2.nonzero().flatten()
                v2[rows2], i2[rows2] = _topk_relu(u[rows[rows2]] @ W.T, k)
            v[rows], i[rows] = v2, i2
        values[s0:s1], indices[s0:s1] = v, i
    return [values, indices]


class _Ranked(NamedTuple):
    """One operand of a ranking product: the rounded matrix (bf16, or int8 with a scale per row),
    and per row the two error factors of the bound, ``err [2, rows]``: a vector's row pairs with
    a latent's as ``err_u[0] err_W[0] + err_u[1] err_W[1]``."""

    values: Tensor  # [rows, d (+ BOUND_COLUMNS for bf16)]
    scale: Tensor | None  # [rows] (int8)
    err: Tensor  # [2, rows] fp32

    def take(self, rows: Tensor) -> _Ranked:
        return _Ranked(self.values[rows], None if self.scale is None else self.scale[rows],
                       self.err[:, rows].contiguous())


# The bf16 operands carry this many more columns: the two error factors, then zeros, so that the
# product adds the bound to each score itself.
BOUND_COLUMNS = 8
ROUND_UP = 1 + 2**-6  # an fp32 norm's rounding, then bf16's (2^-8): the bound never rounds down
INT8_SMOOTHING = 0.7  # int8: feature j of u divided, of W multiplied, by amax|u_j|^a / amax|W_j|^(1-a)


def _error_factors(t: Tensor, rounded: Tensor, latents: bool) -> Tensor:
    """``[2, rows]``: for W's rows (|W_f|, |W_f - Wq_f|), for vectors (|u - uq| + the fp32 sums'
    share 3 d 2^-24 |u|, |uq|), rounded up; ``rounded`` is the dequantized uq or Wq (fp32 or bf16)."""
    norm = functools.partial(torch.linalg.vector_norm, dim=1, dtype=torch.float32)
    error = norm(torch.sub(t, rounded, out=_buffer("rounding", t.shape, torch.float32, t.device)))
    if latents:
        return torch.stack([norm(t), error]).mul_(ROUND_UP)
    return torch.stack([error.add_(norm(t), alpha=3 * t.shape[1] * 2**-24), norm(rounded)]).mul_(ROUND_UP)


def _bf16_operand(t: Tensor, name: str, latents: bool) -> _Ranked:
    """``[bf16(t) | error factors | zeros]`` in a buffer, and its error factors as the product reads them."""
    m, d = t.shape
    out = _buffer(name, (m, d + BOUND_COLUMNS), torch.bfloat16, t.device)
    out[:, d:].zero_()
    err = _error_factors(t, out[:, :d].copy_(t), latents)
    out[:, d : d + 2].copy_(err.T)
    return _Ranked(out, None, out[:, d : d + 2].T.float().contiguous())


def int8_smoothing(u_amax: Tensor, W: Tensor) -> Tensor:
    """Per feature j, c_j = amax|u_j|^a / amax|W_j|^(1-a) (a = INT8_SMOOTHING): dividing the vectors'
    feature j by c_j and multiplying W's column j by it leaves u.w as it is, and moves the vectors'
    outlier features into W's columns, where int8 rounds each row with its own scale."""
    a = INT8_SMOOTHING
    return u_amax.clamp_min(1e-30).pow_(a).div_(W.abs().amax(0).clamp_min_(1e-30).pow_(1 - a))


def _int8_operand(t: Tensor, name: str, latents: bool) -> _Ranked:
    """``t`` (smoothed) rounded to int8, each row with its own scale, and its error factors."""
    amax = t.abs().amax(1)
    scale = torch.where(amax > 0, amax / 127, 1.0)
    q = _buffer("quantized", t.shape, torch.float32, t.device)
    torch.div(t, scale[:, None], out=q).round_().clamp_(-127, 127)
    values = _buffer(name, t.shape, torch.int8, t.device).copy_(q)
    return _Ranked(values, scale, _error_factors(t, q.mul_(scale[:, None]), latents))


def _mm_tile(u: Tensor, W: Tensor, r0: int, r1: int, c0: int, c1: int, out: Tensor) -> Tensor:
    """Vectors r0..r1 of ``u`` by latents c0..c1 of ``W``, into ``out``."""
    return torch.mm(u[r0:r1], W[c0:c1].T, out=out.view(r1 - r0, c1 - c0))


def _ranked_tile(u: _Ranked, W: _Ranked, r0: int, r1: int, c0: int, c1: int, out: Tensor) -> Tensor:
    """Upper bounds of the fp32 scores of vectors r0..r1 by latents c0..c1, into ``out`` (bf16
    for a bf16 product, whose bound columns add the errors; fp32 for int8)."""
    if u.scale is None:
        return _mm_tile(u.values, W.values, r0, r1, c0, c1, out)
    sums = _buffer("int8_sums", (r1 - r0, c1 - c0), torch.int32, out.device)
    torch._int_mm(u.values[r0:r1], W.values[c0:c1].T, out=sums)
    return native.int8_bounds(sums, u.scale[r0:r1], W.scale[c0:c1], u.err[:, r0:r1], W.err[:, c0:c1],
                              out.view(r1 - r0, c1 - c0))


def _mixed_round(u: Tensor, ranked_u: _Ranked, ranked_W: _Ranked, W: Tensor, k: int, n_cand: int
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """One round of _encode_mixed over the rows of ``u``: (values, indices, rows left unsettled)."""
    state = native.TopKState(u.shape[0], n_cand)
    dtype = torch.bfloat16 if ranked_u.scale is None else torch.float32
    tile = functools.partial(_ranked_tile, ranked_u, ranked_W)
    row_err = ranked_u.err
    if _fold_tiles(state, u.shape[0], W.shape[0], tile, dtype, n_cand):  # NaN: no bound holds, all to fp32
        row_err = torch.full_like(row_err, float("nan"))
    cand_values, cand_indices = state.finish(relu=False)
    return native.rescore(cand_values, cand_indices, k, W.shape[0], row_err, ranked_W.err, u.contiguous(), W)


def _encode_tiles(inputs: Callable[[int, int], Tensor], n: int, W: Tensor, k: int) -> list[Tensor] | None:
    """TopK of every vector from tiles of the product, span of vectors by span (None on NaN)."""
    state = native.TopKState(n, k)
    failed = 0
    for s0 in range(0, n, SPAN_ROWS):  # bounds the (x - b) copies for long batches (all layers)
        u = inputs(s0, min(s0 + SPAN_ROWS, n))
        failed += _fold_tiles(state, len(u), W.shape[0], functools.partial(_mm_tile, u, W), W.dtype, min(k, W.shape[0]), s0)
    return None if failed else list(state.finish())


def _fold_tiles(state: native.TopKState, n: int, n_latents: int, tile: Callable[[int, int, int, int, Tensor], Tensor],
                dtype: torch.dtype, min_block: int, row0: int = 0) -> int:
    """Fold the product of ``n`` vectors by ``n_latents`` latents into the running TopK ``state``
    (its rows row0..), tile by tile: ``tile(r0, r1, c0, c1, out)`` computes vectors r0..r1 by
    latents c0..c1 into ``out`` (of ``dtype``) and returns it. Returns the number of tiles holding NaN.

    A tile is a block of latents (at least ``min_block``) by a chunk of vectors. Latent blocks go
    outside, so each block of W is read once while the vectors (small) stay in cache; the C kernel
    folds each tile in while it is still in cache.
    """
    n_blocks = -(-n_latents // LATENT_BLOCK) if n_latents > TILED_MIN_LATENTS else 1
    block = max(-(-n_latents // n_blocks), min_block)
    rows = max(16, TILE_BYTES // (block * dtype.itemsize))
    buf = _buffer("tile", (min(rows, n) * block,), dtype, torch.device("cpu"))  # the native TopK: CPU only
    failed = 0
    for c0 in range(0, n_latents, block):
        c1 = min(c0 + block, n_latents)
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            failed += state.add(tile(r0, r1, c0, c1, buf[: (r1 - r0) * (c1 - c0)]), c0, slice(row0 + r0, row0 + r1))
    return failed


def _encode_rows(inputs: Callable[[int, int], Tensor], x: Tensor, W: Tensor, k: int) -> list[Tensor]:
    """[values, indices] from chunks of vectors by all latents (few latents, and the PyTorch path)."""
    dtype = W.dtype
    n, n_latents = x.shape[0], W.shape[0]
    values = torch.empty(n, k, dtype=x.dtype, device=x.device)
    indices = torch.empty(n, k, dtype=torch.long, device=x.device)
    step = _chunk_rows(n_latents, torch.finfo(dtype).bits // 8, x.device)
    buf = _buffer("pre", (min(step, n), n_latents), dtype, x.device)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        pre = torch.mm(inputs(rows.start, rows.stop), W.T, out=buf[: rows.stop - start])
        if rows.stop - start == n:  # one chunk: no copies
            values, indices = _topk_relu(pre, k)
            return [values.to(x.dtype), indices]
        values[rows], indices[rows] = _topk_relu(pre, k)
    return [values, indices]


def _shifted(x: Tensor, b: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``(x - b)`` in ``dtype`` (one rounding), written into a reused buffer."""
    if b is None:
        return x.to(dtype)
    return torch.sub(x, b, out=_buffer("u" if dtype == x.dtype else "u_gemm", x.shape, dtype, x.device))


def topk_encode(x: Tensor, W_enc: Tensor, k: int, b: Tensor | None = None, x_low: Tensor | None = None) -> TopK:
    """Encode ``x - b`` (``x [N, d]``, ``b [d]`` or None) with ``W_enc [F, d]``: the TopK over all latents.

    ``x_low``: ``x - b`` already in the autocast dtype, if the caller has it (saves a pass).
    Under autocast the weight gradient uses the product's own low-precision inputs, as
    autocast's linear layers do.
    """
    if x_low is not None and x_low.dtype != gemm_dtype(x):
        x_low = None
    sort = native.IndexSort()
    values, indices = _TopKEncode.apply(x.contiguous(), W_enc, b, k, x_low, sort)
    return _Encoded(values, indices, sort)


def auxk_sq_error(x: Tensor, error: Tensor, scale: Tensor, W_enc: Tensor, W_dec: Tensor, b: Tensor | None,
                  dead: Tensor, auxk: int) -> Tensor:
    """How much AuxK changes the summed squared error: ``sum((error + scale * a)^2) - sum(error^2)``,
    where ``a [N, d]`` is AuxK's reconstruction of ``x [N, d]`` (the ``auxk`` largest pre-activations
    among the ``dead`` latents (``[F]`` bool) of each vector, after ReLU, decoded without the
    decoder's bias), ``error [N, d]`` is detached and ``scale`` is ``[N, 1]``.

    Dense over the dead latents alone, and ``a`` is never built: with ``u = scale * relu(pre)`` and
    ``D = W_dec[dead]`` the change is ``2 <u, error @ D.T> + |u @ D|^2``, the last through the Gram
    matrix ``D @ D.T`` while there are fewer dead latents than features. The dead rows' gradients are
    sparse, added in place to the dense ones of the TopK path. Building ``a`` and its error made
    about ten [N, d] passes each way, and dense row gradients two [F, d] fills and adds: the AuxK
    term of a 7,650-vector step with 39 dead latents took 26-28 ms, now 14-15 (AMX Xeon, bf16 and
    fp32). A selection inside the sparse encoder, before that, made the step 2.6x slower.
    """
    if torch.is_autocast_enabled(x.device.type) and gemm_dtype(x) == torch.float32:  # as the encoder's product
        with torch.autocast(x.device.type, enabled=False):
            return auxk_sq_error(x, error, scale, W_enc, W_dec, b, dead, auxk)
    latents = dead.nonzero().flatten()
    W, D = (F.embedding(latents, w, sparse=True) for w in (W_enc, W_dec))  # sparse grads: added in place
    pre = F.linear(x, W, None if b is None else -(W @ b))  # (x - b) @ W.T without an [N, d] pass
    if len(latents) > auxk and bool(((pre > 0).sum(-1) > auxk).any()):  # else ReLU alone keeps the TopK
        top = pre.topk(auxk, dim=-1, sorted=False).indices
        pre = pre * torch.zeros_like(pre, dtype=torch.bool).scatter_(-1, top, True)
    u = pre.relu() * scale  # in scale's precision: under autocast the products alone run in bf16
    cross = (u * F.linear(error, D)).sum()
    if len(latents) <= x.shape[-1]:
        own = (u * F.linear(u, D @ D.T)).sum()
    else:
        own = (u @ D).to(u.dtype).square().sum()
    return 2 * cross + own


# ----------------------------------------------------------------------------- the loss's dense passes


class Standardized(NamedTuple):
    x: Tensor  # standardized input
    mean: Tensor | float
    scale: Tensor | float


class _ScaledError(torch.autograd.Function):
    """Per-layer MSE in the raw space, ``mean(((decoded + b - z) * scale)^2)``, from standardized tensors.

    Returns the MSE [L], the raw-space error ``recon - x`` [M, d] and the reconstruction (both
    detached, for AuxK and the caller); one [M, d] pass forward and one backward, where autograd
    through the de-standardization would make about ten.
    """

    @staticmethod
    def forward(ctx, decoded: Tensor, b: Tensor, z: Tensor, scale: Tensor, x: Tensor, n_layers: int):
        ctx.native = _native(decoded, b, z, scale, x, dtypes=FP32)
        if ctx.native:
            error, recon, per_row = native.scaled_error(decoded, b.detach(), z, scale, x)
            mse = per_row.view(n_layers, -1).sum(1) / (error.numel() // n_layers)
        else:
            error = torch.add(decoded, b).sub_(z).mul_(scale)
            recon = x + error
            mse = torch.linalg.vector_norm(error.view(n_layers, -1), dim=1).square_() / (error.numel() // n_layers)
        ctx.save_for_backward(error, scale)
        ctx.mark_non_differentiable(error, recon)
        ctx.set_materialize_grads(False)  # no [M, d] zeros for the two non-differentiable outputs
        ctx.n_layers = n_layers
        return mse, error, recon

    @staticmethod
    def backward(ctx, grad_mse: Tensor | None, _grad_error: None, _grad_recon: None):
        if grad_mse is None:
            return None, None, None, None, None, None
        error, scale = ctx.saved_tensors
        per_layer = grad_mse * (2 / (error.numel() // ctx.n_layers))
        row_weight = (scale.view(ctx.n_layers, -1) * per_layer[:, None]).reshape(-1)
        if ctx.native:
            grad, grad_b = native.scaled_error_backward(error, row_weight.float().contiguous())
        else:
            grad = error * row_weight[:, None]
            grad_b = grad.sum(0)
        return grad, grad_b if ctx.needs_input_grad[1] else None, None, None, None, None


def standardize(x: Tensor, eps: float, shift: Tensor | None = None) -> tuple[Standardized, Tensor, Tensor | None]:
    """Per-token standardization of ``x [..., d]`` (std + ``eps``), and each token's squared norm
    after centering.

    Two-pass std through a norm: PyTorch's var/std kernels run ~10x slower on CPU. With ``shift``,
    under bf16 autocast and with the C kernels, also ``bf16(z - shift)`` from the same pass (the
    encoder's input, for ``topk_encode``'s ``x_low``), else None.
    """
    if x.dim() == 2 and _native(x, dtypes=FP32):
        if shift is not None and not (gemm_dtype(x) == torch.bfloat16 and shift.dtype == x.dtype):
            shift = None
        z, mean, scale, sq_norm, low = native.standardize(x, eps, shift)
        return Standardized(z, mean, scale), sq_norm, low
    mean = x.mean(-1, keepdim=True)
    centered = x - mean
    sq_norm = torch.linalg.vector_norm(centered, dim=-1, keepdim=True).square_()
    scale = sq_norm.sqrt().div_(math.sqrt(max(x.shape[-1] - 1, 1))).add_(eps)
    return Standardized(centered.div_(scale), mean, scale), sq_norm, None


def scaled_error(decoded: Tensor, b: Tensor, z: Tensor, scale: Tensor, x: Tensor, n_layers: int
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Per-layer MSE ``[L]`` of the raw-space reconstruction ``(decoded + b) * scale + mean`` of ``x``
    (from the standardized ``z``), the error ``recon - x`` and ``recon`` (both detached)."""
    return _ScaledError.apply(decoded, b, z, scale, x, n_layers)


@torch.no_grad()
def project_rows_(g: Tensor, w: Tensor) -> None:
    """In place, ``g[f] -= <g[f], w[f]> w[f]`` for every row: removes from the decoder's gradient its
    component along each (unit) decoder row."""
    if _native(g, w, dtypes=FP32):
        native.project_rows(g, w)
    else:
        g.addcmul_(w, torch.linalg.vecdot(g, w).unsqueeze(-1), value=-1)


# ----------------------------------------------------------------------------- decode


class _SparseDecode(torch.autograd.Function):
    """The C decode forward (blocked for L2); backward in one C pass over the output gradient (no
    [N*k, d] temporaries)."""

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, W_dec: Tensor, sort: native.IndexSort | None) -> Tensor:
        ctx.save_for_backward(values, indices, W_dec)
        ctx.sort = sort
        return native.decode(values, indices, W_dec)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        values, indices, W_dec = ctx.saved_tensors
        grad_out = grad_out.contiguous().float()
        if ctx.needs_input_grad[0] and ctx.needs_input_grad[2]:
            grad_W, grad_values = native.decode_backward(values, indices, grad_out, W_dec, ctx.sort)
            return grad_values, None, grad_W, None
        grad_values = native.gather_dot(indices, W_dec, grad_out) if ctx.needs_input_grad[0] else None
        grad_W = scatter_rows(values, indices, grad_out, W_dec.shape[0])[0] if ctx.needs_input_grad[2] else None
        return grad_values, None, grad_W, None


def sparse_decode(topk: TopK, W_dec: Tensor) -> Tensor:
    """``sum_j values[i, j] * W_dec[indices[i, j]]`` for each vector i: [N, k] -> [N, d], without a dense [N, F]."""
    shape = topk.indices.shape
    indices = topk.indices.reshape(-1, shape[-1]).contiguous()
    values = topk.values.reshape(-1, shape[-1]).to(W_dec.dtype).contiguous()
    if W_dec.dtype == torch.float32 and _native(values, indices, W_dec):
        _check_indices(indices, W_dec.shape[0])
        out = _SparseDecode.apply(values, indices, W_dec, getattr(topk, "sort", None))
    else:
        out = F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")
    return out.reshape(*shape[:-1], W_dec.shape[-1])


def dense_latents(topk: TopK, n_latents: int) -> Tensor:
    """Scatter a TopK into a dense [..., F] tensor (for analysis and tests, not the training path)."""
    out = topk.values.new_zeros(*topk.values.shape[:-1], n_latents)
    return out.scatter_(-1, topk.indices, topk.values)
