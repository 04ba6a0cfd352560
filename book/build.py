"""Run the book's notebooks with papermill, assemble the Jupyter Book and build it offline.

    python -m book run NOTEBOOK [--profile P]      execute notebooks/NOTEBOOK.ipynb
    python -m book run-all [--profile P]           every notebook, in book order
    python -m book build [--profile P]             assemble + jupyter-book build + number check
    python -m book check [--profile P]             the number check alone

Layout for profile P (``--out_dir`` moves it): ``out/P/notebooks/*.ipynb`` (executed),
``out/P/results/*.json`` (every number shown), ``out/P/book/src`` (the assembled sources: the
project's ``_config.yml``, ``_toc.yml``, ``book/*.md`` and the executed notebooks) and
``out/P/book/_build/html/index.html``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from book.profile import load_profile, repo_root
from book.stages import BUILD_START, DEADLINE, trained_tokens
from book.results import NUMBER, PAPER, Results, normalise, number_tokens
from mlsae.utils import MLSAEError, atomic_write_text

# Book order, which is also an order in which every notebook finds what it reads.
NOTEBOOKS = (
    "train",
    "evaluation",
    "residual_geometry",
    "layer_distributions",
    "examples",
    "prompt_heatmaps",
    "decoder_geometry",
    "baselines",
    "tuned_lens",
    "model_size",
    "performance",
)
# Chapters that only some profiles run: notebook -> the profile section it needs.
NEEDS_SECTION = {"model_size": "compare"}
TITLES = {
    "train": "Training the sweep",
    "evaluation": "Evaluation",
    "residual_geometry": "Residual stream geometry",
    "layer_distributions": "Layer distributions of latents",
    "examples": "Latent cards",
    "prompt_heatmaps": "Prompt heatmaps",
    "decoder_geometry": "Decoder geometry",
    "baselines": "MLSAE versus per-layer SAEs",
    "tuned_lens": "The tuned lens",
    "model_size": "Two models: the model-size claim",
    "performance": "Performance",
}


def profile_notebooks(profile: str) -> tuple[str, ...]:
    """The notebooks of ``profile``'s book, in book order: every one whose section the profile has
    (``NEEDS_SECTION``; the model-size chapter needs another model to compare with)."""
    prof = load_profile(profile)
    return tuple(n for n in NOTEBOOKS if n not in NEEDS_SECTION or prof.section(NEEDS_SECTION[n]))


def notebook_source(name: str) -> Path:
    path = repo_root() / "notebooks" / f"{name}.ipynb"
    if not path.is_file():
        raise MLSAEError(f"no notebook {name!r} (looked for {path}); notebooks: {', '.join(NOTEBOOKS)}")
    return path


def quiet_env() -> dict[str, str]:
    """Environment of the notebook kernels: the book package importable (it is not installed),
    no progress bars (they would print into the book), passive OpenMP waits unless set otherwise."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(repo_root()), *filter(None, [env.get("PYTHONPATH")])])
    # Passive OpenMP waits: on a shared CPU, spinning workers slow many-small-kernel steps severalfold.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.update(TQDM_DISABLE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error",
               TOKENIZERS_PARALLELISM="false", PYDEVD_DISABLE_FILE_VALIDATION="1")
    return env


def execute(name: str, profile: str = "default", *, out_dir: str | None = None, runs_dir: str | None = None,
            parameters: dict | None = None) -> Path:
    """Execute ``notebooks/<name>.ipynb`` under ``profile`` into ``<out>/notebooks/<name>.ipynb``.

    The kernel runs in the project folder (so the profile's relative paths hold). A failed run
    leaves ``<name>.failed.ipynb`` beside it, with the error in place.
    """
    import papermill as pm

    prof = load_profile(profile)
    out = prof.out_dir(out_dir)
    dest = out / "notebooks" / f"{name}.ipynb"
    params = {"profile": str(profile), "out_dir": str(out), "runs_dir": str(prof.runs_dir(runs_dir)),
              **(parameters or {})}
    saved_env = dict(os.environ)
    os.environ.update(quiet_env())
    if (deadline := prof.deadline(os.environ.get(BUILD_START))) is not None:
        os.environ[DEADLINE] = str(deadline)  # what training fits into (book.stages.ensure_trained)
    start = time.perf_counter()
    try:
        partial = dest.with_name(f".{name}.partial.ipynb")
        partial.parent.mkdir(parents=True, exist_ok=True)
        try:
            pm.execute_notebook(str(notebook_source(name)), str(partial), parameters=params, cwd=str(Path.cwd()),
                                kernel_name="python3", progress_bar=False, log_output=False, language="python")
        except pm.PapermillExecutionError as e:
            failed = dest.with_suffix(".failed.ipynb")
            partial.replace(failed)
            raise MLSAEError(f"notebook {name} failed in cell {e.exec_count}: {e.ename}: {e.evalue} "
                             f"(see {failed})") from e
        partial.replace(dest)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
    dest.with_suffix(".failed.ipynb").unlink(missing_ok=True)
    _record_timing(out, name, time.perf_counter() - start)
    return dest


def _record_timing(out: Path, name: str, seconds: float) -> None:
    """Keep each notebook's last and slowest execution times: a rerun whose heavy stages were
    cached takes seconds, while the slowest run is what producing the results cost."""
    path = out / "timings.json"
    timings = read_timings(out)
    prev = timings.get(name, {})
    timings[name] = {"last": round(seconds, 1), "slowest": round(max(seconds, prev.get("slowest", 0.0)), 1)}
    atomic_write_text(path, json.dumps(timings, indent=1))


def read_timings(out: Path) -> dict[str, dict[str, float]]:
    """``{notebook: {"last": s, "slowest": s}}`` from ``<out>/timings.json``."""
    path = out / "timings.json"
    raw = json.loads(path.read_text()) if path.is_file() else {}
    return {k: v if isinstance(v, dict) else {"last": v, "slowest": v} for k, v in raw.items()}


def fetch(profile: str = "default") -> list[str]:
    """Prepare what the profile's ``fetch`` section names: the embedded model and corpora
    (``mlsae.fetch``), a tiny random model (``mlsae.tiny``, at the profile's ``model_name``), or
    nothing for hub models and datasets (they stream at run time)."""
    from mlsae import fetch as fetch_mod

    prof = load_profile(profile)
    section = prof.section("fetch")
    done = [path for other in prof.section("compare").get("profiles") or [] if other != prof.name
            for path in fetch(other)]  # the model-size chapter reads the compared profiles' runs too
    for name in section.get("embedded") or []:  # "model" is the default model
        model = fetch_mod.SMOLLM2 if name == "model" else fetch_mod.EMBEDDED.get(f"embedded:{name}".lower())
        if model is None:
            raise MLSAEError(f"{prof.path}: fetch: unknown embedded model {name!r}; known: "
                             f"{', '.join(m.name for m in fetch_mod.EMBEDDED.values())}")
        done.append(str(fetch_mod.fetch_model(model)))
    for corpus in section.get("corpora") or []:
        done.append(str(fetch_mod.fetch_corpus(corpus)))
    if section.get("tiny"):
        from mlsae.tiny import make_tiny

        spec = dict(section["tiny"])
        done.append(str(make_tiny(spec.pop("arch", "llama"), prof.train_config().model_name, **spec)))
    return done


# ----------------------------------------------------------------------------- assembling


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=repo_root(), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _shown_path(path: Path) -> str:
    try:
        return path.resolve().relative_to(repo_root()).as_posix()
    except ValueError:
        return path.as_posix()


def build_info(profile: str, out: Path) -> str:
    """The introduction's account of this build (Markdown), its numbers recorded in ``results/book.json``."""
    import torch

    prof = load_profile(profile)
    R = Results("book", out)
    cfg = prof.train_config()
    tokens = trained_tokens(cfg)
    lines = [
        f"This book was built from the profile **{R.text('profile', prof.name)}** "
        f"(`{R.text('profile_file', _shown_path(prof.path))}`): "
        f"{R.text('description', prof.description)}",
        "",
        f"- Transformer: `{R.text('model', cfg.model_name)}`; data: `{R.text('data', cfg.path)}`.",
        f"- MLSAE sweep: expansion factor ∈ {{{R.param('ef', cfg.expansion_factor)}}} × k ∈ {{{R.param('k', cfg.k)}}}, "
        f"each trained on {R.param('max_tokens', tokens)} tokens "
        f"({R.param('tokens_per_step', cfg.tokens_per_step)} per step, context {R.param('max_length', cfg.max_length)})"
        + (f", **cut by the time budget** from the recipe's {R.param('recipe_tokens', cfg.max_tokens)} (see the training "
           "chapter): the metrics are those of an undertrained MLSAE." if tokens < cfg.max_tokens else "."),
    ]
    if cfg.baselines:
        lines.append(f"- Per-layer SAE baselines at layers {R.param('baseline_layers', cfg.baselines)}, trained in the sweep's pass.")
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    lines.append(f"- Built {R.text('date', now)}"
                 + (f" from commit `{R.text('commit', commit)}`" + (" with local changes" if dirty else "") if commit else "")
                 + f", Python {R.text('python', platform.python_version())}, PyTorch {R.text('torch', torch.__version__)}"
                 + f", on {R.text('device', 'a CUDA GPU' if torch.cuda.is_available() else f'{os.cpu_count()} CPU cores')}.")
    timings = {k: v["slowest"] for k, v in read_timings(out).items()}
    headlines, verdicts = [], []
    chapters = profile_notebooks(profile)
    for name in chapters:
        path = out / "results" / f"{name}.json"
        if not path.is_file():
            continue
        for key, item in json.loads(path.read_text())["items"].items():
            if item.get("headline"):
                headlines.append((name, item["headline"], item["text"]))
            if item.get("kind") == "verdict":
                verdicts.append((name, item["claim"], item["text"]))
    if verdicts:
        lines += ["", "Against the paper's claims (each comparison computed in its chapter):", ""]
        lines += [f"- {claim}: {text} ([{TITLES[name]}](notebooks/{name}.ipynb))" for name, claim, text in verdicts]
    if headlines:
        lines += ["", "Headline results of this build (each defined in its chapter):", "",
                  "| chapter | result | value |", "| --- | --- | --- |"]
        for name, label, text in headlines:
            lines.append(f"| [{TITLES[name]}](notebooks/{name}.ipynb) | {label} | {text} |")
    if timings:
        total = sum(timings.get(n, 0) for n in chapters)
        lines += ["", f"Producing the results took {R.num('notebooks_seconds', total, '.0f')} s of notebook execution "
                  "(the slowest recorded execution of each notebook; reruns with unchanged inputs reuse the "
                  "trained models, evaluations and analyses and take seconds) "
                  + "(" + ", ".join(f"{TITLES[n][0].lower() + TITLES[n][1:]} {R.num(f'seconds_{n}', timings[n], '.0f')} s"
                                    for n in chapters if n in timings) + ")."]
    return "\n".join(lines) + "\n"


def assemble(profile: str = "default", out_dir: str | None = None, *, partial: bool = False) -> Path:
    """Gather the book's sources and the executed notebooks into ``<out>/book/src``.

    With ``partial`` the chapters whose notebook was not executed are left out of the table of
    contents; otherwise they are an error.
    """
    import yaml

    from book.figures import PLOTLY_JS, plotly_js_path

    prof = load_profile(profile)
    out = prof.out_dir(out_dir)
    chapters = profile_notebooks(profile)
    missing = [n for n in chapters if not (out / "notebooks" / f"{n}.ipynb").is_file()]
    if missing and not partial:
        raise MLSAEError(f"notebooks not executed yet under {out}: {', '.join(missing)} "
                         f"(run: python -m book run-all --profile {profile})")
    root, src = repo_root(), out / "book" / "src"
    shutil.rmtree(src, ignore_errors=True)
    (src / "book" / "notebooks").mkdir(parents=True)
    (src / "_static").mkdir()
    shutil.copyfile(root / "_config.yml", src / "_config.yml")
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    left_out = set(missing) | set(NOTEBOOKS) - set(chapters)
    for part in toc.get("parts", []):
        part["chapters"] = [c for c in part["chapters"] if Path(c["file"]).name not in left_out]
    toc["parts"] = [p for p in toc.get("parts", []) if p["chapters"]]
    (src / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False))
    for path in (root / "book").iterdir():
        if path.is_file() and path.suffix in (".md", ".png", ".svg", ".bib", ".css"):
            shutil.copyfile(path, src / "book" / path.name)
    for name in chapters:
        if name not in missing:
            shutil.copyfile(out / "notebooks" / f"{name}.ipynb", src / "book" / "notebooks" / f"{name}.ipynb")
    shutil.copyfile(plotly_js_path(), src / "_static" / PLOTLY_JS)
    (src / "book" / "build_info.md").write_text(build_info(profile, out))
    return src


def jupyter_book() -> list[str]:
    exe = Path(sys.executable).parent / "jupyter-book"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "jupyter_book.cli.main"]


def build(profile: str = "default", out_dir: str | None = None, *, check: bool = True, partial: bool = False) -> Path:
    """Assemble and build the HTML book (offline); returns the path of ``index.html``."""
    prof = load_profile(profile)
    out = prof.out_dir(out_dir)
    src = assemble(profile, out_dir, partial=partial)
    dest = out / "book"
    shutil.rmtree(dest / "_build", ignore_errors=True)
    cmd = [*jupyter_book(), "build", str(src), "--path-output", str(dest), "--builder", "html", "-W", "-n", "--keep-going"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=quiet_env())
    log = proc.stdout + proc.stderr
    (out / "book" / "build.log").write_text(log)
    if proc.returncode != 0:
        raise MLSAEError(f"jupyter-book build failed (see {out / 'book' / 'build.log'}):\n" + _warnings(log))
    html = dest / "_build" / "html"
    if check:
        problems = check_numbers(html, out / "results")
        if problems:
            listing = "\n".join(f"  {page}: {token!r} in ...{context}..." for page, token, context in problems[:30])
            raise MLSAEError(f"{len(problems)} number(s) in the book come from no recorded result:\n{listing}")
        bad = verify_sources(out)
        if bad:
            raise MLSAEError(f"{len(bad)} number(s) in the book differ from the file they name:\n  " + "\n  ".join(bad[:30]))
    return html / "index.html"


def _warnings(log: str) -> str:
    lines = [line for line in log.splitlines() if "WARNING" in line or "ERROR" in line or "Error" in line]
    return "\n".join(lines[-40:]) or log[-4000:]


# ----------------------------------------------------------------------------- the number check

SKIP_PAGES = ("genindex.html", "search.html", "py-modindex.html")


def page_text(path: Path) -> str:
    """The text a reader sees in a page's article: prose and cell outputs, not code inputs,
    scripts, styles or the theme's chrome."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(path.read_text(encoding="utf-8"), "html.parser")
    article = soup.select_one("article.bd-article") or soup.select_one("main") or soup
    for tag in article.select("script, style, div.cell_input, a.headerlink, template"):
        tag.decompose()
    for tag in article.select("div.highlight"):
        if not tag.find_parent("div", class_="cell_output"):
            tag.decompose()  # code blocks in prose (commands); cell outputs stay
    return article.get_text(" ")


def check_numbers(html_dir: str | Path, results_dir: str | Path) -> list[tuple[str, str, str]]:
    """Numbers in the built book that no notebook recorded: ``[(page, number, context)]``."""
    allowed = Results.allowed(results_dir)
    problems = []
    html_dir = Path(html_dir)
    for path in sorted(html_dir.rglob("*.html")):
        rel = path.relative_to(html_dir).as_posix()
        if rel.startswith(("_static", "_sources")) or path.name in SKIP_PAGES:
            continue
        text = " ".join(page_text(path).split())
        for m in NUMBER.finditer(text):
            if normalise(m.group(0)) not in allowed:
                problems.append((rel, m.group(0), text[max(0, m.start() - 60): m.end() + 60]))
    return problems


def verify_sources(out_dir: str | Path) -> list[str]:
    """Recorded numbers that name a source file: those whose value differs from the file's, or whose
    file is missing."""
    import math

    out = Path(out_dir)
    bad = []
    for path in (out / "results").glob("*.json"):
        for key, item in json.loads(path.read_text()).get("items", {}).items():
            src = item.get("source")
            if not src:
                continue
            if not (out / src["file"]).is_file():
                bad.append(f"{path.name}:{key} names {src['file']}, which is missing")
                continue
            value = json.loads((out / src["file"]).read_text())
            for k in src["keys"]:
                value = value[k]
            if not (isinstance(value, (int, float)) and math.isclose(value, item["value"], rel_tol=1e-9, abs_tol=1e-12)):
                bad.append(f"{path.name}:{key} = {item['value']!r} but {src['file']}{src['keys']} = {value!r}")
    return bad


__all__ = ["NOTEBOOKS", "PAPER", "assemble", "build", "check_numbers", "execute", "number_tokens", "verify_sources"]
