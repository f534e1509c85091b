"""The ``vitkern`` command (console script; also ``python -m vitkern``).

Subcommands:

* ``vitkern profile`` - attention cost vs resolution: tables, CSV/JSON and a plot
  (see :mod:`vitkern.profiler` and ``vitkern profile --help``).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from vitkern import __version__
    from vitkern.profiler import cli as profile_cli

    parser = argparse.ArgumentParser(prog="vitkern", description="vitkern: fused Triton kernels for Vision "
                                     "Transformers - command-line tools.")
    parser.add_argument("--version", action="version", version=f"vitkern {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("profile", help="attention cost vs resolution: table, CSV, JSON and plot",
                       description=profile_cli.DESCRIPTION, epilog=profile_cli.EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    profile_cli.add_arguments(p)
    p.set_defaults(_run=profile_cli.run, _parser=p)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return args._run(args, args._parser, argv[1:])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
