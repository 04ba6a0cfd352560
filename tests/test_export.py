"""Export to SAELens, checked against sae-lens itself (installed by make test): every layer's SAE
loads with SAE.load_from_disk and encodes and decodes real residuals as the MLSAE does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlsae.export import export_saelens
from mlsae.lens import TunedLens
from mlsae.model import MLSAE, SAEConfig
from mlsae.utils import MLSAEError

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The cat sat on the mat, and the dog watched it from the door.",
           "Residual streams carry every layer's features forward to the next."]


def _sae(transformer, **kw) -> MLSAE:
    torch.manual_seed(0)
    sae = MLSAE(SAEConfig(n_inputs=transformer.d_model, n_latents=256, k=8, n_layers=transformer.n_layers,
                          model_name=transformer.name, **kw))
    with torch.no_grad():
        sae.b_pre.normal_(0, 0.1)
    return sae.eval()


def test_saelens_round_trip_on_real_residuals(tiny_llama, tmp_path):
    from sae_lens import SAE

    sae = _sae(tiny_llama)
    folder = tmp_path / "sae"
    sae.save_pretrained(folder)
    out = tmp_path / "saelens"
    folders = export_saelens(sae, out, source=str(folder))
    assert [f.name for f in folders] == [f"layer_{layer}" for layer in range(tiny_llama.n_layers)]
    ids = torch.stack([torch.tensor(tiny_llama.tokenizer(p)["input_ids"][:12]) for p in PROMPTS])
    with torch.no_grad():
        resid = tiny_llama.residuals(ids).float()  # [L, B, P, d]
        recon, topk = sae(resid)
    worst = 0.0
    for layer, path in enumerate(folders):
        exported = SAE.load_from_disk(str(path), device="cpu")
        assert exported.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_post"
        assert exported.cfg.metadata.mlsae["position_rule"]["skip_first"] == sae.config.skip_first
        x = resid[layer].reshape(-1, resid.shape[-1])
        with torch.no_grad():
            acts = exported.encode(x)
            theirs = exported.decode(acts)
        ours = torch.zeros(x.shape[0], sae.config.n_latents).scatter(
            -1, topk.indices[layer].reshape(x.shape[0], -1), topk.values[layer].reshape(x.shape[0], -1))
        assert torch.equal(acts > 0, ours > 0)  # the same latents
        torch.testing.assert_close(acts, ours, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs, recon[layer].reshape_as(theirs), rtol=1e-4, atol=1e-4)
        worst = max(worst, float((theirs - recon[layer].reshape_as(theirs)).abs().max()))
    print(f"SAELens round trip: largest reconstruction difference {worst:.2e}")


def test_what_saelens_cannot_express_is_refused(tiny_llama, tmp_path):
    sae = _sae(tiny_llama, tuned_lens=True)
    sae.set_lens(TunedLens(list(range(tiny_llama.n_layers)), tiny_llama.d_model))
    with pytest.raises(MLSAEError, match="tuned lens"):
        export_saelens(sae, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cli_and_its_bad_inputs(tiny_llama, tmp_path):
    _sae(tiny_llama).save_pretrained(tmp_path / "sae")
    run = lambda *a: subprocess.run([sys.executable, "-m", "mlsae.export", "--sae", str(tmp_path / "sae"), *a],  # noqa: E731
                                    capture_output=True, text=True, cwd=ROOT, timeout=300)
    ok = run("--out", str(tmp_path / "out"))
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "out" / "layer_0" / "cfg.json").read_text())["architecture"] == "topk"
    (tmp_path / "a-file").write_text("")
    for args, message in ((["--out", str(tmp_path / "out")], "is not empty"),
                          (["--out", str(tmp_path / "a-file")], "is a file, not a folder"),
                          ([], "--out is required"),
                          (["--out", str(tmp_path / "o2"), "--to", "neuronpedia"], "invalid choice")):
        bad = run(*args)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr and message in bad.stderr, bad.stderr
