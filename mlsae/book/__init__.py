"""The paper book: profiles, the recorder of every number shown, cached stages, and the build.

In a notebook::

    from mlsae import book
    P = book.setup(profile)                    # the Profile; quiet progress bars, plot style
    R = book.Results("evaluation", P.out_dir(out_dir))
    R.md(f"Mean FVU over layers: {R.num('fvu_avg', value, '.3f')} (definition ...).")

From the shell: ``python -m mlsae.book --help``.
"""

from __future__ import annotations

from mlsae.book import claims
from mlsae.book.claims import ratio_verdict
from mlsae.book.profile import EvalConfig, Profile, load_profile, profile_path, repo_root
from mlsae.book.perf import recipe_study
from mlsae.book.results import PAPER, Results, fmt_number, number_tokens
from mlsae.book.stages import (
    analysis_dir,
    data_options,
    ensure_analysis_pass,
    ensure_decoder,
    ensure_evaluated,
    ensure_resid,
    ensure_trained,
    eval_path,
    main_run,
    read_metrics,
    run_dirs,
    sae_config,
    sae_positions,
    train_status,
    write_tables,
)


def setup(profile: str = "default", *, quiet: bool = True) -> Profile:
    """Load ``profile`` for a notebook; hide progress bars (they would print numbers into the
    book) and set the plotting defaults."""
    if quiet:
        import functools

        import tqdm.std

        if not getattr(tqdm.std.tqdm.__init__, "_mlsae_quiet", False):
            loud_init = tqdm.std.tqdm.__init__

            @functools.wraps(loud_init)
            def quiet_init(self, *args, **kwargs):  # callers pass disable=False explicitly: override it
                kwargs["disable"] = True
                loud_init(self, *args, **kwargs)

            quiet_init._mlsae_quiet = True  # type: ignore[attr-defined]
            tqdm.std.tqdm.__init__ = quiet_init
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    from mlsae.book.figures import register_renderer

    register_renderer()
    try:
        import matplotlib as mpl

        mpl.rcParams.update({"figure.dpi": 110, "savefig.dpi": 110, "figure.figsize": (7.5, 4.0),
                             "axes.spines.top": False, "axes.spines.right": False})
    except ImportError:  # pragma: no cover
        pass
    return load_profile(profile)


__all__ = [
    "PAPER", "EvalConfig", "claims", "analysis_dir", "data_options", "ensure_analysis_pass", "ensure_decoder", "ensure_resid", "Profile", "Results", "ensure_evaluated", "ensure_trained", "eval_path", "fmt_number",
    "load_profile", "main_run", "ratio_verdict", "number_tokens", "profile_path", "read_metrics", "recipe_study", "repo_root", "run_dirs", "sae_config", "sae_positions", "setup", "train_status", "write_tables",
]
