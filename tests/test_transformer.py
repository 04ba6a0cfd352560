"""The transformer side: hooks capture what we claim, early stop, splicing, loading, tiny models."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mlsae.tiny import make_tiny, make_tiny_gguf
from mlsae.transformer import Transformer, _find_blocks, _find_final_norm, load_transformer
from mlsae.utils import MLSAEError

# ----- independent, hand-written forward passes (from the weights, no HF module is called)


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention with a causal mask; q, k, v are [B, H, P, hd]; returns [B, P, H*hd]."""
    p = q.shape[-2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(torch.ones(p, p, dtype=torch.bool).triu(1), float("-inf"))
    out = scores.softmax(-1) @ v
    return out.transpose(1, 2).reshape(q.shape[0], p, -1)


def _rope(x: torch.Tensor, theta: float, rot_dim: int) -> torch.Tensor:
    """Rotary embedding on the first ``rot_dim`` dims of each head (halves rotated, as in GPT-NeoX)."""
    p, half = x.shape[-2], rot_dim // 2
    inv_freq = 1.0 / theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim)
    angle = torch.arange(p, dtype=torch.float32)[:, None] * inv_freq[None]
    cos, sin = angle.cos(), angle.sin()
    x1, x2, rest = x[..., :half], x[..., half:rot_dim], x[..., rot_dim:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], -1)


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    b, p, _ = x.shape
    return x.view(b, p, n, -1).transpose(1, 2)


def _llama_by_hand(model, ids: torch.Tensor) -> list[torch.Tensor]:
    cfg, m = model.config, model.model
    n_h, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd, theta, eps = cfg.hidden_size // n_h, cfg.rope_parameters["rope_theta"], cfg.rms_norm_eps

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    h, outs = m.embed_tokens.weight[ids], []
    for blk in m.layers:
        at = blk.self_attn
        a = rms(h, blk.input_layernorm.weight)
        q = _rope(_heads(a @ at.q_proj.weight.T, n_h), theta, hd)
        k = _rope(_heads(a @ at.k_proj.weight.T, n_kv), theta, hd).repeat_interleave(n_h // n_kv, 1)
        v = _heads(a @ at.v_proj.weight.T, n_kv).repeat_interleave(n_h // n_kv, 1)
        h = h + _causal_attention(q, k, v) @ at.o_proj.weight.T
        x = rms(h, blk.post_attention_layernorm.weight)
        mlp = blk.mlp
        h = h + (F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
        outs.append(h)
    return outs


def _neox_by_hand(model, ids: torch.Tensor) -> list[torch.Tensor]:
    cfg, m = model.config, model.gpt_neox
    n_h, d = cfg.num_attention_heads, cfg.hidden_size
    hd = d // n_h
    rot = int(hd * cfg.rope_parameters["partial_rotary_factor"])
    theta = cfg.rope_parameters["rope_theta"]
    assert cfg.use_parallel_residual

    def ln(x, mod):
        return F.layer_norm(x, (d,), mod.weight, mod.bias, mod.eps)

    h, outs = m.embed_in.weight[ids], []
    for blk in m.layers:
        at = blk.attention
        qkv = ln(h, blk.input_layernorm) @ at.query_key_value.weight.T + at.query_key_value.bias
        qkv = qkv.view(*ids.shape, n_h, 3 * hd).transpose(1, 2)  # per head: [q | k | v]
        q, k, v = qkv[..., :hd], qkv[..., hd : 2 * hd], qkv[..., 2 * hd :]
        attn = _causal_attention(_rope(q, theta, rot), _rope(k, theta, rot), v) @ at.dense.weight.T + at.dense.bias
        x = ln(h, blk.post_attention_layernorm)
        mlp = F.gelu(x @ blk.mlp.dense_h_to_4h.weight.T + blk.mlp.dense_h_to_4h.bias)
        mlp = mlp @ blk.mlp.dense_4h_to_h.weight.T + blk.mlp.dense_4h_to_h.bias
        h = h + attn + mlp  # parallel residual
        outs.append(h)
    return outs


def _gpt2_by_hand(model, ids: torch.Tensor) -> list[torch.Tensor]:
    cfg, m = model.config, model.transformer
    n_h, d = cfg.n_head, cfg.n_embd

    def ln(x, mod):
        return F.layer_norm(x, (d,), mod.weight, mod.bias, mod.eps)

    h = m.wte.weight[ids] + m.wpe.weight[torch.arange(ids.shape[1])]
    outs = []
    for blk in m.h:
        qkv = ln(h, blk.ln_1) @ blk.attn.c_attn.weight + blk.attn.c_attn.bias  # Conv1D: x @ W + b
        q, k, v = (_heads(t, n_h) for t in qkv.split(d, dim=-1))
        h = h + _causal_attention(q, k, v) @ blk.attn.c_proj.weight + blk.attn.c_proj.bias
        x = ln(h, blk.ln_2)
        mlp = F.gelu(x @ blk.mlp.c_fc.weight + blk.mlp.c_fc.bias, approximate="tanh")
        h = h + mlp @ blk.mlp.c_proj.weight + blk.mlp.c_proj.bias
        outs.append(h)
    return outs


_BY_HAND = {"llama": _llama_by_hand, "gpt_neox": _neox_by_hand, "gpt2": _gpt2_by_hand}


def _arch(t: Transformer) -> str:
    return t.model.config.model_type


def _hook_counts(t: Transformer) -> list[int]:
    return [len(b._forward_hooks) + len(b._forward_pre_hooks) for b in t.blocks]


# ----- what the hooks capture


def test_sizes_and_parts(tiny_transformer):
    t = tiny_transformer
    assert (t.n_layers, t.d_model, t.vocab_size) == (3, 64, 512)
    assert t.special_ids == [t.tokenizer.eos_token_id]
    assert t.name == f"tiny-{_arch(t)}"
    assert isinstance(t.final_norm, (nn.LayerNorm,)) or "RMSNorm" in type(t.final_norm).__name__
    assert t.lm_head is t.model.get_output_embeddings()
    # The wrapped model is registered once: no duplicate keys for blocks, norm or head.
    assert list(t.state_dict()) == [f"model.{k}" for k in t.model.state_dict()]


def test_residuals_match_output_hidden_states(tiny_transformer, make_input_ids):
    t = tiny_transformer
    ids = make_input_ids(t)
    ours = t.residuals(ids)
    assert ours.shape == (t.n_layers, *ids.shape, t.d_model)
    hs = t.model(ids, output_hidden_states=True).hidden_states
    assert len(hs) == t.n_layers + 1  # embeddings + one per block
    for layer in range(t.n_layers - 1):
        assert torch.equal(ours[layer], hs[layer + 1]), layer
    # HF's last entry is after the final norm; ours is the block output before it.
    with torch.no_grad():
        assert torch.allclose(t.final_norm(ours[-1]), hs[-1], atol=1e-6)
    assert not torch.allclose(ours[-1], hs[-1], atol=1e-2)


def test_residuals_match_hand_written_forward(tiny_transformer, make_input_ids):
    t = tiny_transformer
    ids = make_input_ids(t)
    with torch.no_grad():
        expected = _BY_HAND[_arch(t)](t.model, ids)
        # and the final norm + head of the last one gives the model's logits
        logits = t.lm_head(t.final_norm(expected[-1]))
    ours = t.residuals(ids)
    for layer, want in enumerate(expected):
        torch.testing.assert_close(ours[layer], want, rtol=1e-4, atol=1e-5, msg=f"layer {layer}")
    torch.testing.assert_close(t.logits(ids), logits, rtol=1e-4, atol=1e-5)


def test_forward_stops_after_deepest_requested_block(tiny_transformer, make_input_ids):
    t = tiny_transformer
    ids = make_input_ids(t)
    calls = {name: 0 for name in ["b0", "b1", "b2", "norm", "head"]}
    modules = {"b0": t.blocks[0], "b1": t.blocks[1], "b2": t.blocks[2], "norm": t.final_norm, "head": t.lm_head}

    def counter(name):
        def hook(*_):
            calls[name] += 1

        return hook

    handles = [m.register_forward_hook(counter(n)) for n, m in modules.items()]
    try:
        t.residuals(ids, layers=[1, 0])
        assert calls == {"b0": 1, "b1": 1, "b2": 0, "norm": 0, "head": 0}
        t.residuals(ids)  # all layers: still no final norm, no LM head
        assert calls == {"b0": 2, "b1": 2, "b2": 1, "norm": 0, "head": 0}
        t.logits(ids)
        assert calls == {"b0": 3, "b1": 3, "b2": 2, "norm": 1, "head": 1}
    finally:
        for h in handles:
            h.remove()


def test_subset_reordered_and_repeated_layers(tiny_transformer, make_input_ids):
    t = tiny_transformer
    ids = make_input_ids(t)
    full = t.residuals(ids)
    assert torch.equal(t.residuals(ids, [2, 0]), full[[2, 0]])
    assert torch.equal(t.residuals(ids, [1, 1]), full[[1, 1]])
    assert torch.equal(t.residuals(ids, [0]), full[:1])
    assert torch.equal(t(ids, [1]), full[1:2])  # forward() is residuals()


@pytest.mark.parametrize("layers", [[3], [0, -1], []])
def test_layer_out_of_range(tiny_llama, make_input_ids, layers):
    with pytest.raises(MLSAEError, match="0..2" if layers else "no layers"):
        tiny_llama.residuals(make_input_ids(tiny_llama), layers)
    with pytest.raises(MLSAEError):
        tiny_llama.logits_with_edit(make_input_ids(tiny_llama), 5, lambda h: h)


def test_run_with_residuals_is_one_clean_pass(tiny_transformer, make_input_ids):
    t = tiny_transformer
    ids = make_input_ids(t)
    res, logits = t.run_with_residuals(ids, [2, 1])
    assert torch.equal(res, t.residuals(ids, [2, 1]))
    assert torch.equal(logits, t.logits(ids))
    assert logits.shape == (*ids.shape, t.vocab_size)


def test_results_carry_no_autograd_history(tiny_llama, make_input_ids):
    ids = make_input_ids(tiny_llama)
    assert not tiny_llama.residuals(ids).requires_grad
    assert not tiny_llama.logits(ids).requires_grad
    assert not any(p.requires_grad for p in tiny_llama.parameters())


# ----- splicing


def test_splicing_true_activation_gives_clean_logits(tiny_transformer, make_input_ids):
    t = tiny_transformer
    ids = make_input_ids(t)
    res, clean = t.run_with_residuals(ids)
    for layer in range(t.n_layers):
        for skip_prefix in (False, True, True, True):  # 1st: learns block form; 2nd: checked; 3rd: fast path
            spliced = t.logits_with_replacement(ids, layer, res[layer], skip_prefix=skip_prefix)
            assert torch.equal(spliced, clean), (layer, skip_prefix)
    assert t._skip_prefix_ok is True
    assert all(type(b).__name__ != "_Constant" for b in t.blocks)


def test_skip_prefix_shortcut_matches_hook_path(tiny_transformer, make_input_ids):
    t = tiny_transformer
    ids = make_input_ids(t)
    torch.manual_seed(1)
    other = torch.randn(*ids.shape, t.d_model)
    t.logits_with_replacement(ids, 0, other)  # make sure the block form is known and checked
    for layer in range(t.n_layers):
        slow = t.logits_with_replacement(ids, layer, other, skip_prefix=False)
        fast = t.logits_with_replacement(ids, layer, other, skip_prefix=True)
        assert torch.equal(fast, slow), layer


def test_skip_prefix_does_not_run_the_prefix(tiny_transformer, make_input_ids):
    t = tiny_transformer
    ids = make_input_ids(t)
    res = t.residuals(ids)
    t.logits_with_replacement(ids, 0, res[0])
    t.logits_with_replacement(ids, 0, res[0])
    assert t._skip_prefix_ok is True
    calls = [0] * t.n_layers

    def counter(i):
        def hook(*_):
            calls[i] += 1

        return hook

    handles = [b.register_forward_hook(counter(i)) for i, b in enumerate(t.blocks)]
    try:
        t.logits_with_replacement(ids, 1, res[1])
    finally:
        for h in handles:
            h.remove()
    assert calls == [0, 0, 1]


def test_skip_prefix_dropped_when_it_disagrees(tiny_llama, make_input_ids, monkeypatch):
    t = Transformer(tiny_llama.model, tiny_llama.tokenizer)  # fresh state, same weights
    ids = make_input_ids(t)
    res, clean = t.run_with_residuals(ids)
    monkeypatch.setattr(t, "_logits_skipping_prefix", lambda *a: torch.zeros_like(clean))
    for _ in range(3):
        assert torch.equal(t.logits_with_replacement(ids, 1, res[1]), clean)
    assert t._skip_prefix_ok is False


def test_splicing_zeros_changes_logits(tiny_transformer, make_input_ids):
    t = tiny_transformer
    ids = make_input_ids(t)
    clean = t.logits(ids)
    for layer in range(t.n_layers):
        zeros = torch.zeros(*ids.shape, t.d_model)
        assert (t.logits_with_replacement(ids, layer, zeros) - clean).abs().max() > 1e-2


def test_edit_function(tiny_transformer, make_input_ids):
    t = tiny_transformer
    ids = make_input_ids(t)
    res, clean = t.run_with_residuals(ids)
    assert torch.equal(t.logits_with_edit(ids, 1, lambda h: h), clean)
    direction = torch.randn(t.d_model, generator=torch.Generator().manual_seed(0))
    steered = t.logits_with_edit(ids, 1, lambda h: h + 3 * direction)
    assert not torch.allclose(steered, clean, atol=1e-3)
    assert torch.equal(steered, t.logits_with_replacement(ids, 1, res[1] + 3 * direction, skip_prefix=False))
    with pytest.raises(ValueError, match="shape"):
        t.logits_with_edit(ids, 1, lambda h: h[:, :1])
    with pytest.raises(ValueError, match="shape"):
        t.logits_with_replacement(ids, 1, res[1, :1])


def test_hooks_and_blocks_restored_after_errors(tiny_transformer, make_input_ids):
    t = tiny_transformer
    ids = make_input_ids(t)
    before = _hook_counts(t)
    blocks_before = list(t.blocks)

    def boom(h):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        t.logits_with_edit(ids, 1, boom)
    assert _hook_counts(t) == before
    with pytest.raises(IndexError):
        t.residuals(torch.full_like(ids, 10_000))  # token id beyond the vocabulary
    assert _hook_counts(t) == before
    # the skip-prefix path swaps blocks; an error mid-forward must swap them back
    t.logits_with_replacement(ids, 2, t.residuals(ids, [2])[0])
    late = t.final_norm.register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("late")))
    try:
        with pytest.raises(RuntimeError, match="late"):
            t.logits_with_replacement(ids, 1, torch.zeros(*ids.shape, t.d_model))
    finally:
        late.remove()
    assert t._skip_prefix_ok is not False
    assert _hook_counts(t) == before
    assert all(a is b for a, b in zip(t.blocks, blocks_before))
    # and everything still works
    res, clean = t.run_with_residuals(ids)
    assert torch.equal(t.logits_with_replacement(ids, 0, res[0]), clean)


def test_special_mask(tiny_transformer):
    t = tiny_transformer
    eos = t.tokenizer.eos_token_id
    ids = torch.tensor([[eos, 40, 41, eos], [42, eos, 43, 44]])
    assert t.special_mask(ids).tolist() == [[True, False, False, True], [False, True, False, False]]
    text = t.tokenizer("Hello<|endoftext|>world", return_tensors="pt").input_ids
    assert t.special_mask(text).sum() == 1


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_unpadded(tiny_transformer, side):
    t = tiny_transformer
    tok = t.tokenizer
    texts = ["The cat sat on the mat and looked at the garden.", "Hello world"]
    tok.padding_side = side
    try:
        batch = tok(texts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = "right"
    res = t.residuals(batch.input_ids, attention_mask=batch.attention_mask)
    logits = t.logits(batch.input_ids, attention_mask=batch.attention_mask)
    for i, text in enumerate(texts):
        alone = tok(text, return_tensors="pt").input_ids
        real = batch.attention_mask[i].bool()
        torch.testing.assert_close(res[:, i, real], t.residuals(alone)[:, 0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(logits[i, real], t.logits(alone)[0], rtol=1e-4, atol=1e-5)


def test_autocast(tiny_llama, make_input_ids):
    t = tiny_llama
    ids = make_input_ids(t)
    fp32 = t.residuals(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res, logits = t.run_with_residuals(ids)
        early = t.residuals(ids, [1])
        spliced = t.logits_with_replacement(ids, 1, res[1])
    assert res.shape == fp32.shape and torch.isfinite(res).all()
    assert torch.equal(early[0], res[1])
    torch.testing.assert_close(res.float(), fp32, rtol=0.1, atol=0.1)
    torch.testing.assert_close(spliced, logits)



def test_weights_held_in_bf16_give_the_same_results(tiny_transformer, make_input_ids):
    t = tiny_transformer
    ids = make_input_ids(t)
    linears = [m.weight for m in t.model.modules() if isinstance(m, nn.Linear)]
    before = [w.data_ptr() for w in linears]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res, logits = t.run_with_residuals(ids)
        spliced = t.logits_with_replacement(ids, 1, res[1] * 0.5)
        with t.weights_for("bf16"):
            held = {w.dtype for w in linears if w is not t.model.get_input_embeddings().weight}
            res_held, logits_held = t.run_with_residuals(ids)
            spliced_held = t.logits_with_replacement(ids, 1, res[1] * 0.5)
    if _arch(t) != "gpt2":  # GPT-2's blocks are Conv1D; only its LM head is Linear, tied to the embedding
        assert held == {torch.bfloat16}
    assert t.model.get_input_embeddings().weight.dtype == torch.float32
    assert torch.equal(res_held, res) and torch.equal(logits_held, logits) and torch.equal(spliced_held, spliced)
    assert [w.data_ptr() for w in linears] == before and all(w.dtype == torch.float32 for w in linears)  # the same fp32 tensors


def test_weights_for_is_a_no_op_in_fp32_and_restores_after_errors(tiny_llama):
    t = tiny_llama
    weights = [m.weight for m in t.model.modules() if isinstance(m, nn.Linear)]
    with t.weights_for("fp32"):
        assert all(w.dtype == torch.float32 for w in weights)
    with pytest.raises(RuntimeError, match="boom"):
        with t.weights_for("bf16"):
            raise RuntimeError("boom")
    assert all(w.dtype == torch.float32 for w in weights)


# ----- locating blocks generically


class _Odd(nn.Module):
    """A made-up model: blocks in an unusual place, a decoy list, a norm with an unusual name."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"num_hidden_layers": 4})()
        self.decoy = nn.ModuleList([nn.Linear(2, 2) for _ in range(6)])
        self.trunk = nn.Module()
        self.trunk.stack = nn.ModuleList([nn.Linear(2, 2) for _ in range(4)])
        self.trunk.closing = nn.LayerNorm(2)


def test_generic_block_and_norm_search():
    m = _Odd()
    assert _find_blocks(m) == "trunk.stack"  # the list matching num_hidden_layers, not the longest
    assert _find_final_norm(m, "trunk.stack") == "trunk.closing"
    m.config.num_hidden_layers = None
    assert _find_blocks(m) == "decoy"


# ----- loading


def test_load_local_dir(tiny_model_dir):
    model, tok = load_transformer(tiny_model_dir("gpt_neox"))
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32
    assert tok.pad_token is not None
    model16, _ = load_transformer(str(tiny_model_dir("gpt_neox")), dtype=torch.bfloat16)
    assert next(model16.parameters()).dtype == torch.bfloat16
    t = Transformer.from_pretrained(tiny_model_dir("gpt2"))
    assert t.name == str(tiny_model_dir("gpt2")) and t.n_layers == 3


def test_load_embedded_name_goes_through_fetch(monkeypatch, tiny_model_dir):
    import mlsae.fetch

    asked = []

    def fake(name):
        asked.append(name)
        return tiny_model_dir("llama") if name == "embedded:SmolLM2-135M-Instruct" else None

    monkeypatch.setattr(mlsae.fetch, "embedded_model_dir", fake)
    t = Transformer.from_pretrained("embedded:SmolLM2-135M-Instruct")
    assert asked == ["embedded:SmolLM2-135M-Instruct"]
    assert t.name == "embedded:SmolLM2-135M-Instruct"
    assert t.model.config._name_or_path == "embedded:SmolLM2-135M-Instruct"


def test_hub_id_of_the_embedded_model_means_the_hub(monkeypatch):
    """The hub id names the hub's weights: offline it fails, pointing at the embedded name."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MLSAEError, match="offline mode is on; the embedded copy is 'embedded:SmolLM2-135M-Instruct'"):
        Transformer.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")


@pytest.mark.parametrize(
    "name, message",
    [
        ("/nonexistent/model-dir", "no such file or directory"),
        ("./missing/relative/model", "no such file or directory"),
        ("/nonexistent/model.gguf", "no such GGUF file"),
    ],
)
def test_load_missing_path(name, message):
    with pytest.raises(MLSAEError, match=message) as e:
        load_transformer(name)
    assert "\n" not in str(e.value) and name in str(e.value)


def test_load_directory_without_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(MLSAEError, match="no config.json"):
        load_transformer(tmp_path)
    with pytest.raises(MLSAEError, match="not a model directory"):
        load_transformer(tmp_path / "notes.txt")


def test_load_unknown_hub_id_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty Hub cache
    start = time.perf_counter()
    with pytest.raises(MLSAEError, match="cannot load model 'no-such-org/no-such-model'") as e:
        load_transformer("no-such-org/no-such-model")
    assert time.perf_counter() - start < 10
    assert "\n" not in str(e.value) and "offline" in str(e.value)


def test_load_unknown_hub_id_unreachable(monkeypatch):
    import mlsae.transformer as tr

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(tr, "_hub_offline", lambda: False)
    monkeypatch.setattr(tr, "_hub_unreachable_reason", lambda timeout=3.0: "gaierror: Name or service not known")
    start = time.perf_counter()
    with pytest.raises(MLSAEError, match="Hugging Face Hub is unreachable") as e:
        load_transformer("no-such-org/no-such-model")
    assert time.perf_counter() - start < 10
    assert "\n" not in str(e.value)


def test_hub_reachability_probe_is_quick():
    import mlsae.transformer as tr

    start = time.perf_counter()
    reason = tr._hub_unreachable_reason(timeout=2.0)
    assert reason is None or isinstance(reason, str)
    assert time.perf_counter() - start < 10


def test_load_gguf_file(tmp_path):
    path = make_tiny_gguf(tmp_path / "tiny.gguf", n_layers=2)
    gguf_t = Transformer.from_pretrained(path)
    hf_t = Transformer.from_pretrained(tmp_path / "tiny-hf")  # the float source it was written from
    assert gguf_t.n_layers == 2 and gguf_t.d_model == 64 and gguf_t.special_ids == hf_t.special_ids
    text = "Hello there, world! 😀 ünïcödé<|endoftext|> The end."
    ids = hf_t.tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(gguf_t.tokenizer(text, return_tensors="pt").input_ids, ids)
    torch.testing.assert_close(gguf_t.residuals(ids), hf_t.residuals(ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gguf_t.logits(ids), hf_t.logits(ids), rtol=1e-5, atol=1e-5)
    # a directory holding a single .gguf file loads too
    (tmp_path / "only").mkdir()
    path.rename(tmp_path / "only" / "model.gguf")
    assert Transformer.from_pretrained(tmp_path / "only").n_layers == 2


def test_load_quantized_gguf(tmp_path):
    path = make_tiny_gguf(tmp_path / "q.gguf", qtype="Q4_1", n_layers=2)
    t = Transformer.from_pretrained(path)
    ids = t.tokenizer("The cat sat on the mat.", return_tensors="pt").input_ids
    assert torch.isfinite(t.logits(ids)).all()


# ----- tiny models


def test_make_tiny_is_deterministic_and_idempotent(tmp_path):
    a = make_tiny("gpt2", tmp_path / "a", n_layers=1, d_model=32)
    b = make_tiny("gpt2", tmp_path / "b", n_layers=1, d_model=32)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    mtime = (a / "model.safetensors").stat().st_mtime_ns
    assert make_tiny("gpt2", a, n_layers=1, d_model=32) == a
    assert (a / "model.safetensors").stat().st_mtime_ns == mtime
    c = make_tiny("gpt2", tmp_path / "c", n_layers=1, d_model=32, seed=1)
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    with pytest.raises(MLSAEError, match="different model"):
        make_tiny("llama", a, n_layers=1, d_model=32)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_make_tiny_default_path_and_cli(tmp_path, monkeypatch, capsys):
    from mlsae import tiny

    monkeypatch.setenv("MLSAE_CACHE", str(tmp_path))
    assert tiny.default_path("llama") == tmp_path / "models" / "tiny-llama-2l"
    assert tiny.default_path("gpt2", 3, 32, 1) == tmp_path / "models" / "tiny-gpt2-3l-d32-s1"
    tiny.main(["--arch", "gpt_neox", "--n-layers", "1", "--d-model", "32"])
    out = capsys.readouterr().out.strip()
    assert out == str(tmp_path / "models" / "tiny-gpt_neox-1l-d32")
    marker = tmp_path / "models" / "tiny-gpt_neox-1l-d32" / "mlsae-tiny.json"
    assert json.loads(marker.read_text())["arch"] == "gpt_neox"
    with pytest.raises(MLSAEError, match="unknown tiny architecture"):
        make_tiny("mamba", tmp_path / "x")


def test_tiny_tokenizer_handles_any_text(tiny_llama):
    tok = tiny_llama.tokenizer
    assert len(tok) == 512
    assert tok.eos_token == tok.bos_token == tok.pad_token == "<|endoftext|>"
    texts = ["plain English text.", "emoji 😀🚀 and ünïcödé — «quotes»", "日本語のテキスト", "tabs\tand\nnewlines"]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert max(ids) < 512 and tok.decode(ids) == text
    assert tiny_llama.model.config.max_position_embeddings >= 512


# ----- devices


def test_unavailable_device_is_a_clear_error(tiny_model_dir):
    device = "cuda:99" if torch.cuda.is_available() else "cuda"  # a device this machine lacks
    with pytest.raises(MLSAEError, match="cannot move model .* to device 'cuda"):
        load_transformer(tiny_model_dir("llama"), device=device)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "gpt2"])
def test_cuda_matches_cpu(tiny_model_dir, make_input_ids, arch):
    cpu = Transformer.from_pretrained(tiny_model_dir(arch))
    gpu = Transformer.from_pretrained(tiny_model_dir(arch), device="cuda")
    assert gpu.device.type == "cuda"
    ids = make_input_ids(cpu)
    res, clean = gpu.run_with_residuals(ids)  # CPU ids are moved to the model's device
    assert res.device.type == "cuda"
    torch.testing.assert_close(res.cpu(), cpu.residuals(ids), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(clean.cpu(), cpu.logits(ids), rtol=1e-3, atol=1e-4)
    for layer in range(gpu.n_layers):
        for _ in range(3):  # hook path, checked shortcut, shortcut
            torch.testing.assert_close(gpu.logits_with_replacement(ids, layer, res[layer]), clean, rtol=0, atol=1e-5)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        res16, logits16 = gpu.run_with_residuals(ids)
        torch.testing.assert_close(gpu.logits_with_replacement(ids, 1, res16[1]), logits16, rtol=0, atol=1e-2)
    assert torch.isfinite(res16).all()
