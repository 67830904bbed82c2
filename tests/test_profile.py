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
from blockzoo.cli import main
from blockzoo.core import count_flops
from blockzoo.layers import ConvNormAct
from blockzoo.tools import profile as profiling
from blockzoo.tools.profile import (
    baseline_conv,
    compare,
    compare_models,
    machine_info,
    median_interval,
    paired_timing,
    peak_memory,
    profile,
    report,
)


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
                   warmup=1, min_rounds=3, budget=0.2)
    by_name = {r["block"]: r for r in rows}
    base = [r for r in rows if r["kind"] == "baseline" and "conv" in r["block"]]
    assert len(base) == 2  # stride 1 for SE, stride 2 for SPD-Conv
    assert "baseline: identity" in by_name
    conv_params = sum(p.numel() for p in ConvNormAct(16, 16, 3).parameters())
    se = by_name["se"]
    assert se["params_x"] == pytest.approx(se["params"] / conv_params, abs=1e-3)
    assert by_name["spd_conv"]["output"] == (2, 16, 6, 6)
    for row in (se, by_name["spd_conv"]):
        assert row["rounds"] >= 3 and row["timing"] in ("converged", "budget")
        assert row["latency_x_low"] <= row["latency_x"] <= row["latency_x_high"]
        assert row["machine_ms"] > 0
    with pytest.raises(KeyError):
        compare(["nope"])


def test_baseline_is_the_library_conv_norm_act() -> None:
    base = baseline_conv(16, 32, 2)
    assert isinstance(base, ConvNormAct)
    assert base.conv.kernel_size == (3, 3) and base.conv.stride == (2, 2)
    assert base.conv.bias is None and isinstance(base.bn, nn.BatchNorm2d)
    assert base(torch.randn(1, 16, 9, 9)).shape == (1, 32, 5, 5)


def test_paired_timing_recovers_a_known_ratio() -> None:
    """Summing twice as many integers costs twice as much CPU time, however busy the machine:
    with one thread the samples are the thread's CPU time."""
    with profiling.num_threads(1):
        assert profiling.timing_clock("cpu") == "thread cpu"
        timing = paired_timing(lambda: sum(range(20_000)), lambda: sum(range(40_000)),
                               warmup=1, min_rounds=5, budget_s=20, tolerance=0.10)
    assert timing.stopped == "converged" and timing.rounds >= 5
    assert timing.ratio == pytest.approx(2.0, rel=0.15)
    low, high = timing.interval
    assert low <= timing.ratio <= high and timing.spread <= 0.10


def test_paired_timing_stops_at_the_budget_and_says_so() -> None:
    timing = paired_timing(lambda: None, lambda: sum(range(50)), warmup=1, min_rounds=4,
                           budget_s=0.05, tolerance=0.0)
    assert timing.stopped == "budget" and timing.rounds >= 4


def test_median_interval_brackets_the_median() -> None:
    values = [1.0, 1.1, 0.9, 1.05, 0.95, 3.0, 1.0]
    low, high = median_interval(values)
    assert low <= float(np.median(values)) <= high < 3.0
    assert median_interval([2.0] * 5) == (2.0, 2.0)


def test_load_above_the_cores_is_flagged(monkeypatch) -> None:
    import os

    monkeypatch.setattr(profiling, "load_average", lambda: (os.cpu_count() or 1) + 3.0)
    rows = compare(["se"], in_channels=8, input_size=(8, 8), batch=1, min_rounds=2, budget=0.1)
    se = next(r for r in rows if r["block"] == "se")
    assert "load" in se["warning"] and "cores" in se["warning"]
    assert any("WARNING" in note and "se" in note for note in profiling.report_notes(rows))


def test_report_starts_with_the_machine() -> None:
    rows = compare(["gc"], in_channels=8, input_size=(8, 8), batch=1, min_rounds=2, budget=0.1,
                   threads=1)
    machine = machine_info("cpu", 1)
    assert machine["threads"] == 1 and machine["torch"] == torch.__version__
    assert machine["cores"] >= 1 and machine["cpu"] and machine["clock"] == "thread cpu"
    data = json.loads(report(rows, machine, "json"))
    assert list(data)[0] == "machine" and data["machine"] == machine
    assert {r["block"] for r in data["rows"]} >= {"gc", "baseline: conv3x3+bn+relu"}
    markdown = report(rows, machine, "markdown")
    assert markdown.startswith("**machine:") and torch.__version__ in markdown.splitlines()[0]
    assert "machine-dependent" in markdown


def test_compare_models_against_the_first() -> None:
    small = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    big = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1))
    rows = compare_models([("small", small), ("big", big)], (1, 3, 16, 16), min_rounds=2,
                          budget=0.1)
    assert [r["model"] for r in rows] == ["small", "big"]
    assert rows[1]["flops_x"] == pytest.approx((8 * 27 + 8 * 72) / (8 * 27), abs=1e-3)
    assert rows[0]["latency_x"] == 1.0 and rows[1]["rounds"] >= 2


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


FAST = ("--budget", "0.2", "--min-rounds", "2", "--warmup", "1")


def test_cli_models_lists_networks_by_glob(capsys) -> None:
    code, out, _ = _run(capsys, "models", "se_*")
    assert code == 0 and "se_resnet50" in out and "sknet50" not in out
    code, out, _ = _run(capsys, "models", "resnet1?", "--source", "torchvision", "--format",
                        "json")
    assert code == 0 and {r["model"] for r in json.loads(out)} >= {"resnet18"}
    code, _, err = _run(capsys, "models", "zzz*")
    assert code == 2 and "no model matches" in err


def test_cli_profile_model_with_an_inserted_block(capsys) -> None:
    code, out, err = _run(capsys, "profile", "resnet18", "--insert", "se", "--after",
                          "layer*.*.bn2", "--size", "32", "--format", "json", *FAST)
    assert code == 0, err
    assert "changed 8 module(s)" in err
    data = json.loads(out)
    before, after = data["rows"]
    assert before["model"] == "resnet18 (before)" and after["model"].endswith("(after)")
    se_params = sum(
        p.numel() for c in (64, 64, 128, 128, 256, 256, 512, 512)
        for p in bz.create_block("se", c).parameters()
    )
    assert after["params"] - before["params"] == se_params + 8  # + each gate's gamma
    assert after["params_x"] > 1 and after["flops_x"] > 1
    assert after["latency_x_low"] <= after["latency_x"] <= after["latency_x_high"]
    assert data["machine"]["threads"] == 1


def test_cli_profile_model_with_replaced_convs(capsys) -> None:
    code, out, err = _run(capsys, "profile", "resnet18", "--replace", "dynamic_conv", "--where",
                          "layer1.*.conv?", "--size", "32", "--format", "json", *FAST)
    assert code == 0, err
    assert "changed 4 module(s)" in err
    before, after = json.loads(out)["rows"]
    assert after["params"] > before["params"]
    code, _, err = _run(capsys, "profile", "resnet18", "--insert", "se", "--after", "nope.*")
    assert code == 2 and "matched no module" in err


def test_cli_compare_models(capsys) -> None:
    code, out, err = _run(capsys, "compare", "--models", "resnet18", "resnet_cifar", "--size",
                          "32", "--format", "json", *FAST)
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert [r["model"] for r in rows] == ["resnet18", "resnet_cifar"]
    assert rows[1]["params_x"] == pytest.approx(rows[1]["params"] / rows[0]["params"], abs=1e-3)
    code, out, err = _run(capsys, "compare", "resnet_cifar", "resnet18", "--size", "32",
                          "--format", "json", *FAST)
    assert code == 0, err
    assert [r["model"] for r in json.loads(out)["rows"]] == ["resnet_cifar", "resnet18"]
    code, out, err = _run(capsys, "compare", "se", "resnet18")
    assert code == 2 and out == "" and "--models" in err


def test_cli_save_is_checked_before_profiling(tmp_path, capsys) -> None:
    folder = tmp_path / "a_folder"
    folder.mkdir()
    code, out, err = _run(capsys, "compare", "--kind", "conv", "--save", str(folder))
    assert code == 2 and out == "" and "is a directory" in err
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, out, err = _run(capsys, "compare", "se", "--save", str(blocker / "x.csv"))
    assert code == 2 and out == "" and "--save" in err
    saved = tmp_path / "sub" / "se.csv"
    code, out, err = _run(capsys, "compare", "se", "--in", "8", "--size", "8", "--batch", "1",
                          "--save", str(saved), *FAST)
    assert code == 0, err
    lines = saved.read_text().splitlines()
    assert lines[0].startswith("block,kind,") and len(lines) == 4  # header, conv, se, identity


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blockzoo", *args], capture_output=True,
                          text=True, timeout=600)


def test_cli_info_profile_compare(tmp_path) -> None:
    info = _cli("info", "coord_att")
    assert info.returncode == 0 and "2103.02907" in info.stdout and "create_block" in info.stdout
    prof = _cli("profile", "se", "--in", "16", "--size", "8", "--batch", "2", "--repeat", "2",
                "--threads", "1")
    assert prof.returncode == 0, prof.stderr
    assert "flops" in prof.stdout and "latency_ms" in prof.stdout
    plot, table = tmp_path / "c.png", tmp_path / "c.md"
    comp = _cli("compare", "--kind", "attention", "spd_conv", "--in", "16", "--size", "8",
                "--batch", "2", "--repeat", "2", "--budget", "0.1", "--format", "json",
                "--plot", str(plot), "--save", str(table))
    assert comp.returncode == 0, comp.stderr
    names = {r["block"] for r in json.loads(comp.stdout)["rows"]}
    assert set(bz.list_blocks("attention")) | {"spd_conv"} <= names
    assert plot.stat().st_size > 10_000 and table.read_text().startswith("**machine:")


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


def test_plot_labels_do_not_overlap(tmp_path) -> None:
    from blockzoo.tools.plot import _overlapping, compare_figure, plot_compare

    rows = [{"block": f"block_{i}", "kind": "conv", "params": 100 + i, "flops_x": 1.0 + i / 1000,
             "latency_x": 1.0 + i / 1000, "latency_x_low": 0.9, "latency_x_high": 1.1}
            for i in range(8)]
    fig, labels = compare_figure(rows)
    renderer = fig.canvas.get_renderer()
    assert len(labels) == 8
    assert _overlapping([label.get_window_extent(renderer) for label in labels]) == []
    assert plot_compare(rows, tmp_path / "p.png").stat().st_size > 10_000


def test_a_dynamic_conv_is_not_faster_than_the_conv_inside_it() -> None:
    """The figure that was 125x off on a loaded machine: dynamic_conv runs a conv of the
    baseline's shape plus its routing, so its paired ratio cannot be far below 1."""
    rows = compare(["dynamic_conv"], in_channels=16, input_size=(24, 24), batch=2, budget=2)
    dynamic = next(r for r in rows if r["block"] == "dynamic_conv")
    assert dynamic["latency_x"] > 0.6, dynamic


def test_cli_unknown_names_suggest_blocks_and_networks(capsys) -> None:
    code, out, err = _run(capsys, "profile", "resnt18")
    assert code == 2 and out == ""
    assert "resnet18" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, "profile", "se", "--plot", "x.png")
    assert code == 2 and "--plot" in err


def test_model_table_shows_progress_on_stderr(capsys) -> None:
    from blockzoo.models.table import model_rows

    rows = model_rows(["resnet_cifar"])
    err = capsys.readouterr().err
    assert [r["model"] for r in rows] == ["resnet_cifar"]
    assert "models" in err and "1/1" in err and "resnet_cifar" in err
    model_rows(["resnet_cifar"], progress=False)
    assert capsys.readouterr().err == ""
