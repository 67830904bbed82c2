"""The command line, through its installed entry point, and README's block table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


def _closed_early(*args: str) -> subprocess.CompletedProcess:
    """Run the CLI with a stdout pipe the reader closes before any output (like ``| head``)."""
    proc = subprocess.Popen([sys.executable, "-m", "blockzoo", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", err)


def test_a_reader_that_stops_early_loses_nothing(tmp_path) -> None:
    listing = _closed_early("list", "--format", "json")
    assert listing.returncode == 0, listing.stderr
    assert "Broken pipe" not in listing.stderr and "Errno 32" not in listing.stderr
    saved = tmp_path / "se.csv"
    comp = _closed_early("compare", "se", "--in", "8", "--size", "8", "--batch", "1",
                         "--budget", "0.1", "--min-rounds", "2", "--save", str(saved))
    assert comp.returncode == 0, comp.stderr
    assert "Broken pipe" not in comp.stderr and "Traceback" not in comp.stderr
    rows = saved.read_text().splitlines()
    assert rows[0].startswith("block,") and any(r.startswith("se,") for r in rows)


def test_head_of_a_pipe_sees_the_table(tmp_path) -> None:
    saved = tmp_path / "se.csv"
    cmd = (f"{sys.executable} -m blockzoo compare se --in 8 --size 8 --batch 1 --budget 0.1 "
           f"--min-rounds 2 --save {saved} | head -3")
    result = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=300)
    assert result.stdout.startswith("machine:") and len(result.stdout.splitlines()) == 3
    assert "Broken pipe" not in result.stderr
    assert saved.read_text().startswith("block,kind,")


def _demo_sample_rows() -> list[dict[str, str]]:
    from blockzoo.tools.readme import DEMO_END, DEMO_START

    readme = (ROOT / "README.md").read_text()
    sample = readme.split(DEMO_START, 1)[1].split(DEMO_END, 1)[0]
    lines = [line for line in sample.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
            for line in lines[1:]]


def test_readme_demo_sample_flops_match_the_code() -> None:
    """FLOPs do not depend on the machine: the sample's FLOPs columns must be the code's."""
    from blockzoo.tools.profile import compare
    from blockzoo.tools.readme import DEMO_ARGS

    makefile = (ROOT / "Makefile").read_text()
    assert "DEMO_SIZE ?= --size 32 --batch 4" in makefile
    assert "compare --kind conv --kind attention $(DEMO_SIZE) --budget 3" in makefile
    assert " ".join(DEMO_ARGS).startswith(
        "compare --kind conv --kind attention --size 32 --batch 4 --budget 3")
    sample = _demo_sample_rows()
    names = [r["block"] for r in sample if r["kind"] != "baseline"]
    assert set(names) == set(bz.list_blocks("conv")) | set(bz.list_blocks("attention")), (
        "README's demo sample is stale: run `make readme`")
    rows = {r["block"]: r for r in compare(names, in_channels=64, input_size=(32, 32), batch=4,
                                           warmup=0, min_rounds=1, budget=0)}
    for row in sample:
        code = rows[row["block"]]
        assert float(row["mflops"].replace(",", "")) == pytest.approx(code["mflops"], rel=5e-3,
                                                                       abs=5e-3), row["block"]
        assert float(row["flops_x"]) == pytest.approx(code["flops_x"], rel=5e-3,
                                                      abs=1e-3), row["block"]
        assert int(row["params"].replace(",", "")) == code["params"], row["block"]
