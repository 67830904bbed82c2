"""Fidelity to the authors' released code: the SK networks' stem pool (the SKNet prototxt),
the NAS cells' BatchNorm epsilon (TF-slim / tensorflow/tpu), DY-Conv's reference attention
and CondConv's TensorFlow 'SAME' padding. References are written out in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blockzoo import create_block, create_model
from blockzoo.blocks import AmoebaNetNormalCell, CondConv2d, DynamicConv2d, NASNetNormalCell
from blockzoo.models.resnet import CaffeMaxPool2d

# --------------------------------------------------------------------------- SKNet stem pool


@pytest.mark.parametrize("name", ["sknet50", "sknet101"])
def test_sk_networks_pool_their_stem_as_the_prototxt(name: str) -> None:
    model = create_model(name, features_only=True, out_indices=(0,), device="meta")
    assert isinstance(model.stem.pool, CaffeMaxPool2d)
    pool = model.stem.pool
    assert (pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode) == (3, 2, 0, True)
    torchvision_form = create_model(name, stem_pool="torchvision", device="meta")
    assert type(torchvision_form.stem.pool) is nn.MaxPool2d
    assert torchvision_form.stem.pool.padding == 1 and not torchvision_form.stem.pool.ceil_mode


def test_caffe_stem_pool_sizes_and_windows() -> None:
    # at 193x161 the prototxt's pool gives 48x40 after the stem, torchvision's 49x41
    caffe = create_model("sknet50", features_only=True, out_indices=(0,)).eval()
    tv = create_model("sknet50", features_only=True, out_indices=(0,),
                      stem_pool="torchvision").eval()
    x = torch.randn(1, 3, 193, 161)
    with torch.no_grad():
        assert caffe(x)[0].shape[-2:] == (48, 40)
        assert tv(x)[0].shape[-2:] == (49, 41)
    # the windows start at pixel 0 (Caffe) instead of -1 (padding 1)
    y = torch.randn(2, 4, 112, 112, dtype=torch.float64)
    out = CaffeMaxPool2d()(y)
    assert out.shape == (2, 4, 56, 56)
    assert torch.equal(out[:, :, 0, 0], y[:, :, 0:3, 0:3].amax(dim=(2, 3)))
    assert torch.equal(out[:, :, 3, 5], y[:, :, 6:9, 10:13].amax(dim=(2, 3)))
    assert torch.equal(out[:, :, -1, -1], y[:, :, 110:, 110:].amax(dim=(2, 3)))  # ceil: clipped
    padded = nn.MaxPool2d(3, 2, padding=1)(y)
    assert torch.equal(padded[:, :, 0, 0], y[:, :, 0:2, 0:2].amax(dim=(2, 3)))


def test_caffe_stem_pool_keeps_tiny_inputs_working() -> None:
    assert CaffeMaxPool2d()(torch.randn(1, 2, 1, 2)).shape == (1, 2, 1, 1)
    model = create_model("sknet50", num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 1, 1)).shape == (1, 3)
    with pytest.raises(ValueError, match="stem_pool"):
        create_model("sknet50", stem_pool="ceil", device="meta")


# --------------------------------------------------------------------------- NAS cells


@pytest.mark.parametrize("cls", [NASNetNormalCell, AmoebaNetNormalCell])
def test_nas_cells_use_the_authors_batchnorm_epsilon(cls: type) -> None:
    cell = cls(48)
    norms = [m for m in cell.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.eps == 1e-3 for m in norms) and cell.norm_eps == 1e-3
    assert all(m.eps == 1e-5 for m in cls(48, norm_eps=1e-5).modules()
               if isinstance(m, nn.BatchNorm2d))
    with pytest.raises(ValueError, match="norm_eps"):
        cls(48, norm_eps=0)


def test_cell_batchnorm_normalises_with_the_given_epsilon() -> None:
    torch.manual_seed(0)
    cell = NASNetNormalCell(12, cell_channels=2).double().eval()
    bn = cell.preprocess_x[1].bn
    with torch.no_grad():
        bn.running_var.fill_(1e-3)
        bn.running_mean.zero_()
    x = torch.randn(1, 12, 5, 5, dtype=torch.float64)
    conv = cell.preprocess_x[1].conv(torch.relu(x))
    expected = conv / torch.sqrt(torch.tensor(1e-3 + 1e-3, dtype=torch.float64))
    expected = expected * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(cell.preprocess_x(x), expected)


# --------------------------------------------------------------------------- DY-Conv attention


def test_dynamic_conv_reference_attention_options() -> None:
    paper = DynamicConv2d(64, 32)
    assert paper.hidden_channels == 16 and paper.fc1.bias is not None  # max(64 / 4, K)
    assert DynamicConv2d(8, 8).hidden_channels == 4  # max(8 / 4, K=4)
    ref = DynamicConv2d(64, 32, attention_bias=False, attention_width="reference")
    assert ref.hidden_channels == 17 and ref.fc1.bias is None  # int(64 * 0.25) + 1
    assert ref.fc1.weight.shape == (17, 64) and ref.fc2.bias is not None
    assert DynamicConv2d(3, 16, attention_width="reference").hidden_channels == 4  # K for RGB
    assert DynamicConv2d(30, 16, attention_width="reference").hidden_channels == 8
    unit = create_block("dynamic_conv_bn_act", 64, 32, attention_bias=False,
                        attention_width="reference")
    assert unit.conv.hidden_channels == 17 and unit.conv.fc1.bias is None
    with pytest.raises(ValueError, match="attention_width"):
        DynamicConv2d(64, attention_width="timm")


def test_dynamic_conv_reference_attention_matches_a_float64_reference() -> None:
    torch.manual_seed(0)
    conv = DynamicConv2d(20, 8, attention_bias=False, attention_width="reference",
                         temperature=2.0).double()
    x = torch.randn(3, 20, 6, 7, dtype=torch.float64)
    pooled = x.mean(dim=(2, 3))
    hidden = torch.relu(pooled @ conv.fc1.weight.T)  # no bias
    expected = torch.softmax((hidden @ conv.fc2.weight.T + conv.fc2.bias) / 2.0, dim=1)
    torch.testing.assert_close(conv.routing(x), expected)
    y = conv(x)
    for n in range(3):
        kernel = (expected[n].view(-1, 1, 1, 1, 1) * conv.expert_weights()).sum(0)
        bias = expected[n] @ conv.bias
        torch.testing.assert_close(y[n:n + 1], F.conv2d(x[n:n + 1], kernel, bias, padding=1))


# --------------------------------------------------------------------------- CondConv TF SAME


def _cond_conv_reference(conv: CondConv2d, x: torch.Tensor, pad: tuple[int, ...]) -> torch.Tensor:
    routing = conv.routing(x)
    outs = []
    for n in range(x.shape[0]):
        kernel = (routing[n].view(-1, 1, 1, 1, 1) * conv.expert_weights()).sum(0)
        outs.append(F.conv2d(F.pad(x[n:n + 1], pad), kernel, routing[n] @ conv.bias,
                             stride=conv.stride))
    return torch.cat(outs)


@pytest.mark.parametrize(
    "size, stride, pad",
    [
        ((8, 8), 2, (0, 1, 0, 1)),  # even size, stride 2: 0 before, 1 after
        ((9, 7), 2, (1, 1, 1, 1)),  # odd sizes: symmetric
        ((8, 9), 2, (1, 1, 0, 1)),  # (left, right, top, bottom): H even, W odd
        ((6, 6), 1, (1, 1, 1, 1)),  # stride 1: symmetric
    ],
)
def test_cond_conv_tf_same_padding(size: tuple[int, int], stride: int, pad: tuple) -> None:
    torch.manual_seed(0)
    conv = CondConv2d(6, 5, stride, padding="tf_same", num_experts=3).double()
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(2, 6, *size, dtype=torch.float64)
    y = conv(x)
    assert y.shape[-2:] == tuple(-(-s // stride) for s in size)
    torch.testing.assert_close(y, _cond_conv_reference(conv, x, pad))
    for strategy in ("aggregate", "mix"):
        conv.strategy = strategy
        torch.testing.assert_close(conv(x), y)


def test_cond_conv_tf_same_differs_from_symmetric_padding_at_even_sizes() -> None:
    torch.manual_seed(0)
    tf = CondConv2d(4, 4, 2, padding="tf_same")
    sym = CondConv2d(4, 4, 2)
    sym.load_state_dict(tf.state_dict())
    x = torch.randn(1, 4, 8, 8)
    assert tf(x).shape == sym(x).shape == (1, 4, 4, 4)
    assert not torch.allclose(tf(x), sym(x))
    assert "tf_same" in repr(tf)
    even = CondConv2d(4, 4, 2, kernel_size=2, padding="tf_same")  # even kernels work too
    assert even(x).shape == (1, 4, 4, 4)
