"""Small shared helpers: the user-facing error type, the cache folder, atomic writes, CLI entry."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


class MLSAEError(Exception):
    """An error caused by the user's input; CLIs print its message on one line and exit 2."""


def cache_dir() -> Path:
    """Where fetched models, corpora and tokenized data live (``$MLSAE_CACHE`` or ``./cache``)."""
    return Path(os.environ.get("MLSAE_CACHE", "cache")).resolve()


def check_out_dir(path: str | os.PathLike, flag: str = "--out_dir") -> Path:
    """``path`` if it can be an output folder (it, or its first existing parent, is a folder); checked
    before any work starts, so that a wrong flag fails at once and leaves nothing behind."""
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists())  # "." or "/" at the latest
    if not existing.is_dir():
        raise MLSAEError(f"{flag} {path}: {existing} is a file, not a folder")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A reader (or a resumed run) therefore never sees a half-written file.
    """
    path = Path(path)
    check_out_dir(path.parent, "cannot write into")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; give them the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def sae_option():
    """The dataclass field naming an MLSAE, shared by every CLI: ``--sae`` (or the reference's ``--repo_id``)."""
    from simple_parsing import field

    return field(alias=["--repo_id"], help="The MLSAE: a folder written by mlsae.train, or a hub repo id "
                                           "(this project's or the reference's).")


def run_cli(main: Callable[[], object]) -> None:
    """Run a CLI entry point: user errors become one clear line on stderr and exit status 2."""
    try:
        main()
    except MLSAEError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


@contextlib.contextmanager
def quiet_hf_progress() -> Iterator[None]:
    """Hide transformers' progress bars (weight loading, shard writing) in the block, then restore them."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
