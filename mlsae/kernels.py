"""Sparse TopK encode and decode: the training hot path never builds a dense [vectors, n_latents] gradient.

The encoder's forward needs one dense product (the pre-activations); everything after
the TopK touches only the k (plus AuxK) selected latents of each vector:

- decode:   out[i] = sum_j values[i, j] * W_dec[indices[i, j]]           (embedding_bag)
- backward: grad_x[i] = sum_j g[i, j] * W_enc[indices[i, j]]            (embedding_bag)
            grad_W_enc[f] = sum over (i, j) with indices[i, j] == f of g[i, j] * x[i]   (index_add)

Each function is checked against naive dense autograd in tests/test_kernels.py.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class TopK(NamedTuple):
    """The k largest pre-activations of each vector, after ReLU, and their latent indices."""

    values: Tensor  # [..., k] float32
    indices: Tensor  # [..., k] int64


def gemm_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the encoder product: the autocast dtype when autocast is on, else x's dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def pre_activations(x: Tensor, W_enc: Tensor) -> Tensor:
    """Dense encoder product ``x @ W_enc.T`` in the autocast dtype (no autograd)."""
    dtype = gemm_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        return x.to(dtype) @ W_enc.to(dtype).T


def _scatter_weight_grad(grad: Tensor, indices: Tensor, x: Tensor, n_latents: int) -> Tensor:
    """``sum_{(i,j): indices[i,j]==f} grad[i,j] * x[i]`` for every latent f, as a dense [F, d] tensor.

    Built as a sparse [F, N] matrix times x, which never materialises the [N*k, d] outer products.
    """
    n, k = indices.shape
    rows = torch.arange(n, device=x.device).repeat_interleave(k)
    sparse = torch.sparse_coo_tensor(
        torch.stack([indices.reshape(-1), rows]), grad.reshape(-1).to(x.dtype), (n_latents, n),
        check_invariants=False,
    )
    return torch.sparse.mm(sparse, x)


class _TopKEncode(torch.autograd.Function):
    """TopK on pre-activations then ReLU, with an optional second TopK over a subset (AuxK).

    Both selections share one dense product; the backward is sparse in both.
    """

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, k: int, auxk: int, aux_mask: Tensor | None):
        pre = pre_activations(x, W_enc)
        values, indices = pre.topk(k, dim=-1, sorted=False)
        outputs = [values.to(x.dtype).relu_(), indices]
        if aux_mask is not None:
            pre.masked_fill_(~aux_mask, float("-inf"))
            aux_values, aux_indices = pre.topk(min(auxk, pre.shape[-1]), dim=-1, sorted=False)
            # -inf (fewer eligible latents than auxk) becomes 0 after the ReLU and gets no gradient.
            outputs += [aux_values.to(x.dtype).relu_(), aux_indices]
        del pre
        ctx.save_for_backward(x, W_enc, *outputs)
        ctx.mark_non_differentiable(*outputs[1::2])
        return tuple(outputs)

    @staticmethod
    def backward(ctx, grad_values, _grad_indices, grad_aux=None, _grad_aux_indices=None):
        x, W_enc, values, indices, *aux = ctx.saved_tensors
        grad = grad_values * (values > 0)
        if aux and grad_aux is not None:
            grad = torch.cat([grad, grad_aux * (aux[0] > 0)], dim=-1)
            indices = torch.cat([indices, aux[1]], dim=-1)
        grad_x = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, W_enc, per_sample_weights=grad.to(W_enc.dtype), mode="sum")
        if ctx.needs_input_grad[1]:
            grad_W = _scatter_weight_grad(grad, indices, x, W_enc.shape[0])
        return grad_x.to(x.dtype) if grad_x is not None else None, grad_W, None, None, None


def topk_encode(
    x: Tensor, W_enc: Tensor, k: int, auxk: int = 0, aux_mask: Tensor | None = None
) -> tuple[TopK, TopK | None]:
    """Encode ``x [N, d]`` with ``W_enc [F, d]``: TopK over all latents, and TopK over ``aux_mask`` latents.

    ``aux_mask`` ([F] bool, e.g. the dead latents) switches on the auxiliary selection.
    """
    if aux_mask is None or auxk <= 0:
        values, indices = _TopKEncode.apply(x, W_enc, k, 0, None)
        return TopK(values, indices), None
    values, indices, aux_values, aux_indices = _TopKEncode.apply(x, W_enc, k, auxk, aux_mask)
    return TopK(values, indices), TopK(aux_values, aux_indices)


def sparse_decode(topk: TopK, W_dec: Tensor) -> Tensor:
    """``sum_j values[i, j] * W_dec[indices[i, j]]`` for each vector i: [N, k] -> [N, d], without a dense [N, F]."""
    shape = topk.indices.shape
    out = F.embedding_bag(
        topk.indices.reshape(-1, shape[-1]),
        W_dec,
        per_sample_weights=topk.values.reshape(-1, shape[-1]).to(W_dec.dtype),
        mode="sum",
    )
    return out.reshape(*shape[:-1], W_dec.shape[-1])


def dense_latents(topk: TopK, n_latents: int) -> Tensor:
    """Scatter a TopK into a dense [..., F] tensor (for analysis and tests, not the training path)."""
    out = topk.values.new_zeros(*topk.values.shape[:-1], n_latents)
    return out.scatter_(-1, topk.indices, topk.values)
