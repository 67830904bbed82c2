"""Pretrained weights offline: state_dicts in each author format (their published key names and
shapes written down here as data, random values) load into blockzoo's networks, every tensor
lands where the layout says, and files of another family, depth or size fail clearly.
``pretrained=True`` is exercised with the download replaced: no test touches the network.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from blockzoo import create_block, create_model, list_models
from blockzoo.blocks import SqueezeExcite
from blockzoo.cli import main as cli_main
from blockzoo.models import pretrained as pt
from blockzoo.models.pretrained import PretrainedError, ReleasedWeights

ROOT = Path(__file__).resolve().parents[1]
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def bn(prefix: str, channels: int) -> dict[str, tuple]:
    return {f"{prefix}.{k}": () if k == "num_batches_tracked" else (channels,) for k in BN}


def random_state(shapes: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    """Distinct random tensors (integer counters for ``num_batches_tracked``)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, (key, shape) in enumerate(shapes.items()):
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000 + i)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g)
    return state


def assert_lands(model: torch.nn.Module, state: dict[str, torch.Tensor], spots: dict) -> None:
    """``spots`` (author key -> blockzoo key) hold the author's tensors, and every tensor of the
    network is exactly one of the file's (a bijection between the two state_dicts)."""
    ours = model.state_dict()
    for author, blockzoo in spots.items():
        assert torch.equal(ours[blockzoo], state[author]), (author, blockzoo)
    index = {(tuple(v.shape), v.flatten()[:8].tolist().__repr__()): k for k, v in state.items()}
    used = set()
    for key, value in ours.items():
        found = index.get((tuple(value.shape), value.flatten()[:8].tolist().__repr__()))
        assert found is not None, f"{key} holds no tensor of the file"
        assert torch.equal(value, state[found]), key
        used.add(found)
    assert used == set(state)


# --------------------------------------------------------------------------- author layouts

#: RedNet (d-li14/involution, cls/mmcls/models/backbones/rednet.py, mmcls ImageClassifier):
#: blocks per stage for each depth.
REDNET_LAYERS = {26: (1, 2, 4, 1), 38: (2, 3, 5, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
                 152: (3, 8, 36, 3)}


def mmcls_rednet_shapes(depth: int) -> dict[str, tuple]:
    """The keys and shapes of an mmcls RedNet checkpoint's ``state_dict``."""
    shapes = {
        "backbone.stem.0.conv.weight": (32, 3, 3, 3), **bn("backbone.stem.0.bn", 32),
        "backbone.stem.1.conv1.conv.weight": (8, 32, 1, 1), **bn("backbone.stem.1.conv1.bn", 8),
        "backbone.stem.1.conv2.conv.weight": (18, 8, 1, 1),  # K=3: 9 x (32 / 16) groups
        "backbone.stem.1.conv2.conv.bias": (18,),
        **bn("backbone.stem.2", 32),
        "backbone.stem.4.conv.weight": (64, 32, 3, 3), **bn("backbone.stem.4.bn", 64),
    }
    cin = 64
    for i, blocks in enumerate(REDNET_LAYERS[depth]):
        mid, out = 64 * 2**i, 256 * 2**i
        for j in range(blocks):
            p = f"backbone.layer{i + 1}.{j}."
            shapes |= {p + "conv1.weight": (mid, cin, 1, 1), **bn(p + "bn1", mid),
                       p + "conv2.conv1.conv.weight": (mid // 4, mid, 1, 1),
                       **bn(p + "conv2.conv1.bn", mid // 4),
                       p + "conv2.conv2.conv.weight": (49 * mid // 16, mid // 4, 1, 1),
                       p + "conv2.conv2.conv.bias": (49 * mid // 16,),
                       **bn(p + "bn2", mid), p + "conv3.weight": (out, mid, 1, 1),
                       **bn(p + "bn3", out)}
            if j == 0:
                shapes |= {p + "downsample.0.weight": (out, cin, 1, 1),
                           **bn(p + "downsample.1", out)}
            cin = out
    return shapes | {"head.fc.weight": (1000, 2048), "head.fc.bias": (1000,)}


#: MobileNetV2 (t, c, n, s) rows, as both the coordinate-attention code and torchvision use.
MBV2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
        (6, 160, 3, 2), (6, 320, 1, 1))


def coordatt_mbv2_shapes() -> dict[str, tuple]:
    """The keys and shapes of houqb/CoordAttention's ``mbv2_ca.pth`` (``mbv2_ca.py``)."""
    shapes = {"features.0.0.weight": (32, 3, 3, 3), **bn("features.0.1", 32)}
    cin, b = 32, 1
    for t, c, n, _ in MBV2:
        for _ in range(n):
            p, hidden = f"features.{b}.conv.", cin * t
            if t == 1:
                shapes |= {p + "0.weight": (hidden, 1, 3, 3), **bn(p + "1", hidden),
                           p + "3.weight": (c, hidden, 1, 1), **bn(p + "4", c)}
            else:
                mip = max(8, hidden // 32)
                shapes |= {p + "0.weight": (hidden, cin, 1, 1), **bn(p + "1", hidden),
                           p + "3.weight": (hidden, 1, 3, 3), **bn(p + "4", hidden),
                           p + "6.conv1.weight": (mip, hidden, 1, 1), p + "6.conv1.bias": (mip,),
                           **bn(p + "6.bn1", mip),
                           p + "6.conv2.weight": (hidden, mip, 1, 1), p + "6.conv2.bias": (hidden,),
                           p + "6.conv3.weight": (hidden, mip, 1, 1), p + "6.conv3.bias": (hidden,),
                           p + "7.weight": (c, hidden, 1, 1), **bn(p + "8", c)}
            cin, b = c, b + 1
    return shapes | {"conv.0.weight": (1280, 320, 1, 1), **bn("conv.1", 1280),
                     "classifier.1.weight": (1000, 1280), "classifier.1.bias": (1000,)}


def acmix_resnet50_shapes() -> dict[str, tuple]:
    """The keys and shapes of the ACmix reference ResNet-50 (LeapLabTHU/ACmix,
    ``ResNet/ResNet_ImageNet.py`` with ``test_bottleneck.ACmix``: ``dep_conv`` has no bias)."""
    shapes = {"conv1.weight": (64, 3, 7, 7), **bn("bn1", 64)}
    cin = 64
    for i, blocks in enumerate((3, 4, 6, 3)):
        width, out = 64 * 2**i, 256 * 2**i
        for j in range(blocks):
            p = f"layer{i + 1}.{j}."
            a = p + "conv2."
            shapes |= {p + "conv1.weight": (width, cin, 1, 1), **bn(p + "bn1", width),
                       a + "rate1": (1,), a + "rate2": (1,),
                       **{a + f"conv{k}.weight": (width, width, 1, 1) for k in (1, 2, 3)},
                       **{a + f"conv{k}.bias": (width,) for k in (1, 2, 3)},
                       a + "conv_p.weight": (width // 4, 2, 1, 1), a + "conv_p.bias": (width // 4,),
                       a + "fc.weight": (9, 12, 1, 1), a + "dep_conv.weight": (width, 9, 3, 3),
                       **bn(p + "bn2", width), p + "conv3.weight": (out, width, 1, 1),
                       **bn(p + "bn3", out)}
            if j == 0:
                shapes |= {p + "downsample.0.weight": (out, cin, 1, 1),
                           **bn(p + "downsample.1", out)}
            cin = out
    return shapes | {"fc.weight": (1000, 2048), "fc.bias": (1000,)}


@pytest.mark.parametrize("depth", sorted(REDNET_LAYERS))
def test_mmcls_rednet_checkpoints_load(depth: int, tmp_path: Path) -> None:
    state = random_state(mmcls_rednet_shapes(depth), seed=depth)
    path = tmp_path / f"rednet{depth}.pth"
    torch.save({"meta": {"epoch": 130, "CLASSES": ["a"]}, "state_dict": state}, path)
    model = create_model(f"rednet{depth}", pretrained=str(path))
    last = REDNET_LAYERS[depth][3] - 1
    assert_lands(model, state, {
        "backbone.stem.0.conv.weight": "stem.conv1.conv.weight",
        "backbone.stem.1.conv1.bn.running_var": "stem.involution.reduce.bn.running_var",
        "backbone.stem.1.conv2.conv.weight": "stem.involution.span.weight",
        "backbone.stem.2.weight": "stem.bn.weight",
        "backbone.stem.4.bn.bias": "stem.conv2.bn.bias",
        "backbone.layer1.0.downsample.0.weight": "stages.0.0.shortcut.conv.weight",
        "backbone.layer2.1.conv2.conv1.conv.weight":
            "stages.1.1.body.conv2.conv.reduce.conv.weight",
        "backbone.layer3.0.conv2.conv2.conv.bias": "stages.2.0.body.conv2.conv.span.bias",
        "backbone.layer3.3.bn2.running_mean": "stages.2.3.body.conv2.bn.running_mean",
        f"backbone.layer4.{last}.bn3.weight": f"stages.3.{last}.body.conv3.bn.weight",
        "head.fc.weight": "fc.weight",
    })


def test_coordatt_mbv2_ca_checkpoint_loads(tmp_path: Path) -> None:
    state = random_state(coordatt_mbv2_shapes())
    path = tmp_path / "mbv2_ca.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)  # DataParallel keys
    model = create_model("mobilenetv2_ca", pretrained=path)
    assert_lands(model, state, {
        "features.0.0.weight": "stem.conv.weight",
        "features.1.conv.0.weight": "stages.0.0.depthwise.conv.weight",
        "features.1.conv.4.running_var": "stages.0.0.project.bn.running_var",
        "features.2.conv.0.weight": "stages.0.1.expand.conv.weight",
        "features.2.conv.6.conv1.bias": "stages.0.1.attention.conv1.bias",
        "features.2.conv.6.bn1.weight": "stages.0.1.attention.bn1.weight",
        "features.2.conv.6.conv2.weight": "stages.0.1.attention.conv_h.weight",
        "features.2.conv.6.conv3.bias": "stages.0.1.attention.conv_w.bias",
        "features.13.conv.3.weight": "stages.2.6.depthwise.conv.weight",
        "features.17.conv.7.weight": "stages.3.3.project.conv.weight",
        "conv.1.running_mean": "head_conv.bn.running_mean",
        "classifier.1.weight": "fc.weight",
    })


def test_acmix_reference_resnet50_state_dict_loads(tmp_path: Path) -> None:
    state = random_state(acmix_resnet50_shapes())
    path = tmp_path / "acmix.pth.tar"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    model = create_model("acmix_resnet50", pretrained=path)
    assert_lands(model, state, {
        "conv1.weight": "stem.conv.conv.weight",
        "layer1.0.conv2.rate1": "stages.0.0.body.conv2.conv.rate1",
        "layer2.0.conv2.dep_conv.weight": "stages.1.0.body.conv2.conv.dep_conv.weight",
        "layer3.5.conv2.conv_p.bias": "stages.2.5.body.conv2.conv.conv_p.bias",
        "layer4.2.bn2.weight": "stages.3.2.body.conv2.bn.weight",
        "layer4.0.downsample.1.running_mean": "stages.3.0.shortcut.bn.running_mean",
    })


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                b.normal_(0, 0.1)
    return model.eval()


@pytest.mark.parametrize("factory, name", [(torchvision.models.resnet50, "resnet50"),
                                           (torchvision.models.mobilenet_v2, "mobilenetv2")])
def test_torchvision_weights_give_torchvisions_outputs(factory, name, tmp_path: Path) -> None:
    reference = _randomised(factory())
    path = tmp_path / f"{name}.pth"
    torch.save(reference.state_dict(), path)
    model = create_model(name, pretrained=path).eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    # a new head, a backbone, one input channel: what fits is loaded, the rest adapted or left
    ten = create_model(name, pretrained=path, num_classes=10)
    assert ten.fc.out_features == 10
    torch.testing.assert_close(ten.stem.state_dict(), model.stem.state_dict())
    backbone = create_model(name, pretrained=path, features_only=True, out_indices=(0, 1))
    torch.testing.assert_close(backbone.stages[1].state_dict(), model.stages[1].state_dict())
    gray = create_model(name, pretrained=path, in_chans=1)
    first = model.default_cfg["first_conv"] + ".weight"
    torch.testing.assert_close(gray.state_dict()[first],
                               model.state_dict()[first].sum(dim=1, keepdim=True))


def test_wrong_family_depth_or_size_fails_naming_the_first_key(tmp_path: Path) -> None:
    tv = tmp_path / "tv.pth"
    torch.save(torchvision.models.resnet50().state_dict(), tv)
    with pytest.raises(PretrainedError, match="rednet50: checkpoint key 'conv1.weight'"):
        create_model("rednet50", pretrained=tv)
    red = tmp_path / "rednet50.pth"
    torch.save({"state_dict": random_state(mmcls_rednet_shapes(50))}, red)
    with pytest.raises(PretrainedError, match="'backbone.layer1.1.conv1.weight' has no place"):
        create_model("rednet26", pretrained=red)
    mbv2 = tmp_path / "mbv2.pth"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), mbv2)
    with pytest.raises(PretrainedError, match="'features.1.conv.0.0.weight' has no place"):
        create_model("mobilenetv2_ca", pretrained=mbv2)
    ca = tmp_path / "mbv2_ca.pth"
    torch.save(random_state(coordatt_mbv2_shapes()), ca)
    with pytest.raises(PretrainedError, match="'features.1.conv.0.weight' has no place"):
        create_model("mobilenetv2", pretrained=ca)
    partial = tmp_path / "partial.pth"
    state = torchvision.models.resnet50().state_dict()
    del state["layer3.2.bn1.running_mean"]
    torch.save(state, partial)
    with pytest.raises(PretrainedError, match="'stages.2.2.body.conv1.bn.running_mean'"):
        create_model("resnet50", pretrained=partial)
    widened = tmp_path / "widened.pth"
    state = torchvision.models.resnet50().state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(65, 64, 1, 1)
    torch.save(state, widened)
    with pytest.raises(PretrainedError, match=r"'layer1.0.conv1.weight' has shape \(65, 64"):
        create_model("resnet50", pretrained=widened)
    with pytest.raises(FileNotFoundError, match="no such file"):
        create_model("resnet50", pretrained=tmp_path / "missing.pth")


def test_blockzoo_state_dict_and_safetensors_load(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    source = _randomised(create_model("resnet_cifar"))
    path = tmp_path / "resnet_cifar.safetensors"
    save_file(source.state_dict(), path)
    loaded = create_model("resnet_cifar", pretrained=str(path))
    torch.testing.assert_close(loaded.state_dict(), source.state_dict())


# --------------------------------------------------------------------------- pretrained=True


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """torch.hub's cache in tmp_path and a fake download that serves ``files[url]``."""
    files: dict[str, bytes] = {}
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def download(url: str, dst: str, progress: bool = True) -> None:
        if url not in files:
            raise urllib.error.URLError("offline")
        Path(dst).write_bytes(files[url])

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    return files


def _file_bytes(state: dict, tmp_path: Path) -> bytes:
    path = tmp_path / "bytes.pth"
    torch.save(state, path)
    return path.read_bytes()


def test_pretrained_true_downloads_verifies_and_caches(hub: dict, tmp_path: Path) -> None:
    weights = create_model("resnet50", device="meta").default_cfg["weights"][0]
    assert weights.url == "https://download.pytorch.org/models/resnet50-0676ba61.pth"
    reference = _randomised(torchvision.models.resnet50())
    data = _file_bytes(reference.state_dict(), tmp_path)
    hub[weights.url] = data
    with pytest.raises(PretrainedError, match="SHA-256 .* expected 0676ba61.*not kept"):
        create_model("resnet50", pretrained=True)  # random bytes are not torchvision's file
    cache = tmp_path / "hub" / "checkpoints"
    assert not list(cache.iterdir())  # a mismatch never enters the cache
    (cache / "resnet50-0676ba61.pth").write_bytes(data)  # nor passes once there
    with pytest.raises(PretrainedError, match="cached .* expected 0676ba61.*delete it"):
        create_model("resnet50", pretrained=True)
    digest = hashlib.sha256(data).hexdigest()
    good = ReleasedWeights(tag="t", page="https://example.org/page", url="https://example.org/w.pth",
                           sha256=digest, top1=None, license="MIT", layout="torchvision_resnet")
    hub[good.url] = data
    model = create_model("resnet50", pretrained=good).eval()
    torch.testing.assert_close(model.fc.weight, reference.fc.weight)
    assert (tmp_path / "hub" / "checkpoints" / "w.pth").is_file()
    del hub[good.url]  # cached: no second download
    create_model("resnet50", pretrained=good)
    model = create_model("resnet50", pretrained=good.url)  # a URL string loads too
    torch.testing.assert_close(model.fc.bias, reference.fc.bias)


def test_pretrained_true_without_url_or_offline_names_the_page(hub: dict) -> None:
    with pytest.raises(PretrainedError, match=r"github.com/d-li14/involution.*pretrained=\"path"):
        create_model("rednet50", pretrained=True)
    with pytest.raises(PretrainedError, match="cannot download .*pytorch.org/vision.*"
                       "pretrained=\"path"):
        create_model("mobilenetv2", pretrained=True)
    with pytest.raises(PretrainedError, match=r"implus/SKNet.*'caffe' format, which blockzoo "
                       r"cannot read"):
        create_model("sknet50", pretrained=True)
    with pytest.raises(PretrainedError, match="no released pretrained weights"):
        create_model("resnet_cifar", pretrained=True)


def test_every_released_checkpoint_is_described() -> None:
    for name in list_models():
        for w in create_model(name, device="meta").default_cfg["weights"]:
            assert w.page.startswith("https://") and w.license and w.tag
            assert w.url is None or w.url.startswith("https://")
            assert w.layout in pt.LAYOUTS or w.layout == "caffe"
            assert w.top1 is None or 60 < w.top1 < 90


# --------------------------------------------------------------------------- CLI, hub, package


def test_convert_writes_a_safetensors_state_dict(tmp_path: Path, capsys) -> None:
    state = random_state(mmcls_rednet_shapes(26))
    src, dst = tmp_path / "red26.pth", tmp_path / "out" / "rednet26.safetensors"
    torch.save({"state_dict": state}, src)
    assert cli_main(["convert", str(src), str(dst), "--model", "rednet26"]) == 0
    assert "rednet26" in capsys.readouterr().out
    from safetensors.torch import load_file

    converted = load_file(dst)
    assert torch.equal(converted["stem.involution.span.weight"],
                       state["backbone.stem.1.conv2.conv.weight"])
    model = create_model("rednet26", pretrained=dst)
    assert_lands(model, state, {"head.fc.bias": "fc.bias"})
    assert cli_main(["convert", str(src), str(dst), "--model", "rednet38"]) == 2
    assert "rednet38: the mmcls_rednet checkpoint leaves" in capsys.readouterr().err
    assert cli_main(["convert", str(src), str(dst), "--model", "rednet26",
                     "--num-classes", "10"]) == 2
    assert "--num-classes" in capsys.readouterr().err


def test_hubconf_loads_models_from_a_local_clone() -> None:
    model = torch.hub.load(str(ROOT), "rednet50", source="local", num_classes=4)
    assert model.default_cfg["architecture"] == "rednet50" and model.num_classes == 4


def test_version_class_names_py_typed_and_license() -> None:
    out = subprocess.run([sys.executable, "-m", "blockzoo", "--version"], capture_output=True,
                         text=True, check=True, cwd=ROOT)
    import blockzoo

    assert out.stdout.strip() == f"blockzoo {blockzoo.__version__}"
    assert isinstance(create_block("SqueezeExcite", 32), SqueezeExcite)
    with pytest.raises(KeyError, match="SqueezeExcit"):
        create_block("SqueezeExcit", 32)
    assert (ROOT / "src" / "blockzoo" / "py.typed").is_file()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"py.typed"' in pyproject and 'license = { text = "MIT" }' in pyproject
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
