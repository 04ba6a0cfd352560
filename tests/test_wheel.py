"""The library as a user installs it: a wheel built from the package alone, installed into a fresh
venv that has none of the book's dependencies, trains, evaluates and loads an MLSAE from a folder
outside the repository (so nothing is found through the checkout).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What only the book and the explorer use (pyproject's `book` and `explore` extras), and the book's
# own package: none of it may be needed, or installed, by the library.
NOT_INSTALLED = ("book", "jupyter_book", "papermill", "nbclient", "matplotlib", "seaborn", "plotly", "ipywidgets",
                 "voila", "bs4", "pytest")


def sh(*cmd: str | Path, cwd: Path, env: dict | None = None, timeout: int = 900) -> str:
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert result.returncode == 0, f"{' '.join(map(str, cmd))}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_wheel_trains_evaluates_and_loads_in_a_fresh_venv(tmp_path):
    # The wheel, built from a copy of what it is made of (an in-place build leaves build/ behind).
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "mlsae", src / "mlsae", ignore=shutil.ignore_patterns("__pycache__"))
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []  # saves a download
    sh(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", tmp_path / "dist", src,
       cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("mlsae-*.whl")
    # A fresh venv from the base interpreter; the library's dependencies at the project's pins.
    base = getattr(sys, "_base_executable", sys.executable)
    sh(base, "-m", "venv", tmp_path / "venv", cwd=tmp_path)
    py = tmp_path / "venv" / "bin" / "python"
    sh(py, "-m", "pip", "install", "-q", "-c", ROOT / "constraints.txt", wheel, cwd=tmp_path)
    missing = sh(py, "-c", "import importlib.util as u, json; "
                 f"print(json.dumps([m for m in {list(NOT_INSTALLED)!r} if u.find_spec(m)]))", cwd=tmp_path)
    assert json.loads(missing) == [], "installed with the library, but only the book needs it"

    # Outside the repository: a tiny model, a corpus, training, evaluation and loading.
    work = tmp_path / "work"
    work.mkdir()
    env = {"MLSAE_CACHE": str(work / "cache"), "PYTHONPATH": ""}
    sh(py, "-m", "mlsae.tiny", "--path", "tiny", "--n-layers", "3", cwd=work, env=env)
    words = "the cat sat on a mat while residual streams carry sparse features across layers".split()
    with open(work / "data.jsonl", "w") as f:
        for i in range(200):
            f.write(json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(40))}) + "\n")
    sh(py, "-m", "mlsae.train", "--model_name", "tiny", "--path", "data.jsonl", "--out_dir", "runs",
       "--max_length", "32", "--batch_size", "2", "--tokens_per_step", "128", "--max_tokens", "1280",
       "--expansion_factor", "2", "-k", "4", "--precision", "fp32", "--device", "cpu", cwd=work, env=env)
    (folder,) = (work / "runs").glob("mlsae-*")
    sh(py, "-m", "mlsae.evaluate", "--sae", folder, "--path", "data.jsonl", "--max_length", "32",
       "--max_tokens", "512", "--downstream_tokens", "128", "--out_dir", "eval", cwd=work, env=env)
    results = json.loads((work / "eval" / f"test_{folder.name}.json").read_text())["results"]
    assert 0 < results["train/fvu/avg"] < 2 and "val/loss/delta/avg" in results
    loaded = sh(py, "-c", f"""
import json, torch, mlsae
from mlsae import MLSAE, native
assert mlsae.__file__.startswith({str(tmp_path / "venv")!r}), mlsae.__file__
sae = MLSAE.from_pretrained({str(folder)!r})
x = torch.randn(5, sae.config.n_inputs)
recon, _ = sae(x)
print(json.dumps({{"layers": sae.config.n_layers, "k": sae.config.k, "shape": list(recon.shape),
                  "native": native.lib() is not None}}))
""", cwd=work, env=env)
    info = json.loads(loaded.splitlines()[-1])
    assert info["layers"] == 3 and info["k"] == 4 and info["shape"] == [5, 64]
    assert info["native"], "the wheel must carry the C source of the native kernels"
    print("wheel install:", wheel.name, info)
