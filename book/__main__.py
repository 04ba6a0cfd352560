"""``python -m book``: run the book's notebooks and build the book (see book.build)."""

from __future__ import annotations

import argparse

from book.build import NOTEBOOKS, build, check_numbers, execute, fetch, profile_notebooks, verify_sources
from book.profile import load_profile
from mlsae.utils import MLSAEError, run_cli


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m book", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", "execute notebooks with papermill"), ("run-all", "execute every notebook in order"),
                       ("build", "assemble and build the HTML book, then check its numbers"),
                       ("check", "check that every number in the built book was recorded"),
                       ("fetch", "fetch or build the model and data the profile needs"),
                       ("list", "print the profile's notebooks in book order")):
        p = sub.add_parser(name, help=text)
        if name == "run":
            p.add_argument("notebooks", nargs="+", choices=NOTEBOOKS, metavar="NOTEBOOK")
        if name == "build":
            p.add_argument("--partial", action="store_true", help="leave out chapters whose notebook was not run")
        p.add_argument("--profile", default="default", help="profile name or YAML file (default: default)")
        p.add_argument("--out_dir", default=None, help="outputs folder (default: out/<profile>)")
        p.add_argument("--runs_dir", default=None, help="trained SAEs folder (default: runs/<profile>)")
    args = parser.parse_args(argv)
    if args.command == "list":
        print("\n".join(profile_notebooks(args.profile)))
        return
    if args.command == "fetch":
        for path in fetch(args.profile):
            print(path)
        return
    if args.command in ("run", "run-all"):
        for name in args.notebooks if args.command == "run" else profile_notebooks(args.profile):
            print(f"{name}: {execute(name, args.profile, out_dir=args.out_dir, runs_dir=args.runs_dir)}", flush=True)
    elif args.command == "build":
        print(build(args.profile, args.out_dir, partial=args.partial).resolve())
    elif args.command == "check":
        out = load_profile(args.profile).out_dir(args.out_dir)
        problems = check_numbers(out / "book" / "_build" / "html", out / "results")
        bad = verify_sources(out)
        for page, token, context in problems:
            print(f"{page}: {token!r} in ...{context}...")
        for line in bad:
            print(line)
        if problems or bad:
            raise MLSAEError(f"{len(problems)} unrecorded number(s), {len(bad)} number(s) differing from their source")
        print("every number in the book was recorded by a notebook")


if __name__ == "__main__":
    run_cli(main)
