"""Sparse encode/decode against naive dense autograd: values and gradients."""

import pytest
import torch

from mlsae.kernels import TopK, dense_latents, sparse_decode, topk_encode


def naive(x, W_enc, W_dec, k, aux_mask=None, auxk=0):
    pre = x @ W_enc.T
    values, indices = pre.topk(k, dim=-1)
    dense = torch.zeros_like(pre).scatter(-1, indices, values.relu())
    out = dense @ W_dec
    if aux_mask is None:
        return out, None
    aux_pre = pre.masked_fill(~aux_mask, float("-inf"))
    av, ai = aux_pre.topk(auxk, dim=-1)
    aux_dense = torch.zeros_like(pre).scatter(-1, ai, av.relu())
    return out, aux_dense @ W_dec


def params(n=64, d=16, f=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_()
    W_enc = torch.randn(f, d, generator=g, dtype=torch.float64).requires_grad_()
    W_dec = torch.randn(f, d, generator=g, dtype=torch.float64).requires_grad_()
    return x, W_enc, W_dec


def grads(out, *tensors):
    return torch.autograd.grad(out, tensors)


@pytest.mark.parametrize("k", [1, 4, 13])
def test_sparse_matches_dense_values_and_gradients(k):
    x, W_enc, W_dec = params()
    target = torch.randn(64, 16, dtype=torch.float64)
    topk, _ = topk_encode(x, W_enc, k)
    sparse = sparse_decode(topk, W_dec)
    dense, _ = naive(x, W_enc, W_dec, k)
    torch.testing.assert_close(sparse, dense)
    g_sparse = grads((sparse - target).pow(2).sum(), x, W_enc, W_dec)
    g_dense = grads((dense - target).pow(2).sum(), x, W_enc, W_dec)
    for a, b in zip(g_sparse, g_dense):
        torch.testing.assert_close(a, b)


def test_auxk_matches_dense_and_only_dead_latents_get_encoder_gradient():
    x, W_enc, W_dec = params(seed=1)
    dead = torch.zeros(96, dtype=torch.bool)
    dead[::3] = True
    target = torch.randn(64, 16, dtype=torch.float64)
    _, aux = topk_encode(x, W_enc, 4, auxk=8, aux_mask=dead)
    aux_out = sparse_decode(aux, W_dec)
    _, dense_aux = naive(x, W_enc, W_dec, 4, dead, 8)
    torch.testing.assert_close(aux_out, dense_aux)
    assert dead[aux.indices].all()
    g_sparse = grads((aux_out - target).pow(2).sum(), x, W_enc, W_dec)
    g_dense = grads((dense_aux - target).pow(2).sum(), x, W_enc, W_dec)
    for a, b in zip(g_sparse, g_dense):
        torch.testing.assert_close(a, b)
    g_enc = g_sparse[1]
    assert g_enc[~dead].abs().sum() == 0 and g_enc[dead].abs().sum() > 0


def test_relu_after_topk_blocks_negative_values():
    x, W_enc, _ = params(seed=2)
    W = -W_enc.detach().abs()
    topk, _ = topk_encode(x.detach().abs(), W, 5)  # all pre-activations negative
    assert (topk.values == 0).all()


def test_fewer_dead_latents_than_auxk():
    x, W_enc, W_dec = params(seed=3)
    dead = torch.zeros(96, dtype=torch.bool)
    dead[:3] = True
    _, aux = topk_encode(x, W_enc, 4, auxk=8, aux_mask=dead)
    out = sparse_decode(aux, W_dec)
    assert torch.isfinite(out).all()
    (gx,) = grads(out.sum(), x)
    assert torch.isfinite(gx).all()


def test_dense_latents_scatter():
    topk = TopK(torch.tensor([[1.0, 2.0]]), torch.tensor([[3, 0]]))
    assert dense_latents(topk, 5).tolist() == [[2.0, 0, 0, 1.0, 0]]


def test_bf16_autocast_close_to_fp32():
    x, W_enc, W_dec = (t.detach().float() for t in params(n=256, d=64, f=512, seed=4))
    ref = sparse_decode(topk_encode(x, W_enc, 16)[0], W_dec)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        topk, _ = topk_encode(x, W_enc, 16)
        out = sparse_decode(topk, W_dec)
    assert out.dtype == torch.float32
    rel = (out - ref).pow(2).mean() / ref.pow(2).mean()
    assert rel < 0.05
