"""Keep README's block table in step with the registry: ``python -m blockzoo.tools.readme``."""

from __future__ import annotations

import sys
from pathlib import Path

from ..core.formatting import format_rows, replace_between_markers
from .catalog import catalog_rows

START, END = "<!-- blocks:start -->", "<!-- blocks:end -->"


def block_table() -> str:
    """The Markdown table ``blockzoo list --format markdown`` prints."""
    return format_rows(catalog_rows(), "markdown")


def update_readme(path: Path) -> bool:
    """Rewrite the table between the markers in ``path``; True when it changed."""
    return replace_between_markers(path, START, END, block_table())


if __name__ == "__main__":
    changed = update_readme(Path(sys.argv[1] if len(sys.argv) > 1 else "README.md"))
    print("README table updated" if changed else "README table already current")
