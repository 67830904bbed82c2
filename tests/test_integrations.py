"""Ultralytics YOLO and timm integrations, with the network switched off.

Ultralytics is imported with ``YOLO_OFFLINE=1`` and a temporary ``YOLO_CONFIG_DIR``, and every
socket connection or DNS lookup during these tests fails the test.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import blockzoo as bz

YOLO_DIR = Path(__file__).resolve().parents[1] / "examples" / "yolo"


@contextlib.contextmanager
def no_network() -> Iterator[list[str]]:
    """Record (and refuse) every DNS lookup or connection attempt made inside the block."""
    attempts: list[str] = []

    def refuse(what: str):
        def fail(*args, **kwargs):
            attempts.append(f"{what}{args[:2]}")
            raise OSError(f"network access in a test: {what}")

        return fail

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
        mp.setattr(socket, "create_connection", refuse("create_connection"))
        mp.setattr(socket.socket, "connect", refuse("connect"))
        yield attempts
    assert attempts == [], f"network access attempted: {attempts}"


# --------------------------------------------------------------------------- Ultralytics


@pytest.fixture(scope="module")
def yolo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("YOLO_OFFLINE", "1")
        mp.setenv("YOLO_CONFIG_DIR", str(tmp_path_factory.mktemp("ultralytics")))
        with no_network():
            pytest.importorskip("ultralytics")
            from blockzoo.integrations import ultralytics as bz_yolo
        bz_yolo.register()
        with no_network():
            yield bz_yolo
        bz_yolo.unregister()


def _tasks():
    from ultralytics.nn import tasks

    return tasks


def _tiny(*rows: list, depth: float = 1.0, width: float = 0.5) -> dict:
    """A small classification YAML: a strided Conv, the given rows, Ultralytics' Classify head."""
    return {
        "nc": 5, "depth_multiple": depth, "width_multiple": width,
        "backbone": [[-1, 1, "Conv", [32, 3, 2]], *map(list, rows)],
        "head": [[-1, 1, "Classify", [5]]],
    }


def test_yolov8n_yaml_with_three_blockzoo_blocks(yolo: object) -> None:
    tasks = _tasks()
    from ultralytics.utils.torch_utils import get_flops

    model = tasks.DetectionModel(str(YOLO_DIR / "yolov8n-blockzoo.yaml"), verbose=False).eval()
    layers = model.model
    # Scale n: width 0.25, so SPDConv [256] gets 64 out-channels, and its input is C2f(128 * 0.25).
    assert isinstance(layers[3], bz.SPDConv)
    assert (layers[3].in_channels, layers[3].out_channels, layers[3].stride) == (32, 64, 2)
    assert isinstance(layers[9], bz.CoordinateAttention) and layers[9].in_channels == 256
    assert isinstance(layers[17], bz.GlobalContext) and layers[17].in_channels == 64
    assert layers[17].i == 17 and layers[17].f == -1 and layers[17].type.endswith("GlobalContext")
    assert layers[9].np == sum(p.numel() for p in layers[9].parameters())
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 640, 640))
        assert out[0].shape == (1, 84, 80 * 80 + 40 * 40 + 20 * 20)
        # Non-square, with odd feature maps at stride 32 (13 x 9); YOLO's concatenations need
        # multiples of 32, for Ultralytics' own models too.
        out = model(torch.zeros(1, 3, 416, 288))
        assert out[0].shape == (1, 84, 52 * 36 + 26 * 18 + 13 * 9)
    flops = get_flops(model, 640)
    plain = tasks.DetectionModel("yolov8n.yaml", verbose=False)
    # SPD-Conv's 3x3 conv sees 4x the channels at P3: more FLOPs than YOLOv8n, and counted.
    assert flops > get_flops(plain, 640) > 0
    assert model.stride.tolist() == [8.0, 16.0, 32.0]


def test_howto_five_lines(yolo: object) -> None:
    from ultralytics import YOLO

    model = YOLO(str(YOLO_DIR / "yolov8n-coordatt.yaml"))
    _, params, _, gflops = model.info()
    assert isinstance(model.model.model[9], bz.CoordinateAttention)
    assert model.model.model[9].in_channels == 256
    assert params == sum(p.numel() for p in model.model.parameters()) and gflops > 0


def test_width_multiplier_and_max_channels_apply_to_blockzoo_out_channels(yolo: object) -> None:
    tasks = _tasks()
    cfg = tasks.yaml_model_load(YOLO_DIR / "yolov8n-coordatt.yaml")
    cfg["scale"] = "m"  # depth 0.67, width 0.75, max_channels 768
    cfg["backbone"][3] = [-1, 1, "SPDConv", [256, 2, {"kernel_size": 1}]]
    cfg["backbone"][7] = [-1, 1, "bz.spd_conv", [1024]]
    model = tasks.DetectionModel(cfg, verbose=False)
    # make_divisible(min(c2, max_channels) * width, 8), as for Ultralytics' Conv
    assert model.model[3].out_channels == 192 and model.model[3].conv.conv.kernel_size == (1, 1)
    assert model.model[7].out_channels == 576  # min(1024, 768) * 0.75
    assert model.model[9].in_channels == 576  # CoordAtt follows C2f(1024 -> 576)


def test_yaml_names_aliases_and_ultralytics_names_win(yolo) -> None:
    names = yolo.yaml_names()
    for alias in ("CoordAtt", "coord_att", "CoordinateAttention", "bz.coord_att"):
        assert names[alias] == "coord_att"
    assert names["SPDConv"] == names["SpdConv"] == names["bz.spd_conv"] == "spd_conv"
    assert names["SqueezeExcite"] == names["bz.se"] == "se"
    tasks = _tasks()
    for name in names:
        assert name.startswith("bz.") or name not in vars(tasks)
    if "bottleneck" in bz.list_blocks():  # a blockzoo class that shares Ultralytics' name
        assert "Bottleneck" in vars(tasks) and "Bottleneck" not in names
        assert names["bz.bottleneck"] == "bottleneck"


def test_repeats_options_and_verbose_table(yolo: object) -> None:
    tasks = _tasks()
    cfg = _tiny([-1, 2, "SPDConv", [64]], [-1, 6, "bz.se", [{"reduction": 4}]], depth=0.33)
    model = tasks.ClassificationModel(cfg, verbose=True)
    spd, se = model.model[1], model.model[2]
    # depth 0.33: 2 -> round(0.66) = 1 block, 6 -> 2 blocks; width 0.5: 64 -> 32 channels
    assert isinstance(spd, bz.SPDConv) and (spd.in_channels, spd.out_channels) == (16, 32)
    assert isinstance(se, nn.Sequential) and len(se) == 2 and se.i == 2
    assert all(isinstance(b, bz.SqueezeExcite) and b.rd_channels == 8 for b in se)
    cfg = _tiny([-1, 2, "SPDConv", [64]])
    first, second = tasks.ClassificationModel(cfg, verbose=False).model[1]
    assert (first.in_channels, first.out_channels, second.in_channels) == (16, 32, 32)
    out = model.eval()(torch.randn(1, 3, 64, 96))
    assert (out[0] if isinstance(out, tuple) else out).shape == (1, 5)


def test_bad_rows_raise_clear_errors(yolo: object) -> None:
    tasks = _tasks()
    with pytest.raises(ValueError, match="one input"):
        tasks.ClassificationModel(_tiny([[-1, 0], 1, "CoordAtt", []]), verbose=False)
    with pytest.raises(ValueError, match=r"\[out_channels, stride, \{options\}\]"):
        tasks.ClassificationModel(_tiny([-1, 1, "SPDConv", [64, 2, 3]]), verbose=False)
    with pytest.raises(ValueError, match=r"\[out_channels, stride, \{options\}\]"):
        tasks.ClassificationModel(_tiny([-1, 1, "SPDConv", ["wide"]]), verbose=False)
    with pytest.raises(ValueError, match="out_channels must be None or in_channels"):
        tasks.ClassificationModel(_tiny([-1, 1, "CoordAtt", [64]]), verbose=False)
    if "dense" in bz.list_blocks():  # structural width: the output must be declared
        with pytest.raises(ValueError, match="give its output channels"):
            tasks.ClassificationModel(_tiny([-1, 1, "bz.dense", []]), verbose=False)


def test_unregister_restores_ultralytics_parse_model(yolo) -> None:
    tasks = _tasks()
    assert yolo.is_registered()
    yolo.unregister()
    try:
        assert not yolo.is_registered()
        with pytest.raises(KeyError, match="CoordAtt"):
            tasks.ClassificationModel(_tiny([-1, 1, "CoordAtt", []]), verbose=False)
    finally:
        yolo.register()
        yolo.register()  # idempotent: wraps once
    assert not hasattr(tasks.parse_model.__dict__["_blockzoo_original"], "_blockzoo_original")


def test_yaml_errors_name_the_layer_suggest_names_and_explain_the_width(yolo: object) -> None:
    tasks = _tasks()
    cfg = tasks.yaml_model_load(YOLO_DIR / "yolov8n-coordatt.yaml")  # scale n: width 0.25
    cfg["backbone"][9] = [-1, 1, "CoordAttn", []]
    with pytest.raises(ValueError, match=r"layer 9: unknown module 'CoordAttn'; did you mean "
                                         r"CoordAtt"):
        tasks.DetectionModel(cfg, verbose=False)
    cfg["backbone"][9] = [-1, 1, "coord_att", [128]]
    with pytest.raises(ValueError) as err:
        tasks.DetectionModel(cfg, verbose=False)
    message = str(err.value)
    assert message.startswith("layer 9 (coord_att): CoordinateAttention: ")
    assert "in_channels (256), got 32" in message
    assert "128 output channels are 32" in message and "width multiple 0.25" in message
    assert "its input has 256 channels, which it keeps: leave the output channels out ([])" \
        in message
    cfg["backbone"][9] = [-1, 1, "bz.dense", [128]]  # structural: 256 + 6 * 32 channels out
    with pytest.raises(ValueError) as err:
        tasks.DetectionModel(cfg, verbose=False)
    message = str(err.value)
    assert message.startswith("layer 9 (bz.dense): DenseBlock: out_channels is structural")
    assert "128 output channels are 32" in message and "leave the output" not in message
    cfg["backbone"][9] = [-1, 1, "SPDConv", [64, 2, {"kernel_size": "3"}]]
    with pytest.raises(ValueError, match=r"^layer 9 \(SPDConv\): SPDConv: kernel_size must be"):
        tasks.DetectionModel(cfg, verbose=False)
    cfg["backbone"][9] = [-1, 1, "bz.se", [{"rd_channels": 0}]]
    with pytest.raises(ValueError, match=r"^layer 9 \(bz.se\): SqueezeExcite: rd_channels"):
        tasks.DetectionModel(cfg, verbose=False)


TINY_DETECTOR = """\
nc: 1
depth_multiple: 1.0
width_multiple: 1.0
backbone:
  - [-1, 1, Conv, [8, 3, 2]]
  - [-1, 1, SPDConv, [16]]
  - [-1, 1, Conv, [16, 3, 2]]
  - [-1, 1, CoordAtt, []]
  - [-1, 1, Conv, [16, 3, 2]]
  - [-1, 1, Conv, [16, 3, 2]]
head:
  - [[3, 4, 5], 1, Detect, [nc]]
"""


def _tiny_detection_data(root: Path) -> Path:
    """Four 32x32 train and val images with one bright square each, labelled in YOLO format."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for k in range(4):
            x0, y0 = (int(v) for v in torch.randint(2, 14, (2,), generator=generator))
            image = torch.full((32, 32, 3), 40, dtype=torch.uint8)
            image[y0 : y0 + 14, x0 : x0 + 14] = 220
            Image.fromarray(image.numpy()).save(root / "images" / split / f"{k}.png")
            box = f"{(x0 + 7) / 32:.4f} {(y0 + 7) / 32:.4f} {14 / 32:.4f} {14 / 32:.4f}"
            (root / "labels" / split / f"{k}.txt").write_text(f"0 {box}\n")
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: square\n")
    return data


@contextlib.contextmanager
def _torch_settings_kept() -> Iterator[None]:
    """Ultralytics' trainer sets the thread count and the deterministic flags process-wide."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


@pytest.mark.slow
def test_blockzoo_yolo_cli_trains_validates_predicts_and_exports_offline(
    yolo: object, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``blockzoo yolo ...`` is Ultralytics' CLI with the blocks registered: a YAML naming
    SPDConv and CoordAtt trains one epoch on a dataset made here, then validates, predicts and
    exports to TorchScript (a trace) without touching the network (the fixture refuses it)."""
    from ultralytics.utils import USER_CONFIG_DIR

    from blockzoo.cli import main

    # Checking a dataset makes Ultralytics look for its plotting font, downloading it when it is
    # not in its settings directory (the fixture's temporary one); nothing is plotted here.
    assert USER_CONFIG_DIR.is_relative_to(os.environ["YOLO_CONFIG_DIR"])
    (USER_CONFIG_DIR / "Arial.ttf").touch()
    data = _tiny_detection_data(tmp_path / "data")
    model_yaml = tmp_path / "tiny.yaml"
    model_yaml.write_text(TINY_DETECTOR)
    common = ["imgsz=32", "device=cpu", "workers=0", "plots=False", f"project={tmp_path / 'runs'}",
              "exist_ok=True"]
    with _torch_settings_kept():
        yolo.unregister()  # the command registers the blocks itself
        assert main(["yolo", "detect", "train", f"model={model_yaml}", f"data={data}",
                     "epochs=1", "batch=2", "amp=False", "deterministic=False", "val=False",
                     "name=train", *common]) == 0
        assert yolo.is_registered()
        weights = tmp_path / "runs" / "train" / "weights" / "last.pt"
        assert weights.is_file()
        assert main(["yolo", "detect", "val", f"model={weights}", f"data={data}", "batch=2",
                     "name=val", *common]) == 0
        assert main(["yolo", "predict", f"model={weights}", f"source={data.parent}/images/val",
                     "save=False", "name=predict", *common]) == 0
        assert main(["yolo", "export", f"model={weights}", "format=torchscript", "imgsz=32",
                     "device=cpu"]) == 0
    exported = weights.with_suffix(".torchscript")
    assert exported.is_file()
    traced = torch.jit.load(str(exported))
    from ultralytics import YOLO

    model = YOLO(str(weights)).model.float().eval()
    x = torch.rand(3, 3, 32, 32)  # traced at batch 1: the graph generalises to batch 3
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x)[0], rtol=1e-4, atol=1e-4)
    layers = model.model
    assert isinstance(layers[1], bz.SPDConv) and isinstance(layers[3], bz.CoordinateAttention)


def test_blockzoo_yolo_cli_reports_yaml_errors_in_one_line(
    yolo: object, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from blockzoo.cli import main

    model_yaml = tmp_path / "bad.yaml"
    model_yaml.write_text(TINY_DETECTOR.replace("CoordAtt", "CoordAttn"))
    assert main(["yolo", "detect", "train", f"model={model_yaml}", "epochs=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "layer 3: unknown module 'CoordAttn'; did you mean CoordAtt" in err
    assert err.startswith("blockzoo yolo: error:")
    assert main(["yolo", "detect", "train", "epochz=1"]) == 2
    assert "epochz" in capsys.readouterr().err


# --------------------------------------------------------------------------- timm


@pytest.fixture(scope="module")
def timm_bz() -> object:
    with no_network():
        pytest.importorskip("timm")
        from blockzoo.integrations import timm as timm_bz
    return timm_bz


def test_attn_layer_in_timm_resnet(timm_bz) -> None:
    import timm

    with no_network():
        model = timm.create_model(
            "resnet10t", pretrained=False, num_classes=3,
            block_args=dict(attn_layer=timm_bz.attn_layer("coord_att", reduction=16)),
        ).eval()
    attn = [m for m in model.modules() if isinstance(m, bz.CoordinateAttention)]
    assert [a.in_channels for a in attn] == [64, 128, 256, 512]
    assert attn[0].mip == 8 and attn[3].mip == 32  # max(8, C / 16)
    assert model(torch.randn(1, 3, 64, 48)).shape == (1, 3)


def test_attn_layer_through_timm_create_attn(timm_bz) -> None:
    from timm.layers import create_attn, get_attn

    layer = timm_bz.attn_layer("se", reduction=4)
    assert get_attn(layer) is layer
    se = create_attn(layer, 32, device="cpu", dtype=torch.float64)
    assert isinstance(se, bz.SqueezeExcite) and se.rd_channels == 8
    assert se.fc1.weight.dtype == torch.float64
    with pytest.raises(ValueError, match="shape must not change"):
        timm_bz.attn_layer("spd_conv")


class _TinyNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_chans, width, 3, padding=1), bz.SqueezeExcite(width))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=(2, 3)))


def test_register_models_with_timm(timm_bz) -> None:
    import timm

    names = timm_bz.register_models({"tinynet_reg": _TinyNet})
    assert names == ["blockzoo_tinynet_reg"] and timm.is_model("blockzoo_tinynet_reg")
    assert "blockzoo_tinynet_reg" in timm.list_models("blockzoo_*")
    with no_network():
        model = timm.create_model("blockzoo_tinynet_reg", num_classes=4, in_chans=1, width=16)
    assert isinstance(model, _TinyNet) and model.head.out_features == 4
    assert model(torch.randn(2, 1, 9, 9)).shape == (2, 4)
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("blockzoo_tinynet_reg", pretrained=True)
    with pytest.raises(ValueError, match="cannot contain"):
        timm_bz.register_models({"x": _TinyNet}, prefix="blockzoo/")


def test_register_models_defaults_to_blockzoo_models(timm_bz, monkeypatch) -> None:
    import timm

    monkeypatch.setattr(bz, "list_models", lambda: ["tinynet_default"], raising=False)
    monkeypatch.setattr(bz, "create_model", lambda name, **kw: _TinyNet(**kw), raising=False)
    assert timm_bz.register_models() == ["blockzoo_tinynet_default"]
    model = timm.create_model("blockzoo_tinynet_default", num_classes=2)
    assert isinstance(model, _TinyNet) and model.head.out_features == 2
    monkeypatch.delattr(bz, "list_models")
    assert timm_bz.register_models() == []


def test_network_guard_works() -> None:
    with (
        pytest.raises(AssertionError, match="network access attempted"),
        no_network(),
        contextlib.suppress(OSError),
    ):
        socket.getaddrinfo("example.com", 80)
