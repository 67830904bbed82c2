"""Semantics of the DenseNet dense block beyond the contract."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from torch import nn

import blockzoo as bz


def _count(block: nn.Module) -> int:
    return sum(p.numel() for p in block.parameters())


def _torchvision_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's ``denselayer{i+1}.*`` names to ours, ``layers.{i}.*``."""
    out = {}
    for key, value in state.items():
        layer, rest = key.split(".", 1)
        out[f"layers.{int(layer.removeprefix('denselayer')) - 1}.{rest}"] = value
    return out


def test_densenet121_first_block_parameter_count() -> None:
    block = bz.DenseBlock(64)  # defaults: 6 layers, growth 32, bn_size 4
    assert block.out_channels == 64 + 6 * 32 == 256
    by_hand = 0
    for i in range(6):
        c = 64 + 32 * i  # the layer sees the input and the i earlier outputs
        by_hand += 2 * c + c * 128  # BN, 1x1 conv to bn_size * growth = 128
        by_hand += 2 * 128 + 9 * 128 * 32  # BN, 3x3 conv to growth = 32
    assert _count(block) == by_hand == 335_040
    assert all(conv.bias is None for conv in block.modules() if isinstance(conv, nn.Conv2d))


@pytest.mark.parametrize(("c_in", "layers", "growth"), [(16, 1, 8), (16, 3, 12), (5, 4, 2)])
def test_output_width_and_concatenation(c_in: int, layers: int, growth: int) -> None:
    block = bz.DenseBlock(c_in, num_layers=layers, growth_rate=growth, bn_size=2).eval()
    assert block.out_channels == c_in + layers * growth
    assert [layer.conv1.in_channels for layer in block.layers] == [
        c_in + i * growth for i in range(layers)
    ]
    x = torch.randn(2, c_in, 6, 7)
    y = block(x)
    assert y.shape == (2, c_in + layers * growth, 6, 7)
    torch.testing.assert_close(y[:, :c_in], x, rtol=0, atol=0)  # the input is passed on
    # the last layer sees everything before it and adds the last growth_rate channels
    torch.testing.assert_close(y[:, -growth:], block.layers[-1]([y[:, :-growth]]))


def test_matches_torchvision_dense_block() -> None:
    densenet = importlib.import_module("torchvision.models.densenet")
    reference = densenet._DenseBlock(3, 16, bn_size=4, growth_rate=8, drop_rate=0.0)
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)
    ours = bz.DenseBlock(16, num_layers=3, growth_rate=8, bn_size=4)
    ours.load_state_dict(_torchvision_keys(reference.state_dict()))
    x = torch.randn(2, 16, 7, 5)
    torch.testing.assert_close(ours.train()(x), reference.train()(x))
    torch.testing.assert_close(ours.state_dict(), _torchvision_keys(reference.state_dict()))
    torch.testing.assert_close(ours.eval()(x), reference.eval()(x))


def test_memory_efficient_gives_identical_outputs_gradients_and_statistics() -> None:
    plain = bz.DenseBlock(12, num_layers=3, growth_rate=6).train()
    efficient = bz.DenseBlock(12, num_layers=3, growth_rate=6, memory_efficient=True).train()
    efficient.load_state_dict(plain.state_dict())
    calls = []
    for layer in efficient.layers:
        layer.norm1.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 12, 6, 5)
    results = []
    for block in (plain, efficient):
        xi = x.clone().requires_grad_()
        y = block(xi)
        y.square().sum().backward()
        grads = {n: p.grad for n, p in block.named_parameters()}
        results.append((y.detach(), xi.grad, grads, copy.deepcopy(block.state_dict())))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    # the bottleneck really is recomputed in backward: two norm1 calls per layer ...
    assert len(calls) == 2 * 3
    # ... and the recomputation does not move the running statistics a second time
    assert all(int(layer.norm1.num_batches_tracked) == 1 for layer in efficient.layers)
    calls.clear()
    with torch.no_grad():  # no checkpointing without autograd
        torch.testing.assert_close(efficient(x), plain(x), rtol=0, atol=0)
    assert len(calls) == 3


def test_memory_efficient_training_step_compiles() -> None:
    efficient = bz.DenseBlock(8, num_layers=2, growth_rate=4, memory_efficient=True).train()
    plain = copy.deepcopy(efficient)
    for layer in plain.layers:
        layer.memory_efficient = False
    torch._dynamo.reset()
    compiled = torch.compile(efficient, fullgraph=True)
    x = torch.randn(2, 8, 5, 6)
    results = []
    for block in (compiled, plain):
        xi = x.clone().requires_grad_()
        y = block(xi)
        y.square().sum().backward()
        grads = [p.grad for p in block.parameters()]
        results.append((y.detach(), xi.grad, grads, [b.clone() for b in block.buffers()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-5)
    assert all(int(layer.norm1.num_batches_tracked) == 1 for layer in efficient.layers)


def test_structural_out_channels_and_bad_options() -> None:
    with pytest.raises(ValueError, match=r"DenseBlock.*in_channels \+ num_layers \* growth_rate"):
        bz.DenseBlock(16, 32, num_layers=2, growth_rate=4)
    assert bz.DenseBlock(16, 24, num_layers=2, growth_rate=4).out_channels == 24
    for bad in ({"num_layers": 0}, {"growth_rate": -2}, {"bn_size": 1.5}):
        with pytest.raises(ValueError, match="DenseBlock"):
            bz.DenseBlock(16, **bad)
