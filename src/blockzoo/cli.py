"""The ``blockzoo`` command line (also ``python -m blockzoo``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .registry import KINDS
from .tools.formatting import format_rows


def _cmd_list(args: argparse.Namespace) -> int:
    from .tools.catalog import catalog_rows

    print(format_rows(catalog_rows(args.kind), args.format))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blockzoo", description="Tested, paper-faithful CNN building blocks for PyTorch."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "list",
        help="table of every registered block",
        description="Every registered block with its kind, paper, year, parameter count "
        "(in=64 channels, defaults) and output shape for a 1x64x56x56 input.",
    )
    p.add_argument("--kind", choices=KINDS, help="only blocks of this kind")
    p.add_argument("--format", choices=("table", "markdown", "json"), default="table")
    p.set_defaults(func=_cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"blockzoo {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
