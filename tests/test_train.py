"""``blockzoo train`` / ``bench-accuracy``: learning, bit-for-bit resume, DDP, data, CLI.

Everything runs offline on tiny synthetic images (16x16) and a narrow resnet_cifar.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import socket
import subprocess
import sys
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
    loaders = engine._Loaders(build_data("synthetic", image_size=16, train_size=64), config, env)

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
