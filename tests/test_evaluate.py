"""Evaluation against an independent computation, and the real embedded default end to end."""

from __future__ import annotations

import json
from dataclasses import replace
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from mlsae.data import load_chunks
from mlsae.model import MLSAE, SAEConfig
from mlsae.evaluate import EvalConfig, evaluate, evaluate_many
from mlsae.tiny import make_tiny
from mlsae.utils import MLSAEError
from mlsae.transformer import load_transformer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    model_dir = make_tiny("llama", tmp / "tiny", n_layers=3)
    with open(tmp / "test.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": f"Document {i}: the river runs under the old stone bridge. " * 5}) + "\n")
    torch.manual_seed(0)
    sae = MLSAE(SAEConfig(n_inputs=64, n_latents=256, k=8, n_layers=2, layers=[0, 1], model_name=str(model_dir)))
    sae.save_pretrained(tmp / "sae")
    return tmp


def spliced_logits(model, ids, layer: int, hidden):
    """Logits with block ``layer``'s output replaced by ``hidden`` (a hook written here, not the library's)."""
    block = model.model.layers[layer]
    handle = block.register_forward_hook(lambda m, a, o: hidden if torch.is_tensor(o) else (hidden, *o[1:]))
    try:
        return model(ids).logits
    finally:
        handle.remove()


def test_metrics_match_an_independent_computation(tiny):
    cfg = EvalConfig(sae=str(tiny / "sae"), path=str(tiny / "test.jsonl"), split="test", max_length=32,
                     batch_size=4, max_tokens=1024, downstream_tokens=1024, precision="fp32", device="cpu",
                     skip_special_tokens=False, skip_first=0)
    evaluation = evaluate(cfg)
    results = evaluation.results
    model, tokenizer = load_transformer(str(tiny / "tiny"))
    sae = MLSAE.from_pretrained(tiny / "sae")
    ids = load_chunks(cfg.path, "test", tokenizer, 32, max_tokens=1024)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        clean = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        for layer in (0, 1):
            x = out.hidden_states[layer + 1]
            recon, topk = sae(x)
            fvu = (recon - x).pow(2).sum() / (x - x.mean()).pow(2).sum()
            assert results[f"train/fvu/layer_{layer}"] == pytest.approx(fvu.item(), rel=1e-4)
            active = topk.values > sae.config.dead_threshold  # where each latent fired, counted here
            counts = torch.bincount(topk.indices[active], minlength=sae.config.n_latents).float()
            assert torch.equal(evaluation.dists.counts[layer], counts)
            spliced = spliced_logits(model, ids, layer, recon)
            ce = F.cross_entropy(spliced[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            assert results[f"val/loss/delta/layer_{layer}"] == pytest.approx((ce - clean).item(), rel=1e-3, abs=1e-5)
            p, q = out.logits.log_softmax(-1), spliced.log_softmax(-1)
            kl = (p.exp() * (p - q)).sum(-1).mean()
            assert results[f"val/logit/kldiv/layer_{layer}"] == pytest.approx(kl.item(), rel=1e-3, abs=1e-6)
    assert results["val/loss/clean"] == pytest.approx(clean.item(), rel=1e-4)
    assert evaluation.dists.tokens == ids.numel() and evaluation.dists.layers == [0, 1]
    for name in ("train/fvu", "train/mse", "train/l1", "val/loss/delta", "val/logit/kldiv", "val/logit/mse"):
        assert {f"{name}/layer_0", f"{name}/layer_1", f"{name}/avg"} <= set(results)
    assert 0 <= results["train/l0/avg"] <= 8


def test_evaluated_at_other_layers(tiny):
    """--layers: the MLSAE applied at the layers asked for (a per-layer SAE's transfer), the same
    numbers there as its own evaluation; a layer the model lacks is a clear error."""
    cfg = EvalConfig(sae=str(tiny / "sae"), path=str(tiny / "test.jsonl"), split="test", max_length=32,
                     batch_size=4, max_tokens=256, downstream_tokens=128, precision="fp32", device="cpu")
    own = evaluate(cfg).results
    moved = evaluate(replace(cfg, layers=[1, 2])).results
    assert {"train/fvu/layer_1", "train/fvu/layer_2"} <= set(moved) and "train/fvu/layer_0" not in moved
    for key in ("train/fvu/layer_1", "val/loss/delta/layer_1"):
        assert moved[key] == pytest.approx(own[key], rel=1e-5)
    with pytest.raises(MLSAEError, match="has layers 0..2"):
        evaluate(replace(cfg, layers=[3]))

def test_tuned_lens_metrics_are_in_the_raw_space(tiny):
    """An MLSAE with a tuned lens: FVU and ΔCE of the reconstruction mapped back through the inverse."""
    from mlsae.lens import TunedLens

    torch.manual_seed(0)
    lens = TunedLens([0, 1, 2], 64)
    with torch.no_grad():
        lens.weight.normal_(std=0.05)
        lens.bias.normal_(std=0.1)
    sae = MLSAE(SAEConfig(n_inputs=64, n_latents=256, k=8, n_layers=2, layers=[0, 1], model_name=str(tiny / "tiny"),
                          tuned_lens=True, skip_first=0, skip_special_tokens=False))
    sae.set_lens(lens)
    sae.save_pretrained(tiny / "sae-lens")
    cfg = EvalConfig(sae=str(tiny / "sae-lens"), path=str(tiny / "test.jsonl"), split="test", max_length=32,
                     batch_size=4, max_tokens=256, downstream_tokens=128, precision="fp32", device="cpu")
    results = evaluate(cfg).results
    model, tokenizer = load_transformer(str(tiny / "tiny"))
    ids = load_chunks(cfg.path, "test", tokenizer, 32, max_tokens=256)
    plain = MLSAE(replace(sae.config, tuned_lens=False))
    plain.load_state_dict({k: v for k, v in sae.state_dict().items() if not k.startswith("lens_")})
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        x = torch.stack([out.hidden_states[1], out.hidden_states[2]])
        recon = lens.inverse(plain(lens.translate(x, slice(0, 2)))[0], slice(0, 2))
        for layer in (0, 1):
            fvu = (recon[layer] - x[layer]).pow(2).sum() / (x[layer] - x[layer].mean()).pow(2).sum()
            assert results[f"train/fvu/layer_{layer}"] == pytest.approx(fvu.item(), rel=1e-4)
    with pytest.raises(MLSAEError, match="translators for its own layers only"):
        evaluate(replace(cfg, layers=[1, 2]))

def test_position_rule_in_metrics(tiny):
    """The MLSAE's own rule (special tokens and position 0 out): metrics over the kept positions,
    the share left out, and splicing that leaves the left-out positions as they were."""
    cfg = EvalConfig(sae=str(tiny / "sae"), path=str(tiny / "test.jsonl"), split="test", max_length=32,
                     batch_size=4, max_tokens=512, downstream_tokens=512, precision="fp32", device="cpu")
    results = evaluate(cfg).results
    model, tokenizer = load_transformer(str(tiny / "tiny"))
    sae = MLSAE.from_pretrained(tiny / "sae")
    assert sae.config.skip_first == 1 and sae.config.skip_special_tokens
    ids = load_chunks(cfg.path, "test", tokenizer, 32, max_tokens=512)
    keep = ~torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    keep[:, 0] = False
    assert (~keep[:, 1:]).any()  # EOS inside the chunks too
    assert results["excluded/tokens"] == (~keep).sum().item()
    assert results["excluded/share"] == pytest.approx((~keep).float().mean().item())
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        clean = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        for layer in (0, 1):
            h = out.hidden_states[layer + 1]
            x = h[keep]
            recon, _ = sae(x)
            fvu = (recon - x).pow(2).sum() / (x - x.mean()).pow(2).sum()
            assert results[f"train/fvu/layer_{layer}"] == pytest.approx(fvu.item(), rel=1e-4)
            sq_dev = (h - h.mean()).pow(2).sum(-1)
            share = sq_dev[~keep].sum() / sq_dev.sum()
            assert results[f"excluded/variance/layer_{layer}"] == pytest.approx(share.item(), rel=1e-4)
            spliced_h = h.clone()
            spliced_h[keep] = recon
            ce = F.cross_entropy(spliced_logits(model, ids, layer, spliced_h)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            assert results[f"val/loss/delta/layer_{layer}"] == pytest.approx((ce - clean).item(), rel=1e-3, abs=1e-5)
    everything = evaluate(replace(cfg, skip_special_tokens=False, skip_first=0)).results
    assert everything["excluded/tokens"] == 0 and everything["excluded/variance/avg"] == 0
    assert everything["train/fvu/avg"] != pytest.approx(results["train/fvu/avg"])


@pytest.mark.gpu
def test_cuda_evaluation_matches_cpu(tiny):
    """Every metric on CUDA (fp32) as on the CPU, with the default position rule, and in bf16 near it;
    the dead-latent counts agree exactly."""
    cfg = EvalConfig(sae=str(tiny / "sae"), path=str(tiny / "test.jsonl"), split="test", max_length=32,
                     batch_size=4, max_tokens=512, downstream_tokens=512, precision="fp32", device="cpu")
    cpu, gpu = evaluate(cfg), evaluate(replace(cfg, device="cuda"))
    assert gpu.results.keys() == cpu.results.keys()
    for key, value in cpu.results.items():
        assert gpu.results[key] == pytest.approx(value, rel=1e-3, abs=1e-5), key
    assert torch.equal(gpu.dists.counts.cpu(), cpu.dists.counts)
    low = evaluate(replace(cfg, device="cuda", precision="bf16")).results
    assert low["train/fvu/avg"] == pytest.approx(cpu.results["train/fvu/avg"], rel=0.05)


def test_evaluations_sharing_a_pass_equal_each_alone(tiny):
    """evaluate_many: SAEs of other layers, rules, spliced-token budgets and zero ablation in one
    pass (one transformer forward per batch, zeros spliced once per layer) give what each gives alone."""
    torch.manual_seed(1)
    single = MLSAE(SAEConfig(n_inputs=64, n_latents=128, k=4, n_layers=1, layers=[2], model_name=str(tiny / "tiny")))
    single.save_pretrained(tiny / "single")
    base = EvalConfig(sae=str(tiny / "sae"), path=str(tiny / "test.jsonl"), split="test", max_length=32, batch_size=4,
                      max_tokens=512, downstream_tokens=256, precision="fp32", device="cpu")
    cfgs = [base, replace(base, skip_first=0, downstream_tokens=128, zero_ablation=False),
            replace(base, sae=str(tiny / "single")), replace(base, sae=str(tiny / "single"), layers=[0, 2]),
            replace(base, max_tokens=256)]  # other data: a pass of its own
    together = evaluate_many(cfgs)
    for cfg, joint in zip(cfgs, together):
        alone = evaluate(cfg).results
        assert joint.results.keys() == alone.keys()
        for key, value in alone.items():
            assert joint.results[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert "val/loss/recovered/avg" not in together[1].results and "val/loss/recovered/avg" in together[0].results
    # zeros spliced in do not depend on the SAE: two SAEs read at layer 0 share the zero-ablated CE
    assert together[0].results["val/loss/zero/layer_0"] == together[3].results["val/loss/zero/layer_0"]


def test_bos_model_chunks_and_metrics(tmp_path):
    """A tokenizer that adds BOS: every chunk starts with it, and the BOS position is left out of the
    metrics like any special token (with skip_first 0 nothing else is)."""
    model_dir = make_tiny("llama", tmp_path / "bos", n_layers=2, bos=True)
    model, tokenizer = load_transformer(str(model_dir))
    bos = tokenizer.bos_token_id
    assert bos != tokenizer.eos_token_id and tokenizer("x")["input_ids"][0] == bos
    with open(tmp_path / "test.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"text": f"Note {i}: the lamp on the desk was still warm. " * 4}) + "\n")
    ids = load_chunks(str(tmp_path / "test.jsonl"), "test", tokenizer, 32, max_tokens=512)
    assert (ids[:, 0] == bos).all() and not (ids[:, 1:] == bos).any()
    torch.manual_seed(0)
    sae = MLSAE(SAEConfig(n_inputs=64, n_latents=128, k=8, n_layers=2, model_name=str(model_dir), skip_first=0))
    sae.save_pretrained(tmp_path / "sae")
    cfg = EvalConfig(sae=str(tmp_path / "sae"), path=str(tmp_path / "test.jsonl"), max_length=32,
                     batch_size=4, max_tokens=512, downstream_tokens=128, precision="fp32", device="cpu")
    results = evaluate(cfg).results
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    assert results["excluded/tokens"] == special.sum().item() >= len(ids)
    with torch.no_grad():
        h = model(ids, output_hidden_states=True).hidden_states[1]
    x = h[~special]
    recon, _ = sae(x)
    fvu = (recon - x).pow(2).sum() / (x - x.mean()).pow(2).sum()
    assert results["train/fvu/layer_0"] == pytest.approx(fvu.item(), rel=1e-4)
    # the residual geometry measures the first position all the same: here every one is the BOS
    from mlsae.analysis import resid
    from mlsae.transformer import Transformer

    df, _ = resid.resid_stats(Transformer(model, tokenizer), ids, [0, 1], batch_size=4, precision="fp32")
    assert (df["first_special"] == 1.0).all()
    assert df["norm_first"][0] == pytest.approx(h[:, 0].norm(dim=-1).mean().item(), rel=1e-4)


def test_cli_writes_csv_and_json(tiny):
    out = tiny / "out"
    result = subprocess.run(
        [sys.executable, "-m", "mlsae.evaluate", "--repo_id", str(tiny / "sae"), "--path", str(tiny / "test.jsonl"),
         "--max_length", "32", "--max_tokens", "512", "--downstream_tokens", "128", "--out_dir", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    row = pd.read_csv(out / "test_sae.csv")
    assert len(row) == 1 and "val/loss/delta/avg" in row
    assert json.loads((out / "test_sae.json").read_text())["results"]["train/fvu/avg"] == pytest.approx(
        row["train/fvu/avg"][0])
    from mlsae.analysis.dists import Dists

    fired = Dists.load(out / "test_sae.dists.safetensors")
    assert fired.layers == [0, 1] and fired.counts.shape == (2, 256) and fired.counts.sum() > 0
    bad = subprocess.run([sys.executable, "-m", "mlsae.evaluate", "--repo_id", str(tiny / "missing")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "cannot load MLSAE" in bad.stderr
    mismatched = tiny / "mismatched"
    shutil.copytree(tiny / "sae", mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    (mismatched / "config.json").write_text(json.dumps({**config, "n_latents": 512}))
    afile = tiny / "a-file"
    afile.write_text("")
    for argv, message in (([str(mismatched)], "config.json does not match model.safetensors (W_enc is [256, 64] in the "
                                               "weights, [512, 64] by config.json"),
                          ([str(tiny / "sae"), "--out_dir", str(afile)], f"{afile} is a file, not a folder")):
        bad = subprocess.run([sys.executable, "-m", "mlsae.evaluate", "--sae", *argv], capture_output=True, text=True,
                             cwd=ROOT, timeout=120)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr and message in bad.stderr, bad.stderr


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_default_model_trains_and_evaluates(tmp_path):
    """A few hundred steps on SmolLM2-135M + Brown: FVU falls well below its starting value and 1."""
    env = {**os.environ}
    train = subprocess.run(
        [sys.executable, "-m", "mlsae.train", "--out_dir", str(tmp_path / "run"), "--expansion_factor", "4",
         "-k", "32", "--max_length", "128", "--batch_size", "1", "--tokens_per_step", "128",
         "--max_tokens", str(128 * 200), "--log_every", "10", "--checkpoint_every", "100"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=1200)
    assert train.returncode == 0, train.stderr[-2000:]
    folder = tmp_path / "run" / "mlsae-SmolLM2-135M-Instruct-x4-k32"
    log = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    first, last = log[0]["train/fvu/avg"], sum(r["train/fvu/avg"] for r in log[-3:]) / 3
    assert last < 0.6 * first and last < 0.3, (first, last)
    test = subprocess.run(
        [sys.executable, "-m", "mlsae.evaluate", "--repo_id", str(folder), "--max_length", "128",
         "--max_tokens", "4096", "--downstream_tokens", "256", "--out_dir", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=1200)
    assert test.returncode == 0, test.stderr[-2000:]
    row = pd.read_csv(tmp_path / "out" / f"test_{folder.name}.csv").iloc[0]
    assert row["train/fvu/avg"] < 0.4
    assert 0 < row["val/loss/delta/avg"] < row["val/loss/zero/avg"] - row["val/loss/clean"]
    assert row["val/logit/kldiv/avg"] > 0
    assert {f"train/fvu/layer_{i}" for i in range(30)} <= set(row.index)
