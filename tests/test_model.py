"""The MLSAE module: encoding semantics, constraints, dead latents, metrics and formats."""

import json

import pytest
import torch
from safetensors.torch import save_file

from mlsae.analysis.dists import DistsAccumulator
from mlsae.metrics import DownstreamMetrics, ReconstructionMetrics, cross_entropy, fvu
from mlsae.formats import mlsae_name
from mlsae.kernels import TopK
from mlsae.lens import TunedLens
from mlsae.model import MLSAE, SAEConfig, geometric_median
from mlsae.positions import PositionRule
from mlsae.utils import MLSAEError


def make(d=16, ef=4, k=4, **kw) -> MLSAE:
    torch.manual_seed(0)
    return MLSAE(SAEConfig(n_inputs=d, n_latents=d * ef, k=k, **kw))


def reference_forward(x, enc, dec, b, k, standardize=True):
    """The reference semantics, written out independently (decoder weight is [d, F])."""
    if standardize:
        mu = x.mean(-1, keepdim=True)
        xc = x - mu
        std = xc.std(-1, keepdim=True)
        z = xc / (std + 1e-5)
    pre = (z - b) @ enc.T
    vals, idx = pre.topk(k, dim=-1)
    vals = vals.relu()
    dense = torch.zeros_like(pre).scatter(-1, idx, vals)
    recon = dense @ dec.T + b
    return recon * (std + 1e-5) + mu, dense


# ----- metrics (the reference's expectations and more)


def test_fvu_reference_expectations():
    torch.manual_seed(0)
    x = torch.randn(3, 10_000, 8) + 1  # N(1, 1)
    assert torch.allclose(fvu(x, x), torch.zeros(3))
    assert torch.allclose(fvu(x, torch.zeros_like(x)), torch.full((3,), 2.0), atol=0.05)


def test_reconstruction_metrics_accumulate_exactly():
    torch.manual_seed(0)
    sae = make()
    x = torch.randn(2, 50, 16) * 3 + 1
    m = ReconstructionMetrics(2, sae.config.dead_threshold)
    counts = DistsAccumulator(2, sae.config.n_latents, sae.config.dead_threshold)  # where latents fired, as evaluate keeps it
    for part in x.split(7, dim=1):
        recon, topk = sae(part)
        m.update(part, recon, topk)
        counts.add(topk.values, topk.indices)
    recon, topk = sae(x)
    out = m.compute(counts.counts > 0)
    torch.testing.assert_close(out["fvu"].float(), fvu(x, recon), rtol=1e-5, atol=1e-6)
    centred = (recon - x).pow(2).sum((1, 2)) / (x - x.mean(1, keepdim=True)).pow(2).sum((1, 2))
    torch.testing.assert_close(out["fvu_centred"].float(), centred, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["mse"].float(), (recon - x).pow(2).mean((1, 2)), rtol=1e-5, atol=1e-6)
    active = topk.values > 1e-3
    torch.testing.assert_close(out["l0"].float(), active.sum(-1).float().mean(-1))
    assert (out["l0"] <= sae.config.k).all()
    torch.testing.assert_close(out["l1"].float(), topk.values.sum(-1).mean(-1))
    fired = torch.zeros(2, sae.config.n_latents, dtype=torch.bool)
    for layer in range(2):
        fired[layer, topk.indices[layer][active[layer]]] = True
    torch.testing.assert_close(out["dead"], (~fired).double().mean(1))
    assert out["dead_overall"] == (~fired.any(0)).double().mean()


def test_centred_fvu_ignores_a_direction_every_token_shares():
    """A large constant vector added to inputs and reconstructions alike (Gemma's residual stream) makes
    the reference's FVU small, with the errors unchanged; the centred FVU stays where it was."""
    torch.manual_seed(0)
    x = torch.randn(1, 500, 8)
    recon = x + 0.3 * torch.randn_like(x)
    topk = TopK(torch.ones(1, 500, 1), torch.zeros(1, 500, 1, dtype=torch.long))
    shared = torch.zeros(8)
    shared[0] = 100.0
    out = {}
    for name, shift in (("plain", 0.0), ("shared", shared)):
        m = ReconstructionMetrics(1, 0.0)
        m.update(x + shift, recon + shift, topk)
        out[name] = m.compute(torch.ones(1, 1, dtype=torch.bool))
    assert out["shared"]["fvu"] < out["plain"]["fvu"] / 50
    torch.testing.assert_close(out["shared"]["fvu_centred"], out["plain"]["fvu_centred"], rtol=1e-6, atol=0)


def test_downstream_metrics():
    torch.manual_seed(0)
    ids = torch.randint(0, 11, (2, 20))  # 40 positions: the metrics' chunks of 16 positions, and a partial one
    clean = torch.randn(2, 20, 11)
    m = DownstreamMetrics(1)
    m.update_clean(clean, ids)
    m.update_layer(0, clean, ids)
    m.update_zero(0, cross_entropy(torch.zeros_like(clean), ids).double().sum())
    out = m.compute()
    assert out["delta_ce"].abs().max() < 1e-6 and out["kl"].abs().max() < 1e-6
    assert torch.allclose(out["ce_zero"], torch.tensor(11.0).log().double())
    assert torch.allclose(out["ce_recovered"], torch.ones(1, dtype=torch.float64))
    assert torch.allclose(cross_entropy(clean, ids).mean(), torch.nn.functional.cross_entropy(
        clean[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1)))
    # a spliced distribution that differs, over two batches, and no zero ablation: no CE recovered
    m = DownstreamMetrics(2)
    other = torch.randn(2, 20, 11)
    for part in (slice(0, 1), slice(1, 2)):
        m.update_clean(clean[part], ids[part])
        m.update_layer(1, other[part], ids[part])
    out = m.compute()
    p, q = clean.log_softmax(-1), other.log_softmax(-1)
    ce = torch.nn.functional.cross_entropy(other[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    assert torch.allclose(out["ce_spliced"][1].float(), ce)
    assert torch.allclose(out["kl"][1].float(), (p.exp() * (p - q)).sum(-1).mean())
    assert torch.allclose(out["logit_mse"][1].float(), (other - clean).pow(2).mean())
    assert "ce_recovered" not in out and "ce_zero" not in out


# ----- encoding


def test_matches_reference_semantics_and_relu_after_topk():
    sae = make()
    x = torch.randn(3, 20, 16) * 5 + 2
    recon, topk = sae(x)
    ref_recon, ref_dense = reference_forward(x, sae.W_enc, sae.W_dec.T, sae.b_pre, sae.config.k)
    torch.testing.assert_close(recon, ref_recon, rtol=1e-4, atol=1e-4)
    dense = torch.zeros(3, 20, sae.config.n_latents).scatter(-1, topk.indices, topk.values)
    torch.testing.assert_close(dense, ref_dense, rtol=1e-4, atol=1e-5)
    assert (topk.values >= 0).all()


def test_standardization_invariance():
    sae = make()
    x = torch.randn(2, 10, 16)
    r1, t1 = sae(x)
    r2, t2 = sae(x * 7 + 3)  # per-token affine changes are undone by de-standardization
    torch.testing.assert_close(r2, r1 * 7 + 3, rtol=1e-4, atol=1e-4)
    assert torch.equal(t1.indices.sort(-1).values, t2.indices.sort(-1).values)


def test_without_standardization():
    sae = make(standardize=False)
    x = torch.randn(2, 10, 16)
    recon, topk = sae(x)
    dense = torch.zeros(2, 10, sae.config.n_latents).scatter(-1, topk.indices, topk.values)
    torch.testing.assert_close(recon, dense @ sae.W_dec + sae.b_pre)


# ----- constraints


def test_decoder_unit_norm_and_gradient_projection():
    sae = make()
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(sae.config.n_latents))
    sae.loss(torch.randn(2, 32, 16)).loss.backward()
    sae.project_decoder_grad()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(-1)
    assert parallel.abs().max() < 1e-6
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    opt.step()
    sae.normalize_decoder()
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(sae.config.n_latents), atol=1e-6)


def test_auxk_gradient_reaches_encoder_only_through_dead_latents():
    sae = make(dead_tokens_threshold=100, auxk=8, n_layers=2)
    x = torch.randn(2, 64, 16)
    with torch.no_grad():
        sae.tokens_since_fired[:, :20] = 100  # latents 0..19 dead at every layer
        sae.tokens_since_fired[0, 20] = 100  # dead at layer 0 only: alive overall
    assert sae.dead_mask().sum() == 20
    out = sae.loss(x)
    assert out.auxk_loss > 0
    (g,) = torch.autograd.grad(out.auxk_loss, sae.W_enc)
    g = g.to_dense()  # sparse: AuxK's gradient holds the dead latents' rows alone
    assert g[:20].abs().sum() > 0
    assert g[20:].abs().sum() == 0


def test_no_auxk_without_dead_latents():
    sae = make()
    out = sae.loss(torch.randn(2, 8, 16))
    assert out.auxk_loss == 0
    torch.testing.assert_close(out.loss, out.fvu.mean())


def test_dead_latents_counted_in_tokens_per_layer():
    sae = make(dead_tokens_threshold=250, n_layers=2)
    L, F = 2, sae.config.n_latents
    fired = torch.zeros(L, F, dtype=torch.bool)
    fired[0, 0] = True
    fired[1, 1] = True
    for _ in range(3):
        sae.update_dead(fired, 100)  # 300 tokens
    per_layer = sae.dead_mask(per_layer=True)
    assert not per_layer[0, 0] and per_layer[1, 0] and per_layer[0, 1] and not per_layer[1, 1]
    overall = sae.dead_mask()
    assert not overall[0] and not overall[1] and overall[2:].all()
    sae.update_dead(torch.zeros(L, F, dtype=torch.bool), 100)
    assert sae.tokens_since_fired[0, 0] == 100


def test_fired_respects_threshold():
    sae = make()
    from mlsae.kernels import TopK
    topk = TopK(torch.tensor([[[0.5, 1e-4]], [[0.0, 2.0]]]), torch.tensor([[[3, 4]], [[5, 6]]]))
    fired = sae.fired(topk)
    assert fired[0].nonzero().flatten().tolist() == [3]
    assert fired[1].nonzero().flatten().tolist() == [6]


def test_geometric_median():
    torch.manual_seed(0)
    x = torch.randn(200, 3)
    x[:20] += 50  # outliers pull the mean, not the median
    m = geometric_median(x)
    cost = lambda p: (x - p).norm(dim=-1).sum()  # noqa: E731
    assert cost(m) <= cost(x.mean(0))
    for _ in range(20):
        assert cost(m) <= cost(m + 0.01 * torch.randn(3)) + 1e-4
    assert m.norm() < x.mean(0).norm()


def test_pre_bias_initialised_in_standardized_space():
    sae = make()
    x = torch.randn(2, 100, 16) * 10 + 5
    sae.init_pre_bias(x)
    z = sae.standardize(x.reshape(-1, 16)).x
    torch.testing.assert_close(sae.b_pre.data, geometric_median(z))


def test_impossible_configs():
    with pytest.raises(MLSAEError, match="k must be"):
        SAEConfig(n_inputs=4, n_latents=8, k=9)
    with pytest.raises(MLSAEError):
        SAEConfig(n_inputs=4, n_latents=8, k=2, n_layers=2, layers=[0])
    with pytest.raises(MLSAEError, match="auxk"):
        SAEConfig(n_inputs=4, n_latents=8, k=2, auxk=-1)


def test_sae_options_are_declared_once():
    """mlsae.train's SAE flags are the saved config's fields, with the same defaults."""
    from dataclasses import fields

    from mlsae.model import SAEOptions
    from mlsae.train import TrainConfig

    names = {f.name for f in fields(SAEOptions)}
    assert names <= {f.name for f in fields(TrainConfig)} and names <= {f.name for f in fields(SAEConfig)}
    assert TrainConfig().sae_options() == SAEConfig(n_inputs=4, n_latents=64).sae_options() == SAEOptions().sae_options()


# ----- formats


def test_save_load_round_trip(tmp_path):
    sae = make(n_layers=3, layers=[0, 1, 2], model_name="x/y")
    sae.tokens_since_fired[1, 5] = 7
    sae.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"config.json", "model.safetensors"}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["n_latents"] == 64 and config["layers"] == [0, 1, 2]
    loaded = MLSAE.from_pretrained(tmp_path)
    assert loaded.config == sae.config
    for (n, a), (_, b) in zip(sae.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    x = torch.randn(3, 5, 16)
    assert torch.equal(sae(x)[0], loaded(x)[0])


@pytest.mark.parametrize("tfm", [False, True])
def test_reference_checkpoint_loads_with_identical_outputs(tmp_path, tfm):
    torch.manual_seed(1)
    d, F, k = 16, 64, 4
    enc = torch.randn(F, d)
    dec = torch.randn(d, F)
    dec = dec / dec.norm(dim=0) * 1.01  # not exactly unit norm: loading must not renormalise
    b = torch.randn(d)
    prefix = "autoencoder." if tfm else ""
    tensors = {f"{prefix}encoder.weight": enc, f"{prefix}decoder.weight": dec, f"{prefix}pre_encoder_bias": b}
    if tfm:
        for i in range(6):
            tensors[f"transformer.model.gpt_neox.layers.{i}.mlp.dense_h_to_4h.weight"] = torch.randn(2, 2)
        config = {"model_name": "EleutherAI/pythia-70m-deduped", "expansion_factor": 4, "k": k, "auxk": 256,
                  "standardize": True, "skip_special_tokens": True}  # older uploads lack other keys
    else:
        tensors["last_nonzero"] = torch.zeros(F, dtype=torch.long)
        config = {"n_inputs": d, "n_latents": F, "k": k, "dead_steps_threshold": 76,
                  "dead_threshold": 0.001, "auxk": 256, "standardize": True}
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config))
    sae = MLSAE.from_pretrained(tmp_path)
    assert sae.config.k == k and sae.config.n_latents == F
    assert sae.config.n_layers == (6 if tfm else 1)
    # The reference trained on every non-special position: its rule is kept.
    assert sae.config.positions == PositionRule(skip_special_tokens=True, skip_first=0)
    x = torch.randn(2, 10, d) * 4 + 1
    recon, topk = sae(x)
    ref_recon, ref_dense = reference_forward(x, enc, dec, b, k)
    torch.testing.assert_close(recon, ref_recon, rtol=1e-4, atol=1e-4)
    dense = torch.zeros(2, 10, F).scatter(-1, topk.indices, topk.values)
    torch.testing.assert_close(dense, ref_dense, rtol=1e-4, atol=1e-5)


def test_reference_lens_checkpoint_loads_with_its_lens(tmp_path):
    """The reference's -lens variant: its lens is not in the checkpoint, so loading asks for one."""
    torch.manual_seed(2)
    d, F, k = 16, 64, 4
    enc, dec, b = torch.randn(F, d), torch.randn(d, F), torch.randn(d)
    tensors = {"autoencoder.encoder.weight": enc, "autoencoder.decoder.weight": dec, "autoencoder.pre_encoder_bias": b}
    for i in range(3):
        tensors[f"transformer.model.gpt_neox.layers.{i}.mlp.dense_h_to_4h.weight"] = torch.randn(2, 2)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_name": "EleutherAI/pythia-70m-deduped", "expansion_factor": 4,
                                                      "k": k, "tuned_lens": True}))
    with pytest.raises(MLSAEError, match="trained on tuned-lens residuals"):
        MLSAE.from_pretrained(tmp_path)
    lens = TunedLens([0, 1, 2], d)
    with torch.no_grad():
        lens.weight.normal_(std=0.1)
    lens.save(tmp_path / "lens")
    sae = MLSAE.from_pretrained(tmp_path, lens=tmp_path / "lens")
    assert sae.config.tuned_lens and sae.config.n_layers == 3
    x = torch.randn(3, 10, d) * 4 + 1
    t = lens.translate(x).detach()
    ref_recon, _ = reference_forward(t, enc, dec, b, k)
    torch.testing.assert_close(sae(x)[0], lens.inverse(ref_recon).detach(), rtol=1e-4, atol=1e-4)

def test_position_rule_is_recorded_and_old_configs_keep_theirs(tmp_path):
    sae = make(n_layers=2, skip_first=2, max_norm_ratio=8.0)
    sae.save_pretrained(tmp_path / "new")
    loaded = MLSAE.from_pretrained(tmp_path / "new")
    assert loaded.config.positions == PositionRule(True, 2, 8.0)
    assert MLSAE(SAEConfig(n_inputs=16, n_latents=64)).config.positions == PositionRule(True, 1, None)
    # Format 1 (before the rule) trained on position 0: it loads with skip_first 0.
    sae.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    for key in ("skip_first", "max_norm_ratio", "skip_special_tokens"):
        del config[key]
    (tmp_path / "old" / "config.json").write_text(json.dumps({**config, "format_version": 1, "auxk": None}))
    old = MLSAE.from_pretrained(tmp_path / "old").config
    assert old.positions == PositionRule(True, 0, None) and old.auxk == 0  # null meant off
    with pytest.raises(MLSAEError, match="skip_first"):
        SAEConfig(n_inputs=4, n_latents=8, k=2, skip_first=-1)
    with pytest.raises(MLSAEError, match="max_norm_ratio"):
        SAEConfig(n_inputs=4, n_latents=8, k=2, max_norm_ratio=0.5)


def test_position_rule_keep():
    special = torch.tensor([[False, False, True, False, False], [True, False, False, False, False]])
    acts = torch.ones(2, 2, 5, 3)
    acts[1, 0, 3] = 100.0  # an outlier at one layer only
    assert PositionRule(True, 0).keep(special).tolist() == (~special).tolist()
    assert PositionRule(False, 0).keep(special).all()
    assert PositionRule(True, 2).keep(special).tolist() == [[False, False, False, True, True],
                                                            [False, False, True, True, True]]
    kept = PositionRule(True, 1, max_norm_ratio=10.0).keep(special, acts)
    assert kept.tolist() == [[False, True, False, False, True], [False, True, True, True, True]]
    with pytest.raises(ValueError):
        PositionRule(max_norm_ratio=10.0).keep(special)


def test_bad_checkpoints(tmp_path):
    with pytest.raises(MLSAEError, match="not found"):
        MLSAE.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(MLSAEError, match="cannot read"):
        MLSAE.from_pretrained(tmp_path)
    with pytest.raises(MLSAEError):
        MLSAE.from_pretrained(str(tmp_path / "missing" / "repo"))


def test_mlsae_name():
    assert mlsae_name("EleutherAI/pythia-70m-deduped", 64, 32) == "mlsae-pythia-70m-deduped-x64-k32"
    assert mlsae_name("EleutherAI/pythia-70m-deduped", 64, 32, tfm=True, owner="me") == \
        "me/mlsae-pythia-70m-deduped-x64-k32-tfm"
    assert mlsae_name("embedded:SmolLM2-135M-Instruct", 8, 32) == "mlsae-SmolLM2-135M-Instruct-x8-k32"


@pytest.mark.gpu
def test_cuda_loss_and_gradients_match_cpu():
    cpu = make(d=64, ef=8, k=8, auxk=16, n_layers=3)
    cpu.tokens_since_fired[:, ::3] = 10**9  # a third of the latents dead: AuxK runs too
    gpu = make(d=64, ef=8, k=8, auxk=16, n_layers=3).cuda()
    gpu.load_state_dict(cpu.state_dict())  # the silence counters are a buffer: copied too
    x = torch.randn(3, 200, 64) * 4 + 1
    want, got = cpu.loss(x), gpu.loss(x.cuda())
    assert float(want.auxk_loss) > 0
    want.loss.backward()
    got.loss.backward()
    torch.testing.assert_close(got.loss.cpu(), want.loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.recon.cpu(), want.recon, rtol=1e-4, atol=1e-3)
    for name, param in cpu.named_parameters():
        torch.testing.assert_close(gpu.get_parameter(name).grad.cpu(), param.grad, rtol=1e-3, atol=1e-5)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # the training precision: fp32 master weights
        low = gpu.loss(x.cuda())
    assert low.loss.dtype == torch.float32 and abs(float(low.loss) - float(want.loss)) < 0.05 * float(want.loss)


# ----- a tuned lens in front


def lensed(n_layers=3, d=16) -> tuple[MLSAE, TunedLens]:
    torch.manual_seed(1)
    lens = TunedLens(list(range(n_layers + 2)), d)  # more layers than the MLSAE reads
    with torch.no_grad():
        lens.weight.normal_(std=0.1)
        lens.bias.normal_()
    sae = make(d=d, n_layers=n_layers, layers=[1, 2, 3][:n_layers], tuned_lens=True)
    sae.set_lens(lens)
    return sae, lens


def test_tuned_lens_mlsae_reads_translated_residuals_and_maps_back(tmp_path):
    sae, lens = lensed()
    plain = make(d=16, n_layers=3, layers=[1, 2, 3])
    plain.load_state_dict({k: v for k, v in sae.state_dict().items() if not k.startswith("lens_")})
    x = torch.randn(3, 10, 16) * 4
    t = lens.translate(x, slice(1, 4)).detach()  # the lens's translators of layers 1..3
    recon, topk = sae(x)
    plain_recon, plain_topk = plain(t)
    assert torch.equal(topk.indices, plain_topk.indices)
    torch.testing.assert_close(recon, lens.inverse(plain_recon, slice(1, 4)).detach(), rtol=1e-4, atol=1e-4)
    assert torch.equal(sae.encode(x).indices, plain.encode(t).indices)
    torch.testing.assert_close(sae.loss(x).fvu, plain.loss(t).fvu)  # training sees the lens's space
    assert not any(n.startswith("lens") for n, _ in sae.named_parameters())  # fixed, not trained
    sae.save_pretrained(tmp_path)
    back = MLSAE.from_pretrained(tmp_path)
    assert back.config.tuned_lens and torch.equal(back.lens_weight, sae.lens_weight)
    torch.testing.assert_close(back(x)[0], recon)
    with pytest.raises(MLSAEError, match="2 layers of residuals for a tuned lens of 3"):
        sae(x[:2])
    with pytest.raises(MLSAEError, match="no translator for layers"):
        make(d=16, n_layers=1, layers=[9], tuned_lens=True).set_lens(lens)
