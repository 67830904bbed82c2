"""The model API timm users expect, on every blockzoo network (:class:`StagedNet`):
``forward_features``/``forward_head``, ``get_classifier``/``reset_classifier``,
``features_only`` with ``out_indices`` and ``feature_info``, ``create_model`` with
``device``/``dtype``, ``list_models`` patterns, and the timm keys of ``default_cfg``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from blockzoo import create_model, list_models
from blockzoo.models import FeatureInfo, model_info

SMALL = ["resnet_cifar", "sknet_cifar", "mobilenetv2"]


@pytest.mark.parametrize("name", SMALL)
def test_forward_is_forward_head_of_forward_features(name: str) -> None:
    model = create_model(name, num_classes=7).eval()
    x = torch.randn(2, 3, 40, 36)
    with torch.no_grad():
        features = model.forward_features(x)
        stride = model.feature_strides[-1]
        assert features.shape == (2, model.num_features, math.ceil(40 / stride),
                                  math.ceil(36 / stride))
        pre = model.forward_head(features, pre_logits=True)
        assert pre.shape == (2, model.num_features) == (2, model.head_hidden_size)
        torch.testing.assert_close(pre, features.mean(dim=(2, 3)))
        torch.testing.assert_close(model(x), model.forward_head(features))
        torch.testing.assert_close(model(x), model.fc(pre))
    # MobileNetV2's final map is the 1x1 head conv's 1280 channels, not the last stage's 320
    if name == "mobilenetv2":
        assert model.num_features == 1280 and model.stage_channels[-1] == 320


def test_get_and_reset_classifier_keep_device_dtype_mode_and_frozen_parameters() -> None:
    model = create_model("resnet_cifar", num_classes=10, dtype=torch.float64).eval()
    assert model.get_classifier() is model.fc and model.fc.out_features == 10
    model.requires_grad_(False)
    model.reset_classifier(3)
    fc = model.get_classifier()
    assert isinstance(fc, nn.Linear) and fc.out_features == 3 and model.num_classes == 3
    assert fc.weight.dtype == torch.float64 and not fc.training
    assert model.default_cfg["num_classes"] == 3
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["fc.weight", "fc.bias"]  # the new head trains, the rest stays frozen
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity) and model.num_classes == 0
    assert model(x).shape == (2, model.num_features)
    model.reset_classifier(0, global_pool="")
    assert model(x).shape == (2, model.num_features, 4, 4)
    model.reset_classifier(0, global_pool="max")
    torch.testing.assert_close(model(x), model.forward_features(x).amax(dim=(2, 3)))
    model.reset_classifier(5, global_pool="")  # the classifier at every position
    dense = model(x)
    assert dense.shape == (2, 5, 4, 4)
    torch.testing.assert_close(
        dense[:, :, 1, 2], model.fc(model.forward_features(x)[:, :, 1, 2])
    )
    with pytest.raises(ValueError, match="global_pool must be one of"):
        model.reset_classifier(5, global_pool="median")
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_classifier(-1)


def test_unpooled_headless_model_from_create_model() -> None:
    model = create_model("mobilenetv2", num_classes=0, global_pool="").eval()
    with torch.no_grad():
        y = model(torch.randn(1, 3, 64, 64))
    assert y.shape == (1, 1280, 2, 2)


@pytest.mark.parametrize("name", ["rednet26", "mobilenetv2_ca"])
def test_features_only_with_out_indices_and_feature_info(name: str) -> None:
    full = create_model(name, features_only=True)
    info = full.feature_info
    assert isinstance(info, FeatureInfo) and len(info) == 4
    assert info.reduction() == [4, 8, 16, 32]
    assert info.module_name() == ["stages.0", "stages.1", "stages.2", "stages.3"]
    assert info.channels() == full.stage_channels
    model = create_model(name, features_only=True, out_indices=(1, -1)).eval()
    assert model.out_indices == (1, 3)
    assert model.feature_info.channels() == [info.channels(1), info.channels(3)]
    assert model.feature_info.reduction() == [8, 32]
    assert model.feature_info.get("num_chs", 1) == info.channels(3)
    for module in model.feature_info.module_name():
        assert isinstance(model.get_submodule(module), nn.Sequential)
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape) for o in outputs] == [
        (1, c, 64 // r, 96 // r) for c, r in zip(model.feature_info.channels(),
                                                 model.feature_info.reduction(), strict=True)
    ]
    # the stages after the last chosen one are not built
    early = create_model(name, features_only=True, out_indices=(0, 1))
    assert len(early.stages) == 2
    assert sum(p.numel() for p in early.parameters()) < sum(p.numel() for p in full.parameters())


def test_out_indices_are_validated() -> None:
    with pytest.raises(ValueError, match="out_indices"):
        create_model("resnet_cifar", features_only=True, out_indices=(4,))
    with pytest.raises(ValueError, match="repeat"):
        create_model("resnet_cifar", features_only=True, out_indices=(1, -3))
    with pytest.raises(ValueError, match="without it"):
        create_model("resnet_cifar", out_indices=(1,))
    model = create_model("resnet_cifar", features_only=True)
    with pytest.raises(ValueError, match="features_only"):
        model.get_classifier()
    with pytest.raises(ValueError, match="features_only"):
        model.reset_classifier(10)


def test_create_model_device_dtype_and_unknown_arguments() -> None:
    model = create_model("rednet26", device="meta", dtype=torch.bfloat16)
    tensors = [*model.parameters(), *model.buffers()]
    assert all(t.device.type == "meta" for t in tensors)
    assert {t.dtype for t in model.parameters()} == {torch.bfloat16}
    y = model(torch.randn(1, 3, 224, 224, device="meta", dtype=torch.bfloat16))
    assert y.shape == (1, 1000) and y.dtype == torch.bfloat16
    double = create_model("resnet_cifar", dtype=torch.float64)
    assert double(torch.randn(1, 3, 8, 8, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(TypeError, match="not_a_model_arg"):
        create_model("resnet50", device="meta", not_a_model_arg=1)
    with pytest.raises(TypeError, match="pretrained must be"):
        create_model("resnet_cifar", 10)


def test_num_classes_defaults_to_the_cfg() -> None:
    assert create_model("resnet_cifar").num_classes == 10
    assert create_model("resnet50", device="meta").num_classes == 1000


def test_list_models_pattern_and_pretrained_filter() -> None:
    assert list_models("rednet*") == ["rednet101", "rednet152", "rednet26", "rednet38",
                                      "rednet50"]
    assert list_models("*cifar") == ["resnet_cifar", "sknet_cifar"]
    assert list_models("nothing*") == []
    with_weights = list_models(pretrained=True)
    assert {"resnet50", "mobilenetv2", "mobilenetv2_ca", "rednet50"} <= set(with_weights)
    assert "resnet_cifar" not in with_weights and "acmix_resnet50" not in with_weights
    assert "sknet50" not in with_weights  # released as a .caffemodel, which blockzoo cannot read
    assert model_info("sknet50").default_cfg["weights"][0].layout == "caffe"
    assert all(model_info(n).default_cfg["weights"] for n in with_weights)
    assert list_models("rednet5*", pretrained=True) == ["rednet50"]


@pytest.mark.parametrize("name", list_models())
def test_default_cfg_carries_timms_keys(name: str) -> None:
    model = create_model(name, device="meta")
    cfg = model.default_cfg
    assert model.pretrained_cfg is cfg
    state = model.state_dict()
    assert cfg["first_conv"] + ".weight" in state
    assert cfg["classifier"] == "fc" and "fc.weight" in state
    size = cfg["input_size"][1:]
    assert cfg["pool_size"] == tuple(math.ceil(s / model.feature_strides[-1]) for s in size)
    assert cfg["interpolation"] in ("bilinear", "bicubic") and 0 < cfg["crop_pct"] <= 1
    assert cfg["min_input_size"] == (3, 32, 32)
