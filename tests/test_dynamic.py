"""Semantics of the dynamic convolutions (DY-Conv, CondConv) beyond the contract."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

import blockzoo as bz
from blockzoo.blocks.dynamic import ExpertConv2d

STRATEGIES = ("aggregate", "mix", "auto")


def naive_reference(block: ExpertConv2d, x: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
    """Per-sample loop in float64: ``conv(x_n, sum_k r_nk W_k) + sum_k r_nk b_k``."""
    experts = block.expert_weights().detach().double()
    biases = None if block.bias is None else block.bias.detach().double()
    routing = routing.detach().double()
    outputs = []
    for n in range(x.shape[0]):
        r = routing[n] if routing.shape[0] > 1 else routing[0]
        kernel = sum(r[k] * experts[k] for k in range(block.num_experts))
        bias = None if biases is None else sum(r[k] * biases[k] for k in range(block.num_experts))
        outputs.append(F.conv2d(x[n : n + 1].double(), kernel, bias, block.stride, block.padding,
                                block.dilation, block.groups))
    return torch.cat(outputs)


def _randomise(block: nn.Module) -> nn.Module:
    """Non-zero biases and well-spread routing so that every term matters."""
    with torch.no_grad():
        for p in block.parameters():
            if p.dim() <= 2:
                p.normal_()
    return block


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.to(memory_format=torch.channels_last)
    if layout == "non_contiguous":  # every other channel of a twice as wide tensor
        y = torch.stack([x, torch.randn_like(x)], dim=2).flatten(1, 2)[:, ::2]
        assert not y.is_contiguous() and torch.equal(y, x)
        return y
    return x


# (in, out, stride, kernel, dilation, groups, bias, h, w)
GEOMETRIES = [
    (6, 4, 2, 3, 1, 2, True, 7, 5),
    (4, 6, 1, 3, 2, 1, False, 9, 6),
    (6, 6, 2, 5, 2, 3, True, 5, 11),
    (4, 8, 2, 1, 1, 1, True, 3, 1),
]


@pytest.mark.parametrize("cls", [bz.DynamicConv2d, bz.CondConv2d])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "non_contiguous"])
def test_strategies_match_a_naive_float64_per_sample_loop(cls, geometry, n, layout) -> None:
    c_in, c_out, stride, k, dilation, groups, bias, h, w = geometry
    block = cls(c_in, c_out, stride, kernel_size=k, dilation=dilation, groups=groups, bias=bias,
                dtype=torch.float64)
    _randomise(block)
    if isinstance(block, bz.DynamicConv2d):
        block.temperature = 1.0
    x = _layout(torch.randn(n, c_in, h, w, dtype=torch.float64), layout)
    expected = naive_reference(block, x, block.routing(x))
    assert expected.shape == (n, c_out, -(-h // stride), -(-w // stride))
    for strategy in STRATEGIES:
        block.strategy = strategy
        torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cls", [bz.DynamicConv2d, bz.CondConv2d])
def test_strategies_agree_in_float32_and_in_their_gradients(cls) -> None:
    block = _randomise(cls(8, 12, 2, groups=2))
    x = torch.randn(5, 8, 9, 7)
    grads = []
    for strategy in ("aggregate", "mix"):
        block.strategy = strategy
        block.zero_grad()
        xs = x.clone().requires_grad_()
        y = block(xs)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        grads.append([y.detach(), xs.grad] + [p.grad.clone() for p in block.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(("stride", "dilation", "groups", "bias"),
                         [(1, 1, 1, True), (2, 2, 2, True), (2, 1, 4, False)])
def test_one_expert_dynamic_conv_is_nn_conv2d(strategy, stride, dilation, groups, bias) -> None:
    block = bz.DynamicConv2d(8, 12, stride, num_experts=1, dilation=dilation, groups=groups,
                             bias=bias, strategy=strategy)
    conv = nn.Conv2d(8, 12, 3, stride, padding=dilation, dilation=dilation, groups=groups,
                     bias=bias)
    with torch.no_grad():
        block.weight.copy_(conv.weight)  # one expert: the (1 * C_out, C_in/g, k, k) weight
        if bias:
            block.bias.copy_(conv.bias[None])
        _randomise(block.fc1), _randomise(block.fc2)
    x = torch.randn(3, 8, 11, 6)
    torch.testing.assert_close(block.routing(x), torch.ones(3, 1))  # softmax of one logit
    torch.testing.assert_close(block(x), conv(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_equal_experts_give_that_conv_for_any_attention(strategy) -> None:
    block = bz.DynamicConv2d(8, 6, 2, num_experts=5, strategy=strategy, temperature=0.5)
    conv = nn.Conv2d(8, 6, 3, 2, padding=1)
    with torch.no_grad():
        block.weight.copy_(conv.weight.repeat(5, 1, 1, 1))
        block.bias.copy_(conv.bias.repeat(5, 1))
        _randomise(block.fc1), _randomise(block.fc2)
    x = torch.randn(4, 8, 9, 10)
    routing = block.routing(x)
    assert routing.std(dim=1).min() > 0.01  # the attention really differs between experts
    torch.testing.assert_close(block(x), conv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_equal_experts_cond_conv_scales_by_the_routing_sum(strategy) -> None:
    block = bz.CondConv2d(8, 6, 1, num_experts=4, strategy=strategy)
    conv = nn.Conv2d(8, 6, 3, padding=1)
    with torch.no_grad():
        block.weight.copy_(conv.weight.repeat(4, 1, 1, 1))
        block.bias.copy_(conv.bias.repeat(4, 1))
        _randomise(block.routing_fn)
    x = torch.randn(3, 8, 7, 5)
    external = torch.rand(3, 4)
    external = external / external.sum(dim=1, keepdim=True)  # any routing summing to 1
    torch.testing.assert_close(block(x, external), conv(x), rtol=1e-5, atol=1e-5)
    # Sigmoid gates need not sum to 1: the output is conv(x, s W) + s b with s = sum_e r_e.
    s = block.routing(x).sum(dim=1)
    assert not torch.allclose(s, torch.ones(3))
    expected = torch.stack([F.conv2d(x[i : i + 1], s[i] * conv.weight, s[i] * conv.bias,
                                     padding=1)[0] for i in range(3)])
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [bz.DynamicConv2d, bz.CondConv2d])
@pytest.mark.parametrize("strategy", ["aggregate", "mix"])
def test_gradients_reach_every_expert_and_the_routing_fc(cls, strategy) -> None:
    block = cls(8, 8, 1, strategy=strategy).train()
    _randomise(block)
    x = torch.randn(2, 8, 6, 6)
    block(x).square().mean().backward()
    per_expert = block.weight.grad.reshape(block.num_experts, -1).abs().sum(dim=1)
    assert (per_expert > 0).all(), per_expert
    assert (block.bias.grad.abs().sum(dim=1) > 0).all()
    fcs = [block.fc1, block.fc2] if cls is bz.DynamicConv2d else [block.routing_fn]
    for fc in fcs:
        assert fc.weight.grad.abs().sum() > 0 and fc.bias.grad.abs().sum() > 0


def test_dynamic_conv_paper_defaults_and_parameter_count() -> None:
    block = bz.DynamicConv2d(64)
    assert (block.out_channels, block.stride, block.kernel_size, block.padding) == (64, 1, 3, 1)
    assert block.num_experts == 4 and block.temperature == 30.0
    assert block.hidden_channels == 16  # C / 4
    assert bz.DynamicConv2d(8).hidden_channels == 4  # max(C / 4, K)
    assert bz.DynamicConv2d(3, 16).hidden_channels == 4
    assert not any(isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) for m in block.modules())
    assert block.expert_weights().shape == (4, 64, 64, 3, 3)
    experts = 4 * 64 * 64 * 9 + 4 * 64
    attention = (64 * 16 + 16) + (16 * 4 + 4)
    assert sum(p.numel() for p in block.parameters()) == experts + attention
    grouped = bz.DynamicConv2d(32, 64, groups=4, bias=False, num_experts=2, reduction=8)
    expected = 2 * 64 * 8 * 9 + (32 * 4 + 4) + (4 * 2 + 2)
    assert sum(p.numel() for p in grouped.parameters()) == expected


def test_cond_conv_paper_defaults_and_parameter_count() -> None:
    block = bz.CondConv2d(64, 32, 2)
    assert block.num_experts == 8 and block.routing_dropout.p == 0.0
    assert block.expert_weights().shape == (8, 32, 64, 3, 3)
    expected = 8 * 32 * 64 * 9 + 8 * 32 + (64 * 8 + 8)
    assert sum(p.numel() for p in block.parameters()) == expected


@pytest.mark.parametrize("cls", [bz.DynamicConv2d, bz.CondConv2d])
def test_experts_are_initialised_independently_like_nn_conv2d(cls) -> None:
    block = cls(64, 64)
    bound = 1 / math.sqrt(64 * 9)  # kaiming_uniform_(a=sqrt(5)), as nn.Conv2d
    reference_std = nn.Conv2d(64, 64, 3).weight.std()
    experts = block.expert_weights()
    for k in range(block.num_experts):
        assert experts[k].abs().max() <= bound
        assert abs(experts[k].std() / reference_std - 1) < 0.05
        for j in range(k):
            assert not torch.allclose(experts[j], experts[k])
    assert (block.bias == 0).all()


def test_attention_is_a_softmax_over_experts_with_temperature() -> None:
    block = _randomise(bz.DynamicConv2d(16, 8, num_experts=6, temperature=1.0))
    x = torch.randn(3, 16, 5, 4)
    logits = block.fc2(F.relu(block.fc1(x.mean(dim=(2, 3)))))
    torch.testing.assert_close(block.routing(x), torch.softmax(logits, dim=1))
    spread = {}
    for t in (1.0, 30.0):
        bz.set_temperature(block, t)
        routing = block.explain(x)["routing_weights"].detach()
        assert routing.shape == (3, 6)
        torch.testing.assert_close(routing, torch.softmax(logits / t, dim=1))
        torch.testing.assert_close(routing.sum(dim=1), torch.ones(3))
        spread[t] = float((routing.max(dim=1).values - routing.min(dim=1).values).max())
    assert spread[30.0] < spread[1.0] / 5  # a high temperature keeps the attention near uniform


def test_cond_conv_routing_is_a_sigmoid_with_dropout_on_its_input() -> None:
    block = _randomise(bz.CondConv2d(16, 8, num_experts=5, dropout=0.5))
    x = torch.randn(4, 16, 6, 3)
    pooled = x.mean(dim=(2, 3))
    block.eval()
    expected = torch.sigmoid(block.routing_fn(pooled))
    explained = block.explain(x)
    torch.testing.assert_close(explained["routing_weights"], expected)
    assert explained["kernels"].shape == (4, 8, 16, 3, 3)
    block.train()
    torch.manual_seed(3)
    routing = block.routing(x)
    torch.manual_seed(3)
    torch.testing.assert_close(
        routing, torch.sigmoid(block.routing_fn(F.dropout(pooled, 0.5, training=True)))
    )
    assert not torch.allclose(routing, expected)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cond_conv_external_routing(strategy) -> None:
    block = _randomise(bz.CondConv2d(8, 6, 2, num_experts=3, strategy=strategy))
    x = torch.randn(4, 8, 7, 7)
    routing = torch.rand(4, 3)
    expected = naive_reference(block, x, routing).float()
    torch.testing.assert_close(block(x, routing), expected, rtol=1e-5, atol=1e-5)
    # A (1, E) routing is shared by the batch: one ordinary conv with the aggregated kernel.
    shared = torch.rand(1, 3)
    kernel, bias = block.aggregate_kernels(shared)
    single = F.conv2d(x, kernel[0], bias[0], 2, 1)
    torch.testing.assert_close(block(x, shared), single, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(block(x, shared.expand(4, 3)), single, rtol=1e-5, atol=1e-5)


def test_one_routing_function_drives_two_cond_convs() -> None:
    expand = bz.CondConv2d(8, 16, kernel_size=1, num_experts=4)
    depthwise = bz.CondConv2d(16, 16, 2, groups=16, num_experts=4)
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    routing = expand.routing(x)
    y = depthwise(expand(x, routing), routing)
    assert y.shape == (2, 16, 5, 5)
    y.sum().backward()
    assert depthwise.routing_fn.weight.grad is None  # its own routing was not used
    assert expand.routing_fn.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "bad",
    [torch.rand(3, 4), torch.rand(2, 5), torch.rand(4), torch.rand(2, 4, 1),
     torch.ones(2, 4, dtype=torch.int64), [[0.5] * 4] * 2],
    ids=["batch", "experts", "1d", "3d", "int", "list"],
)
def test_cond_conv_rejects_bad_routing_weights(bad) -> None:
    block = bz.CondConv2d(8, num_experts=4)
    with pytest.raises(ValueError, match=r"CondConv2d: routing_weights.*\(2, 4\)"):
        block(torch.randn(2, 8, 5, 5), bad)


def test_cond_conv_routing_weights_of_another_dtype_are_refused_outside_autocast() -> None:
    block = bz.CondConv2d(8, num_experts=4).eval()
    x = torch.randn(2, 8, 5, 5)
    with pytest.raises(ValueError, match="routing_weights must have the input's dtype"):
        block(x, torch.rand(2, 4, dtype=torch.float64))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert block(x, torch.rand(2, 4, dtype=torch.bfloat16)).shape == (2, 8, 5, 5)


def test_auto_strategy_rule() -> None:
    def pick(block: ExpertConv2d, n: int, h: int, w: int) -> str:
        return block.choose_strategy(torch.empty(n, block.in_channels, h, w))

    block = bz.DynamicConv2d(16)
    assert pick(block, 16, 7, 7) == "mix"
    assert pick(block, 32, 8, 8) == "mix"
    assert pick(block, 32, 9, 8) == "aggregate"  # 72 > 64 output positions
    assert pick(block, 15, 7, 7) == "aggregate"  # too few samples
    assert pick(block, 1, 7, 7) == "aggregate"
    assert pick(bz.DynamicConv2d(16, stride=2), 16, 14, 14) == "mix"  # 7x7 output
    assert pick(bz.DynamicConv2d(16, kernel_size=1), 32, 7, 7) == "aggregate"
    assert pick(bz.DynamicConv2d(16, groups=2), 32, 7, 7) == "aggregate"
    assert pick(bz.CondConv2d(16), 32, 7, 7) == "aggregate"  # 8 experts: mix costs 8 convs
    assert pick(bz.DynamicConv2d(16, strategy="aggregate"), 32, 7, 7) == "aggregate"
    assert pick(bz.DynamicConv2d(16, strategy="mix"), 1, 56, 56) == "mix"
    x = torch.randn(16, 16, 7, 7)
    torch.testing.assert_close(block(x), naive_reference(block, x, block.routing(x)).float(),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", [bz.DynamicConv2d, bz.CondConv2d])
def test_export_with_dynamic_batch_even_with_the_aggregate_strategy(cls) -> None:
    block = _randomise(cls(8, 6, 2, groups=2, strategy="aggregate")).eval()
    program = torch.export.export(block, (torch.randn(2, 8, 9, 7),),
                                  dynamic_shapes={"x": {0: Dim("batch", min=1)}})
    x = torch.randn(5, 8, 9, 7)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), block(x), rtol=1e-5, atol=1e-5)


def test_dynamic_conv_bn_act_is_dy_conv_then_bn_then_relu() -> None:
    block = bz.create_block("dynamic_conv_bn_act", 16, 24, 2, num_experts=3)
    assert bz.block_info("dynamic_conv_bn_act").kind == "block"
    assert isinstance(block.conv, bz.DynamicConv2d) and block.conv.bias is None
    assert block.conv.num_experts == 3 and block.conv.stride == 2
    assert isinstance(block.bn, bz.layers.BatchNorm2d) and isinstance(block.act, nn.ReLU)
    block.eval()
    _randomise(block.bn)
    x = torch.randn(2, 16, 9, 8)
    torch.testing.assert_close(block(x), F.relu(block.bn(block.conv(x))))
    assert block.explain(x)["routing_weights"].shape == (2, 3)


def _small_model() -> nn.Sequential:
    return nn.Sequential(
        bz.DynamicConvBnAct(3, 8),
        nn.Conv2d(8, 8, 1),
        nn.Sequential(bz.DynamicConv2d(8, 8, 2), bz.CondConv2d(8, 4)),
    )


def _temperatures(model: nn.Module) -> list[float]:
    return [m.temperature for m in model.modules() if isinstance(m, bz.DynamicConv2d)]


def test_temperature_schedule_decays_linearly_and_clamps() -> None:
    model = _small_model()
    bz.set_temperature(model, 7.0)
    schedule = bz.TemperatureSchedule(model, start=30.0, end=1.0, epochs=10)
    assert _temperatures(model) == [30.0, 30.0]  # construction applies epoch 0
    assert schedule.step() == pytest.approx(27.1)  # epoch 1
    assert _temperatures(model) == pytest.approx([27.1, 27.1])
    for epoch in range(11):
        assert schedule.step(epoch) == pytest.approx(30.0 - 2.9 * epoch)
        assert _temperatures(model) == pytest.approx([30.0 - 2.9 * epoch] * 2)
    assert schedule.last_epoch == 10
    for _ in range(3):
        assert schedule.step() == 1.0  # clamped after the end
    assert schedule.step(100) == 1.0 and _temperatures(model) == [1.0, 1.0]
    assert schedule.temperature_at(5) == pytest.approx(15.5)
    warm = bz.TemperatureSchedule(model, start=1.0, end=5.0, epochs=4)  # increasing works too
    assert [warm.temperature_at(e) for e in range(6)] == [1.0, 2.0, 3.0, 4.0, 5.0, 5.0]


def test_temperature_schedule_changes_the_forward() -> None:
    model = _small_model().eval()
    for m in model.modules():
        if isinstance(m, bz.DynamicConv2d):
            _randomise(m.fc1), _randomise(m.fc2)
    x = torch.randn(2, 3, 8, 8)
    schedule = bz.TemperatureSchedule(model)
    hot = model(x)
    schedule.step(10)
    assert not torch.allclose(model(x), hot)


def test_temperature_schedule_and_set_temperature_reject_bad_values() -> None:
    model = _small_model()
    for kwargs in ({"start": 0.0}, {"end": -1.0}, {"epochs": 0}, {"epochs": 2.5},
                   {"start": float("inf")}):
        with pytest.raises(ValueError, match="TemperatureSchedule"):
            bz.TemperatureSchedule(model, **kwargs)
    with pytest.raises(ValueError, match="no DynamicConv2d"):
        bz.TemperatureSchedule(nn.Sequential(nn.Conv2d(3, 3, 1), bz.CondConv2d(3)))
    schedule = bz.TemperatureSchedule(model)
    with pytest.raises(ValueError, match="epoch"):
        schedule.step(-1)
    assert bz.set_temperature(model, 2.5) == 2 and _temperatures(model) == [2.5, 2.5]
    assert bz.set_temperature(nn.Conv2d(3, 3, 1), 2.0) == 0
    for bad in (0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="temperature"):
            bz.set_temperature(model, bad)


def test_integer_padding_is_used_as_given() -> None:
    block = bz.DynamicConv2d(4, 6, num_experts=1, padding=0, kernel_size=4)
    conv = nn.Conv2d(4, 6, 4)
    with torch.no_grad():
        block.weight.copy_(conv.weight)
        block.bias.copy_(conv.bias[None])
    x = torch.randn(2, 4, 9, 7)
    torch.testing.assert_close(block(x), conv(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (bz.DynamicConv2d, {"kernel_size": 4}, "DynamicConv2d: .*odd kernel_size"),
        (bz.DynamicConv2d, {"kernel_size": 0}, "DynamicConv2d: kernel_size"),
        (bz.DynamicConv2d, {"groups": 3}, "DynamicConv2d: groups"),
        (bz.DynamicConv2d, {"padding": -1}, "DynamicConv2d: padding"),
        (bz.DynamicConv2d, {"padding": "valid"}, "DynamicConv2d: padding"),
        (bz.DynamicConv2d, {"dilation": 0}, "DynamicConv2d: dilation"),
        (bz.DynamicConv2d, {"num_experts": 0}, "DynamicConv2d: num_experts"),
        (bz.DynamicConv2d, {"temperature": 0.0}, "DynamicConv2d: temperature"),
        (bz.DynamicConv2d, {"reduction": 0}, "DynamicConv2d: reduction"),
        (bz.DynamicConv2d, {"strategy": "loop"}, "DynamicConv2d: strategy"),
        (bz.CondConv2d, {"dropout": 1.0}, "CondConv2d: dropout"),
        (bz.CondConv2d, {"groups": 5}, "CondConv2d: groups"),
        (bz.DynamicConvBnAct, {"kernel_size": 2}, "DynamicConv2d: .*odd kernel_size"),
    ],
)
def test_rejects_bad_arguments(cls, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        cls(8, 12, **kwargs)
