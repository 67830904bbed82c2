"""The command line, through its installed entry point, and README's block table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import blockzoo as bz
from blockzoo.tools.readme import END, START, block_table

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blockzoo", *args], capture_output=True, text=True, timeout=300
    )


def test_list_json_has_every_block_with_params_and_shape() -> None:
    result = _cli("list", "--format", "json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert set(rows) == set(bz.list_blocks())
    assert rows["se"]["params"] == 2 * 64 * 8 + 64 + 8
    assert rows["se"]["output"] == [1, 64, 56, 56]
    assert rows["spd_conv"]["output"] == [1, 64, 28, 28]
    assert rows["gc"]["arxiv"] == "1904.11492"


def test_list_filters_by_kind_and_rejects_unknown_kind() -> None:
    result = _cli("list", "--kind", "attention")
    assert result.returncode == 0
    assert "coord_att" in result.stdout and "spd_conv" not in result.stdout
    bad = _cli("list", "--kind", "nope")
    assert bad.returncode != 0 and "invalid choice" in bad.stderr


def test_readme_block_table_is_current() -> None:
    readme = (ROOT / "README.md").read_text()
    assert f"{START}\n{block_table()}\n{END}" in readme, "run `make readme`"


def test_readme_usage_example_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    usage = readme.split("## Usage", 1)[1]
    code = usage.split("```python", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md", "exec"), {})
