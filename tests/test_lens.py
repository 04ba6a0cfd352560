"""The tuned lens: an exact inverse, a fit that lowers the KL to the final logits on held-out
text, safetensors round trip, and the command line."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mlsae.lens import LensConfig, TunedLens, _batches, fit, kl_per_layer, least_squares, translate
from mlsae.positions import PositionRule, read_residuals
from mlsae.tiny import make_tiny
from mlsae.transformer import Transformer, load_transformer
from mlsae.utils import MLSAEError

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the cat dog river mountain sings runs under over blue red green house tree stone bridge".split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lens")
    make_tiny("llama", tmp / "tiny", n_layers=3)
    rng = random.Random(0)
    for split, n in (("train", 200), ("val", 40)):
        with open(tmp / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(60))}) + "\n")
    return tmp


def test_inverse_of_translate_is_the_identity():
    torch.manual_seed(0)
    lens = TunedLens([0, 1, 2], 16)
    with torch.no_grad():
        lens.weight.normal_(std=0.2)
        lens.bias.normal_()
    x = torch.randn(3, 5, 7, 16) * 10
    t = lens.translate(x)
    assert not torch.allclose(t, x)
    torch.testing.assert_close(lens.inverse(t), x, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(TunedLens([0, 1, 2], 16).translate(x), x)  # identity at the start
    torch.testing.assert_close(TunedLens([0, 1, 2], 16).condition_numbers(), torch.ones(3, dtype=torch.float64))
    scaled = TunedLens([0], 4)
    with torch.no_grad():
        scaled.weight[0] = torch.diag(torch.tensor([1.0, 3.0, 0.5, 2.0]) - 1)  # I + A: singular values 1, 3, 0.5, 2
    assert scaled.condition_numbers().item() == pytest.approx(6.0)


@pytest.mark.parametrize("recipe", [
    {"start": "identity", "optimizer": "sgd", "lr": 1.0},  # the tuned-lens paper's
    {"start": "lstsq", "fine_tune": False},
    {"start": "lstsq", "optimizer": "adam", "lr": 1e-3},
])
def test_fitted_lens_lowers_the_kl_on_held_out_text(tiny, tmp_path, recipe):
    model, tokenizer = load_transformer(str(tiny / "tiny"))
    transformer = Transformer(model, tokenizer)
    cfg = LensConfig(model_name=str(tiny / "tiny"), path=str(tiny), max_length=32, batch_size=4, max_tokens=4096,
                     tokens_per_step=256, lstsq_tokens=4096, precision="fp32", device="cpu", out_dir=str(tmp_path),
                     **recipe)
    torch.manual_seed(0)
    lens = fit(cfg, transformer)
    held_out = _batches(cfg, transformer, "val", 1024)
    rule = PositionRule()
    identity = kl_per_layer(transformer, lens, held_out, rule, "fp32", identity=True)
    tuned = kl_per_layer(transformer, lens, held_out, rule, "fp32")
    assert identity[-1] < 1e-5 and tuned[-1] < 1e-5  # the last layer's readout is the model's own
    assert (tuned[:-1] < 0.8 * identity[:-1]).all(), (identity, tuned)
    with torch.no_grad():  # the first layer's KL, computed here from log-softmaxes
        r = [read_residuals(transformer, ids, [0], rule, logits=True) for ids in held_out]
        log_p = torch.cat([x.logits[x.keep] for x in r]).log_softmax(-1)
        log_q = transformer.lm_head(transformer.final_norm(lens.translate(torch.cat([x.kept for x in r], 1), slice(0, 1))[0]))
        kl = (log_p.exp() * (log_p - log_q.log_softmax(-1))).sum(-1).mean()
    assert tuned[0].item() == pytest.approx(kl.item(), rel=1e-4)
    lens.save(tmp_path)
    back = TunedLens.load(tmp_path)
    assert back.layers == [0, 1, 2] and back.model_name == cfg.model_name
    torch.testing.assert_close(back.weight, lens.weight.detach())


@pytest.mark.gpu
def test_lens_fit_on_cuda_matches_cpu(tiny, tmp_path):
    """The least-squares lens fitted on CUDA: the translators and held-out KLs of the CPU fit."""
    cfg = LensConfig(model_name=str(tiny / "tiny"), path=str(tiny), max_length=32, batch_size=4, max_tokens=4096,
                     lstsq_tokens=4096, start="lstsq", fine_tune=False, precision="fp32", device="cpu",
                     out_dir=str(tmp_path))
    fits = {}
    for device in ("cpu", "cuda"):
        model, tokenizer = load_transformer(str(tiny / "tiny"), device=device)
        transformer = Transformer(model, tokenizer)
        lens = fit(cfg, transformer)
        kl = kl_per_layer(transformer, lens, _batches(cfg, transformer, "val", 1024), PositionRule(), "fp32")
        fits[device] = lens.weight.detach().cpu(), kl.cpu()
    torch.testing.assert_close(fits["cuda"][0], fits["cpu"][0], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(fits["cuda"][1], fits["cpu"][1], rtol=1e-3, atol=1e-5)
    sgd = replace(cfg, start="identity", fine_tune=True, optimizer="sgd", lr=1.0, tokens_per_step=256)
    lens, held_out = fit(sgd, transformer), _batches(cfg, transformer, "val", 1024)  # the tuned-lens paper's, on CUDA
    identity = kl_per_layer(transformer, lens, held_out, PositionRule(), "fp32", identity=True)
    assert (kl_per_layer(transformer, lens, held_out, PositionRule(), "fp32")[:-1] < 0.8 * identity[:-1]).all()


def test_least_squares_start_is_the_least_squares_fit(tiny):
    """The residual of the fit to the last layer is orthogonal to every input direction (and the constant)."""
    model, tokenizer = load_transformer(str(tiny / "tiny"))
    transformer = Transformer(model, tokenizer)
    cfg = LensConfig(model_name=str(tiny / "tiny"), path=str(tiny), max_length=32, batch_size=4, precision="fp32")
    batches, rule = _batches(cfg, transformer, "train", 2048), PositionRule()
    weight, bias = least_squares(transformer, batches, [0, 1, 2], rule, "fp32", ridge=0.0)
    assert weight[2].abs().max() == 0 and bias[2].abs().max() == 0  # the last layer's own: the identity
    h = torch.cat([read_residuals(transformer, ids, [0, 1, 2], rule).kept for ids in batches], 1).double()
    error = translate(h, weight.double(), bias.double()) - h[2]
    x = torch.cat([h, torch.ones_like(h[..., :1])], -1)
    cos = (x.transpose(1, 2) @ error)[:2] / (x.norm(dim=1)[:2, :, None] * error.norm(dim=1)[:2, None, :])
    assert cos.abs().max() < 1e-3  # each input column orthogonal to each error column: the optimum
    assert (error[:2].square().mean((1, 2)) < 0.9 * (h[:2] - h[2]).square().mean((1, 2))).all()  # beats the identity
    # bounded: every translator's condition number at most the bound, the translated mean still the target's
    weight, bias = least_squares(transformer, batches, [0, 1, 2], rule, "fp32", ridge=0.0, max_condition=1.5)
    lens = TunedLens([0, 1, 2], h.shape[-1])
    with torch.no_grad():
        lens.weight.copy_(weight)
        lens.bias.copy_(bias)
    assert (lens.condition_numbers() <= 1.5 + 1e-4).all()
    torch.testing.assert_close(translate(h, weight.double(), bias.double()).mean(1)[:2], h[2].mean(0).expand(2, -1),
                               rtol=1e-4, atol=1e-4)
    # floored: every singular value at least the floor, the ones above it and the translated mean as they were
    floor = 0.5
    free, _ = least_squares(transformer, batches, [0, 1, 2], rule, "fp32", ridge=0.0)
    weight, bias = least_squares(transformer, batches, [0, 1, 2], rule, "fp32", ridge=0.0, min_singular=floor)
    with torch.no_grad():
        lens.weight.copy_(weight)
        lens.bias.copy_(bias)
    assert (lens.smallest_singular_values() >= floor - 1e-5).all()
    eye = torch.eye(h.shape[-1], dtype=torch.float64)
    before, after = (torch.linalg.svdvals(eye + w.double()) for w in (free, weight))
    assert (before[:2] < floor).any()  # the floor binds
    torch.testing.assert_close(after, before.clamp(min=floor), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(translate(h, weight.double(), bias.double()).mean(1)[:2], h[2].mean(0).expand(2, -1),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(MLSAEError, match="--min_singular must be positive"):
        LensConfig(min_singular=0)


def test_cli_writes_lens_and_report(tiny, tmp_path):
    out = tmp_path / "lens"
    result = subprocess.run(
        [sys.executable, "-m", "mlsae.lens", "--model_name", str(tiny / "tiny"), "--path", str(tiny),
         "--max_length", "32", "--batch_size", "4", "--max_tokens", "1024", "--tokens_per_step", "256",
         "--eval_tokens", "256", "--precision", "fp32", "--out_dir", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "lens.json").read_text())
    assert len(report["kl_identity"]) == len(report["kl_tuned"]) == 3
    assert (out / "lens.safetensors").is_file()
    bad = subprocess.run([sys.executable, "-m", "mlsae.lens", "--model_name", str(tiny / "tiny"), "--layers", "9"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "the model has layers 0..2" in bad.stderr


def test_corrupt_lens_file_is_a_clear_error(tmp_path):
    (tmp_path / "lens.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MLSAEError, match="cannot read the tuned lens"):
        TunedLens.load(tmp_path)
    with pytest.raises(MLSAEError, match="no tuned lens"):
        TunedLens.load(tmp_path / "missing")
