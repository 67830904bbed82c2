"""Profiler, compare, and the CLI commands built on them (through the entry point)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import blockzoo as bz
from blockzoo.core import count_flops
from blockzoo.tools.profile import ConvBNReLU, compare, peak_memory, profile


def test_flops_are_two_per_multiply_add_at_the_given_size() -> None:
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    for h, w in [(10, 12), (7, 5)]:
        x = torch.randn(2, 8, h, w)
        macs = 2 * 16 * h * w * 8 * 9
        assert count_flops(conv, x) == 2 * macs
    linear = nn.Linear(32, 10)
    assert count_flops(linear, torch.randn(4, 32)) == 2 * 4 * 32 * 10


def test_extra_flops_hook_is_added() -> None:
    class Elementwise(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * x

        def extra_flops(self, x: torch.Tensor) -> int:
            return x.numel()

    x = torch.randn(2, 3, 4, 4)
    assert count_flops(Elementwise(), x) == x.numel()
    assert count_flops(nn.Sequential(Elementwise(), Elementwise()), x) == 2 * x.numel()


def test_peak_memory_sees_the_largest_live_allocation() -> None:
    def work() -> torch.Tensor:
        a = torch.ones(1000, 1000)  # 4 MB
        b = a * 2  # +4 MB live at once
        del a
        return b.sum()

    peak, method = peak_memory(work, torch.device("cpu"))
    assert 8_000_000 <= peak < 9_000_000
    assert "profiler" in method


def test_profile_block_by_name() -> None:
    result = profile("spd_conv", (2, 16, 9, 7), out_channels=32, repeat=3, warmup=1)
    assert result.output_shape == (2, 32, 5, 4)
    assert result.params == sum(p.numel() for p in bz.SPDConv(16, 32).parameters())
    assert result.flops == 2 * (2 * 32 * 5 * 4 * 64 * 9)  # the conv on space-to-depth
    assert result.macs == result.flops // 2
    assert result.latency_ms > 0 and result.latency_iqr_ms >= 0
    assert result.peak_memory_bytes > 0
    backward = profile("spd_conv", (2, 16, 9, 7), backward=True, repeat=2, warmup=1)
    assert backward.backward and backward.flops > result.flops
    with pytest.raises(ValueError, match="input_size"):
        profile("se", (16, 8, 8))


def test_compare_rows_and_ratios() -> None:
    rows = compare(["se", "spd_conv"], in_channels=16, input_size=(12, 12), batch=2,
                   warmup=1, repeat=2)
    by_name = {r["block"]: r for r in rows}
    base = [r for r in rows if r["kind"] == "baseline" and "conv" in r["block"]]
    assert len(base) == 2  # stride 1 for SE, stride 2 for SPD-Conv
    assert "baseline: identity" in by_name
    conv_params = sum(p.numel() for p in ConvBNReLU(16, 16).parameters())
    se = by_name["se"]
    assert se["params_x"] == pytest.approx(se["params"] / conv_params, abs=1e-3)
    assert by_name["spd_conv"]["output"] == (2, 16, 6, 6)
    with pytest.raises(KeyError):
        compare(["nope"])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blockzoo", *args], capture_output=True,
                          text=True, timeout=600)


def test_cli_info_profile_compare(tmp_path) -> None:
    info = _cli("info", "coord_att")
    assert info.returncode == 0 and "2103.02907" in info.stdout and "create_block" in info.stdout
    prof = _cli("profile", "se", "--in", "16", "--size", "8", "--batch", "2", "--repeat", "2")
    assert prof.returncode == 0, prof.stderr
    assert "flops" in prof.stdout and "latency_ms" in prof.stdout
    plot, table = tmp_path / "c.png", tmp_path / "c.md"
    comp = _cli("compare", "--kind", "attention", "spd_conv", "--in", "16", "--size", "8",
                "--batch", "2", "--repeat", "2", "--format", "json", "--plot", str(plot),
                "--save", str(table))
    assert comp.returncode == 0, comp.stderr
    names = {r["block"] for r in json.loads(comp.stdout)}
    assert set(bz.list_blocks("attention")) | {"spd_conv"} <= names
    assert plot.stat().st_size > 10_000 and table.read_text().startswith("[")


def test_cli_errors_are_one_clear_line() -> None:
    for args in (("info", "nope"), ("profile", "se", "--stride", "2", "--size", "8")):
        result = _cli(*args)
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("blockzoo"), result.stderr
    assert _cli("compare", "--help").returncode == 0


def test_viz_writes_a_non_blank_png_of_the_expected_size(tmp_path) -> None:
    from matplotlib.image import imread

    for name in ("gc", "se"):
        out = tmp_path / f"{name}.png"
        result = _cli("viz", name, "--out", str(out), "--size", "96")
        assert result.returncode == 0, result.stderr
        pixels = imread(out)
        assert pixels.shape[:2] == (500, 1000)
        assert np.std(pixels[..., :3]) > 0.05
    missing = _cli("viz", "gc", str(tmp_path / "missing.jpg"))
    assert missing.returncode != 0 and "not found" in missing.stderr


EXPLAINED = [
    n for n in bz.list_blocks() if bz.block_info(n).cls.explain is not bz.Block.explain
]


@pytest.mark.parametrize("name", EXPLAINED)
def test_viz_draws_every_block_with_an_explain_hook(name: str, tmp_path) -> None:
    from matplotlib.image import imread

    from blockzoo.tools.viz import visualize

    path = visualize(name, out=tmp_path / "v.png", size=64)
    pixels = imread(path)
    assert pixels.shape[0] == 500 and pixels.shape[1] >= 1000
    assert np.std(pixels[..., :3]) > 0.05
