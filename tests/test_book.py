"""The paper book under the smoke profile: every notebook executed with papermill, the Jupyter Book
built from their outputs with no error or warning, and every number in the book traced to a
number a notebook recorded (and, where a notebook named it, to the file it was read from).

The notebooks share one smoke run (a session fixture): a tiny random Llama, a slice of Brown.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

pytest.importorskip("papermill")
pytest.importorskip("jupyter_book")

import nbformat  # noqa: E402
import yaml  # noqa: E402

from book import Results, baseline_dirs, lens_dir, load_profile, number_tokens, repo_root, run_dirs, train_status  # noqa: E402
from book.build import NOTEBOOKS, build, check_numbers, execute, fetch, page_text, profile_notebooks, verify_sources  # noqa: E402
from book.results import fmt_number  # noqa: E402
from mlsae.train import parse_args  # noqa: E402

ROOT = repo_root()


@pytest.fixture(scope="session")
def smoke_book(tmp_path_factory):
    """Execute every notebook under the smoke profile into a temporary folder, then build the book."""
    cwd = os.getcwd()
    os.chdir(ROOT)  # the profiles' relative paths (the tiny model in ./cache) hold from the project folder
    try:
        base = tmp_path_factory.mktemp("book")
        out, runs = base / "out", base / "runs"
        fetch("smoke")
        timings = {}
        # the model-size chapter's second model (profile smoke-neox) runs into its own temporary folders
        compare = {"compare_dirs": {"smoke-neox": [str(base / "out-neox"), str(base / "runs-neox")]}}
        for name in profile_notebooks("smoke"):
            start = time.perf_counter()
            execute(name, "smoke", out_dir=str(out), runs_dir=str(runs), parameters=compare if name == "model_size" else None)
            timings[name] = time.perf_counter() - start
        start = time.perf_counter()
        index = build("smoke", str(out), check=False)
        timings["book"] = time.perf_counter() - start
        print("smoke book timings (s):", {k: round(v, 1) for k, v in timings.items()})
        yield {"out": out, "runs": runs, "html": index.parent, "index": index}
    finally:
        os.chdir(cwd)


# ----------------------------------------------------------------------------- the notebooks


def test_toc_and_notebooks_agree():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [c["file"] for part in toc["parts"] for c in part["chapters"]]
    chapters = [Path(f).name for f in files if f.startswith("book/notebooks/")]
    assert chapters == list(NOTEBOOKS)
    for name in NOTEBOOKS:
        nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{name}: needs exactly one papermill 'parameters' cell"
        assert "profile" in tagged[0].source
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{name}: commit it without outputs"
        raw = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
        assert all("id" in c for c in raw["cells"]), f"{name}: every cell needs an id (nbformat 4.5)"


def test_every_notebook_executed(smoke_book):
    for name in NOTEBOOKS:
        path = smoke_book["out"] / "notebooks" / f"{name}.ipynb"
        nb = nbformat.read(path, as_version=4)
        injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert injected and "'smoke'" in injected[0].source.replace('"', "'"), name
        errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{name}: {errors[0]['ename']}: {errors[0]['evalue']}"
        results = json.loads((smoke_book["out"] / "results" / f"{name}.json").read_text())
        assert results["items"] or results["tables"], f"{name} recorded no result"


def test_training_ran_once_and_is_reused(smoke_book):
    prof = load_profile("smoke")
    cfg = prof.train_config(runs_dir=smoke_book["runs"])
    assert train_status(cfg) == "done"
    # the baselines came from the sweep's own pass: no other training folder
    assert sorted(p.name for p in Path(smoke_book["runs"]).iterdir()) == ["sweep"]
    assert all((folder / "model.safetensors").is_file() for folder in baseline_dirs(cfg).values())


def test_every_cached_stage_is_stamped_with_its_code(smoke_book):
    from book.stages import DECODER_CODE, EVAL_CODE, PASS_CODE, RESID_CODE, STAMPS, code_digest

    stamps = [(path.parent, stage, value) for path in smoke_book["out"].rglob(STAMPS)
              for stage, value in json.loads(path.read_text()).items()]
    codes = {"evaluate": EVAL_CODE, "pass": PASS_CODE, "resid": RESID_CODE, "decoder": DECODER_CODE}
    for stage, code in codes.items():
        found = [v for _, k, v in stamps if k.split()[0] == stage]
        assert found and all(v["key"]["code"] == code_digest(code) for v in found), stage
    evals = {(p.parent, f"evaluate {p.stem.removeprefix('test_')}")
             for p in smoke_book["out"].rglob("test_*.json")}
    assert evals == {(folder, stage) for folder, stage, _ in stamps if stage.startswith("evaluate ")}


def test_one_caching_rule(tmp_path):
    """A stage reruns when its options, its code or the bytes it reads change, when its output
    is gone, and after it was killed half-way; otherwise it is reused."""
    from book.stages import cached

    weights, output, calls = tmp_path / "model.safetensors", tmp_path / "out.json", []
    weights.write_bytes(b"weights v1")

    def compute(fail: bool = False) -> None:
        calls.append(1)
        if fail:
            raise KeyboardInterrupt
        output.write_text("{}")

    def stage(options: dict, code: tuple[str, ...] = ("mlsae.metrics",), fail: bool = False) -> str:
        return cached(tmp_path, "stage", options=options, code=code, inputs=(weights,), outputs=(output,),
                      compute=lambda: compute(fail))["status"]

    assert stage({"k": 1}) == "computed"
    assert stage({"k": 1}) == "cached" and len(calls) == 1
    assert stage({"k": 2}) == "computed"
    assert stage({"k": 2}, code=("mlsae.metrics", "mlsae.model")) == "computed"
    weights.write_bytes(b"weights v2")
    assert stage({"k": 2}, code=("mlsae.metrics", "mlsae.model")) == "computed"
    output.unlink()
    assert stage({"k": 2}, code=("mlsae.metrics", "mlsae.model")) == "computed"
    with pytest.raises(KeyboardInterrupt):  # other options, killed while it rewrote the output
        stage({"k": 1}, fail=True)
    assert stage({"k": 2}, code=("mlsae.metrics", "mlsae.model")) == "computed", "the output may be half-written"
    assert stage({"k": 2}, code=("mlsae.metrics", "mlsae.model")) == "cached"


# ----------------------------------------------------------------------------- the book


def test_book_built_without_warnings(smoke_book):
    html = smoke_book["html"]
    assert smoke_book["index"].is_file()
    for name in NOTEBOOKS:
        assert (html / "book" / "notebooks" / f"{name}.html").is_file(), name
    log = (smoke_book["out"] / "book" / "build.log").read_text()
    assert "build succeeded" in log
    bad = [line for line in log.splitlines() if "WARNING" in line or "ERROR" in line]
    assert not bad, "\n".join(bad[:20])
    assert (html / "_static" / "plotly.min.js").is_file()  # interactive figures work offline


def test_book_says_which_profile_built_it(smoke_book):
    text = " ".join(page_text(smoke_book["html"] / "book" / "intro.html").split())
    assert "profile smoke" in text
    assert "Headline results of this build" in text


def test_chapters_show_figures_and_verdicts(smoke_book):
    html = smoke_book["html"] / "book" / "notebooks"
    ld = (html / "layer_distributions.html").read_text()
    assert "<img" in ld and "plotly-graph-div" in ld  # a static and an interactive figure
    assert "The paper reports about" in page_text(html / "layer_distributions.html")
    ev = page_text(html / "evaluation.html")
    assert "agrees with the paper" in ev or "disagrees with the paper" in ev
    assert "Traceback" not in ld
    size = page_text(html / "model_size.html")
    assert "the larger model has" in size and "a weak test of a size trend" in size
    assert "tiny-gpt_neox-6l-d96" in size and "tiny-llama-4l" in size  # the larger model second


def test_profile_notebooks():
    assert "model_size" not in profile_notebooks("default")  # it has no second model to compare with
    assert profile_notebooks("gemma") == NOTEBOOKS and profile_notebooks("smoke") == NOTEBOOKS
    assert list(load_profile("gemma").section("compare")["profiles"]) == ["default"]


def test_the_build_deadline_is_makes_start_plus_the_budget():
    assert load_profile("default").deadline("1000") == 1000 + 45 * 60
    assert load_profile("default").deadline("") is None  # outside make, or make all FULL_RECIPE=1
    assert load_profile("gemma").deadline("1000") is None  # no performance.budget_minutes


def test_every_number_in_the_book_was_recorded(smoke_book):
    problems = check_numbers(smoke_book["html"], smoke_book["out"] / "results")
    assert not problems, "\n".join(f"{p}: {t!r} in ...{c}..." for p, t, c in problems[:20])
    assert not verify_sources(smoke_book["out"])


def test_numbers_are_read_from_the_rendered_pages(smoke_book):
    """The check sees the numbers a reader sees: a recorded evaluation number is on its page."""
    results = json.loads((smoke_book["out"] / "results" / "evaluation.json").read_text())
    text = page_text(smoke_book["html"] / "book" / "notebooks" / "evaluation.html")
    assert results["items"]["main_fvu"]["text"] in text
    assert set(number_tokens(results["items"]["main_fvu"]["text"])) <= set(number_tokens(text))


# ----------------------------------------------------------------------------- the check itself


def test_check_flags_a_typed_in_number(tmp_path):
    html = tmp_path / "html"
    (html / "book").mkdir(parents=True)
    page = html / "book" / "chapter.html"
    page.write_text('<html><body><article class="bd-article"><p>FVU is 0.8123 at layer 3 of SmolLM2-135M.</p>'
                    '<div class="cell_input"><pre>x = 42</pre></div><script>var y = 7;</script>'
                    '</article><footer>2025</footer></body></html>')
    results = tmp_path / "out"
    R = Results("chapter", results)
    R.num("layer", 3)
    found = check_numbers(html, results / "results")
    assert [(p, t) for p, t, _ in found] == [("book/chapter.html", "0.8123")]
    R.num("fvu", 0.81234, ".4f")
    assert check_numbers(html, results / "results") == []


def test_sources_are_verified(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "r.json").write_text(json.dumps({"results": {"fvu": 0.25}}))
    R = Results("x", tmp_path)
    R.num("fvu", 0.25, ".2f", source=("eval/r.json", ["results", "fvu"]))
    assert verify_sources(tmp_path) == []
    R.num("fvu", 0.5, ".2f", source=("eval/r.json", ["results", "fvu"]))
    assert len(verify_sources(tmp_path)) == 1
    R.num("cos", 0.25, ".2f", source=("analysis/resid-embedded:model/resid.json", ["cos"]))
    assert verify_sources(tmp_path)[1:] == ["x.json:cos names analysis/resid-embedded:model/resid.json, which is missing"]


def test_number_tokens_and_formats():
    assert number_tokens("x8 k32 layer_3 SmolLM2-135M ef 8, FVU 0.123; 262,144 tokens; ~100x; -0.5; 1e-05") == [
        "8", "0.123", "262144", "100", "0.5", "1e-05"]
    assert fmt_number(262144) == "262,144"
    assert fmt_number(0.123456) == "0.123"
    assert fmt_number(0.5, ".1%") == "50.0%"
    assert fmt_number(-0.0001, ".3f") == "0.000" and fmt_number(-0.5, ".2f") == "-0.50"


def test_table_records_every_cell(tmp_path):
    import pandas as pd

    R = Results("t", tmp_path)
    R.table("tab", pd.DataFrame({"FVU": [0.12345, 0.5]}, index=pd.Index([0, 29], name="layer")), ".3f", show=False)
    saved = json.loads(R.path.read_text())["tables"]["tab"]
    assert ["0", "0.123"] in saved and ["29", "0.500"] in saved


# ----------------------------------------------------------------------------- profiles


@pytest.mark.parametrize("name", ["default", "smoke", "paper", "gemma"])
def test_profiles_are_train_configs(name):
    prof = load_profile(name)
    cfg = prof.train_config()
    # the profile doubles as mlsae.train's config (given the lens that the book fits for its lens copy)
    assert parse_args(["--config_path", str(prof.path), "--tuned_lens", cfg.tuned_lens]) == cfg
    assert cfg.out_dir == f"runs/{name}/sweep"
    assert len(cfg.baselines) >= 2
    assert cfg.lens_copy and cfg.tuned_lens.startswith(f"runs/{name}/sweep/lens-")
    assert [m.layers for m in cfg.members()] == [None] * (len(cfg.sweep()) + 1) + [[layer] for layer in cfg.baselines]
    assert [m.lens for m in cfg.members()] == [False] * len(cfg.sweep()) + [True] + [False] * len(cfg.baselines)
    assert set(baseline_dirs(cfg)) == set(cfg.baselines) and len(run_dirs(cfg)) == len(cfg.sweep())
    assert lens_dir(cfg).name.endswith("-lens") and lens_dir(cfg) not in run_dirs(cfg)
    assert prof.lens_config(cfg).out_dir == cfg.tuned_lens
    prof.eval_config("some/folder", "out")
    assert {"expansion_factor", "k", "max_tokens", "prompts"} <= set(prof.analysis())


def test_paper_profile_is_the_papers_sweep():
    cfg = load_profile("paper").train_config()
    assert cfg.model_name == "EleutherAI/pythia-70m-deduped" and cfg.path == "monology/pile-uncopyrighted"
    assert cfg.expansion_factor == [32, 64, 128] and cfg.k == [16, 32, 64]
    assert cfg.lr == 1e-4 and cfg.max_length == 2048 and cfg.tokens_per_step == 131_072


def test_recipe_study_holds_the_default_recipe_at_several_budgets():
    """The evaluation chapter's budget curve and the training chapter's "used here" mark need the
    recorded study to match the default profile's recipe (it once did not: a renamed model)."""
    from dataclasses import asdict

    from book.perf import recipe_points, recipe_study

    cfg = asdict(load_profile("default").train_config())
    study = recipe_study(cfg)
    assert (study["table"]["used here"] == "yes").sum() == 1
    assert recipe_points(study["records"], cfg)["tokens"].nunique() >= 2


def test_time_budget_reads_the_curve_at_the_budget_that_fits():
    """The performance chapter's time budget: power laws fitted to points on known curves, then
    the most tokens that fit the budget at a given rate, and each target's tokens and minutes."""
    import pandas as pd

    from book.evals import TARGETS, at_budget, budget_curve
    from book.perf import time_budget

    fvu, rec, dead = TARGETS.values()
    tokens = pd.Series([1e5, 2e5, 4e5])
    points = pd.DataFrame({"tokens": tokens, fvu[0]: 30 * tokens ** -0.5, rec[0]: 1 - 10 * tokens ** -0.5,
                           dead[0]: 0.5 * tokens ** -0.25})
    fit = budget_curve(points)
    assert fit["slope"].round(6).tolist() == [-0.5, -0.5, -0.25]
    assert at_budget(fit, 9e4).round(6).tolist() == [0.1, round(1 - 10 / 300, 6), round(0.5 / 9e4 ** 0.25, 6)]
    needed = fit["tokens to reach the target"]
    assert needed.tolist() == pytest.approx([(30 / 0.1) ** 2, (10 / 0.08) ** 2, (0.5 / 0.02) ** 4])

    table = time_budget(fit, 200_000, tokens_per_s=100.0, other_seconds=600.0, budget_seconds=1800.0)
    assert list(table.index) == ["this build", "the most within 30 min", *(f"{m} at its target" for m in TARGETS)]
    assert table.loc["this build", "notebook minutes"] == (600 + 2000) / 60
    assert table.loc["the most within 30 min", "tokens"] == 120_000
    assert table.loc["the most within 30 min", "notebook minutes"] == 30
    for metric, (_, bound, _) in TARGETS.items():
        assert table.loc[f"{metric} at its target", metric] == pytest.approx(bound)
    # a budget spent before training starts allows no training
    assert time_budget(fit, 200_000, 100.0, 2000.0, 1800.0).loc["the most within 30 min"].isna().all()


# ----------------------------------------------------------------------------- environment


def test_environment_yml_in_step_with_pyproject():
    import re
    import tomllib

    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = env["dependencies"]
    python = next(d for d in deps if isinstance(d, str) and d.startswith("python="))
    assert python.split("=")[1] >= project["requires-python"].removeprefix(">=")
    pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    assert "-c constraints.txt" in pip
    editable = next(line for line in pip if line.startswith("-e ."))
    extras = re.search(r"\[(.*)\]", editable).group(1).split(",")
    assert set(extras) <= set(project["optional-dependencies"])
    assert {"test", "book"} <= set(extras)
    # the book's packages are pinned, so that set-up resolves quickly and reproducibly
    pins = {line.split("==")[0].strip().lower() for line in (ROOT / "constraints.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#")}
    for dep in project["optional-dependencies"]["book"]:
        name = re.split(r"[<>=\[ ]", dep)[0].lower()
        assert name in pins, f"{name} (book extra) has no pin in constraints.txt"


def test_experiments_never_replace_the_profiles_runs():
    prof = load_profile("default")
    assert prof.train_config(expansion_factor=prof.train_config().expansion_factor).out_dir == "runs/default/sweep"
    other = prof.train_config(expansion_factor=[16])
    assert other.out_dir.startswith("runs/default/sweep-") and other.expansion_factor == [16]
    assert prof.train_config(runs_dir="/tmp/x").out_dir == "/tmp/x/sweep"
    moved = prof.train_config(baselines=[3], max_tokens=4096)
    assert moved.out_dir.startswith("runs/default/sweep-") and moved.baselines == [3] and moved.max_tokens == 4096
