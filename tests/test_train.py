"""``blockzoo train`` / ``bench-accuracy``: learning, bit-for-bit resume, DDP, data, CLI.

Everything runs offline on tiny synthetic images (16x16) and a narrow resnet_cifar.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
from PIL import Image

import blockzoo as bz
from blockzoo.cli import main as cli_main
from blockzoo.core import count_flops
from blockzoo.models import create_model
from blockzoo.train import bench, checkpoint, data, engine
from blockzoo.train.build import WarmupCosine
from blockzoo.train.cli import parse_kwargs
from blockzoo.train.config import TrainConfig
from blockzoo.train.data import Augmented, build_data, make_synthetic
from blockzoo.train.engine import train
from blockzoo.train.loaders import Loaders
from blockzoo.train.metrics import read_metrics

#: A narrow resnet_cifar (one bottleneck per stage, 3x3 widths 8/8/16/16) for 16x16 images.
TINY = dict(layers=(1, 1, 1, 1), widths=(32, 32, 64, 64), stem_width=16, strides=(1, 2, 2, 1))
TINY_ARGS = ["--model-kwargs", "layers=(1,1,1,1)", "widths=(32,32,64,64)", "stem_width=16",
             "strides=(1,2,2,1)"]


def tiny_config(out: Path, **kw) -> TrainConfig:
    base = dict(image_size=16, train_size=256, val_size=64, epochs=2, batch_size=32,
                model_kwargs=dict(TINY), out=str(out), progress=False, warmup_epochs=0.5)
    base.update(kw)
    return TrainConfig(**base)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.update(extra)
    return env


# --------------------------------------------------------------------------- learning


def test_synthetic_training_learns_well_above_chance(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, train_size=1200, val_size=400, epochs=6)
    result = train(config)
    accs = [row["val_acc"] for row in result.history]
    # 10 balanced classes: chance is 10%. The validation images are generated independently of
    # the training images, so only learning can get there.
    assert result.val_acc > 40.0, accs
    assert accs[-1] > accs[0] + 15, accs
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    rows = read_metrics(tmp_path / engine.METRICS)
    assert [r["epoch"] for r in rows] == list(range(1, 7))  # numbered as the log numbers them
    assert rows[-1]["val_acc"] == pytest.approx(result.val_acc)
    assert all(r["temperature"] == "" for r in rows)  # no dynamic conv: no schedule
    # The learning rate warms up (half an epoch) to at most 0.1, then decays (cosine).
    lrs = [r["lr"] for r in rows]
    assert lrs[0] < 0.01 and 0.09 < lrs[1] <= 0.1 and lrs[-1] < 0.01
    assert lrs[1:] == sorted(lrs[1:], reverse=True)


# --------------------------------------------------------------------------- resume


class _Killed(Exception):
    pass


def _kill_after_first_epoch(epoch: int, row: dict) -> None:
    if epoch == 0:
        raise _Killed


def test_resume_continues_bit_for_bit(tmp_path: Path) -> None:
    # dynamic_conv exercises the temperature schedule, dropout the global RNG; the data order
    # and the augmentation have their own seeds.
    cfg = dict(conv="dynamic_conv", attention="se", model_kwargs=dict(TINY, drop_rate=0.3))
    full = train(tiny_config(tmp_path / "full", **cfg))
    with pytest.raises(_Killed):
        train(tiny_config(tmp_path / "cut", **cfg), on_epoch_end=[_kill_after_first_epoch])
    assert checkpoint.load_checkpoint(tmp_path / "cut" / engine.CHECKPOINT)["epoch"] == 1
    assert not (tmp_path / "cut" / engine.WEIGHTS).exists()
    resumed = train(tiny_config(tmp_path / "cut", resume=True, **cfg))
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    timing = ("train_images_per_s", "epoch_time_s")
    strip = [{k: v for k, v in r.items() if k not in timing}
             for r in read_metrics(tmp_path / "full" / engine.METRICS)]
    assert [{k: v for k, v in r.items() if k not in timing}
            for r in read_metrics(tmp_path / "cut" / engine.METRICS)] == strip
    assert [r["temperature"] for r in strip] == [30.0, 1.0]  # DY-Conv annealed 30 -> 1
    assert [r["epoch"] for r in resumed.history] == [1, 2]  # history includes epoch 1
    # The final weights, as safetensors, are the model's.
    exported, _ = bz.load_trained(tmp_path / "cut")
    for key, value in exported.state_dict().items():
        assert torch.equal(value, b[key]), key


def test_resume_refuses_other_settings_and_overwriting(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, epochs=1, train_size=64, val_size=20)
    train(config)
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        train(config)
    with pytest.raises(ValueError, match=r"lr \(checkpoint 0.1, now 0.5\)"):
        train(dataclasses.replace(config, resume=True, lr=0.5))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(dataclasses.replace(config, out=str(tmp_path / "empty"), resume=True))


def test_checkpoint_is_weights_only_and_restores_rng(tmp_path: Path) -> None:
    import random

    import numpy as np

    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    state = {"rng": checkpoint.rng_state(), "x": torch.arange(3)}
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    path = checkpoint.save_checkpoint(state, tmp_path / "c.pt")
    loaded = torch.load(path, weights_only=True)  # plain data only: loads without pickled code
    assert checkpoint.load_checkpoint(path)["x"].tolist() == [0, 1, 2]  # checksum verified
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    checkpoint.set_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(4), expected[0])
    assert np.array_equal(np.random.rand(4), expected[1])
    assert [random.random() for _ in range(4)] == expected[2]
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = checkpoint.save_checkpoint({"epoch": 1}, tmp_path / "last.pt")
    good = path.read_bytes()

    def dies_halfway(obj: object, f: io.BufferedWriter) -> None:
        f.write(good[: len(good) // 2])
        raise KeyboardInterrupt  # killed while writing

    monkeypatch.setattr(checkpoint.torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint({"epoch": 2}, path)
    assert path.read_bytes() == good
    assert checkpoint.load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_each_epoch_has_its_own_order_and_augmentation(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, train_size=64)
    env = engine.init_distributed("cpu")
    loaders = Loaders(build_data("synthetic", image_size=16, train_size=64), config, env)

    def first_batch(epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        loaders.set_epoch(epoch)
        return next(iter(loaders.train))

    x0, y0 = first_batch(0)
    x1, y1 = first_batch(1)
    assert not torch.equal(y0, y1)  # another order
    again = first_batch(0)
    assert torch.equal(again[0], x0) and torch.equal(again[1], y0)
    # The same images in another epoch are cropped and flipped differently.
    loaders.set_epoch(0)
    epoch0 = [loaders.train_set[i][0] for i in range(8)]
    loaders.set_epoch(1)
    assert not all(torch.equal(loaders.train_set[i][0], x) for i, x in enumerate(epoch0))


def test_warmup_cosine_schedule() -> None:
    f = WarmupCosine(warmup=4, total=14)
    assert [f(t) for t in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0
    assert f(9) == pytest.approx(0.5)
    assert f(14) == pytest.approx(0.0, abs=1e-12)
    assert WarmupCosine(0, 10)(0) == 1.0


# --------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_gloo_via_torchrun(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "blockzoo",
           "train", "--data", "synthetic", "--image-size", "16", "--train-size", "256",
           "--val-size", "201", "--epochs", "2", "--batch-size", "32", "--device", "cpu",
           "--conv", "dynamic_conv", "--out", str(out), *TINY_ARGS]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    # Rank 0 alone logs (the replicas were checked equal after training, or it would fail).
    assert "2 processes on cpu" in log
    assert log.count("epoch 1/2 |") == 1 and log.count("final val acc") == 1, log
    rows = read_metrics(out / engine.METRICS)
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:  # evaluated on all 201 images (both shards summed), not rank 0's 101
        correct = r["val_acc"] * 201 / 100
        assert abs(correct - round(correct)) < 1e-6, r["val_acc"]
    saved = checkpoint.load_checkpoint(out / engine.CHECKPOINT)
    assert saved["world_size"] == 2 and saved["epoch"] == 2
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "run.json", "metrics.csv", "last.pt", "previous.pt", "best.pt",
         "model.safetensors"])


# --------------------------------------------------------------------------- bench-accuracy


def test_bench_accuracy_tiny_grid_and_resume_skip(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    base = tiny_config(tmp_path, epochs=1, train_size=96, val_size=40)
    out = tmp_path / "bench"
    calls: list[tuple] = []
    real_train = bench.train

    def counting_train(config: TrainConfig) -> engine.TrainResult:
        calls.append((config.conv, config.attention, config.seed, config.resume))
        return real_train(config)

    monkeypatch.setattr(bench, "train", counting_train)
    grid = (["conv", "dynamic_conv"], ["none", "se"], [0])
    summary = bench.bench_accuracy(*grid, base, out)
    assert calls == [(None, None, 0, False), (None, "se", 0, False),
                     ("dynamic_conv", None, 0, False), ("dynamic_conv", "se", 0, False)]
    rows = bench.read_results(out / "results.csv")
    assert len(rows) == 4
    by = {(r["block"], r["attention"]): r for r in rows}
    model = create_model("resnet_cifar", num_classes=10, conv="dynamic_conv", attention="se",
                         **TINY)
    assert by["dynamic_conv", "se"]["params"] == sum(p.numel() for p in model.parameters())
    flops = count_flops(model.eval(), torch.zeros(1, 3, 16, 16))
    assert by["dynamic_conv", "se"]["mflops"] == pytest.approx(flops / 1e6)
    assert by["conv", "se"]["mflops"] < by["dynamic_conv", "se"]["mflops"]
    assert by["conv", "se"]["params"] > by["conv", "none"]["params"]
    assert [(t["block"], t["attention"]) for t in summary] == [
        ("conv", "none"), ("conv", "se"), ("dynamic_conv", "none"), ("dynamic_conv", "se")]
    assert summary[0]["delta"] == 0.0
    table = (out / "results.md").read_text()
    assert table.startswith("| block | attention | val acc % (mean ± std) |")
    assert f"{by['conv', 'se']['val_acc']:.2f} ± 0.00" in table
    assert (out / "accuracy_vs_flops.png").stat().st_size > 1000

    # Run again: everything is done, nothing trains.
    calls.clear()
    bench.bench_accuracy(*grid, base, out)
    assert calls == []
    # A run that finished training but whose row was lost: resumed from its checkpoint (no new
    # epoch) and recorded, the others skipped.
    lines = (out / "results.csv").read_text().splitlines()
    (out / "results.csv").write_text("\n".join(lines[:-1]) + "\n")
    bench.bench_accuracy(*grid, base, out)
    assert calls == [("dynamic_conv", "se", 0, True)]
    again = bench.read_results(out / "results.csv")
    assert again[-1] == rows[-1]  # the same figures, read back from the run's metrics
    # Other shared settings on the same folder are refused.
    with pytest.raises(ValueError, match="other settings: epochs"):
        bench.bench_accuracy(*grid, dataclasses.replace(base, epochs=2), out)
    with pytest.raises(ValueError, match="attention-kind"):
        bench.bench_accuracy(["conv"], ["dynamic_conv"], [0], base, tmp_path / "b2")


def test_summary_statistics() -> None:
    rows = [{"block": "conv", "attention": "none", "seed": s, "val_acc": a, "params": 10,
             "mflops": 1.0, "train_images_per_s": 100.0 + s} for s, a in enumerate([50, 52, 57])]
    rows += [{"block": "x", "attention": "se", "seed": 0, "val_acc": 60.0, "params": 12,
              "mflops": 2.0, "train_images_per_s": 90.0}]
    summary = bench.summarize(rows, ["conv", "x"], ["none", "se"])
    assert len(summary) == 2
    assert summary[0]["acc_mean"] == pytest.approx(53.0)
    assert summary[0]["acc_std"] == pytest.approx(math.sqrt((9 + 1 + 16) / 2))  # sample std
    assert summary[0]["train_images_per_s"] == pytest.approx(101.0)
    assert summary[1]["delta"] == pytest.approx(7.0)


# --------------------------------------------------------------------------- data


def test_synthetic_data_is_deterministic_balanced_and_split() -> None:
    a, b = make_synthetic(200, 16, seed=1), make_synthetic(200, 16, seed=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.images.shape == (200, 3, 16, 16) and a.images.dtype == torch.uint8
    assert torch.bincount(a.labels).tolist() == [20] * 10
    assert not torch.equal(make_synthetic(200, 16, seed=2).images, a.images)
    bundle = build_data("synthetic", image_size=16, train_size=50, val_size=30)
    assert (len(bundle.train), len(bundle.val), bundle.num_classes) == (50, 30, 10)
    # Training and validation images are different draws.
    flat = {bytes(img.numpy()) for img in bundle.train.images}
    assert not any(bytes(img.numpy()) in flat for img in bundle.val.images)


def test_augmentation_depends_only_on_seed_epoch_index() -> None:
    base = make_synthetic(64, 16)
    aug = Augmented(base, pad=2, seed=7)
    first = [aug[i][0] for i in range(8)]
    assert all(torch.equal(x, aug[i][0]) for i, x in enumerate(first))
    aug.set_epoch(1)
    assert not all(torch.equal(x, aug[i][0]) for i, x in enumerate(first))
    aug.set_epoch(0)
    loaders = [torch.utils.data.DataLoader(aug, batch_size=16, num_workers=w) for w in (0, 2)]
    for (x0, y0), (x2, y2) in zip(*loaders, strict=True):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)


def test_missing_cifar_names_the_expected_path(tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "cifar-10-batches-py")):
        build_data("cifar10", tmp_path, download=False)
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        build_data("cifar100", tmp_path, download=False)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "train")):
        build_data("imagefolder", tmp_path)
    code = cli_main(["train", "--data", "cifar10", "--data-root", str(tmp_path),
                     "--no-download", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"CIFAR-10 not found at {tmp_path / 'cifar-10-batches-py'}" in err
    assert "downloading is disabled" in err


def test_failed_cifar_download_is_a_clear_error(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    def no_network(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", no_network)
    with pytest.raises(FileNotFoundError, match="the download failed .*no route to host"):
        build_data("cifar10", tmp_path, download=True)


def test_cifar_arrays_become_uint8_chw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np
    import torchvision

    class FakeCIFAR:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            n = 6 if train else 4
            self.data = np.arange(n * 32 * 32 * 3, dtype=np.uint8).reshape(n, 32, 32, 3)
            self.targets = list(range(n))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR)
    (tmp_path / "cifar-10-batches-py").mkdir()
    bundle = build_data("cifar10", tmp_path, download=False, train_size=5)
    image, label = bundle.train[1]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and label == 1
    assert torch.equal(image, torch.from_numpy(FakeCIFAR(".", True, False).data[1]).permute(2, 0,
                                                                                          1))
    assert (len(bundle.train), len(bundle.val), bundle.num_classes) == (5, 4, 10)
    assert bundle.mean == data.CIFAR10_STATS[0]
    with pytest.raises(ValueError, match="32x32"):
        build_data("cifar10", tmp_path, image_size=64, download=False)


def test_imagefolder_resizes_and_keeps_classes(tmp_path: Path) -> None:
    for split in ("train", "val"):
        for c, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
            folder = tmp_path / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40 + i * 7, 30), colour).save(folder / f"{i}.png")
    bundle = build_data("imagefolder", tmp_path, image_size=24)
    assert bundle.num_classes == 2 and len(bundle.train) == 4 and bundle.image_size == 24
    image, label = bundle.val[3]
    assert image.shape == (3, 24, 24) and image.dtype == torch.uint8 and label == 1
    assert image[2].min() == 255 and image[0].max() == 0  # blue
    # It trains (two loader workers decode the PNGs).
    result = train(tiny_config(tmp_path / "run", data="imagefolder", data_root=str(tmp_path),
                               epochs=1, batch_size=2, workers=2))
    assert result.num_classes == 2 and result.image_size == 16 and len(result.history) == 1
    (tmp_path / "val" / "class2").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "class2" / "0.png")
    with pytest.raises(ValueError, match="class folders"):
        build_data("imagefolder", tmp_path, image_size=24)


# --------------------------------------------------------------------------- options, CLI


def test_settings_that_cannot_work_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="CUDA devices only"):
        train(tiny_config(tmp_path, amp=True, device="cpu"))
    with pytest.raises(ValueError, match="optimizer"):
        train(tiny_config(tmp_path, optimizer="lion"))
    assert parse_kwargs(["layers=(1, 2)", "stem=cifar", "drop_rate=0.1"]) == {
        "layers": (1, 2), "stem": "cifar", "drop_rate": 0.1}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_kwargs(["layers"])


def test_tensorboard_logging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tiny_config(tmp_path, epochs=1, train_size=64, val_size=20, tensorboard=True,
                      optimizer="adamw", label_smoothing=0.1, channels_last=True))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"val_acc", "train_loss", "lr"} <= set(events.Tags()["scalars"])
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    with pytest.raises(ValueError, match="pip install tensorboard"):
        train(tiny_config(tmp_path / "b", tensorboard=True))


def test_cli_train_through_the_entry_point(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "--data", "synthetic", "--image-size", "16", "--train-size", "96",
            "--val-size", "40", "--epochs", "1", "--batch-size", "32", "--attention", "se",
            "--label-smoothing", "0.1", "--out", str(out), *TINY_ARGS]
    script = Path(sys.executable).with_name("blockzoo")
    result = subprocess.run([str(script), *args], capture_output=True, text=True, timeout=300,
                            env=_env())
    assert result.returncode == 0, result.stderr
    assert "final val acc" in result.stdout and "epoch 1/1 |" in result.stderr
    with open(out / "metrics.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 1
    model, _ = bz.load_trained(out)
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 10)
    # bench-accuracy through the in-process entry point: the table goes to stdout.
    bench_args = ["bench-accuracy", "--blocks", "conv", "--attention", "none,gc", "--seeds",
                  "1", "--image-size", "16", "--train-size", "64", "--val-size", "20",
                  "--epochs", "1", "--no-progress", "--out", str(tmp_path / "bench"),
                  *TINY_ARGS]
    stdout = io.StringIO()
    with redirect_stderr(io.StringIO()), redirect_stdout(stdout):
        assert cli_main(bench_args) == 0
        with pytest.raises(SystemExit) as exit_info:
            cli_main([*bench_args[:6], "0", *bench_args[7:]])  # --seeds 0
        assert exit_info.value.code == 2
    lines = stdout.getvalue().splitlines()
    assert lines[0].startswith("| block | attention |") and len(lines) == 4
    assert lines[3].startswith("| conv | gc |")
    # Help of both subcommands through the in-process entry point.
    for command in ("train", "bench-accuracy"):
        buffer = io.StringIO()
        with redirect_stderr(buffer), pytest.raises(SystemExit) as exit_info:
            cli_main([command, "--nope"])
        assert exit_info.value.code == 2 and "unrecognized arguments" in buffer.getvalue()


# --------------------------------------------------------------------------- faults

#: An even smaller resnet_cifar for the fault tests (8k parameters).
SMALL = dict(layers=(1, 1, 1, 1), widths=(16, 16, 32, 32))
SMALL_ARGS = ["--model-kwargs", "layers=(1,1,1,1)", "widths=(16,16,32,32)"]


def small_config(out: Path, **kw) -> TrainConfig:
    return tiny_config(out, **{"model_kwargs": dict(SMALL), "train_size": 64, "val_size": 32,
                               "batch_size": 16, **kw})


def _run_cli(args: list[str]) -> tuple[int, str, str]:
    """``blockzoo ARGS`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = cli_main(args)
        except SystemExit as exit_info:
            code = exit_info.code
    return code, out.getvalue(), err.getvalue()


def _error_line(stderr: str) -> str:
    """The one line a user error prints (and nothing else: no traceback)."""
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, stderr
    assert len(lines) >= 1
    return lines[-1]


def test_divergence_stops_with_epoch_and_step_and_exports_nothing(tmp_path: Path) -> None:
    code, _, err = _run_cli(["train", "--data", "synthetic", "--image-size", "16",
                             "--train-size", "64", "--val-size", "32", "--batch-size", "16",
                             "--epochs", "2", "--lr", "1e30", "--no-progress", "--out",
                             str(tmp_path / "a"), *SMALL_ARGS])
    line = _error_line(err)
    assert code == 1
    assert re.search(r"non-finite training loss \(nan\) at epoch 1, step \d+ of 4", line), line
    assert "--skip-nonfinite" in line and "final val acc" not in err
    assert not (tmp_path / "a" / engine.WEIGHTS).exists()
    assert not (tmp_path / "a" / engine.CHECKPOINT).exists()


def test_divergence_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    holder: dict = {}

    def poison(epoch: int, row: dict) -> None:
        if epoch == 0:  # the weights go bad after the first epoch's checkpoint
            with torch.no_grad():
                next(holder["model"].parameters()).fill_(float("nan"))

    real_build = engine.build_model

    def keep(config: TrainConfig, num_classes: int) -> torch.nn.Module:
        holder["model"] = real_build(config, num_classes)
        return holder["model"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "build_model", keep)
        with pytest.raises(engine.TrainingDiverged,
                           match=r"at epoch 2, step 1 of 4: .*last good checkpoint"):
            train(small_config(tmp_path, epochs=3), on_epoch_end=[poison])
    saved = checkpoint.load_checkpoint(tmp_path / engine.CHECKPOINT)
    assert saved["epoch"] == 1 and saved["step"] == 0
    assert all(torch.isfinite(t).all() for t in saved["model"].values())
    assert not (tmp_path / engine.WEIGHTS).exists()
    assert [r["epoch"] for r in read_metrics(tmp_path / engine.METRICS)] == [1]


def test_skip_nonfinite_skips_and_counts_bad_batches(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    calls = {"n": 0}
    real_inputs = engine._Trainer._inputs

    def inputs(self, images, labels):
        x, y = real_inputs(self, images, labels)
        calls["n"] += 1
        if calls["n"] == 2 and self.model.training:  # the second training batch goes bad
            x = x * float("nan")
        return x, y

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine._Trainer, "_inputs", inputs)
        result = train(small_config(tmp_path, epochs=1, skip_nonfinite=True))
    rows = read_metrics(tmp_path / engine.METRICS)
    assert rows[0]["skipped_batches"] == 1
    assert "skipped 1 non-finite batches" in capsys.readouterr().err
    assert all(torch.isfinite(t).all() for t in result.model.state_dict().values())
    tensors, _ = checkpoint.read_safetensors(tmp_path / engine.WEIGHTS)
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def _kill_after_epoch(number: int):
    def kill(epoch: int, row: dict) -> None:
        if row["epoch"] == number:
            raise _Killed

    return kill


def _flip_middle(path: Path, count: int = 16) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_bit_flip_and_truncation_are_one_line_errors_and_resume_falls_back(
        tmp_path: Path) -> None:
    config = small_config(tmp_path / "run", epochs=3)
    with pytest.raises(_Killed):
        train(config, on_epoch_end=[_kill_after_epoch(2)])
    last, previous = tmp_path / "run" / "last.pt", tmp_path / "run" / "previous.pt"
    assert checkpoint.load_checkpoint(last)["epoch"] == 2
    assert checkpoint.load_checkpoint(previous)["epoch"] == 1
    good = last.read_bytes()
    _flip_middle(last)
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(str(last))):
        checkpoint.load_checkpoint(last)
    last.write_bytes(good[: len(good) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="corrupt or truncated"):
        checkpoint.load_checkpoint(last)
    # --resume falls back to the previous good checkpoint and finishes the run.
    code, _, err = _run_cli(_resume_args(config))
    assert code == 0, err
    assert f"resuming from {previous} (epoch 1)" in err
    assert [r["epoch"] for r in read_metrics(tmp_path / "run" / engine.METRICS)] == [1, 2, 3]
    assert checkpoint.load_checkpoint(last)["epoch"] == 3
    # Both bad: one line naming the file, exit 2.
    _flip_middle(last)
    previous.write_bytes(b"")
    code, _, err = _run_cli(_resume_args(config))
    line = _error_line(err)
    assert code == 2 and str(last) in line and "no good checkpoint" in line
    # The exported weights carry a checksum too.
    weights = tmp_path / "run" / engine.WEIGHTS
    _flip_middle(weights, 4)
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(str(weights))):
        bz.load_trained(tmp_path / "run")


def _resume_args(config: TrainConfig) -> list[str]:
    """The ``blockzoo train`` command line of ``config`` with ``--resume``."""
    kwargs = [f"{k}={v!r}".replace(" ", "") for k, v in config.model_kwargs.items()]
    return ["train", "--resume", "--out", config.out, "--data", config.data, "--image-size",
            str(config.image_size), "--train-size", str(config.train_size), "--val-size",
            str(config.val_size), "--batch-size", str(config.batch_size), "--epochs",
            str(config.epochs), "--warmup-epochs", str(config.warmup_epochs), "--no-progress",
            "--model-kwargs", *kwargs]


def test_refused_pickle_has_our_message(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    out = tmp_path / "run"
    out.mkdir()
    torch.save({"epoch": 1, "model": Evil()}, out / "last.pt")
    code, _, err = _run_cli(_resume_args(small_config(out)))
    line = _error_line(err)
    assert code == 2 and str(out / "last.pt") in line and "refused" in line
    assert "weights_only" not in err and "owned" not in err


def test_stale_temporary_files_are_removed_at_start(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    tmp_path.mkdir(exist_ok=True)
    stale = [tmp_path / ".last.pt.999999999.tmp", tmp_path / ".model.safetensors.999999998.tmp"]
    live = tmp_path / f".last.pt.{os.getppid()}.tmp"  # a writer that is still running
    for path in [*stale, live]:
        path.write_bytes(b"x" * 100)
    train(small_config(tmp_path, epochs=1))
    assert not any(p.exists() for p in stale) and live.exists()
    assert "removed 2 stale temporary file(s)" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp") and p != live]


def _start_training(out: Path, epochs: int, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "blockzoo", "train", "--data", "synthetic", "--image-size",
           "16", "--train-size", "160", "--val-size", "16", "--batch-size", "16", "--epochs",
           str(epochs), "--no-progress", "--seed", "1", "--out", str(out), *SMALL_ARGS, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())


def _interrupt_after_first_epoch(proc: subprocess.Popen, signum: int) -> tuple[str, str]:
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("epoch 1/"):
            break
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    return out, "".join(lines) + err


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_writes_a_resumable_checkpoint_and_prints_the_resume_command(
        tmp_path: Path, signum: int, code: int) -> None:
    out = tmp_path / "run"
    proc = _start_training(out, 3)
    _, err = _interrupt_after_first_epoch(proc, signum)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    name = signal.Signals(signum).name
    assert re.match(rf"blockzoo train: interrupted by {name} after (step \d+ of epoch 2|epoch "
                    r"\d+); checkpoint written to .*; resume with: blockzoo train .*--resume$",
                    last), last
    saved = checkpoint.load_checkpoint(out / engine.CHECKPOINT)
    assert saved["epoch"] >= 1
    if signum == signal.SIGTERM:
        return
    # The printed command resumes, and the result is the uninterrupted run's, bit for bit.
    command = shlex.split(last.split("resume with: ", 1)[1])
    assert command[0] == "blockzoo"
    resumed = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True,
                             timeout=300, env=_env())
    assert resumed.returncode == 0, resumed.stderr
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): the same float sums
    try:
        reference = train(small_config(tmp_path / "ref", epochs=3, train_size=160, val_size=16,
                                       seed=1, warmup_epochs=1.0, model_kwargs=dict(SMALL)))
    finally:
        torch.set_num_threads(threads)
    a, _ = checkpoint.read_safetensors(out / engine.WEIGHTS)
    b = reference.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["epoch"] for r in read_metrics(out / engine.METRICS)] == [1, 2, 3]


def test_profile_compare_and_bench_stop_cleanly_on_signals(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    import blockzoo.tools.profile as profile_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr(profile_module, "profile", interrupted)
    code, _, err = _run_cli(["profile", "se"])
    assert code == 130 and _error_line(err) == "blockzoo profile: interrupted by SIGINT"
    monkeypatch.setattr(profile_module, "compare", terminated)
    code, _, err = _run_cli(["compare", "se", "gc"])
    assert code == 143 and _error_line(err) == "blockzoo compare: interrupted by SIGTERM"
    # bench-accuracy: the run in progress writes its checkpoint; the same command continues.
    real_train = bench.train

    def signalled_train(config: TrainConfig) -> engine.TrainResult:
        def sigint(epoch: int, row: dict) -> None:
            if epoch == 0 and not config.resume:
                os.kill(os.getpid(), signal.SIGINT)
        return real_train(config, on_epoch_end=[sigint])

    monkeypatch.setattr(bench, "train", signalled_train)
    args = ["bench-accuracy", "--blocks", "conv", "--attention", "none", "--seeds", "1",
            "--image-size", "16", "--train-size", "32", "--val-size", "16", "--batch-size",
            "16", "--epochs", "2", "--no-progress", "--out", str(tmp_path / "b"), *SMALL_ARGS]
    code, _, err = _run_cli(args)
    line = _error_line(err)
    assert code == 130 and line.endswith(f"resume with: blockzoo {shlex.join(args)}"), line
    code, out, err = _run_cli(args)
    assert code == 0, err
    assert out.startswith("| block | attention |")


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("args", [
    ["train", "--image-size", "0"], ["train", "--train-size", "0"], ["train", "--val-size", "0"],
    ["train", "--weight-decay", "-1"], ["train", "--epochs", "0"], ["train", "--batch-size", "0"],
    ["train", "--lr", "0"], ["train", "--lr", "nan"], ["train", "--label-smoothing", "1"],
    ["train", "--workers", "-1"], ["train", "--temperature-start", "0"],
    ["bench-accuracy", "--seeds", "0"], ["profile", "se", "--size", "0"],
    ["profile", "se", "--batch", "0"], ["profile", "se", "--repeat", "0"],
    ["compare", "se", "--in", "0"], ["predict", "run", "x.png", "--topk", "0"],
])
def test_bad_numbers_are_one_line_usage_errors(args: list[str]) -> None:
    code, _, err = _run_cli(args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"blockzoo {args[0]}: error: argument "), err
    assert args[-2] in err and "Traceback" not in err


def test_zero_is_a_value_not_unset_and_model_kwargs_are_checked(tmp_path: Path) -> None:
    for field_name in ("image_size", "train_size", "val_size"):
        with pytest.raises(ValueError, match=f"{field_name} must be >= 1, got 0"):
            TrainConfig(**{field_name: 0}).validate()
        with pytest.raises(ValueError, match=f"{field_name} must be >= 1"):
            build_data("synthetic", **{field_name: 0})
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        TrainConfig(weight_decay=-1.0).validate()
    args = ["train", "--model-kwargs", "bogus=1", "--out", str(tmp_path / "x"),
            "--image-size", "16", "--train-size", "16", "--val-size", "16"]
    code, _, err = _run_cli(args)
    assert code == 2
    assert _error_line(err) == ("blockzoo train: error: model 'resnet_cifar' has no option "
                                "'bogus' (--model-kwargs)")
    code, _, err = _run_cli(["train", "--model-kwargs", "layers=5", "--out",
                             str(tmp_path / "y"), "--image-size", "16", "--train-size", "16",
                             "--val-size", "16"])
    assert code == 2 and "cannot build model 'resnet_cifar'" in _error_line(err)
    with redirect_stderr(io.StringIO()), pytest.raises(ValueError, match="bogus"):
        cli_main(["--debug", *args])  # --debug: the exception itself, with its traceback
    with redirect_stderr(io.StringIO()), pytest.raises(ValueError, match="bogus"):
        cli_main([*args, "--debug"])


def _image_folder(root: Path, classes: dict[str, tuple[int, int, int]], per_class: int = 6,
                  size: int = 20) -> None:
    """train/ and val/ with ``per_class`` noisy solid-colour PNG/JPEG images per class."""
    gen = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for name, colour in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                noise = torch.randint(-30, 31, (size, size + 4, 3), generator=gen)
                pixels = (torch.tensor(colour) + noise).clamp(0, 255).to(torch.uint8).numpy()
                suffix = "png" if i % 2 else "jpg"
                Image.fromarray(pixels).save(folder / f"{i}.{suffix}")


COLOURS = {"blue": (20, 40, 230), "green": (30, 220, 40), "red": (230, 30, 30)}


def test_bad_images_are_reported_before_training_or_skipped(tmp_path: Path) -> None:
    _image_folder(tmp_path / "data", COLOURS, per_class=2)
    root = tmp_path / "data"
    (root / "train" / "red" / "empty.png").write_bytes(b"")
    good_jpeg = (root / "train" / "blue" / "0.jpg").read_bytes()
    (root / "train" / "blue" / "cut.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    good_png = (root / "val" / "green" / "1.png").read_bytes()
    (root / "val" / "green" / "cut.png").write_bytes(good_png[: len(good_png) - 20])
    (root / "val" / "red" / "text.jpg").write_text("not an image")
    args = ["train", "--data", "imagefolder", "--data-root", str(root), "--image-size", "16",
            "--epochs", "1", "--batch-size", "4", "--workers", "0", "--no-progress",
            "--out", str(tmp_path / "run"), *SMALL_ARGS]
    code, _, err = _run_cli(args)
    line = _error_line(err)
    assert code == 2 and line.startswith("blockzoo train: error: 4 unreadable image(s) in")
    assert "empty.png (empty file)" in line and "cut.jpg (truncated" in line
    assert "and 1 more" in line and "--skip-bad-images" in line
    assert not (tmp_path / "run" / "last.pt").exists()  # nothing trained
    code, _, err = _run_cli([*args, "--skip-bad-images"])
    assert code == 0, err
    assert "skipped 4 unreadable image(s) (--skip-bad-images)" in err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train_size"] == 6
    assert data.image_problem(root / "val" / "green" / "cut.png").startswith("truncated")
    assert data.image_problem(root / "val" / "red" / "text.jpg") == "not a readable image"
    assert data.image_problem(root / "val" / "green" / "1.png") is None


def test_default_workers_never_exceed_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert data.default_workers("imagefolder") == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert data.default_workers("imagefolder") == 4
    assert data.default_workers("synthetic") == 0


# --------------------------------------------------------------------------- using a run


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("colours")
    _image_folder(root / "data", COLOURS)
    out = root / "run"
    code, _, err = _run_cli(["train", "--data", "imagefolder", "--data-root",
                             str(root / "data"), "--image-size", "16", "--epochs", "2",
                             "--batch-size", "6", "--workers", "0", "--no-progress",
                             "--lr", "0.05", "--out", str(out), *SMALL_ARGS])
    assert code == 0, err
    return out


def test_run_directory_describes_itself(trained_run: Path) -> None:
    config = json.loads((trained_run / "config.json").read_text())
    assert None not in config.values()
    assert config["lr"] == 0.05 and config["weight_decay"] == 5e-4 and config["device"] == "cpu"
    assert config["image_size"] == 16 and config["workers"] == 0 and config["amp"] is False
    info = json.loads((trained_run / "run.json").read_text())
    assert info["classes"] == ["blue", "green", "red"]
    assert info["preprocessing"] == {"input_size": [3, 16, 16], "resize": 16, "crop": 16,
                                     "mean": list(data.IMAGENET_STATS[0]),
                                     "std": list(data.IMAGENET_STATS[1]),
                                     "interpolation": "bilinear"}
    rows = read_metrics(trained_run / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2]
    best = checkpoint.load_checkpoint(trained_run / "best.pt")
    accs = [r["val_acc"] for r in rows]
    assert best["epoch"] == 1 + accs.index(max(accs)) and best["val_acc"] == max(accs)
    _, meta = checkpoint.read_safetensors(trained_run / "model.safetensors")
    assert json.loads(meta["classes"]) == info["classes"]
    assert json.loads(meta["preprocessing"]) == info["preprocessing"]


def test_load_trained_gives_eval_model_and_the_training_preprocessing(trained_run: Path
                                                                      ) -> None:
    trained = bz.load_trained(trained_run)
    model, transform = trained
    assert not model.training
    assert trained.default_cfg is model.default_cfg  # attributes and calls reach the model
    assert torch.equal(trained(torch.zeros(1, 3, 16, 16)), model(torch.zeros(1, 3, 16, 16)))
    cfg = model.default_cfg
    assert cfg["mean"] == data.IMAGENET_STATS[0] and cfg["std"] == data.IMAGENET_STATS[1]
    assert cfg["classes"] == ["blue", "green", "red"] and cfg["input_size"] == (3, 16, 16)
    # The transform is exactly what training fed the model for the same file.
    bundle = build_data("imagefolder", trained_run.parent / "data", image_size=16)
    image, label = bundle.val[0]
    path = bundle.val.folder.samples[0][0]
    with Image.open(path) as pil:
        x = transform(pil)
    assert torch.equal(x, bundle.preprocessing.normalize(image))
    best, _ = bz.load_trained(trained_run, checkpoint="best")
    saved = checkpoint.load_checkpoint(trained_run / "best.pt")["model"]
    assert all(torch.equal(v, saved[k]) for k, v in best.state_dict().items())


def test_predict_and_eval_end_to_end(trained_run: Path, tmp_path: Path) -> None:
    val = trained_run.parent / "data" / "val"
    code, out, err = _run_cli(["predict", str(trained_run), str(val / "red"),
                               str(val / "blue" / "0.jpg"), "--topk", "5", "--format", "json",
                               "--batch-size", "4"])
    assert code == 0, err
    rows = json.loads(out)
    assert len(rows) == 7 and rows[-1]["path"] == str(val / "blue" / "0.jpg")
    for row in rows:
        assert [t["class"] for t in row["top"]] != [] and len(row["top"]) == 3  # 3 classes
        assert sorted(t["class"] for t in row["top"]) == ["blue", "green", "red"]
        assert sum(t["probability"] for t in row["top"]) == pytest.approx(1.0, abs=1e-5)
    # Same numbers as the model on the transform, one image at a time.
    model, transform = bz.load_trained(trained_run)
    with Image.open(val / "blue" / "0.jpg") as pil, torch.no_grad():
        probs = model(transform(pil)[None]).softmax(1)[0]
    top = rows[-1]["top"][0]
    assert top["probability"] == pytest.approx(probs.max().item(), abs=1e-5)
    assert top["class"] == model.default_cfg["classes"][int(probs.argmax())]
    code, text, _ = _run_cli(["predict", str(trained_run), str(val / "red" / "0.jpg"),
                              "--topk", "2"])
    assert code == 0 and text.splitlines()[0] == str(val / "red" / "0.jpg")
    assert re.match(r"^ +\d+\.\d\d%  (blue|green|red)$", text.splitlines()[1])
    # eval: accuracy, per-class accuracy and the confusion matrix.
    plot = tmp_path / "cm.png"
    code, text, err = _run_cli(["eval", str(trained_run), "--data", str(val.parent),
                                "--plot", str(plot)])
    assert code == 0, err
    result = bz.train.evaluate_folder((model, transform), val)
    assert f"accuracy {result['accuracy']:.2f}% ({sum(int(result['confusion'][i, i]) for i in range(3))}/18 images)" in text  # noqa: E501
    assert result["confusion"].sum() == 18 and set(result["per_class"]) == set(COLOURS)
    for name, r in result["per_class"].items():
        assert r["count"] == 6 and re.search(rf"{name} +6 +{r['correct']} ", text)
    assert plot.stat().st_size > 1000
    code, _, err = _run_cli(["eval", str(trained_run), "--data", str(tmp_path)])
    assert code == 2 and "one folder per class" in _error_line(err)
    code, _, err = _run_cli(["predict", str(trained_run), str(tmp_path / "nope.png")])
    assert code == 2 and "nope.png" in _error_line(err)


def test_predict_with_pretrained_weights_uses_imagenet_names(tmp_path: Path) -> None:
    names = bz.train.imagenet_classes()
    assert len(names) == 1000 and names[0] == "tench" and len(set(names)) == 1000
    model = create_model("mobilenetv2").eval()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "w.safetensors"))
    torch.save(model.state_dict(), tmp_path / "w.pth")
    Image.new("RGB", (300, 200), (200, 120, 40)).save(tmp_path / "cat.jpg")
    for weights in ("w.safetensors", "w.pth"):
        code, out, err = _run_cli(["predict", "mobilenetv2", "--pretrained",
                                   str(tmp_path / weights), str(tmp_path / "cat.jpg"),
                                   "--format", "json", "--topk", "3"])
        assert code == 0, err
        top = json.loads(out)[0]["top"]
        assert len(top) == 3 and all(t["class"] in names for t in top)
    loaded, transform = bz.load_trained("mobilenetv2", pretrained=tmp_path / "w.pth")
    assert transform.resize == 256 and transform.crop == 224
    assert transform.mean == model.default_cfg["mean"]
    with Image.open(tmp_path / "cat.jpg") as pil, torch.no_grad():
        x = transform(pil)[None]
        assert torch.equal(loaded(x), model(x))
    ten = create_model("mobilenetv2", num_classes=10)
    torch.save(ten.state_dict(), tmp_path / "ten.pth")
    loaded, _ = bz.load_trained("mobilenetv2", pretrained=tmp_path / "ten.pth")
    assert loaded.default_cfg["classes"] == [str(i) for i in range(10)]
    code, _, err = _run_cli(["predict", "mobilenetv2", str(tmp_path / "cat.jpg")])
    assert code == 2 and "--pretrained" in _error_line(err)
    code, _, err = _run_cli(["predict", "resnet_cifar", "--pretrained",
                             str(tmp_path / "w.pth"), str(tmp_path / "cat.jpg")])
    assert code == 2 and "resnet_cifar" in _error_line(err)  # the weights do not fit it

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    torch.save({"fc.weight": Evil()}, tmp_path / "evil.pth")
    code, _, err = _run_cli(["predict", "mobilenetv2", "--pretrained",
                             str(tmp_path / "evil.pth"), str(tmp_path / "cat.jpg")])
    line = _error_line(err)
    assert code == 2 and "refused to load" in line and "weights_only" not in err


# --------------------------------------------------------------------------- DY-Conv schedule


def test_trainer_follows_the_models_temperature_schedule() -> None:
    from blockzoo.blocks.dynamic import DY_CONV_TEMPERATURE, DynamicConv2d, TemperatureSchedule
    from blockzoo.train.build import temperature_schedule

    assert DynamicConv2d(8).temperature == DY_CONV_TEMPERATURE.start
    model = create_model("resnet_cifar", num_classes=10, conv="dynamic_conv", **SMALL)
    assert model.default_cfg["temperature_schedule"] == DY_CONV_TEMPERATURE.as_dict()
    default = TemperatureSchedule(model)
    assert (default.start, default.end, default.epochs) == (30.0, 1.0, 10)
    model.default_cfg = {**model.default_cfg,
                         "temperature_schedule": {"start": 8.0, "end": 2.0, "epochs": 3}}
    schedule = temperature_schedule(model, TrainConfig(epochs=20))
    assert (schedule.start, schedule.end, schedule.epochs) == (8.0, 2.0, 3)
    short = temperature_schedule(model, TrainConfig(epochs=2))  # ends before the last epoch
    assert short.epochs == 1
    override = temperature_schedule(model, TrainConfig(epochs=20, temperature_start=4.0))
    assert (override.start, override.end) == (4.0, 2.0)
    assert temperature_schedule(create_model("resnet_cifar", **SMALL), TrainConfig()) is None


def test_a_run_stopped_mid_epoch_resumes_bit_for_bit(tmp_path: Path) -> None:
    cfg = dict(conv="dynamic_conv", model_kwargs=dict(SMALL, drop_rate=0.3), epochs=2)
    full = train(small_config(tmp_path / "full", **cfg))
    calls = {"n": 0}
    real_inputs = engine._Trainer._inputs

    def signal_in_epoch_2(self, images, labels):
        calls["n"] += 1
        if calls["n"] == 7:  # 4 training + 2 validation batches per epoch: epoch 2, step 1
            os.kill(os.getpid(), signal.SIGINT)
        return real_inputs(self, images, labels)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine._Trainer, "_inputs", signal_in_epoch_2)
        with pytest.raises(engine.TrainingInterrupted, match="after step 1 of epoch 2") as info:
            train(small_config(tmp_path / "cut", **cfg))
    assert info.value.exit_code == 130
    saved = checkpoint.load_checkpoint(tmp_path / "cut" / engine.CHECKPOINT)
    assert (saved["epoch"], saved["step"]) == (1, 1) and saved["partial"]["totals"][2] == 16
    resumed = train(small_config(tmp_path / "cut", resume=True, **cfg))
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    timing = ("train_images_per_s", "epoch_time_s")
    strip = [{k: v for k, v in r.items() if k not in timing}
             for r in read_metrics(tmp_path / "full" / engine.METRICS)]
    assert [{k: v for k, v in r.items() if k not in timing}
            for r in read_metrics(tmp_path / "cut" / engine.METRICS)] == strip
