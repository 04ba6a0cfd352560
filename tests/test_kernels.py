"""Sparse encode/decode and the training loss against naive dense autograd: values and gradients.

Every test that can runs three times: on the native C kernels (mlsae.native) with fp32 TopKs
from fp32 products, on the native kernels with fp32 TopKs ranked by a bf16 or an int8 product
and rescored (the mixed and int8 selects, whatever this machine's GEMM rates would choose), and
on the pure PyTorch path (native switched off), so all stay exact. fp64 runs the PyTorch path only (the C kernels
take fp32/bf16); fp32 results are compared with an fp64 reference at fp32 tolerances.
"""

import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from mlsae import kernels, native, precision
from mlsae.kernels import TopK, auxk_sq_error, dense_latents, scatter_rows, sparse_decode, topk_encode
from mlsae.model import MLSAE, SAEConfig

HAVE_NATIVE = native.lib() is not None
native_only = pytest.mark.skipif(not HAVE_NATIVE, reason="no C compiler")
PATHS = [pytest.param(p, marks=native_only) for p in ("native", "mixed", "int8")] + ["torch"]
RANKING = {"mixed": torch.bfloat16, "int8": torch.int8}  # the fp32 select's ranking product, by path
SELECT = {"mixed": "mixed-select", "int8": "int8-select"}


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Run the test on the C kernels (plain fp32 select, then ranked by bf16, by int8), then on PyTorch ops."""
    monkeypatch.setattr(kernels, "ranking_dtype", lambda device, n_latents: RANKING.get(request.param))
    if request.param == "torch":
        monkeypatch.setattr(native, "usable", lambda *tensors: False)
    return request.param


@pytest.fixture(autouse=True)
def bf16_products(monkeypatch):
    """bf16 autocast runs bf16 products here whatever this machine's rates would choose (the test of
    the fp32 branch forces it)."""
    monkeypatch.setattr(kernels, "bf16_slower", lambda device: False)


def naive(x, W_enc, W_dec, k, b=None):
    pre = (x if b is None else x - b) @ W_enc.T
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values.relu()) @ W_dec


def naive_aux(x, W_enc, W_dec, dead, auxk, b=None):
    """AuxK's reconstruction straight from its definition: a TopK over the dead latents alone."""
    pre = ((x if b is None else x - b) @ W_enc.T).masked_fill(~dead, float("-inf"))
    values, indices = pre.topk(min(auxk, int(dead.sum())), dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values.relu()) @ W_dec


def params(n=64, d=16, f=96, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    W_enc = torch.randn(f, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    W_dec = torch.randn(f, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return x, W_enc, W_dec


def grads(out, *tensors):
    return torch.autograd.grad(out, tensors)


def close(a, b):
    """Equal at the precision of ``a`` (fp32 results are checked against fp64 references)."""
    tol = {} if a.dtype == b.dtype else {"rtol": 2e-4, "atol": 2e-4 * max(1.0, b.abs().max().item())}
    torch.testing.assert_close(a, b.to(a.dtype), **tol)


# ----------------------------------------------------------------------------- encode and decode


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [1, 4, 13])
def test_sparse_matches_dense_values_and_gradients(path, dtype, k):
    x, W_enc, W_dec = params(dtype=dtype)
    rx, rW_enc, rW_dec = (t.detach().double().requires_grad_() for t in (x, W_enc, W_dec))
    target = torch.randn(64, 16, dtype=torch.float64)
    if dtype == torch.float32:
        ranked = path in SELECT and k <= 96 // 8  # (it needs at least 8k latents)
        assert kernels.encode_path(x, W_enc, k) == (SELECT[path] if ranked else "rows")
    topk = topk_encode(x, W_enc, k)
    sparse = sparse_decode(topk, W_dec)
    dense = naive(rx, rW_enc, rW_dec, k)
    close(sparse, dense)
    g_sparse = grads((sparse - target.to(dtype)).pow(2).sum(), x, W_enc, W_dec)
    g_dense = grads((dense - target).pow(2).sum(), rx, rW_enc, rW_dec)
    for a, b in zip(g_sparse, g_dense):
        close(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pre_encoder_bias_gradient(path, dtype):
    """``b`` is subtracted inside the encoder; its gradient comes from per-latent sums, not per vector."""
    x, W_enc, W_dec = params(seed=5, dtype=dtype)
    b = torch.randn(16, dtype=torch.float64).to(dtype).requires_grad_()
    rx, rW_enc, rW_dec, rb = (t.detach().double().requires_grad_() for t in (x, W_enc, W_dec, b))
    out = sparse_decode(topk_encode(x, W_enc, 5, b=b), W_dec)
    ref = naive(rx, rW_enc, rW_dec, 5, b=rb)
    close(out, ref)
    for a, r in zip(grads(out.sin().sum(), x, W_enc, W_dec, b), grads(ref.sin().sum(), rx, rW_enc, rW_dec, rb)):
        close(a, r)


def aux_inputs(seed: int, n_dead: int, dtype=torch.float64):
    """``params`` plus a pre-encoder bias, a detached error, per-vector scales and ``n_dead`` dead latents."""
    x, W_enc, W_dec = params(seed=seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 100)
    b = torch.randn(16, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    error = torch.randn(64, 16, generator=g, dtype=torch.float64).to(dtype)
    scale = torch.rand(64, 1, generator=g, dtype=torch.float64).to(dtype) + 0.5
    dead = torch.zeros(96, dtype=torch.bool)
    dead[torch.randperm(96, generator=g)[:n_dead]] = True
    return x, W_enc, W_dec, b, error, scale, dead


# 3 and 12 dead: fewer than features (the Gram path), 32: more. 12 and 32 with auxk 8: more dead latents
# than auxk (the TopK's selection), 32 with auxk 30: more, but no vector with more than 30 positive.
@pytest.mark.parametrize(("n_dead", "auxk"), [(3, 8), (12, 8), (32, 8), (32, 30)])
def test_auxk_matches_dense_and_only_dead_latents_get_gradients(n_dead, auxk):
    x, W_enc, W_dec, b, error, scale, dead = aux_inputs(1, n_dead)
    got = auxk_sq_error(x, error, scale, W_enc, W_dec, b, dead, auxk)
    aux_error = error + scale * naive_aux(x, W_enc, W_dec, dead, auxk, b=b)  # AuxK's reconstruction, built
    want = aux_error.pow(2).sum() - error.pow(2).sum()
    torch.testing.assert_close(got, want)
    g_got, g_want = grads(got, x, W_enc, W_dec, b), grads(want, x, W_enc, W_dec, b)
    assert all(g.is_sparse for g in g_got[1:3])  # rows of the dead latents alone: added in place to the TopK's grads
    g_got = [g.to_dense() for g in g_got]
    for a, r in zip(g_got, g_want):
        torch.testing.assert_close(a, r)
    for g in g_got[1:3]:  # the encoder's and the decoder's rows of live latents get nothing
        assert g[~dead].abs().sum() == 0 and g[dead].abs().sum() > 0


@pytest.mark.parametrize("n_dead", [12, 32])
def test_auxk_under_bf16_autocast_stays_close_to_fp32(n_dead):
    """Under autocast AuxK's products run in bf16, as autocast's linear layers would; the sums in fp32."""
    x, W_enc, W_dec, b, error, scale, dead = (t.detach() if torch.is_tensor(t) and t.is_floating_point() else t
                                              for t in aux_inputs(4, n_dead, torch.float32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = auxk_sq_error(x, error, scale, W_enc, W_dec, b, dead, 8)
    ref = auxk_sq_error(x, error, scale, W_enc, W_dec, b, dead, 8)
    assert low.dtype == torch.float32
    assert abs(low - ref) < 0.01 * abs(ref)


@pytest.mark.parametrize("slower", [False, True])
def test_bf16_autocast_runs_fp32_products_where_bf16_is_slower(path, monkeypatch, slower):
    """Where bf16 products are measured slower than fp32 ones (an Intel Xeon without AMX, an EPYC
    without AVX-512), bf16 autocast runs the encoder's and AuxK's products in fp32: the TopK, the
    gradients and AuxK's term are then those of fp32, bit for bit; elsewhere they are bf16's."""
    monkeypatch.setattr(kernels, "bf16_slower", lambda device: slower)
    x, W_enc, W_dec = params(n=200, d=32, f=256, seed=12, dtype=torch.float32)
    b = torch.randn(32, generator=torch.Generator().manual_seed(3)).requires_grad_()

    def run(autocast: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            topk = topk_encode(x, W_enc, 8, b)
            loss = sparse_decode(topk, W_dec).float().pow(2).sum()
        return topk.values, topk.indices, *grads(loss, x, W_enc, W_dec, b)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels.gemm_dtype(x) == (torch.float32 if slower else torch.bfloat16)
    low, ref = run(True), run(False)
    assert all(torch.equal(a, r) for a, r in zip(low, ref)) == slower
    top, ref_top = low[0].sort(-1).values, ref[0].sort(-1).values  # bf16's may pick other near-ties
    torch.testing.assert_close(top, ref_top, rtol=0.02, atol=0.02 * ref_top.abs().max().item())

    x, W_enc, W_dec, b, error, scale, dead = aux_inputs(4, 12, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = auxk_sq_error(x, error, scale, W_enc, W_dec, b, dead, 8)
    assert torch.equal(low, auxk_sq_error(x, error, scale, W_enc, W_dec, b, dead, 8)) == slower


def test_relu_after_topk_blocks_negative_values(path):
    x, W_enc, _ = params(seed=2, dtype=torch.float32)
    W = -W_enc.detach().abs()
    topk = topk_encode(x.detach().abs(), W, 5)  # all pre-activations negative
    assert (topk.values == 0).all()


def test_chunks_give_the_same_result(path, monkeypatch):
    """The encoder runs chunk by chunk of vectors; any chunk size gives the same latents and gradients."""
    x, W_enc, W_dec = params(n=200, d=32, f=256, seed=6, dtype=torch.float32)

    def run():
        topk = topk_encode(x, W_enc, 8)
        return (*topk, *grads(sparse_decode(topk, W_dec).pow(2).sum(), x, W_enc, W_dec))

    whole = run()
    monkeypatch.setattr(kernels, "CHUNK_BYTES", 37 * 256 * 4)  # 37 vectors per chunk, a ragged last one
    for a, b in zip(run(), whole):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bf16", [False, True])
def test_tiles_give_the_same_result(path, monkeypatch, bf16):
    """Without AuxK the encoder folds tiles (latent blocks x vector chunks) into running TopKs."""
    x, W_enc, W_dec = params(n=300, d=32, f=1000, seed=9, dtype=torch.float32)
    ranked = path in SELECT and not bf16  # the ranked selects (fp32 only) tile too, by their own rules

    def encode_path():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return kernels.encode_path(x, W_enc, 40)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            topk = topk_encode(x, W_enc, 40)
            out = sparse_decode(topk, W_dec)
        order = topk.indices.argsort(-1)
        return (topk.values.gather(1, order), topk.indices.gather(1, order),
                *grads(out.pow(2).sum(), x, W_enc, W_dec))

    assert encode_path() == (SELECT[path] if ranked else "rows")
    whole = run()
    monkeypatch.setattr(kernels, "LATENT_BLOCK", 150)  # 7 blocks of 143, the last one of 142
    monkeypatch.setattr(kernels, "TILED_MIN_LATENTS", 300)
    monkeypatch.setattr(kernels, "TILE_BYTES", 64 * 143 * 4)  # 64 vectors per tile, a ragged last one
    monkeypatch.setattr(kernels, "SPAN_ROWS", 110)  # 3 spans of vectors
    assert encode_path() == (SELECT[path] if ranked else "rows" if path == "torch" else "tiled")
    for a, b in zip(run(), whole):  # sums in another order: fp32 rounding
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("fp32, bf16, int8, n_latents, want", [
    (150, 400, 700, 4608, torch.bfloat16),  # a Zen 4 EPYC: bf16 first
    (220, 140, 800, 32768, torch.int8),  # a Xeon without AMX, VNNI: int8 for many latents
    (220, 140, 800, 4608, None),  # ... but not for few (it costs per vector, saves per latent)
    (150, 19, 5, 32768, None),  # a Zen 3 EPYC: neither
])
def test_the_ranking_product_is_chosen_by_measured_rates(monkeypatch, fp32, bf16, int8, n_latents, want):
    monkeypatch.setattr(precision, "gemm_rates", lambda device: {"fp32": fp32, "bf16": bf16, "int8": int8})
    assert kernels.ranking_dtype(torch.device("cpu"), n_latents) == want
    assert kernels.ranking_dtype(torch.device("cuda"), n_latents) is None


@native_only
@pytest.mark.parametrize("ranking", ["mixed", "int8"])
@pytest.mark.parametrize("case", ["random", "ties", "nan", "outlier feature"])
def test_fp32_select_by_a_cheaper_product_is_exact(monkeypatch, ranking, case):
    """fp32 encoding ranks latents with a bf16 or int8 product and rescores in fp32: same TopK as fp32."""
    monkeypatch.setattr(kernels, "ranking_dtype", lambda device, n_latents: RANKING[ranking])
    g = torch.Generator().manual_seed(11)
    x = torch.randn(257, 48, generator=g) * 3
    W = torch.empty(2000, 48)
    torch.nn.init.kaiming_uniform_(W, a=math.sqrt(5), generator=g)
    if case == "ties":  # 200 copies of one latent, the best of many rows: more near-ties than candidates
        W[:200] = (x[:10].mean(0) / x[:10].mean(0).norm() * W.norm(dim=1).max()).expand(200, -1)
    if case == "nan":
        x[5, 3] = float("nan")
    if case == "outlier feature":  # as residual streams have: one feature 40x the others
        x[:, 7] *= 40
    b = torch.randn(48, generator=g)
    values, indices = kernels._encode_chunks(x, W, b, 16)
    ref_values, ref_indices = ((x - b) @ W.T).topk(16, dim=-1)
    ok = ~torch.isnan(ref_values).any(-1)
    torch.testing.assert_close(values.sort(-1).values[ok], ref_values.relu().sort(-1).values[ok], rtol=1e-5, atol=1e-5)
    if case in ("random", "outlier feature"):
        assert torch.equal(indices.sort(-1).values, ref_indices.sort(-1).values)
    assert kernels.encode_path(x, W, 16) == SELECT[ranking]
    monkeypatch.setattr(kernels, "ranking_dtype", lambda device, n_latents: None)
    assert kernels.encode_path(x, W, 16) == "rows"
    plain, _ = kernels._encode_chunks(x, W, b, 16)
    torch.testing.assert_close(values.sort(-1).values[ok], plain.sort(-1).values[ok], rtol=1e-5, atol=1e-5)


@native_only
@pytest.mark.parametrize("ranking", ["mixed", "int8"])
def test_ranking_bounds_each_latent(monkeypatch, ranking):
    """Rows of W differ in norm once trained (here one latent 30x the rest), and residual streams
    have outlier features: the error bound of each latent's score scales with its own row, and
    int8 moves the outliers into W's columns, so the first round (3k candidates for bf16, 6k for
    int8) still settles nearly every vector, where one bound per vector at the largest row of W
    settles few."""
    monkeypatch.setattr(kernels, "ranking_dtype", lambda device, n_latents: RANKING[ranking])
    g = torch.Generator().manual_seed(5)
    x, W = torch.randn(512, 64, generator=g), torch.randn(3000, 64, generator=g)
    W[7] *= 30
    x[:, 3] *= 20
    rounds = []

    def spy(u, *args):
        values, indices, left = mixed_round(u, *args)
        rounds.append((len(u), int(left.sum())))
        return values, indices, left

    mixed_round = kernels._mixed_round
    monkeypatch.setattr(kernels, "_mixed_round", spy)
    values, indices = kernels._encode_chunks(x, W, None, 8)
    assert rounds[0][0] == 512 and rounds[0][1] <= 5
    ref = (x @ W.T).topk(8, dim=-1)
    assert torch.equal(indices.sort(-1).values, ref.indices.sort(-1).values)
    torch.testing.assert_close(values.sort(-1).values, ref.values.relu().sort(-1).values)
    # the first version's bound, 2^-7 |u| at the largest row of W, would have left most rows unsettled
    upper = x.bfloat16().float() @ W.bfloat16().float().T + (2**-7 * x.norm(dim=1) * W.norm(dim=1).max())[:, None]
    assert ((upper >= ref.values[:, -1:]).sum(1) > 3 * 8).float().mean() > 0.5


@native_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_keep_the_lowest_latents(dtype):
    """Values tie often in bf16: every selection keeps, of equal values, the lowest latents, so the
    row and tile paths (and machines with and without AVX-512) choose the same TopK."""
    g = torch.Generator().manual_seed(3)
    pre = torch.randint(0, 40, (64, 3000), generator=g).to(dtype)  # about 75 copies of each value per row
    k = 50
    order = pre.float().sort(dim=-1, descending=True, stable=True)  # stable: of equal values, the lower index first
    expected = order.indices[:, :k].sort(-1).values
    values, indices = native.topk_rows(pre, k)
    assert torch.equal(indices.sort(-1).values, expected)
    state = native.TopKState(64, k)
    for c0 in range(0, 3000, 700):  # blocks of latents, folded in as the tiled path does
        state.add(pre[:, c0 : c0 + 700].contiguous(), c0)
    values, indices = state.finish(relu=False)
    assert torch.equal(indices.sort(-1).values, expected)
    assert torch.equal(values.sort(-1).values, order.values[:, :k].float().sort(-1).values)


def test_dense_latents_scatter():
    topk = TopK(torch.tensor([[1.0, 2.0]]), torch.tensor([[3, 0]]))
    assert dense_latents(topk, 5).tolist() == [[2.0, 0, 0, 1.0, 0]]


def test_bf16_autocast_close_to_fp32(path):
    x, W_enc, W_dec = (t.detach().float() for t in params(n=256, d=64, f=512, seed=4))
    ref = sparse_decode(topk_encode(x, W_enc, 16), W_dec)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        topk = topk_encode(x, W_enc, 16)
        out = sparse_decode(topk, W_dec)
    assert out.dtype == torch.float32 and topk.values.dtype == torch.float32
    rel = (out - ref).pow(2).mean() / ref.pow(2).mean()
    assert rel < 0.05


def test_bf16_autocast_gradients_match_autocast_semantics(path):
    """Under bf16 autocast: the TopK of the bf16 product, and W_enc's gradient from its bf16 inputs."""
    x, W_enc, W_dec = (t.detach().float().requires_grad_() for t in params(n=200, d=32, f=300, seed=12))
    b = torch.randn(32, generator=torch.Generator().manual_seed(1)).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        topk = topk_encode(x, W_enc, 8, b=b)
        out = sparse_decode(topk, W_dec)
    got = grads(out.sin().sum(), W_enc, W_dec, b)
    u16, W16 = (x - b).detach().bfloat16(), W_enc.detach().bfloat16()
    pre = (u16 @ W16.T).float()  # what autocast's product gives
    assert torch.equal(topk.values.sort(-1).values, pre.topk(8, dim=-1).values.relu().sort(-1).values)
    indices = topk.indices  # bf16 has ties: check the values, then follow the chosen latents
    values = pre.gather(1, indices)
    assert torch.equal(values.relu(), topk.values)
    v = values.relu().requires_grad_()
    W_dec_ = W_dec.detach().requires_grad_()
    ref_out = torch.zeros(200, 300).scatter(-1, indices, v) @ W_dec_
    gv, g_dec = torch.autograd.grad(ref_out.sin().sum(), (v, W_dec_))
    g = gv * (values > 0)
    g_enc = torch.zeros(300, 32).index_add_(0, indices.flatten(), (g[:, :, None] * u16.float()[:, None, :]).reshape(-1, 32))
    g_b = -(torch.zeros(300).index_add_(0, indices.flatten(), g.flatten()) @ W_enc.detach())
    for a, r in zip(got, (g_enc, g_dec, g_b)):  # fp32 sums in other orders
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5 * r.abs().max().item())


def test_out_of_range_indices_raise():
    W = torch.randn(10, 4)
    with pytest.raises(IndexError):
        sparse_decode(TopK(torch.ones(2, 3), torch.tensor([[0, 1, 10], [2, 3, 4]])), W)


def test_deterministic(path):
    """The same inputs give bitwise the same gradients (exact resume and DDP checks rely on it)."""
    x, W_enc, W_dec = params(n=300, d=32, f=128, seed=7, dtype=torch.float32)

    def run():
        topk = topk_encode(x, W_enc, 8)
        return grads(sparse_decode(topk, W_dec).pow(2).sum(), x, W_enc, W_dec)

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- the native kernels alone


@native_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_latents, k", [(4608, 32), (1000, 7), (33, 32), (17, 17), (5, 1), (40000, 64), (300, 100)])
def test_native_topk_matches_torch(dtype, n_latents, k):
    pre = torch.randn(50, n_latents, generator=torch.Generator().manual_seed(n_latents)).to(dtype)
    values, indices = native.topk_rows(pre, k)
    ref = pre.float().topk(k, dim=-1).values.relu()
    assert torch.equal(values.sort(-1).values, ref.sort(-1).values)
    assert torch.equal(pre.float().gather(1, indices).relu(), values)
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all()  # distinct


@native_only
def test_native_topk_ties_and_nan():
    pre = torch.zeros(3, 100)
    pre[1, ::7] = 1.0  # 15 equal maxima, k = 8: any 8 of them
    values, indices = native.topk_rows(pre, 8)
    assert (values[0] == 0).all() and (values[1] == 1).all() and (pre[1, indices[1]] == 1).all()
    assert all(len(set(row.tolist())) == 8 for row in indices)
    pre[2, 5] = float("nan")
    assert native.topk_rows(pre, 8) is None  # the caller falls back to torch.topk
    values, _ = kernels._topk_relu(pre, 8)
    assert values.shape == (3, 8)


@native_only
def test_native_scatter_and_decode_backward():
    g = torch.Generator().manual_seed(0)
    n, k, d, f = 300, 6, 40, 50
    w, x, G = torch.randn(n, k, generator=g), torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    W = torch.randn(f, d, generator=g)
    idx = torch.randint(0, f, (n, k), generator=g)
    out, wsum = native.scatter_rows(w, idx, x, f, with_sum=True)
    ref = torch.zeros(f, d).index_add_(0, idx.flatten(), (w[:, :, None] * x[:, None, :]).reshape(-1, d))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wsum, torch.zeros(f).index_add_(0, idx.flatten(), w.flatten()))
    torch.testing.assert_close(scatter_rows(w.double(), idx, x.double(), f)[0].float(), ref, rtol=1e-5, atol=1e-5)
    gW, gv = native.decode_backward(w, idx, G, W)
    W_ = W.clone().requires_grad_()
    w_ = w.clone().requires_grad_()
    ref_gv, ref_gW = torch.autograd.grad(F.embedding_bag(idx, W_, per_sample_weights=w_, mode="sum"), (w_, W_), G)
    torch.testing.assert_close(gW, ref_gW, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gv, ref_gv, rtol=1e-5, atol=1e-5)


@native_only
@pytest.mark.parametrize("l2_bytes", [1, 2 * 70 * 4 * 48, 0], ids=["whole rows", "blocks of columns", "this machine"])
def test_native_decode_matches_embedding_bag(l2_bytes):
    """The C decode, by whole rows or by blocks of columns (48 of 200, then a tail of 8), sums the
    same products in the same order as embedding_bag."""
    g = torch.Generator().manual_seed(4)
    v, W = torch.randn(333, 7, generator=g), torch.randn(70, 200, generator=g)
    idx = torch.randint(0, 70, (333, 7), generator=g)
    torch.testing.assert_close(native.decode(v, idx, W, l2_bytes), F.embedding_bag(idx, W, per_sample_weights=v, mode="sum"),
                               rtol=1e-6, atol=1e-5)


@native_only
def test_native_scatters_do_not_depend_on_threads():
    """Entries are summed in their original order whatever the thread count (1 vs 2 processes agree)."""
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(999, 8, generator=g), torch.randn(999, 24, generator=g)
    W = torch.randn(70, 24, generator=g)
    idx = torch.randint(0, 70, (999, 8), generator=g)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 3):
            torch.set_num_threads(n)
            results.append((*native.scatter_rows(w, idx, x, 70, with_sum=True), *native.decode_backward(w, idx, x, W),
                            native.decode(w, idx, W, 1), native.decode(w, idx, W, 2 * 70 * 4 * 48)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@native_only
def test_encoder_scatter_reuses_the_decoder_sort():
    """The decode backward's counting sort serves the encoder scatter of the same indices, once,
    through the IndexSort it is handed (no state elsewhere)."""
    g = torch.Generator().manual_seed(3)
    w, x, G = torch.randn(300, 6, generator=g), torch.randn(300, 20, generator=g), torch.randn(300, 20, generator=g)
    W = torch.randn(50, 20, generator=g)
    idx = torch.randint(0, 50, (300, 6), generator=g)
    fresh = native.scatter_rows(w, idx, x, 50, with_sum=True)
    sort = native.IndexSort()
    native.decode_backward(torch.rand(300, 6, generator=g), idx.view(-1, 6), G, W, sort)
    assert sort.saved is not None
    reused = native.scatter_rows(w, idx, x, 50, with_sum=True, sort=sort)
    assert sort.saved is None
    for a, b in zip(fresh, reused):
        assert torch.equal(a, b)
    native.decode_backward(w, idx, G, W, sort)
    idx[0, 0] = (idx[0, 0] + 1) % 50  # changed in place: the sort no longer applies
    torch.testing.assert_close(native.scatter_rows(w, idx, x, 50, sort=sort)[0], torch.zeros(50, 20).index_add_(
        0, idx.flatten(), (w[:, :, None] * x[:, None, :]).reshape(-1, 20)), rtol=1e-5, atol=1e-5)
    # In a step: the encoder's TopK carries the sort that its decoder's backward fills in.
    W_enc, W_dec = W.clone().requires_grad_(), W.clone().requires_grad_()
    topk = topk_encode(x, W_enc, 6)
    assert isinstance(topk.sort, native.IndexSort) and topk.sort.saved is None
    between = []  # after the decoder's backward, before the encoder's
    topk.values.register_hook(lambda grad: between.append(topk.sort.saved is not None))
    sparse_decode(topk, W_dec).pow(2).sum().backward()
    assert between == [True] and topk.sort.saved is None, "left by the decoder's backward, taken by the encoder's"


@native_only
def test_native_project_and_standardize():
    g = torch.Generator().manual_seed(1)
    grad, w = torch.randn(30, 70, generator=g), torch.randn(30, 70, generator=g)
    ref = grad - (grad * w).sum(-1, keepdim=True) * w
    native.project_rows(grad, w)
    torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-5)
    x = torch.randn(20, 70, generator=g) * 3 + 1
    shift = torch.randn(70, generator=g)
    z, mean, scale, sq, low = native.standardize(x, 1e-5, shift)
    torch.testing.assert_close(mean, x.mean(-1, keepdim=True))
    torch.testing.assert_close(scale, x.std(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(z, (x - mean) / scale)
    torch.testing.assert_close(sq, (x - mean).pow(2).sum(-1, keepdim=True))
    assert torch.equal(low, (z - shift).bfloat16())  # rounded as PyTorch rounds


def test_native_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("MLSAE_NATIVE", "0")
    assert not native.enabled()


# ----------------------------------------------------------------------------- the training loss


def naive_loss(sae: MLSAE, x: torch.Tensor, dead: torch.Tensor | None):
    """MLSAE.loss written densely, straight from its docstring."""
    cfg = sae.config
    if cfg.standardize:
        mean = x.mean(-1, keepdim=True)
        scale = (x - mean).std(-1, keepdim=True) + 1e-5
    else:
        mean, scale = torch.zeros_like(x[..., :1]), torch.ones_like(x[..., :1])
    z = (x - mean) / scale
    pre = (z - sae.b_pre) @ sae.W_enc.T
    values, indices = pre.topk(cfg.k, dim=-1)
    dense = torch.zeros_like(pre).scatter(-1, indices, values.relu())
    recon = (dense @ sae.W_dec + sae.b_pre) * scale + mean
    fvu = (recon - x).pow(2).mean((1, 2)) / x.var((1, 2), unbiased=False)
    loss = fvu.mean()
    auxk = torch.zeros((), dtype=x.dtype)
    if dead is not None:
        aux_pre = pre.masked_fill(~dead, float("-inf"))
        av, ai = aux_pre.topk(min(cfg.auxk, int(dead.sum())), dim=-1)
        aux_recon = torch.zeros_like(pre).scatter(-1, ai, av.relu()) @ sae.W_dec * scale
        residual = (x - recon).detach().reshape(-1, x.shape[-1])
        denom = (residual - residual.mean(0)).pow(2).mean()
        auxk = (aux_recon.reshape(-1, x.shape[-1]) - residual).pow(2).mean() / denom
        loss = loss + cfg.auxk_coef * auxk
    return loss, fvu, auxk, recon


@pytest.mark.parametrize("standardize", [True, False])
@pytest.mark.parametrize("with_aux", [False, True])
def test_loss_matches_naive_dense_loss(path, standardize, with_aux):
    """MLSAE.loss (fp32 by design) against the dense loss in fp64: loss, FVU, AuxK, recon, gradients."""
    dtype = torch.float32
    torch.manual_seed(0)
    sae = MLSAE(SAEConfig(n_inputs=24, n_latents=96, k=6, auxk=10, n_layers=3, standardize=standardize,
                          dead_tokens_threshold=1))
    with torch.no_grad():
        sae.b_pre.normal_()
        if with_aux:
            sae.tokens_since_fired[:, ::3] = 5  # every third latent dead at every layer
    sae = sae.to(dtype)
    x = (torch.randn(3, 40, 24) * torch.tensor([1.0, 3.0, 0.5])[:, None, None] + 2).to(dtype)
    out = sae.loss(x)
    params = (sae.W_enc, sae.W_dec, sae.b_pre)
    got = grads(out.loss, *params)
    ref_sae = MLSAE(sae.config).double()
    ref_sae.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in sae.state_dict().items()})
    loss, fvu, auxk, recon = naive_loss(ref_sae, x.double(), sae.dead_mask() if with_aux else None)
    want = grads(loss, ref_sae.W_enc, ref_sae.W_dec, ref_sae.b_pre)
    close(out.loss, loss)
    close(out.fvu, fvu.detach())
    close(out.auxk_loss.detach(), auxk.detach())
    close(out.recon, recon.detach())
    assert (out.auxk_loss > 0) == with_aux
    for a, b in zip(got, want):
        close(a, b)


def test_decoder_gradient_projection_paths_agree(monkeypatch):
    torch.manual_seed(0)
    sae = MLSAE(SAEConfig(n_inputs=16, n_latents=64, k=4))
    sae.loss(torch.randn(2, 30, 16)).loss.backward()
    grad = sae.W_dec.grad.clone()
    sae.project_decoder_grad()
    native_result = sae.W_dec.grad.clone()
    sae.W_dec.grad = grad
    monkeypatch.setattr(native, "usable", lambda *tensors: False)
    sae.project_decoder_grad()
    torch.testing.assert_close(native_result, sae.W_dec.grad)
    assert (sae.W_dec.grad * sae.W_dec).sum(-1).abs().max() < 1e-6


@pytest.mark.gpu
def test_cuda_matches_naive():
    x, W_enc, W_dec = (t.detach().cuda().requires_grad_() for t in params(n=128, d=32, f=256, seed=8))
    topk = topk_encode(x, W_enc, 8)
    out = sparse_decode(topk, W_dec)
    ref = naive(x, W_enc, W_dec, 8)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads(out.sin().sum(), x, W_enc, W_dec), grads(ref.sin().sum(), x, W_enc, W_dec)):
        torch.testing.assert_close(a, b)
    assert math.isfinite(float(out.detach().sum()))


def test_native_kernels_build_where_a_compiler_is():
    """The skips above are for machines without a C compiler; CI has one, so the fast path is tested."""
    if native.enabled() and (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        assert native.lib() is not None


def test_native_signatures_come_from_the_source():
    """The Python side reads each kernel's parameters from the C source: every exported function is
    found and typed, and the parser refuses a parameter it cannot read."""
    protos = native.prototypes(native.SOURCE.read_text())
    assert {"mlsae_topk_block", "mlsae_scatter_rows", "mlsae_decode_backward", "mlsae_standardize"} <= set(protos)
    params, ret = protos["mlsae_project_rows"]
    assert [(p.name, p.ctype, p.pointer) for p in params] == [
        ("g", "float", True), ("w", "float", True), ("F", "int64_t", False), ("d", "int64_t", False),
        ("nthreads", "int", False)] and ret == "void"
    with pytest.raises(RuntimeError, match="cannot read"):
        native.prototypes("void mlsae_bad(float x[4]) {}")


@native_only
def test_native_calls_are_checked():
    """A wrong dtype, layout, device or argument count is a TypeError naming the kernel and the
    parameter, never a crash or a silent misread."""
    g, w = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(TypeError, match=r"mlsae_project_rows\(w\): expected torch.float32, got torch.float64"):
        native.lib().mlsae_project_rows(g, w.double(), 4, 8, 1)
    with pytest.raises(TypeError, match=r"mlsae_project_rows\(g\): expected a contiguous tensor"):
        native.lib().mlsae_project_rows(torch.randn(8, 4).T, w, 4, 8, 1)
    with pytest.raises(TypeError, match="expected a CPU tensor, got list"):
        native.lib().mlsae_project_rows([0.0], w, 4, 8, 1)
    with pytest.raises(TypeError, match="takes 5 arguments, got 4"):
        native.lib().mlsae_project_rows(g, w, 4, 8)
    expected = g - (g * w).sum(-1, keepdim=True) * w
    native.lib().mlsae_project_rows(g, w, 4, 8, 1)
    torch.testing.assert_close(g, expected)
