"""Registry, public API and shared layers."""

from __future__ import annotations

import re

import pytest
import torch

import blockzoo as bz
from blockzoo.layers import BatchNorm2d, get_act_layer, get_norm_layer, make_divisible


def test_list_blocks_sorted_and_filtered_by_kind() -> None:
    names = bz.list_blocks()
    assert names == sorted(names)
    assert {"se", "gc", "coord_att", "spd_conv"} <= set(names)
    assert set(bz.list_blocks("attention")) >= {"se", "gc", "coord_att"}
    assert "spd_conv" in bz.list_blocks("downsample")
    assert sorted(sum((bz.list_blocks(k) for k in bz.KINDS), [])) == names
    with pytest.raises(ValueError, match="kind"):
        bz.list_blocks("transformer")


def test_block_info_holds_paper_metadata() -> None:
    info = bz.block_info("gc")
    assert info.cls is bz.GlobalContext
    assert info.kind == "attention" and info.arxiv == "1904.11492" and info.year == 2019
    assert "GCNet" in info.paper and info.summary
    assert info.defaults["ratio"] == pytest.approx(1 / 16)
    assert info.defaults["pool"] == "att"
    for name in bz.list_blocks():
        info = bz.block_info(name)
        assert info.paper and info.summary and 1990 < info.year < 2030
        assert re.fullmatch(r"\d{4}\.\d{4,5}", info.arxiv) or info.url.startswith("https://")
        doc = info.cls.__doc__ or ""
        assert info.arxiv in doc, f"{name}: docstring must cite arXiv {info.arxiv}"
        module_doc = __import__(info.cls.__module__, fromlist=["x"]).__doc__ or ""
        assert info.arxiv in module_doc, f"{name}: module must open with its paper"


def test_unknown_block_raises_key_error_with_close_matches() -> None:
    with pytest.raises(KeyError, match="coord_att"):
        bz.block_info("coord_at")
    with pytest.raises(KeyError, match="unknown block"):
        bz.create_block("no_such_block", 16)


def test_create_block_passes_arguments_through() -> None:
    block = bz.create_block("se", 64, reduction=4)
    assert isinstance(block, bz.SqueezeExcite) and block.rd_channels == 16
    spd = bz.create_block("spd_conv", 8, 16, stride=2, kernel_size=1)
    assert (spd.in_channels, spd.out_channels, spd.stride) == (8, 16, 2)


def test_make_divisible() -> None:
    assert make_divisible(32 * 0.25, 8) == 8
    assert make_divisible(37, 8) == 40
    assert make_divisible(10, 8) == 16  # 8 would be below 90% of 10
    assert make_divisible(3, 8) == 8
    assert make_divisible(4, 1, min_value=8) == 8
    assert make_divisible(16.4, 1) == 16


def test_layer_factories() -> None:
    assert get_act_layer("relu") is torch.nn.ReLU
    assert get_act_layer(torch.nn.GELU) is torch.nn.GELU
    assert get_act_layer(None) is torch.nn.Identity
    assert get_norm_layer("bn") is BatchNorm2d
    with pytest.raises(ValueError, match="activation"):
        get_act_layer("nope")


def test_batchnorm_single_value_uses_running_stats_and_keeps_them() -> None:
    bn = BatchNorm2d(4).train()
    reference = torch.nn.BatchNorm2d(4).train()
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(bn(x), reference(x))
    torch.testing.assert_close(bn.running_mean, reference.running_mean)
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    single = torch.randn(1, 4, 1, 1)
    y = bn(single)
    expected = (single - mean[None, :, None, None]) / torch.sqrt(var + bn.eps)[None, :, None, None]
    torch.testing.assert_close(y, expected * bn.weight[None, :, None, None])
    torch.testing.assert_close(bn.running_mean, mean)
    torch.testing.assert_close(bn.running_var, var)
    with pytest.raises(ValueError):
        reference(single)  # plain PyTorch cannot do this


def test_registry_strides_come_from_the_class_or_must_be_given(monkeypatch) -> None:
    from blockzoo import registry
    from blockzoo.blocks.base import Block

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    meta = dict(kind="conv", paper="test", arxiv="0000.0", year=2000, summary="test only")

    class OnlyStrideThree(Block):
        allowed_strides = (3,)
        stride_reason = "it is a test"

    registry.register_block("test_stride_three", **meta)(OnlyStrideThree)
    assert bz.block_info("test_stride_three").strides == (3,)
    message = "OnlyStrideThree: it is a test, so stride must be 3, got 2"
    with pytest.raises(ValueError, match=message):
        OnlyStrideThree(8, stride=2)

    class AnyStride(Block):
        pass

    with pytest.raises(ValueError, match="AnyStride sets no allowed_strides, so give strides="):
        registry.register_block("test_any_stride", **meta)(AnyStride)
    registry.register_block("test_any_stride", strides=(1, 4), **meta)(AnyStride)
    assert bz.block_info("test_any_stride").strides == (1, 4)
