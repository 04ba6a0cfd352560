"""Training end to end on a tiny random model: sweeps, exact resume after a kill, bad input, torchrun."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mlsae.tiny import make_tiny
from mlsae.precision import resolve
from mlsae.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the cat dog river mountain sings runs quickly under over blue red green house tree "
         "science language model layer vector feature sparse residual stream paris france").split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("train")
    model = make_tiny("llama", tmp / "tiny-llama", n_layers=3)
    rng = random.Random(0)
    with open(tmp / "train.jsonl", "w") as f:
        for i in range(300):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80)))
            f.write(json.dumps({"text": text.capitalize() + ".", "meta": {"id": i}}) + "\n")
    return {"model": str(model), "data": str(tmp / "train.jsonl"), "tmp": tmp}


def args(setup: dict, out: Path, *extra: str) -> list[str]:
    return ["--model_name", setup["model"], "--path", setup["data"], "--out_dir", str(out),
            "--max_length", "32", "--batch_size", "2", "--tokens_per_step", "128", "--max_tokens", "2560",
            "--expansion_factor", "2", "-k", "4", "--precision", "fp32", "--log_every", "1",
            "--checkpoint_every", "4", "--device", "cpu", *extra]


def run(argv: list[str], env: dict | None = None, module: str = "mlsae.train") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=600)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def only_run(out: Path) -> Path:
    (folder,) = [p for p in out.iterdir() if p.name.startswith("mlsae-")]
    return folder


def test_train_writes_model_logs_and_learns(setup):
    out = setup["tmp"] / "plain"
    result = run(args(setup, out))
    assert result.returncode == 0, result.stderr
    folder = only_run(out)
    assert {"config.json", "model.safetensors", "metrics.jsonl"} <= {p.name for p in folder.iterdir()}
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 21)) and lines[0]["precision"] == "fp32"
    assert all(0 < r["train/fvu/avg"] < 1.5 for r in lines)  # learning is tested on the real model
    assert {"train/fvu/layer_0", "train/fvu/layer_2", "train/dead/rel", "loss/auxk"} <= set(lines[0])
    config = json.loads((folder / "config.json").read_text())
    assert config["n_layers"] == 3 and config["k"] == 4 and config["n_latents"] == 2 * config["n_inputs"]
    # The position rule: the first position of each of the 4 sequences per step and the EOS tokens are
    # left out (and recorded); with nothing left out every position trains.
    assert config["skip_first"] == 1 and config["skip_special_tokens"] and lines[0]["tokens"] <= 128 - 4
    every = setup["tmp"] / "every"
    assert run(args(setup, every, "--skip_first", "0", "--skip_special_tokens", "false",
                    "--max_tokens", "256", "--precision", "auto")).returncode == 0
    lines = [json.loads(line) for line in (only_run(every) / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in lines] == [128, 256]
    # Runs record the precision they used: fp32 as asked, or what auto chose on this machine.
    assert {r["precision"] for r in lines} == {resolve("auto", "cpu")}


def test_learning_rate_schedule():
    cfg = TrainConfig(tokens_per_step=256, max_length=64, batch_size=4, max_tokens=256 * 10, lr=1e-3,
                      warmup_steps=4, lr_schedule="linear")
    lrs = [cfg.lr_at(s) for s in range(cfg.steps)]
    assert lrs[:5] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3])
    assert lrs[5:] == pytest.approx([1e-3 * (1 - i / 6) for i in range(1, 6)])
    cosine = TrainConfig(tokens_per_step=256, max_length=64, batch_size=4, max_tokens=2560, lr=1e-3, warmup_steps=0,
                         lr_schedule="cosine")
    assert cosine.lr_at(0) == pytest.approx(1e-3) and cosine.lr_at(5) == pytest.approx(5e-4)
    constant = TrainConfig(tokens_per_step=256, max_length=64, batch_size=4, lr=1e-3, warmup_steps=0,
                           lr_schedule="constant")
    assert constant.lr_at(7) == pytest.approx(1e-3)


@pytest.mark.parametrize("batch_size", ["2", "8"])  # 2 micro-batches per step; 2 steps per forward pass
def test_kill_and_resume_equals_uninterrupted(setup, batch_size):
    full = setup["tmp"] / f"full-{batch_size}"
    assert run(args(setup, full, "--batch_size", batch_size)).returncode == 0
    part = setup["tmp"] / f"killed-{batch_size}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for delay in (4.0, 1.0):  # kill twice, at arbitrary moments after the first checkpoint
        proc = subprocess.Popen([sys.executable, "-m", "mlsae.train", *args(setup, part, "--batch_size", batch_size),
                                 *(["--resume"] if (part / "checkpoint").exists() else [])],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while not (part / "checkpoint").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(delay * random.random())
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    result = run(args(setup, part, "--batch_size", batch_size, "--resume"))
    assert result.returncode == 0, result.stderr
    a, b = weights(only_run(full)), weights(only_run(part))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log_a = [json.loads(x) for x in (only_run(full) / "metrics.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (only_run(part) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_b] == [r["step"] for r in log_a]
    assert [r["loss/total"] for r in log_b] == [r["loss/total"] for r in log_a]


def test_a_forward_pass_over_several_steps_trains_as_one_per_step(setup):
    """batch_size above a step's sequences: one transformer forward reads two steps, which then
    train in turn on the same data, in the same order, as with a forward pass per step (up to the
    rounding of a larger product)."""
    runs = {}
    for batch_size in ("4", "8"):
        runs[batch_size] = setup["tmp"] / f"forward-{batch_size}"
        result = run(args(setup, runs[batch_size], "--batch_size", batch_size, "--max_tokens", "640"))
        assert result.returncode == 0, result.stderr
    logs = [[json.loads(x) for x in (only_run(out) / "metrics.jsonl").read_text().splitlines()] for out in runs.values()]
    assert [r["tokens"] for r in logs[0]] == [r["tokens"] for r in logs[1]]
    a, b = weights(only_run(runs["4"])), weights(only_run(runs["8"]))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_sweep_trains_each_config_as_its_solo_run(setup):
    out = setup["tmp"] / "sweep"
    result = run(args(setup, out, "--expansion_factor", "2", "4", "-k", "4", "8", "--max_tokens", "640"))
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in out.iterdir() if p.name.startswith("mlsae-"))
    assert names == ["mlsae-tiny-llama-x2-k4", "mlsae-tiny-llama-x2-k8", "mlsae-tiny-llama-x4-k4",
                     "mlsae-tiny-llama-x4-k8"]
    solo = setup["tmp"] / "solo"
    assert run(args(setup, solo, "--expansion_factor", "4", "-k", "8", "--max_tokens", "640")).returncode == 0
    a, b = weights(out / "mlsae-tiny-llama-x4-k8"), weights(only_run(solo))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_single_layer_sae(setup):
    out = setup["tmp"] / "single"
    assert run(args(setup, out, "--layers", "1", "--max_tokens", "256")).returncode == 0
    config = json.loads((only_run(out) / "config.json").read_text())
    assert config["layers"] == [1] and config["n_layers"] == 1


def test_per_layer_saes_from_one_pass_equal_each_trained_alone(setup):
    """--per_layer: one single-layer SAE per layer from one transformer pass, each the same as the
    SAE that layer would get trained alone (same data, same initialisation)."""
    out = setup["tmp"] / "per-layer"
    result = run(args(setup, out, "--layers", "0", "2", "--per_layer", "--max_tokens", "640"))
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in out.iterdir() if p.name.startswith("mlsae-"))
    assert names == ["mlsae-tiny-llama-x2-k4-layer-0", "mlsae-tiny-llama-x2-k4-layer-2"]
    assert json.loads((out / names[1] / "config.json").read_text())["layers"] == [2]
    alone = setup["tmp"] / "layer-2-alone"
    assert run(args(setup, alone, "--layers", "2", "--max_tokens", "640")).returncode == 0
    a, b = weights(out / names[1]), weights(only_run(alone))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_baselines_train_in_the_sweeps_pass_as_they_would_alone(setup):
    """--baselines: per-layer SAEs of the sweep's largest size beside the sweep's MLSAEs, from the same
    transformer pass; each is the SAE its layer gets trained alone, and the MLSAEs are unchanged."""
    out = setup["tmp"] / "with-baselines"
    result = run(args(setup, out, "--baselines", "0", "2", "--max_tokens", "640"))
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in out.iterdir() if p.name.startswith("mlsae-"))
    assert names == ["mlsae-tiny-llama-x2-k4", "mlsae-tiny-llama-x2-k4-layer-0", "mlsae-tiny-llama-x2-k4-layer-2"]
    assert json.loads((out / names[2] / "config.json").read_text())["layers"] == [2]
    for folder, alone_args in ((names[2], ("--layers", "2")), (names[0], ())):
        alone = setup["tmp"] / f"alone-{folder}"
        assert run(args(setup, alone, *alone_args, "--max_tokens", "640")).returncode == 0
        a, b = weights(out / folder), weights(only_run(alone))
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("extra, message", [
    (["-k", "1000"], "larger than the number of latents"),
    (["--layers", "7"], "out of range"),
    (["--tokens_per_step", "100"], "multiple of"),
    (["--batch_size", "3"], "batch_size (3) must divide the 4 sequences of a step, or be a multiple of them"),
    (["--batch_size", "8", "--checkpoint_every", "3"], "multiple of the 2 steps that one forward pass"),
    (["--model_name", "/nonexistent/model"], "cannot load"),
    (["--path", "/nonexistent/data.jsonl.zst"], "no such file"),
    (["--precision", "fp8"], "invalid choice"),
    (["--per_layer"], "--per_layer needs --layers"),
    (["--per_layer", "--layers", "1", "--max_norm_ratio", "8"], "cannot use --max_norm_ratio"),
    (["--baselines", "9"], "--baselines [9] out of range"),
    (["--baselines", "2", "--layers", "0", "1"], "must be among the layers read"),
    (["--lens_copy"], "--lens_copy adds a tuned-lens MLSAE beside the sweep: it needs --tuned_lens"),
    (["--no_such_flag", "1"], "unrecognized arguments"),
])
def test_bad_input_is_one_clear_line(setup, extra, message):
    out = setup["tmp"] / "bad"
    result = run(args(setup, out, *extra))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "checkpoint").exists()


def test_train_on_tuned_lens_residuals(setup):
    """--tuned_lens: the MLSAE records the lens and stores the translators of its layers."""
    from mlsae.lens import TunedLens

    lens = TunedLens([0, 1, 2], 64, setup["model"])
    torch.manual_seed(0)
    with torch.no_grad():
        lens.weight.normal_(std=0.05)
    lens.save(setup["tmp"] / "lens")
    out = setup["tmp"] / "lensed"
    result = run(args(setup, out, "--layers", "1", "2", "--tuned_lens", str(setup["tmp"] / "lens"),
                      "--max_tokens", "512"))
    assert result.returncode == 0, result.stderr
    folder = only_run(out)
    assert folder.name == "mlsae-tiny-llama-x2-k4-lens"  # the reference's name for the variant
    assert json.loads((folder / "config.json").read_text())["tuned_lens"] is True
    torch.testing.assert_close(weights(folder)["lens_weight"], lens.weight.detach()[1:])
    # --lens_copy: the plain MLSAE and its tuned-lens copy from one pass; the copy is the lensed run above
    both = setup["tmp"] / "lens-copy"
    result = run(args(setup, both, "--layers", "1", "2", "--tuned_lens", str(setup["tmp"] / "lens"), "--lens_copy",
                      "--max_tokens", "512"))
    assert result.returncode == 0, result.stderr
    plain, copy = both / "mlsae-tiny-llama-x2-k4", both / "mlsae-tiny-llama-x2-k4-lens"
    assert json.loads((plain / "config.json").read_text())["tuned_lens"] is False
    assert "lens_weight" not in weights(plain)
    a, b = weights(copy), weights(folder)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    TunedLens([0, 1, 2], 64, "another/model").save(setup["tmp"] / "other-lens")
    bad = run(args(setup, setup["tmp"] / "lensed-bad", "--tuned_lens", str(setup["tmp"] / "other-lens")))
    assert bad.returncode == 2 and "was fitted to another/model" in bad.stderr and "Traceback" not in bad.stderr


def test_out_dir_that_is_a_file(setup):
    afile = setup["tmp"] / "a-file"
    afile.write_text("keep me")
    for out in (afile, afile / "below"):
        result = run(args(setup, out))
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert f"{afile} is a file, not a folder" in result.stderr
    assert afile.read_text() == "keep me"


@pytest.mark.parametrize("damage", ["truncated weights", "truncated trainer.json"])
def test_resume_from_a_damaged_checkpoint(setup, damage):
    out = setup["tmp"] / f"damaged-{damage.split()[1]}"
    assert run(args(setup, out, "--max_tokens", "512")).returncode == 0
    ckpt = out / "checkpoint"
    victim = next(ckpt.glob("mlsae-*/model.safetensors")) if damage == "truncated weights" else ckpt / "trainer.json"
    victim.write_bytes(victim.read_bytes()[:60])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = run(args(setup, out, "--max_tokens", "512", "--resume"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{victim if damage == 'truncated weights' else ckpt / 'trainer.json'} is damaged" in result.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing touched


def test_corrupt_corpus(setup):
    bad = setup["tmp"] / "bad.jsonl.zst"
    bad.write_bytes(b"\x28\xb5\x2f\xfd" + os.urandom(64))
    result = run(args({**setup, "data": str(bad)}, setup["tmp"] / "corrupt"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "corrupt" in result.stderr or "truncated" in result.stderr


def test_resume_with_other_options_is_refused(setup):
    out = setup["tmp"] / "other"
    assert run(args(setup, out, "--max_tokens", "512")).returncode == 0
    result = run(args(setup, out, "--max_tokens", "512", "--lr", "0.01", "--resume"))
    assert result.returncode == 2 and "other options" in result.stderr and "lr" in result.stderr
    again = run(args(setup, out, "--max_tokens", "512"))
    assert again.returncode == 2 and "--resume" in again.stderr


def test_torchrun_two_processes_equal_single_process(setup):
    single = setup["tmp"] / "ddp1"  # the same micro-batches, in one process
    assert run(args(setup, single, "--max_tokens", "640", "--batch_size", "1")).returncode == 0
    double = setup["tmp"] / "ddp2"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         "-m", "mlsae.train", *args(setup, double, "--max_tokens", "640", "--batch_size", "1")],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = weights(only_run(single)), weights(only_run(double))
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-4, atol=1e-5)


def test_torchrun_killed_and_resumed_equals_uninterrupted(setup):
    def torchrun(out: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518",
                "-m", "mlsae.train", *args(setup, out, "--max_tokens", "1280", "--batch_size", "1", *extra)]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = setup["tmp"] / "ddp-full"
    assert subprocess.run(torchrun(full), capture_output=True, cwd=ROOT, env=env, timeout=600).returncode == 0
    part = setup["tmp"] / "ddp-killed"
    proc = subprocess.Popen(torchrun(part), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its own process group: the kill takes every rank
    deadline = time.time() + 300
    while not (part / "checkpoint").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((part / "checkpoint" / "trainer.json").read_text())["step"] < 10  # killed mid-run
    result = subprocess.run(torchrun(part, "--resume"), capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = weights(only_run(full)), weights(only_run(part))
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_wandb_logs_offline(setup, tmp_path):
    out = setup["tmp"] / "wandb"
    result = run(args(setup, out, "--max_tokens", "256", "--wandb"), env={"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-2000:]
    runs = list(only_run(out).glob("wandb/offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_empty_dataset(setup):
    empty = setup["tmp"] / "empty.jsonl"
    empty.write_text("")
    result = run(args({**setup, "data": str(empty)}, setup["tmp"] / "empty"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "empty" in result.stderr or "no documents" in result.stderr or "fewer tokens" in result.stderr


@pytest.mark.gpu
def test_train_on_cuda_in_bf16_matches_cpu_and_resumes(setup):
    cuda = ("--device", "cuda", "--precision", "bf16")
    full = setup["tmp"] / "cuda-full"
    result = run(args(setup, full, *cuda))
    assert result.returncode == 0, result.stderr
    cpu = setup["tmp"] / "cuda-baseline-cpu"
    assert run(args(setup, cpu)).returncode == 0
    fvu = [[json.loads(line)["train/fvu/avg"] for line in (only_run(out) / "metrics.jsonl").read_text().splitlines()]
           for out in (full, cpu)]
    assert len(fvu[0]) == 20 and max(abs(a - b) for a, b in zip(*fvu)) < 0.01  # the CPU fp32 run, step by step
    part = setup["tmp"] / "cuda-killed"
    proc = subprocess.Popen([sys.executable, "-m", "mlsae.train", *args(setup, part, *cuda)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (part / "checkpoint").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = run(args(setup, part, *cuda, "--resume"))
    assert result.returncode == 0, result.stderr
    a, b = weights(only_run(full)), weights(only_run(part))
    for key in a:  # CUDA's scatter-adds are not bitwise deterministic
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)


def test_a_time_limit_plans_fewer_steps(setup, monkeypatch):
    """--max_minutes: at the end of the warm-up the run times its steps and plans those that leave
    the reserve; the schedule decays to that end, and the checkpoint keeps the plan."""
    limit = ("--max_tokens", "5120", "--warmup_steps", "4", "--max_minutes", "60")  # 40 steps; timed from step 1 to 9
    full = setup["tmp"] / "limit-full"
    assert run(args(setup, full, *limit)).returncode == 0  # an hour holds them
    state = json.loads((full / "checkpoint" / "trainer.json").read_text())
    assert state["step"] == state["steps"] == 40 and state["budget"]["at_step"] == 9

    cut = setup["tmp"] / "limit-cut"
    result = run(args(setup, cut, *limit, "--reserve_steps", str(10**9)))  # a reserve no hour holds
    assert result.returncode == 0, result.stderr
    assert "training 10 of the 40 steps (1,280 tokens)" in result.stderr  # one step after the plan
    state = json.loads((cut / "checkpoint" / "trainer.json").read_text())
    assert state["step"] == state["steps"] == 10 and state["budget"]["reserve_seconds"] > 3600
    log = [json.loads(line) for line in (only_run(cut) / "metrics.jsonl").read_text().splitlines()]
    cfg = TrainConfig(tokens_per_step=128, max_length=32, batch_size=2, max_tokens=5120, warmup_steps=4)
    assert [r["step"] for r in log] == list(range(1, 11))
    # the recipe's schedule until the plan is made (at least 8 steps timed), then a decay to the new end
    assert [r["lr"] for r in log] == pytest.approx([cfg.lr_at(s) for s in range(9)] + [cfg.lr_at(9, 10)])
    assert cfg.lr_at(9, 10) < cfg.lr_at(9) / 4

    before = weights(only_run(cut))
    again = run(args(setup, cut, *limit, "--resume"))  # the plan is kept: nothing left to train
    assert again.returncode == 0 and "training" not in again.stderr
    assert all(torch.equal(before[k], v) for k, v in weights(only_run(cut)).items())
    refused = run(args(setup, cut, "--max_tokens", "5120", "--warmup_steps", "4", "--resume"))
    assert refused.returncode == 2 and "plans 10 of 40 steps, to fit --max_minutes 60" in refused.stderr

    # The book keeps a cut run while it builds under a time budget, and retrains it for the whole recipe.
    from book.stages import DEADLINE, train_status, trained_tokens

    book_cfg = TrainConfig(model_name=setup["model"], path=setup["data"], out_dir=str(cut), max_length=32,
                           batch_size=2, tokens_per_step=128, max_tokens=5120, expansion_factor=[2], k=[4],
                           precision="fp32", warmup_steps=4, log_every=1, checkpoint_every=4, device="cpu")
    assert trained_tokens(book_cfg) == 1280
    from book.perf import training_rows  # the performance chapter counts positions read, as the recipe does

    row = training_rows([only_run(cut)], book_cfg).iloc[0]
    assert row["tokens"] == 1280 > log[-1]["tokens"]  # the log counts the kept tokens
    assert row["tokens/s"] == pytest.approx(log[-1]["tokens_per_s"] * 1280 / log[-1]["tokens"])
    monkeypatch.delenv(DEADLINE, raising=False)
    assert train_status(book_cfg) == "stale"
    monkeypatch.setenv(DEADLINE, str(time.time() + 60))
    assert train_status(book_cfg) == "done"
