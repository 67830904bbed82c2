"""timm's own model checks, run over every ``blockzoo_*`` model registered with timm.

These reproduce the checks of timm's ``tests/test_models.py`` (timm 1.0.31, from its source
distribution; the file is not in the wheel): ``test_model_forward``, ``test_model_backward``,
``test_model_default_cfgs`` and ``test_model_forward_features``, with their input-size rule
(``input_size`` capped at a target size, or ``min_input_size`` when the pretrained cfg gives
one: blockzoo's is 32x32) and their model-API contract helpers. Everything goes through
``timm.create_model``. ``test_model_default_cfgs`` runs on the meta device, as timm's does with
a PyTorch that has device contexts.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

timm = pytest.importorskip("timm")

from timm.layers import get_channel_dim, get_spatial_dim  # noqa: E402

from blockzoo.integrations import timm as timm_bridge  # noqa: E402

timm_bridge.register_models()

NAMES = timm.list_models("blockzoo_*")
CFG_NAMES = timm.list_models("blockzoo_*", name_matches_cfg=True)
TAGGED_NAMES = timm.list_models("blockzoo_*", include_tags=True)

# timm's sizes
TARGET_FWD_SIZE = MAX_FWD_SIZE = 384
TARGET_BWD_SIZE = 128
MAX_BWD_SIZE = 320
MAX_FWD_OUT_SIZE = 448
TARGET_FFEAT_SIZE = 96
MAX_FFEAT_SIZE = 256
META = "meta"


def input_size_for(model=None, model_name: str = "", target: int | None = None) -> tuple:
    """timm's rule: the cfg's input size, capped at ``target`` (or ``min_input_size`` when the
    cfg has one and the input size exceeds ``target``), unless the input size is fixed."""
    if model is None:
        get = timm.get_pretrained_cfg_value
        input_size = get(model_name, "input_size")
        fixed = get(model_name, "fixed_input_size")
        min_size = get(model_name, "min_input_size")
    else:
        cfg = model.default_cfg
        input_size, fixed = cfg["input_size"], cfg.get("fixed_input_size")
        min_size = cfg.get("min_input_size")
    assert input_size is not None
    if fixed:
        return input_size
    if target and max(input_size) > target:
        return tuple(min_size) if min_size else tuple(min(x, target) for x in input_size)
    return tuple(input_size)


def test_every_blockzoo_model_is_checked() -> None:
    import blockzoo

    assert sorted(NAMES) == sorted(timm_bridge.PREFIX + n for n in blockzoo.list_models())
    assert sorted(CFG_NAMES) == sorted(NAMES)
    assert len(TAGGED_NAMES) >= len(NAMES)


@pytest.mark.parametrize("model_name", NAMES)
def test_model_forward(model_name: str) -> None:
    batch_size = 1
    model = timm.create_model(model_name, pretrained=False).eval()
    input_size = input_size_for(model=model, target=TARGET_FWD_SIZE)
    assert max(input_size) <= MAX_FWD_SIZE
    inputs = torch.randn((batch_size, *input_size))
    with torch.no_grad():
        outputs = model(inputs)
        assert outputs.shape[0] == batch_size
        assert not torch.isnan(outputs).any(), "Output included NaNs"
        checkpointing = getattr(model, "set_grad_checkpointing", None)
        if callable(checkpointing):
            checkpointing()
            torch.testing.assert_close(model(inputs), outputs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_name", CFG_NAMES)
def test_model_backward(model_name: str) -> None:
    batch_size = 2
    input_size = input_size_for(model_name=model_name, target=TARGET_BWD_SIZE)
    assert max(input_size) <= MAX_BWD_SIZE
    model = timm.create_model(model_name, pretrained=False, num_classes=42)
    encoder_only = model.num_classes == 0
    num_params = sum(p.numel() for p in model.parameters())
    model.train()
    outputs = model(torch.randn((batch_size, *input_size)))
    if isinstance(outputs, tuple):
        outputs = torch.cat(outputs)
    outputs.mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"No gradient for {name}"
    num_grad = sum(p.grad.numel() for p in model.parameters() if p.grad is not None)
    if encoder_only:
        feat_axis = getattr(model, "feature_dim", None)
        if feat_axis is None:
            feat_axis = get_channel_dim(getattr(model, "output_fmt", "NCHW"))
        expected = getattr(model, "out_features", None) or model.num_features
        assert outputs.shape[feat_axis] == expected
    else:
        assert outputs.shape[-1] == 42
    assert num_params == num_grad, "Some parameters are missing gradients"
    assert not torch.isnan(outputs).any(), "Output included NaNs"


def _check_api_contract(model, model_name: str) -> None:
    """timm's ``_assert_model_api_contract`` (its ``group_matcher``/``no_weight_decay`` checks
    apply only to models that define them; blockzoo's define neither)."""
    with torch.device(META), pytest.raises(TypeError):
        timm.create_model(model_name, pretrained=False, device=META, not_a_model_arg=1)
    param = inspect.signature(model.reset_classifier).parameters.get("global_pool")
    if param is not None:
        assert param.default is None


def _check_reset_keeps_device_dtype(model) -> None:
    model.to(device=META, dtype=torch.float64)
    expected = next(model.parameters())
    training = model.training
    model.reset_classifier(0)
    model.reset_classifier(2)
    heads = model.get_classifier()
    heads = heads if isinstance(heads, tuple | list) else (heads,)
    params = [p for head in heads for p in head.parameters()]
    assert params
    assert all(p.device == expected.device and p.dtype == expected.dtype for p in params)
    assert all(m.training == training for m in model.modules())


def _check_frozen_survives_reset(model_name: str) -> None:
    model = timm.create_model(model_name, pretrained=False, device=META, dtype=torch.float32)
    model.requires_grad_(False)
    model.reset_classifier(0)
    model.reset_classifier(0, "")
    resize = getattr(model, "set_input_size", None)
    if callable(resize):
        resize(img_size=tuple(2 * s for s in model.default_cfg["input_size"][-2:]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not trainable, f"frozen parameters became trainable: {trainable[:5]}"


def _check_factory_device(model_name: str) -> None:
    model = timm.create_model(model_name, pretrained=False, device=META, dtype=torch.float32)
    misplaced = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
                 if t.device != torch.device(META)]
    assert not misplaced, f"tensors not created on meta: {misplaced[:5]}"


def _check_dtype_change_after_forward(model, x: torch.Tensor) -> None:
    model.to(torch.bfloat16)
    output = model(x.to(torch.bfloat16))
    if isinstance(output, tuple | list):
        output = output[0]
    assert output.dtype == torch.bfloat16
    model.to(torch.float32)


@pytest.mark.parametrize("model_name", TAGGED_NAMES)
def test_model_default_cfgs(model_name: str) -> None:
    batch_size = 1
    with torch.device(META):
        model = timm.create_model(model_name, pretrained=False, device=META,
                                  dtype=torch.float32).eval()
    _check_api_contract(model, model_name)
    assert model.num_classes >= 0
    assert model.num_features > 0
    assert model.head_hidden_size > 0
    state_dict = model.state_dict()
    cfg = model.default_cfg
    assert model.in_chans == cfg["input_size"][0]
    pool_size = cfg["pool_size"]
    input_size = cfg["input_size"]
    output_fmt = getattr(model, "output_fmt", "NCHW")
    spatial_axis = get_spatial_dim(output_fmt)
    assert len(spatial_axis) == 2
    feat_axis = get_channel_dim(output_fmt)
    assert all(x <= MAX_FWD_OUT_SIZE for x in input_size)
    x = torch.randn((batch_size, *input_size), device=META)

    outputs = model.forward_features(x)
    outputs_pre = model.forward_head(outputs, pre_logits=True)
    assert outputs.shape[spatial_axis[0]] == pool_size[0]
    assert outputs.shape[spatial_axis[1]] == pool_size[1]
    assert outputs.shape[feat_axis] == model.num_features
    assert outputs_pre.shape[1] == model.head_hidden_size
    _check_dtype_change_after_forward(model, x)

    model.reset_classifier(0)
    assert model.num_classes == 0
    outputs = model(x)
    assert len(outputs.shape) == 2
    assert outputs.shape[1] == model.head_hidden_size
    assert outputs.shape == outputs_pre.shape

    model.reset_classifier(0, "")
    outputs = model(x)
    assert len(outputs.shape) == 4
    assert outputs.shape[spatial_axis[0]] == pool_size[0]
    assert outputs.shape[spatial_axis[1]] == pool_size[1]

    model = timm.create_model(model_name, pretrained=False, num_classes=0, device=META,
                              dtype=torch.float32).eval()
    outputs = model(x)
    assert outputs.shape == outputs_pre.shape
    assert outputs.shape[1] == model.head_hidden_size

    model = timm.create_model(model_name, pretrained=False, num_classes=0, global_pool="",
                              device=META, dtype=torch.float32).eval()
    outputs = model(x)
    assert len(outputs.shape) == 4
    assert outputs.shape[spatial_axis[0]] == pool_size[0]
    assert outputs.shape[spatial_axis[1]] == pool_size[1]

    if cfg.get("num_classes", None):
        classifier = cfg["classifier"]
        for c in classifier if isinstance(classifier, tuple | list) else (classifier,):
            assert c + ".weight" in state_dict, f"{c} not in model params"
    first_conv = cfg["first_conv"]
    first_conv = (first_conv,) if isinstance(first_conv, str) else first_conv
    assert isinstance(first_conv, tuple | list)
    for name in first_conv:
        assert name + ".weight" in state_dict, f"{name} not in model params"

    _check_reset_keeps_device_dtype(model)
    _check_factory_device(model_name)
    _check_frozen_survives_reset(model_name)


@pytest.mark.parametrize("model_name", NAMES)
def test_model_forward_features(model_name: str) -> None:
    batch_size = 1
    model = timm.create_model(model_name, pretrained=False, features_only=True).eval()
    expected_channels = model.feature_info.channels()
    expected_reduction = model.feature_info.reduction()
    assert len(expected_channels) >= 3
    input_size = input_size_for(model=model, target=TARGET_FFEAT_SIZE)
    assert max(input_size) <= MAX_FFEAT_SIZE
    output_fmt = getattr(model, "output_fmt", "NCHW")
    feat_axis = get_channel_dim(output_fmt)
    spatial_axis = get_spatial_dim(output_fmt)
    with torch.no_grad():
        outputs = model(torch.randn((batch_size, *input_size)))
    assert len(expected_channels) == len(outputs)
    spatial = input_size[-2:]
    for e, r, o in zip(expected_channels, expected_reduction, outputs, strict=True):
        assert e == o.shape[feat_axis]
        assert o.shape[spatial_axis[0]] <= math.ceil(spatial[0] / r) + 1
        assert o.shape[spatial_axis[1]] <= math.ceil(spatial[1] / r) + 1
        assert o.shape[spatial_axis[0]] > spatial[0] / (2 * r), f"feature reduction {r} too small"
        assert o.shape[spatial_axis[1]] > spatial[1] / (2 * r), f"feature reduction {r} too small"
        assert o.shape[0] == batch_size
        assert not torch.isnan(o).any()



# --------------------------------------------------------------------------- what timm users do


def test_pretrained_cfgs_resolve_data_config_and_released_weights() -> None:
    cfg = timm.models.get_pretrained_cfg("blockzoo_resnet50")
    assert cfg.tag == "tv_in1k" and cfg.url.endswith("resnet50-0676ba61.pth")
    assert cfg.first_conv == "stem.conv.conv" and cfg.classifier == "fc"
    assert cfg.pool_size == (7, 7) and cfg.interpolation == "bilinear"
    red = timm.models.get_pretrained_cfg("blockzoo_rednet26")
    assert red.url is None and red.license == "MIT" and "involution" in red.origin_url
    assert "blockzoo_resnet50.tv_in1k" in timm.list_pretrained("blockzoo_*")
    assert "blockzoo_rednet26.mmcls_in1k" not in timm.list_pretrained("blockzoo_*")
    model = timm.create_model("blockzoo_sknet_cifar", device=META)
    data = timm.data.resolve_data_config(model=model)
    assert data["input_size"] == (3, 32, 32) and data["crop_pct"] == 0.875
    assert data["mean"] == (0.4914, 0.4822, 0.4465) and data["interpolation"] == "bilinear"


def test_pretrained_through_timm_from_a_file_and_without_a_direct_url(tmp_path) -> None:
    import torchvision

    reference = torchvision.models.resnet50()
    path = tmp_path / "resnet50_tv.pth"
    torch.save(reference.state_dict(), path)
    model = timm.create_model("blockzoo_resnet50", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path))).eval()
    torch.testing.assert_close(model.stem.conv.conv.weight, reference.conv1.weight)
    torch.testing.assert_close(model.fc.bias, reference.fc.bias)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference.eval()(x))
    assert model.pretrained_cfg["tag"] == "tv_in1k"
    with pytest.raises(ValueError, match=r"github.com/d-li14/involution.*pretrained=\"path"):
        timm.create_model("blockzoo_rednet26", pretrained=True)


def test_features_only_and_out_indices_through_timm() -> None:
    model = timm.create_model("blockzoo_rednet26", features_only=True, out_indices=(1, 2, 3))
    assert model.feature_info.reduction() == [8, 16, 32]
    assert model.feature_info.channels() == [512, 1024, 2048]
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[-1] for o in outputs] == [8, 4, 2]
