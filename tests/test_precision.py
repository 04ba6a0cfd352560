"""mlsae.precision: validating and resolving precisions, and the measured GEMM rates' cache."""

import json

import pytest
import torch

from mlsae import precision
from mlsae.utils import MLSAEError

CPU = torch.device("cpu")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache folder and no rates remembered by this process; counts the measurements."""
    monkeypatch.setenv("MLSAE_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "_rates", {})
    calls = []
    measure = precision._measure
    monkeypatch.setattr(precision, "_measure", lambda device: calls.append(device) or measure(device))
    return calls


def rates(monkeypatch, fp32: float, bf16: float) -> None:
    monkeypatch.setattr(precision, "gemm_rates", lambda device: {"fp32": fp32, "bf16": bf16})


def test_explicit_precisions_pass_through_without_measuring(cache):
    assert precision.resolve("fp32", CPU) == "fp32"
    assert precision.resolve("bf16", "cpu") == "bf16"
    assert not cache


@pytest.mark.parametrize("bad", ["fp16", "BF16", "", "float32"])
def test_bad_precision_names_the_choices(bad):
    with pytest.raises(MLSAEError, match="auto, fp32, bf16"):
        precision.resolve(bad, CPU)


@pytest.mark.parametrize("fp32, bf16, want", [(250, 1000, "bf16"), (200, 140, "fp32"), (100, 110, "fp32")])
def test_auto_picks_bf16_only_when_clearly_faster(monkeypatch, fp32, bf16, want):
    rates(monkeypatch, fp32, bf16)
    assert precision.resolve("auto", CPU) == want


def test_auto_is_bf16_on_cuda_without_measuring(monkeypatch):
    rates(monkeypatch, 1.0, 0.0)  # would say fp32, but is never asked
    monkeypatch.setattr(precision, "bf16_speedup", lambda device: pytest.fail("measured"))
    assert precision.resolve("auto", torch.device("cuda")) == "bf16"


@pytest.mark.parametrize("choice, on", [("bf16", True), ("fp32", False)])
def test_autocast_follows_the_resolved_precision(monkeypatch, choice, on):
    with precision.autocast(choice, CPU):
        assert torch.is_autocast_enabled("cpu") == on
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == (torch.bfloat16 if on else torch.float32)
    rates(monkeypatch, 100, 400 if on else 90)
    with precision.autocast("auto", CPU):
        assert torch.is_autocast_enabled("cpu") == on


def test_rates_are_measured_once_and_cached(cache, tmp_path, monkeypatch):
    first = precision.gemm_rates(CPU)
    assert first["fp32"] > 0 and first["bf16"] > 0
    assert first["int8"] > 0 if precision._int_mm_runs() else first["int8"] == 0
    assert first["threads"] == torch.get_num_threads() and first["cpu"] == precision.cpu_model()
    (path,) = (tmp_path / "machine").glob("*.json")
    assert json.loads(path.read_text()) == first
    assert precision.gemm_rates(CPU) == first and len(cache) == 1  # remembered by this process
    monkeypatch.setattr(precision, "_rates", {})
    assert precision.gemm_rates(CPU) == first and len(cache) == 1  # read back from the file


@pytest.mark.parametrize("content", ["{not json", "[]", '{"fp32": "fast", "bf16": 1.0}', ""])
def test_a_corrupt_cache_file_is_measured_again(cache, tmp_path, monkeypatch, content):
    precision.gemm_rates(CPU)
    (path,) = (tmp_path / "machine").glob("*.json")
    path.write_text(content)
    monkeypatch.setattr(precision, "_rates", {})
    again = precision.gemm_rates(CPU)
    assert len(cache) == 2 and again["fp32"] > 0
    assert json.loads(path.read_text()) == again


def test_a_cache_file_without_int8_is_measured_again(cache, tmp_path, monkeypatch):
    """Files written before int8 was measured lack its rate, which chooses fp32's int8 ranking."""
    first = precision.gemm_rates(CPU)
    (path,) = (tmp_path / "machine").glob("*.json")
    path.write_text(json.dumps({k: v for k, v in first.items() if k != "int8"}))
    monkeypatch.setattr(precision, "_rates", {})
    assert "int8" in precision.gemm_rates(CPU) and len(cache) == 2


def test_other_facts_are_another_cache_file(cache, tmp_path, monkeypatch):
    precision.gemm_rates(CPU)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 12345)
    assert precision.gemm_rates(CPU)["threads"] == 12345
    assert len(cache) == 2 and len(list((tmp_path / "machine").glob("*.json"))) == 2
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # AMX switched off for oneDNN's bf16 kernels
    assert precision.gemm_rates(CPU)["onednn_max_cpu_isa"] == "AVX512_CORE_BF16"
    assert len(cache) == 3 and len(list((tmp_path / "machine").glob("*.json"))) == 3
