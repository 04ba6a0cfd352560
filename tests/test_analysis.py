"""mlsae.analysis: each analysis against a brute-force computation on small random inputs, and the CLIs."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mlsae.analysis import cards, decoder, dists, examples, prompt, resid, tables, variances
from mlsae.analysis.common import DataOptions
from mlsae.analysis.run import RunOptions, run
from mlsae.analysis.stream import Batch, Pass, stream
from mlsae.data import load_chunks
from mlsae.kernels import TopK, dense_latents
from mlsae.model import MLSAE, SAEConfig
from mlsae.transformer import Transformer, load_transformer
from mlsae.utils import run_cli

ROOT = Path(__file__).resolve().parents[1]
L, F, K = 3, 24, 4


def random_topk(B: int, P: int, seed: int, n_layers: int = L, n_latents: int = F, k: int = K) -> TopK:
    """Distinct latents per vector; values continuous (no ties), about a third exactly 0 and a few tiny."""
    g = torch.Generator().manual_seed(seed)
    indices = torch.rand(n_layers, B, P, n_latents, generator=g).argsort(-1)[..., :k]
    values = torch.rand(n_layers, B, P, k, generator=g) * 3
    values = values * (torch.rand(values.shape, generator=g) > 0.33)
    values = torch.where(torch.rand(values.shape, generator=g) < 0.05, values * 1e-4, values)
    return TopK(values, indices)


def random_batches(n_batches=4, B=2, P=6, seed=0):
    """Batches as the shared pass makes them (special positions zeroed), and the dense activations [L, n, P, F]."""
    out, dense = [], []
    for i in range(n_batches):
        topk = random_topk(B, P, seed + i)
        keep = torch.ones(B, P, dtype=torch.bool)
        keep[0, 0] = False  # a special token
        values = topk.values * keep[..., None]
        ids = torch.randint(0, 50, (B, P), generator=torch.Generator().manual_seed(100 + i))
        out.append(Batch(ids, keep, TopK(values, topk.indices), i * B))
        dense.append(dense_latents(TopK(values, topk.indices), F))
    return out, torch.cat(dense, 1)


# ----------------------------------------------------------------------------------------------
# dists


def test_dists_match_dense_loops():
    batches, A = random_batches()
    acc = dists.DistsAccumulator(L, F, 1e-3)
    for b in batches:
        acc.update(b)
    d = acc.result(list(range(L)), tokens=123)
    counts, totals = np.zeros((L, F)), np.zeros((L, F))
    a = A.numpy()
    for l in range(L):
        for f in range(F):
            counts[l, f] = (a[l, ..., f] > 1e-3).sum()
            totals[l, f] = a[l, ..., f].sum()
    np.testing.assert_allclose(d.counts.numpy(), counts)
    np.testing.assert_allclose(d.totals.numpy(), totals, rtol=1e-6)
    for f in range(F):
        if totals[:, f].sum() == 0:
            assert np.isnan(d.probs[:, f]).all()
            continue
        p = totals[:, f] / totals[:, f].sum()
        mean = sum(l * p[l] for l in range(L))
        var = sum((l - mean) ** 2 * p[l] for l in range(L))
        np.testing.assert_allclose(d.probs[:, f].numpy(), p, rtol=1e-5)
        assert d.layer_mean[f].item() == pytest.approx(mean, rel=1e-5, abs=1e-6)
        assert d.layer_std[f].item() == pytest.approx(var**0.5, rel=1e-4, abs=1e-4)
    fired = counts.sum(0) > 0
    std = d.layer_std.numpy()[fired].astype(np.float64)
    s = d.summary()
    assert s["n_fired"] == fired.sum() and s["tokens"] == 123
    assert s["layer_std"]["mean"] == pytest.approx(std.mean(), rel=1e-5)
    assert s["layer_std"]["var"] == pytest.approx(std.var(), rel=1e-4)
    assert s["layer_std"]["sem"] == pytest.approx(std.std() / np.sqrt(len(std)), rel=1e-4)
    assert s["layer_std_rel"]["mean"] == pytest.approx(std.mean() / L, rel=1e-5)


def test_dists_save_load_round_trip(tmp_path):
    batches, _ = random_batches(2)
    acc = dists.DistsAccumulator(L, F, 1e-3)
    for b in batches:
        acc.update(b)
    d = acc.result([4, 5, 6], tokens=9)
    d.save(tmp_path, {"x": 1})
    back = dists.Dists.load(tmp_path)
    assert back.layers == [4, 5, 6] and back.tokens == 9
    torch.testing.assert_close(back.counts, d.counts)
    assert set(pd.read_csv(tmp_path / "dists.csv").columns) >= {"latent", "layer_mean", "layer_std", "fired"}
    summary = json.loads((tmp_path / "dists.json").read_text())
    assert summary["n_fired"] == d.summary()["n_fired"]
    assert summary["x"] == 1 and summary["layers"] == [4, 5, 6] and summary["tokens"] == 9  # the caller's meta, typed



def test_layers_active_and_multi_layer_summary():
    counts = torch.tensor([[0, 5, 1, 0], [0, 5, 0, 0], [0, 20, 0, 3]], dtype=torch.float32)  # [L=3, F=4]
    d = dists.Dists(counts, counts.clone(), [0, 1, 2])
    assert d.layers_active(1).tolist() == [0, 3, 1, 1]
    assert d.layers_active(5).tolist() == [0, 3, 0, 0]
    table = d.multi_layer([1, 5, 50])
    assert table.loc[1, "latents"] == 3 and table.loc[1, "mean layers"] == pytest.approx(5 / 3)
    assert table.loc[1, "mean layers / layers"] == pytest.approx(5 / 9)
    assert table.loc[1, "share at several layers"] == pytest.approx(1 / 3)
    assert table.loc[5, "latents"] == 1 and table.loc[5, "mean layers"] == 3
    assert table.loc[50, "latents"] == 0 and np.isnan(table.loc[50, "mean layers"])

# ----------------------------------------------------------------------------------------------
# variances


def brute_variances(A: torch.Tensor) -> dict:
    """Dense loops over (token, latent) of activations ``A [L, T, F]``."""
    a = A.double().numpy()
    n_layers, T, n_latents = a.shape
    ell = np.arange(n_layers)
    var_tf, per_latent_p, per_latent_v = [], {}, {}
    for t in range(T):
        for f in range(n_latents):
            mass = a[:, t, f].sum()
            if mass <= 0:
                continue
            p = a[:, t, f] / mass
            v = (ell**2 * p).sum() - (ell * p).sum() ** 2
            var_tf.append(v)
            per_latent_p.setdefault(f, []).append(p)
            per_latent_v.setdefault(f, []).append(v)
    var_f = {}
    for f, ps in per_latent_p.items():
        p = np.mean(ps, 0)
        var_f[f] = (ell**2 * p).sum() - (ell * p).sum() ** 2
    exp_tf, exp_f = np.mean(var_tf), np.mean(list(var_f.values()))
    by_latent = np.mean([np.mean(v) for v in per_latent_v.values()])
    return {"exp_var_l_tf": exp_tf, "exp_var_l_f": exp_f, "rel_var": exp_tf / exp_f,
            "exp_var_l_tf_by_latent": by_latent, "n_pairs": len(var_tf), "var_f": var_f}


def reference_batch(A: torch.Tensor) -> tuple[float, float]:
    """The reference implementation's per-batch formulas, on dense ``A [L, T, F]``."""
    A = A.double()
    probs = (A / A.sum(0)).nan_to_num(0.0)
    ell = torch.arange(A.shape[0], dtype=torch.float64).view(-1, 1, 1)
    var = lambda x, e: (e**2 * x).sum(0) - ((e * x).sum(0)) ** 2  # noqa: E731
    return var(probs, ell).mean().item(), var(probs.mean(1), ell[:, :, 0]).mean().item()


def test_variances_match_dense_loops():
    batches, A = random_batches(n_batches=3)
    acc = variances.VariancesAccumulator(L, F)
    for b in batches:
        acc.update(b)
    result = acc.result()
    s = result.summary
    kept = torch.cat([b.keep.reshape(-1) for b in batches])
    expected = brute_variances(A.reshape(L, -1, F)[:, kept])
    for key in ("exp_var_l_tf", "exp_var_l_f", "rel_var", "exp_var_l_tf_by_latent"):
        assert s[key] == pytest.approx(expected[key], rel=1e-9), key
    assert s["n_pairs"] == expected["n_pairs"]
    var_f = result.per_latent.set_index("latent")["var_f"]
    for f, v in expected["var_f"].items():
        assert var_f[f] == pytest.approx(v, rel=1e-9, abs=1e-12)
    ref = [reference_batch(dense_latents(TopK(b.topk.values[:, b.keep], b.topk.indices[:, b.keep]), F))
           for b in batches]
    assert s["reference"]["exp_var_l_tf"] == pytest.approx(np.mean([r[0] for r in ref]), rel=1e-9)
    assert s["reference"]["exp_var_l_f"] == pytest.approx(np.mean([r[1] for r in ref]), rel=1e-9)
    assert s["reference"]["rel_var_t"] == pytest.approx(np.mean([r[0] / r[1] for r in ref]), rel=1e-9)


def test_variance_ratio_known_case():
    """Latent 0: token 1 split evenly over layers 0 and 1 (variance 1/4), token 2 at layer 2 only (0).
    Token-averaged distribution (1/4, 1/4, 1/2): variance 11/16. Ratio (1/8) / (11/16) = 2/11."""
    values = torch.zeros(3, 1, 2, 1)
    indices = torch.zeros(3, 1, 2, 1, dtype=torch.long)
    values[0, 0, 0, 0] = values[1, 0, 0, 0] = 2.0
    values[2, 0, 1, 0] = 5.0
    acc = variances.VariancesAccumulator(3, 4)
    acc.update(Batch(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool), TopK(values, indices), 0))
    s = acc.result().summary
    assert s["exp_var_l_tf"] == pytest.approx(1 / 8)
    assert s["exp_var_l_f"] == pytest.approx(11 / 16)
    assert s["rel_var"] == pytest.approx(2 / 11)
    assert s["n_pairs"] == 2 and s["n_latents_active"] == 1
    # One layer per token, always the same layer: no spread at all.
    values = torch.zeros(3, 1, 2, 1)
    values[1] = 1.0
    acc = variances.VariancesAccumulator(3, 4)
    acc.update(Batch(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool), TopK(values, indices), 0))
    assert acc.result().summary["exp_var_l_f"] == 0 and np.isnan(acc.result().summary["rel_var"])


# ----------------------------------------------------------------------------------------------
# examples


def brute_examples(A: torch.Tensor, n: int, threshold: float) -> dict:
    """Per (layer, latent): the n largest activations above threshold with their global token ids (global sort)."""
    n_layers, n_chunks, P, n_latents = A.shape
    flat = A.reshape(n_layers, -1, n_latents)
    out = {}
    for l in range(n_layers):
        for f in range(n_latents):
            v = flat[l, :, f]
            idx = (v > threshold).nonzero().squeeze(1)
            order = v[idx].argsort(descending=True)[:n]
            out[l, f] = (v[idx][order], idx[order])
    return out


@pytest.mark.parametrize("B,P,n", [(2, 6, 3), (1, 5, 40), (3, 4, 1)])
def test_streaming_topk_equals_global_sort(B, P, n):
    batches, A = random_batches(n_batches=5, B=B, P=P)
    acc = examples.TopExamples(L, F, n_examples=n, n_tokens=2, threshold=1e-3)
    for b in batches:
        acc.update(b)
    want = brute_examples(A, n, 1e-3)
    vals, toks = acc.values.view(L, F, n), acc.tokens.view(L, F, n)
    wins = acc.windows[acc.slots].view(L, F, n, 4)
    for (l, f), (v, t) in want.items():
        m = len(v)
        torch.testing.assert_close(vals[l, f, :m], v)
        assert torch.equal(toks[l, f, :m], t)
        assert (vals[l, f, m:] == float("-inf")).all()
        for r in range(m):
            c, p = divmod(int(t[r]), P)
            expected = [A[l, c, q, f].item() if 0 <= q < P else 0.0 for q in range(p - 2, p + 2)]
            torch.testing.assert_close(wins[l, f, r], torch.tensor(expected))


def test_examples_table_and_loader(tmp_path, tiny_llama):
    batches, A = random_batches(n_batches=3, B=2, P=6)
    ids = torch.cat([b.ids for b in batches])
    acc = examples.TopExamples(L, F, n_examples=3, n_tokens=2, threshold=1e-3)
    for b in batches:
        acc.update(b)
    layers = [5, 7, 9]
    acc.save(tmp_path, ids, layers, {"model_name": "unused"})
    table = pd.read_parquet(tmp_path / "examples.parquet")
    assert list(table.columns[:7]) == ["latent", "layer", "rank", "activation", "token_ids", "acts", "center"]
    assert str(table["latent"].dtype) == "int32" and str(table["layer"].dtype) == "int16"
    assert str(table["center"].dtype) == "int8" and str(table["activation"].dtype) == "float32"
    keys = list(zip(table["latent"], table["layer"], table["rank"]))
    assert keys == sorted(keys)
    want = brute_examples(A, 3, 1e-3)
    assert len(table) == sum(len(v) for v, _ in want.values())
    store = examples.load_examples(tmp_path, tokenizer=tiny_llama.tokenizer)
    for (l, f), (v, t) in want.items():
        df = store.top(f, layers[l], n=10, tokens=True)
        assert len(df) == len(v)
        for r, row in enumerate(df.itertuples()):
            c, p = divmod(int(t[r]), 6)
            lo, hi = max(p - 2, 0), min(p + 2, 6)
            assert row.activation == pytest.approx(v[r].item())
            assert row.center == p - lo and row.acts[row.center] == pytest.approx(row.activation)
            assert list(row.token_ids) == ids[c, lo:hi].tolist()
            np.testing.assert_allclose(row.acts, A[l, c, lo:hi, f].numpy(), rtol=1e-6)
            assert row.tokens == [tiny_llama.tokenizer.decode([i]) for i in row.token_ids]
    assert len(store.top(0, layers[0], n=1)) <= 1
    assert store.top(F + 5, 5).empty and store.top(0, 99).empty
    assert set(store.latents().columns) == {"latent", "layer", "n", "max_activation"}


# ----------------------------------------------------------------------------------------------
# decoder geometry


def test_chunked_mmcs_equals_full():
    torch.manual_seed(0)
    W = torch.randn(37, 8)
    Wu = W / W.norm(dim=-1, keepdim=True)
    full = Wu @ Wu.T
    full.fill_diagonal_(float("-inf"))
    best, partner = full.max(1)
    for chunk in (1, 5, 36, 37, 1000):
        values, partners = decoder.max_cos_others(W, chunk)
        torch.testing.assert_close(values, best)
        assert torch.equal(partners, partner)
        assert decoder.mmcs(W, chunk) == pytest.approx(best.mean().item())


def test_pair_stats_align_pairs():
    torch.manual_seed(1)
    W = torch.randn(13, 6)
    m = torch.rand(13) * 4
    stats = decoder.pair_stats(W, m, n_layers=5, cos_bins=8, chunk=4)
    Wu = W / W.norm(dim=-1, keepdim=True)
    hist = np.zeros((4, 8), dtype=int)
    xs, ys = [], []
    for f in range(13):
        for g in range(f + 1, 13):
            x, y = float(Wu[f] @ Wu[g]), abs(float(m[f] - m[g]))
            xs.append(x)
            ys.append(y)
            hist[min(int(y), 3), min(int((x + 1) / 0.25), 7)] += 1
    assert stats.n_pairs == len(xs) == 78
    np.testing.assert_array_equal(stats.hist.numpy(), hist)
    assert stats.corr == pytest.approx(np.corrcoef(xs, ys)[0, 1], abs=1e-6)
    frame = stats.frame()
    for d in range(4):
        sel = [x for x, y in zip(xs, ys) if min(int(y), 3) == d]
        assert frame["pairs"][d] == len(sel)
        if sel:
            assert frame["cos_mean"][d] == pytest.approx(np.mean(sel), rel=1e-6)
    assert stats.hist_frame()["pairs"].sum() == 78
    sample = decoder.sample_pairs(W, m, 200, seed=3)
    assert (sample["a"] != sample["b"]).all()
    for row in sample.itertuples():
        assert row.cos == pytest.approx(float(Wu[row.a] @ Wu[row.b]), abs=1e-6)
        assert row.delta == pytest.approx(abs(float(m[row.a] - m[row.b])), abs=1e-6)


def test_top_cos_with_embeddings():
    torch.manual_seed(2)
    W, E = torch.randn(9, 5), torch.randn(30, 5)
    values, tokens = decoder.top_cos_with(W, E, chunk=4)
    cos = torch.nn.functional.cosine_similarity(W[:, None], E[None], dim=-1)
    torch.testing.assert_close(values, cos.max(1).values)
    assert torch.equal(tokens, cos.argmax(1))


# ----------------------------------------------------------------------------------------------
# prompt heatmaps


def test_prompt_heatmap_brute_force():
    topk = random_topk(1, 7, seed=5)
    values, indices = topk.values[:, 0], topk.indices[:, 0]
    latents, totals, probs, centre = prompt.heatmap_from_topk(values, indices, F, 1e-3)
    A = dense_latents(TopK(values, indices), F)  # [L, P, F]
    fired = [f for f in range(F) if (A[..., f] > 1e-3).any()]
    assert sorted(latents.tolist()) == fired
    for j, f in enumerate(latents.tolist()):
        t = A[:, :, f].sum(1).double()
        torch.testing.assert_close(totals[:, j], t.float())
        torch.testing.assert_close(probs[:, j], (t / t.sum()).float())
        assert centre[j].item() == pytest.approx(float((torch.arange(L) * t / t.sum()).sum()), abs=1e-5)
    assert (centre[1:] >= centre[:-1]).all()


# ----------------------------------------------------------------------------------------------
# On the tiny model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_model_dir):
    """A tiny model, a random MLSAE over all its 3 layers, a small JSON-lines corpus, a private cache."""
    tmp = tmp_path_factory.mktemp("analysis")
    model_dir = tiny_model_dir("llama")
    with open(tmp / "test.jsonl", "w") as f:
        for i in range(30):
            text = f"Story {i}: the cat sat on the mat and the dog ran to the river. " * 3
            f.write(json.dumps({"text": text}) + "\n")
    torch.manual_seed(0)
    sae = MLSAE(SAEConfig(n_inputs=64, n_latents=96, k=6, n_layers=3, model_name=str(model_dir)))
    sae.save_pretrained(tmp / "mlsae-tiny-x1-k6")
    return tmp


@pytest.fixture
def cache(tiny, monkeypatch):
    monkeypatch.setenv("MLSAE_CACHE", str(tiny / "cache"))


def test_shared_pass_feeds_accumulators_exactly(tiny, cache):
    """The pass zeroes special tokens, names tokens globally, and the accumulators agree with brute force."""
    sae = MLSAE.from_pretrained(tiny / "mlsae-tiny-x1-k6")
    transformer = Transformer(*load_transformer(sae.config.model_name))
    chunks = load_chunks(str(tiny / "test.jsonl"), "test", transformer.tokenizer, 16, max_tokens=160)
    p = Pass(sae, transformer, [0, 1, 2], chunks)

    class Recorder:
        def __init__(self):
            self.batches = []

        def update(self, batch):
            self.batches.append(batch)

    rec = Recorder()
    acc_d = dists.DistsAccumulator(3, 96, sae.config.dead_threshold)
    acc_e = examples.TopExamples(3, 96, n_examples=4, n_tokens=2)
    info = stream(p, [rec, acc_d, acc_e], DataOptions(batch_size=3, precision="fp32"))
    assert info["positions"] == chunks.numel() and 0 < info["tokens"] < chunks.numel()  # EOS left out
    A = torch.cat([dense_latents(b.topk, 96) for b in rec.batches], 1)  # [L, n, P, F]
    special = ~sae.config.positions.keep(transformer.special_mask(chunks))  # special tokens and position 0
    assert special[:, 0].all() and (A[:, special] == 0).all()
    with torch.no_grad():
        x = transformer.residuals(chunks[:2], [0, 1, 2])
        _, topk = sae(x)
    torch.testing.assert_close(A[:, :2], dense_latents(topk, 96) * ~special[:2, :, None], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(acc_d.counts.float(), (A > 1e-3).sum((1, 2)).float())
    want = brute_examples(A, 4, 1e-3)
    for (l, f), (v, t) in want.items():
        torch.testing.assert_close(acc_e.values.view(3, 96, 4)[l, f, : len(v)], v)


def test_run_cli_writes_every_output(tiny):
    out = tiny / "out"
    env = {**__import__("os").environ, "MLSAE_CACHE": str(tiny / "cache")}
    result = subprocess.run(
        [sys.executable, "-m", "mlsae.analysis.run", "--repo_id", str(tiny / "mlsae-tiny-x1-k6"),
         "--path", str(tiny / "test.jsonl"), "--max_length", "16", "--max_tokens", "256", "--n_examples", "4",
         "--out_dir", str(out)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    for name in ("dists.safetensors", "dists.csv", "dists.json", "variances.json", "variances.csv",
                 "examples.parquet", "histograms.safetensors", "run.json"):
        assert (out / name).is_file(), name
    info = json.loads((out / "run.json").read_text())
    assert info["pass"]["tokens"] > 0 and info["config"]["n_examples"] == 4
    d = dists.Dists.load(out)
    assert d.counts.shape == (3, 96) and d.layers == [0, 1, 2]
    store = examples.load_examples(out)
    latent, layer = map(int, store.latents().iloc[0][["latent", "layer"]])
    top = store.top(latent, layer, tokens=True)
    assert 1 <= len(top) <= 4 and (top["activation"].diff().dropna() <= 0).all()
    assert all(isinstance(t, str) for t in top["tokens"][0])
    assert (np.asarray(d.counts[:, latent].sum()) >= len(top))
    bad = subprocess.run([sys.executable, "-m", "mlsae.analysis.run", "--repo_id", str(tiny / "missing")],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith("error:") and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("module,args,message", [
    (examples, ["--n_tokens", "0"], "error: --n_tokens must be between 1 and 127, got 0"),
    (dists, ["--max_tokens", "0"], "error: --max_tokens must be positive, got 0"),
    (decoder, ["--chunk", "0"], "error: --chunk and --cos_bins must be positive"),
])
def test_bad_options_are_one_line_errors(tiny, capsys, module, args, message):
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: module.main(["--repo_id", str(tiny / "mlsae-tiny-x1-k6"), *args]))
    assert exit_.value.code == 2 and capsys.readouterr().err.strip() == message


def test_resid_matches_brute_force(tiny, cache, tiny_llama):
    chunks = load_chunks(str(tiny / "test.jsonl"), "test", tiny_llama.tokenizer, 16, max_tokens=96)
    df, tokens = resid.resid_stats(tiny_llama, chunks, [0, 1, 2], batch_size=4, precision="fp32")
    special = tiny_llama.special_mask(chunks)
    kept = ~special
    kept[:, 0] = False  # the default position rule: special tokens and the first position left out
    with torch.no_grad():
        acts = tiny_llama.residuals(chunks, [0, 1, 2]).double()
    x = acts[:, kept]
    assert tokens == x.shape[1]
    # Why the first position is left out: its norms (special or not) and share of the variance, with the
    # other non-special positions.
    first = torch.zeros_like(special)
    first[:, 0] = True
    counted = first | ~special
    rest = acts[:, counted]
    sq_dev = (rest - rest.mean((1, 2), keepdim=True)).pow(2).sum(-1)  # [L, N]
    share = sq_dev[:, first[counted]].sum(1) / sq_dev.sum(1)
    for l in range(3):
        assert df["norm_first"][l] == pytest.approx(acts[l][first].norm(dim=-1).mean().item(), rel=1e-5)
        assert df["norm_rest"][l] == pytest.approx(acts[l][~first & ~special].norm(dim=-1).mean().item(), rel=1e-5)
        assert df["first_variance_share"][l] == pytest.approx(share[l].item(), rel=1e-5)
        assert df["first_special"][l] == pytest.approx(special[:, 0].float().mean().item())
    norms = x.norm(dim=-1)
    c = x - x.mean(1, keepdim=True)
    for l in range(3):
        assert df["norm_mean"][l] == pytest.approx(norms[l].mean().item(), rel=1e-5)
        assert df["norm_q50"][l] == pytest.approx(norms[l].quantile(0.5).item(), rel=1e-5)
        assert df["mean_norm"][l] == pytest.approx(x[l].mean(0).norm().item(), rel=1e-5)
    for l in range(2):
        cos = torch.nn.functional.cosine_similarity(c[l], c[l + 1], dim=-1)
        raw = torch.nn.functional.cosine_similarity(x[l], x[l + 1], dim=-1)
        assert df["cos_next"][l] == pytest.approx(cos.mean().item(), rel=1e-5)
        assert df["cos_next_std"][l] == pytest.approx(cos.std(unbiased=False).item(), rel=1e-4, abs=1e-6)
        assert df["cos_next_raw"][l] == pytest.approx(raw.mean().item(), rel=1e-5)
    assert np.isnan(df["cos_next"][2])


def test_resid_decoder_prompt_clis(tiny, cache, capsys):
    out = tiny / "cli"
    sae_dir = str(tiny / "mlsae-tiny-x1-k6")
    data = ["--path", str(tiny / "test.jsonl"), "--max_length", "16", "--max_tokens", "64"]
    resid.main(["--model_name", json.loads((tiny / "mlsae-tiny-x1-k6" / "config.json").read_text())["model_name"],
                *data, "--out_dir", str(out)])
    assert len(pd.read_csv(out / "resid.csv")) == 3
    opts = RunOptions(sae=sae_dir, data=DataOptions(path=str(tiny / "test.jsonl"), max_length=16, max_tokens=64),
                      out_dir=str(out), analyses=["dists"])
    run(opts)
    saved = json.loads((out / "run.json").read_text())
    assert saved["config"] == json.loads(json.dumps(asdict(opts)))  # options only: callers compare them
    assert saved["pass"]["seconds"] >= saved["pass"]["seconds_model"] >= 0 and saved["pass"]["tokens"] > 0
    decoder.main(["--sae", sae_dir, "--out_dir", str(out), "--chunk", "7"])
    per_latent = pd.read_csv(out / "decoder.csv")
    summary = json.loads((out / "decoder.json").read_text())
    assert summary["mmcs"] == pytest.approx(per_latent["max_cos"].mean(), rel=1e-5)
    assert {"embed_in_cos", "embed_out_token", "layer_mean"} <= set(per_latent.columns)
    assert pd.read_csv(out / "decoder_pairs_hist.csv")["pairs"].sum() == summary["pairs"]
    prompt.main(["--sae", sae_dir, "--out_dir", str(out), "--prompt", "The cat sat on the mat."])
    heat = pd.read_csv(out / "prompt.csv")
    assert heat.groupby("latent")["prob"].sum().round(5).eq(1).all()
    centres = heat.drop_duplicates("latent")["centre"].to_numpy()
    assert (np.diff(centres) >= 0).all()


@pytest.mark.gpu
def test_analyses_on_cuda_match_cpu(tiny, cache):
    """The shared pass's analyses, the residual geometry, the decoder geometry and a prompt heatmap
    on CUDA (fp32): the CPU's files."""
    sae_dir = str(tiny / "mlsae-tiny-x1-k6")
    model_name = json.loads((tiny / "mlsae-tiny-x1-k6" / "config.json").read_text())["model_name"]
    data = ["--path", str(tiny / "test.jsonl"), "--max_length", "16", "--max_tokens", "256", "--precision", "fp32"]
    outs = {}
    for device in ("cpu", "cuda"):
        out = outs[device] = tiny / f"on-{device}"
        run(RunOptions(sae=sae_dir, data=DataOptions(path=str(tiny / "test.jsonl"), max_length=16, max_tokens=256,
                                                     precision="fp32", device=device), n_examples=4, out_dir=str(out)))
        resid.main(["--model_name", model_name, *data, "--device", device, "--out_dir", str(out)])
        decoder.main(["--sae", sae_dir, "--device", device, "--out_dir", str(out)])
        prompt.main(["--sae", sae_dir, "--device", device, "--out_dir", str(out), "--prompt", "The cat sat on the mat."])
    cpu, gpu = (dists.Dists.load(outs[d]) for d in ("cpu", "cuda"))
    torch.testing.assert_close(gpu.counts, cpu.counts)
    torch.testing.assert_close(gpu.totals, cpu.totals, rtol=1e-4, atol=1e-6)
    for name in ("variances.csv", "resid.csv", "decoder.csv", "prompt.csv"):
        a, b = (pd.read_csv(outs[d] / name) for d in ("cpu", "cuda"))
        pd.testing.assert_frame_equal(b, a, check_exact=False, rtol=1e-3, atol=1e-5, obj=name)
    a, b = (np.sort(examples.load_examples(outs[d]).table.column("activation").to_numpy()) for d in ("cpu", "cuda"))
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_prompt_heatmap_on_tiny_model(tiny, tiny_llama):
    sae = MLSAE.from_pretrained(tiny / "mlsae-tiny-x1-k6")
    heat = prompt.prompt_heatmap(sae, tiny_llama, "The cat sat on the mat.")
    assert heat.probs.shape == (3, len(heat.latents)) and len(heat.latents) > 0
    torch.testing.assert_close(heat.probs.sum(0), torch.ones(len(heat.latents)))
    assert list(heat.matrix().index) == [0, 1, 2]


# ----------------------------------------------------------------------------------------------
# tables


def test_tables_collect_a_sweep(tmp_path):
    sae_dir = tmp_path / "runs" / "mlsae-tiny-x4-k8"
    sae_dir.mkdir(parents=True)
    (sae_dir / "config.json").write_text(json.dumps({"n_inputs": 16, "n_latents": 64, "k": 8, "n_layers": 2,
                                                     "layers": [0, 1], "model_name": "/models/tiny"}))
    results = {"train/fvu/layer_0": 0.1, "train/fvu/layer_1": 0.3, "train/fvu/avg": 0.2, "val/loss/delta/avg": 0.5}
    out = tmp_path / "out"
    out.mkdir()
    saved = {"config": {"repo_id": str(sae_dir)}, "results": results}
    (out / "test_mlsae-tiny-x4-k8.json").write_text(json.dumps(saved))
    (out / "test_mlsae-tiny-x4-k8.csv").write_text("ignored,because\n1,2\n")  # the JSON twin wins
    (out / "sub").mkdir()
    csv_only = pd.DataFrame([{"train/fvu/layer_0": 0.4, "train/fvu/avg": 0.4}])
    csv_only.to_csv(out / "sub" / "test_mlsae-gpt2-x32-k16.csv", index=False)
    df = tables.collect(out)
    assert list(df["name"]) == ["mlsae-gpt2-x32-k16", "mlsae-tiny-x4-k8"]
    row = df.set_index("name").loc["mlsae-tiny-x4-k8"]
    assert (row["model"], row["expansion_factor"], row["k"], row["layers"]) == ("tiny", 4, 8, "0-1")
    row = df.set_index("name").loc["mlsae-gpt2-x32-k16"]
    assert (row["model"], row["expansion_factor"], row["k"]) == ("gpt2", 32, 16)
    long = tables.per_layer(df)
    assert set(long["metric"]) == {"train/fvu"}
    assert sorted(long[long["name"] == "mlsae-tiny-x4-k8"]["value"]) == [0.1, 0.3]
    tables.main(["--root", str(out), "--out_dir", str(tmp_path / "tab")])
    assert len(pd.read_csv(tmp_path / "tab" / "tables.csv")) == 2


# ----------------------------------------------------------------------------------------------
# latent cards


def test_histograms_match_brute_force():
    """Every active (layer, token, latent) lands in its log-spaced bin; rows sum to the dists' counts."""
    batches, dense = random_batches()
    acc, acc_d = cards.HistogramsAccumulator(L, F, 1e-3), dists.DistsAccumulator(L, F, 1e-3)
    for b in batches:
        acc.update(b)
        acc_d.update(b)
    h = acc.result(list(range(L)))
    edges = cards.EDGES.numpy()
    want = np.zeros((L, F, len(edges) - 1), dtype=np.int64)
    for l, n, p, f in zip(*np.nonzero(dense.numpy() > 1e-3)):
        v = dense[l, n, p, f].item()
        want[l, f, min(max(np.searchsorted(edges, v, side="left") - 1, 0), len(edges) - 2)] += 1
    np.testing.assert_array_equal(h.counts.numpy(), want)
    torch.testing.assert_close(h.counts.sum(-1).float(), acc_d.counts.float())
    assert want[..., 0].sum() > 0  # the tiny values went into the first bin


def test_direct_logit_effect_promotes_the_unembedding_row(tiny_llama):
    """A decoder direction along token t's unembedding row promotes t most; its negative suppresses t most."""
    sae = MLSAE(SAEConfig(n_inputs=tiny_llama.d_model, n_latents=8, k=2, n_layers=3))
    W_U = tiny_llama.lm_head.weight.detach().float()
    with torch.no_grad():
        sae.W_dec[0], sae.W_dec[1] = W_U[5] / W_U[5].norm(), -W_U[9] / W_U[9].norm()
    effect = cards.direct_logit_effect(sae, tiny_llama, [0, 1])
    assert effect.shape == (2, W_U.shape[0])
    assert int(effect[0].argmax()) == 5 and int(effect[1].argmin()) == 9


def test_cards_from_the_analysis_pass(tiny, cache):
    """A card holds the pass's numbers for its latent; the page renders them; the CLI writes it."""
    out = tiny / "cards-pass"
    run(RunOptions(sae=str(tiny / "mlsae-tiny-x1-k6"), data=DataOptions(path=str(tiny / "test.jsonl"), max_length=16,
                   max_tokens=256, precision="fp32"), n_examples=4, out_dir=str(out)))
    d, h = dists.Dists.load(out), cards.Histograms.load(out)
    torch.testing.assert_close(h.counts.sum(-1).float(), d.counts)
    sae = MLSAE.from_pretrained(tiny / "mlsae-tiny-x1-k6")
    tf = Transformer(*load_transformer(sae.config.model_name))
    latent = int(d.counts.sum(0).argmax())
    card = cards.Cards(sae, tf, out).card(latent, n_layers=2, n_examples=3)
    assert card.missing == [] and card.layers == [0, 1, 2]
    torch.testing.assert_close(card.probs, d.probs[:, latent])
    assert sorted(card.contexts) == sorted(d.layers[i] for i in d.probs[:, latent].argsort(descending=True)[:2])
    assert all(1 <= len(df) <= 3 for df in card.contexts.values())
    assert card.promoted[0].value >= card.promoted[-1].value > card.suppressed[-1].value >= card.suppressed[0].value
    from mlsae.explorer.figures import card_html

    page = card_html(card, tf.tokenizer)
    assert f"Latent {latent}" in page and page.count("<svg") == 2 and "<script" not in page
    assert page.count("top contexts at layer") == len(card.contexts)
    bare = cards.Cards(sae, tf, None).card(latent)
    assert bare.probs is None and bare.contexts == {} and "no analysis folder" in bare.missing[0]
    assert "the analysis pass" in card_html(bare, tf.tokenizer)
    env = {**__import__("os").environ, "MLSAE_CACHE": str(tiny / "cache")}
    cli = [sys.executable, "-m", "mlsae.analysis.cards", "--sae", str(tiny / "mlsae-tiny-x1-k6"), "--analysis_dir", str(out)]
    result = subprocess.run([*cli, "--latents", str(latent), "3", "--out", str(tiny / "cards.html")],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tiny / "cards.html").read_text().count("class='mlsae-card'") == 2
    for args, message in ((["--latents", "96"], "error: latent 96 is out of range: this MLSAE has latents 0..95"),
                          ([], "error: name the latents to show: --latents 3 17 ...")):
        bad = subprocess.run([*cli, *args, "--out", str(tiny / "bad.html")], capture_output=True, text=True, cwd=ROOT,
                             env=env, timeout=300)
        assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == message and "Traceback" not in bad.stderr
        assert not (tiny / "bad.html").exists()


def test_resid_with_a_tuned_lens_adds_the_translated_cosines(tiny, tiny_llama):
    """--tuned_lens: the same passes also give the centred cosines of the translated residuals, and the
    raw columns do not change."""
    from mlsae.lens import TunedLens

    chunks = load_chunks(str(tiny / "test.jsonl"), "test", tiny_llama.tokenizer, 16, max_tokens=96)
    torch.manual_seed(0)
    lens = TunedLens([0, 1, 2, 3], tiny_llama.d_model)
    with torch.no_grad():
        lens.weight.normal_(std=0.3)
        lens.bias.normal_()
    plain, _ = resid.resid_stats(tiny_llama, chunks, [0, 1, 2], batch_size=4, precision="fp32")
    df, _ = resid.resid_stats(tiny_llama, chunks, [0, 1, 2], batch_size=4, precision="fp32", lens=lens)
    pd.testing.assert_frame_equal(df[plain.columns], plain)
    keep = ~tiny_llama.special_mask(chunks)
    keep[:, 0] = False
    with torch.no_grad():
        t = lens.translate(tiny_llama.residuals(chunks, [0, 1, 2])[:, keep], slice(0, 3)).double()
    c = t - t.mean(1, keepdim=True)
    for l in range(2):
        cos = torch.nn.functional.cosine_similarity(c[l], c[l + 1], dim=-1)
        assert df["cos_next_lens"][l] == pytest.approx(cos.mean().item(), rel=1e-5)
        assert not df["cos_next_lens"][l] == pytest.approx(df["cos_next"][l], rel=1e-3)
