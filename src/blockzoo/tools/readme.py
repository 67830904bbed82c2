"""Keep README in step with the code: ``python -m blockzoo.tools.readme README.md``.

Two generated parts, each between its markers: the block table (``blockzoo list``) and the
sample output of ``make demo``, produced by a real run of the same command (its FLOPs columns
do not depend on the machine, and a test checks them against the code).
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

from ..core.formatting import format_rows, replace_between_markers
from .catalog import catalog_rows

START, END = "<!-- blocks:start -->", "<!-- blocks:end -->"
DEMO_START, DEMO_END = "<!-- demo:start -->", "<!-- demo:end -->"

#: The comparison ``make demo`` runs (its Makefile target, with the default ``DEMO_SIZE``).
DEMO_ARGS = ("compare", "--kind", "conv", "--kind", "attention", "--size", "32", "--batch", "4",
             "--budget", "3", "--format", "markdown")


def block_table() -> str:
    """The Markdown table ``blockzoo list --format markdown`` prints."""
    return format_rows(catalog_rows(), "markdown")


def demo_sample() -> str:
    """What ``make demo`` prints (a real run; timing figures vary with the machine)."""
    from ..cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(DEMO_ARGS))
    if code != 0:
        raise RuntimeError(f"blockzoo {' '.join(DEMO_ARGS)} failed with exit status {code}")
    return out.getvalue().strip()


def update_readme(path: Path, demo: bool = True) -> bool:
    """Rewrite the generated parts of ``path``; True when it changed."""
    changed = replace_between_markers(path, START, END, block_table())
    if demo:
        changed = replace_between_markers(path, DEMO_START, DEMO_END, demo_sample()) or changed
    return changed


if __name__ == "__main__":
    changed = update_readme(Path(sys.argv[1] if len(sys.argv) > 1 else "README.md"))
    print("README updated" if changed else "README already current")
