"""The paper book: profiles, the recorder of every number shown, cached stages, and the build.

In a notebook::

    import book
    P = book.setup(profile)                    # the Profile; quiet progress bars, plot style
    R = book.Results("evaluation", P.out_dir(out_dir))
    R.md(f"Mean FVU over layers: {R.num('fvu_avg', value, '.3f')} (definition ...).")

From the shell: ``python -m book --help``.
"""

from __future__ import annotations

from mlsae import native

from book import claims
from book.claims import ratio_verdict
from book.profile import EvalConfig, Profile, load_profile, profile_path, repo_root
from book.perf import recipe_study
from book.results import PAPER, Results, fmt_number, number_tokens
from book.stages import (
    analysis_dir,
    data_options,
    ensure_analysis_pass,
    ensure_decoder,
    ensure_evaluated,
    ensure_evaluated_many,
    ensure_lens,
    ensure_resid,
    resid_dir,
    ensure_trained,
    eval_dists_path,
    eval_path,
    lens_dir,
    main_run,
    read_metrics,
    run_dirs,
    baseline_dirs,
    sae_config,
    sae_positions,
    train_status,
    trained_tokens,
    write_tables,
)


def setup(profile: str = "default", *, quiet: bool = True) -> Profile:
    """Load ``profile`` for a notebook; keep freed memory in glibc's heap (a notebook kernel is a
    compute process: evaluation ran 15% faster than when it page-faulted its buffers back), quiet
    the transformers logging (it would print into the book) and set the plotting defaults."""
    native.tune_malloc()
    if quiet:  # progress bars are off through TQDM_DISABLE (book.build.quiet_env)
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    from book.figures import register_renderer

    register_renderer()
    try:
        import matplotlib as mpl

        mpl.rcParams.update({"figure.dpi": 110, "savefig.dpi": 110, "figure.figsize": (7.5, 4.0),
                             "axes.spines.top": False, "axes.spines.right": False})
    except ImportError:  # pragma: no cover
        pass
    return load_profile(profile)


__all__ = [
    "PAPER", "EvalConfig", "claims", "analysis_dir", "data_options", "ensure_analysis_pass", "ensure_decoder", "ensure_resid", "resid_dir", "Profile", "Results", "ensure_evaluated", "ensure_evaluated_many", "ensure_lens", "lens_dir", "ensure_trained", "eval_dists_path", "eval_path", "fmt_number",
    "load_profile", "main_run", "ratio_verdict", "number_tokens", "profile_path", "read_metrics", "recipe_study", "repo_root", "run_dirs", "baseline_dirs", "sae_config", "sae_positions", "setup", "train_status", "trained_tokens", "write_tables",
]
