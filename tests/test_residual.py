"""Semantics of the bottleneck, residual, basic residual and ResNeXt blocks beyond the contract.

Faithfulness is checked against torchvision's ``Bottleneck``/``BasicBlock`` (random weights, no
download) with the weights copied over, against parameter counts worked out by hand, and, for
ResNeXt, against the paper's split-transform-merge form.
"""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import blockzoo as bz
from blockzoo import registry
from blockzoo.blocks import Block


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def conv_weights(module: nn.Module) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if n.endswith("conv.weight"))


def randomize_norms(module: nn.Module) -> None:
    """Give every BatchNorm non-trivial affine parameters and running statistics."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)


def load_reference_weights(ours: nn.Module, reference: nn.Module) -> None:
    """Copy ``reference``'s state into ``ours``, entry by entry in registration order.

    The two modules must register the same tensors in the same order: each pair must agree in
    shape and in the last name component (``weight``, ``running_mean``, ...).
    """
    mine, theirs = ours.state_dict(), reference.state_dict()
    assert len(mine) == len(theirs), (list(mine), list(theirs))
    for (name, value), (ref_name, ref_value) in zip(mine.items(), theirs.items(), strict=True):
        assert name.rsplit(".", 1)[-1] == ref_name.rsplit(".", 1)[-1], (name, ref_name)
        assert value.shape == ref_value.shape, (name, ref_name)
    ours.load_state_dict(dict(zip(mine, theirs.values(), strict=True)))


def assert_same_function(ours: nn.Module, reference: nn.Module, in_channels: int) -> None:
    """Equal outputs in eval mode and in train mode (batch statistics), at an odd size."""
    randomize_norms(reference)
    load_reference_weights(ours, reference)
    x = torch.randn(2, in_channels, 9, 7)
    for training in (False, True):
        ours.train(training)
        reference.train(training)
        torch.testing.assert_close(ours(x), reference(x))
    # the training pass moved both sets of running statistics alike
    for mine, theirs in zip(ours.state_dict().values(), reference.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(mine, theirs)


@pytest.fixture(scope="module")
def resnet50() -> nn.Module:
    return torchvision.models.resnet50(weights=None)


def test_resnet50_first_bottleneck_has_75008_parameters(resnet50: nn.Module) -> None:
    # 1x1 64->64, 3x3 64->64, 1x1 64->256, projection 1x1 64->256, BN (2 per channel) on each.
    convs = 64 * 64 + 9 * 64 * 64 + 64 * 256 + 64 * 256
    norms = 2 * (64 + 64 + 256 + 256)
    assert convs + norms == 75_008
    block = bz.create_block("residual", 64, 256)
    assert n_params(block) == 75_008 == n_params(resnet50.layer1[0])
    assert block.width == 64 and isinstance(block.shortcut[0], nn.Conv2d)
    # without the shortcut: the plain bottleneck
    assert n_params(bz.create_block("bottleneck", 64, 256)) == 75_008 - (64 * 256 + 2 * 256)


@pytest.mark.parametrize(
    ("layer", "index", "in_channels", "out_channels", "stride"),
    [("layer1", 0, 64, 256, 1), ("layer1", 1, 256, 256, 1), ("layer2", 0, 256, 512, 2)],
)
def test_residual_computes_torchvision_bottleneck(
    resnet50: nn.Module, layer: str, index: int, in_channels: int, out_channels: int, stride: int
) -> None:
    reference = getattr(resnet50, layer)[index]
    block = bz.create_block("residual", in_channels, out_channels, stride)
    assert isinstance(block.shortcut, nn.Identity) == (reference.downsample is None)
    assert_same_function(block, reference, in_channels)


def test_bottleneck_is_the_body_without_shortcut(resnet50: nn.Module) -> None:
    reference = resnet50.layer1[1]  # 256 -> 256: identity shortcut
    block = bz.create_block("bottleneck", 256, 256)
    randomize_norms(reference)
    load_reference_weights(block, nn.Sequential(
        reference.conv1, reference.bn1, reference.conv2, reference.bn2, reference.conv3,
        reference.bn3,
    ))
    x = torch.randn(2, 256, 5, 6)
    with torch.no_grad():
        body = reference.bn3(reference.conv3(reference.relu(reference.bn2(reference.conv2(
            reference.relu(reference.bn1(reference.conv1(x))))))))
        torch.testing.assert_close(block(x), body)
        torch.testing.assert_close(reference(x), torch.relu(body + x))
    assert (block(x) < 0).any()  # no activation after the last BN
    assert block.width == 64 and block.body.conv2.conv.kernel_size == (3, 3)
    assert bz.create_block("bottleneck", 64, 128, expansion=2).width == 64


def test_stride_is_on_the_3x3_conv_and_the_projection() -> None:
    block = bz.create_block("residual", 32, 64, stride=2)
    body = block.body
    assert body.conv1.conv.stride == (1, 1) and body.conv3.conv.stride == (1, 1)
    assert body.conv2.conv.stride == (2, 2) and block.shortcut.conv.stride == (2, 2)
    assert block(torch.randn(1, 32, 7, 5)).shape == (1, 64, 4, 3)


def test_basic_residual_counts_and_torchvision_basic_block() -> None:
    resnet18 = torchvision.models.resnet18(weights=None)
    same = 2 * 9 * 64 * 64 + 2 * 2 * 64
    assert same == 73_984
    down = 9 * 64 * 128 + 9 * 128 * 128 + 64 * 128 + 3 * 2 * 128
    assert down == 230_144
    block = bz.create_block("basic_residual", 64)
    assert n_params(block) == same == n_params(resnet18.layer1[0])
    assert_same_function(block, resnet18.layer1[0], 64)
    block = bz.create_block("basic_residual", 64, 128, stride=2)
    assert n_params(block) == down == n_params(resnet18.layer2[0])
    assert_same_function(block, resnet18.layer2[0], 64)


def test_resnext_defaults_and_widths() -> None:
    info = bz.block_info("resnext")
    assert info.defaults["cardinality"] == 32 and info.defaults["base_width"] == 4
    # out 64: planes 16 -> int(16 * 4 / 64) * 32 = 32 channels in 32 groups
    block = bz.create_block("resnext", 64)
    assert block.width == 32 and block.body.conv2.conv.groups == 32
    block = bz.create_block("resnext", 256, 256)
    assert block.width == 128 and block.body.conv2.conv.groups == 32
    # 32x8d doubles the width; ResNet is cardinality 1, base width 64
    assert bz.create_block("resnext", 256, 256, base_width=8).width == 256
    assert bz.create_block("residual", 256, 256).width == 64
    with pytest.raises(ValueError, match=r"ResidualBottleneck.*0 channels per group"):
        bz.create_block("resnext", 16, 16)  # floor(16 / 4 * 4 / 64) = 0


def test_resnext_parameters_match_the_paper_and_torchvision() -> None:
    # Xie et al., Sec. 3.3: C * (256 d + 3 * 3 * d * d + d * 256) with C = 32, d = 4 is ~70k,
    # about the 69,632 of ResNet's 256 -> 64 -> 256 bottleneck.
    block = bz.create_block("resnext", 256, 256)
    assert conv_weights(block) == 32 * (256 * 4 + 9 * 4 * 4 + 4 * 256) == 70_144
    resnet_block = bz.create_block("residual", 256, 256)
    assert conv_weights(resnet_block) == 69_632
    assert n_params(block) == 70_144 + 2 * (128 + 128 + 256)
    resnext50 = torchvision.models.resnext50_32x4d(weights=None)
    assert n_params(block) == n_params(resnext50.layer1[1])
    assert_same_function(block, resnext50.layer1[1], 256)
    assert_same_function(bz.create_block("resnext", 256, 512, 2), resnext50.layer2[0], 256)


def _batch_norm(x: torch.Tensor, norm: nn.BatchNorm2d, channels: slice, training: bool):
    return F.batch_norm(
        x, norm.running_mean[channels].clone(), norm.running_var[channels].clone(),
        norm.weight[channels], norm.bias[channels], training, 0.0, norm.eps,
    )


def split_transform_merge(block: nn.Module, x: torch.Tensor, training: bool) -> torch.Tensor:
    """The paper's form (Xie et al., Fig. 3a): ``cardinality`` separate paths, summed.

    Path ``k`` is ``1x1 (in -> d) + BN + ReLU -> 3x3 (d -> d) + BN + ReLU -> 1x1 (d -> out)``;
    the paths' outputs are summed, one BN normalises the aggregate (BN is per channel, so the
    per-path BNs of the first two layers are channel slices of the grouped block's BNs, with
    batch statistics too), then the shortcut is added and ReLU applied.
    """
    b = block.body
    d = block.width // block.cardinality
    total = torch.zeros(())
    for k in range(block.cardinality):
        path = slice(k * d, (k + 1) * d)
        h = F.conv2d(x, b.conv1.conv.weight[path])
        h = F.relu(_batch_norm(h, b.conv1.bn, path, training))
        h = F.conv2d(h, b.conv2.conv.weight[path], stride=block.stride, padding=1)
        h = F.relu(_batch_norm(h, b.conv2.bn, path, training))
        total = total + F.conv2d(h, b.conv3.conv.weight[:, path])
    aggregate = _batch_norm(total, b.conv3.bn, slice(None), training)
    return F.relu(aggregate + block.shortcut(x))


@pytest.mark.parametrize("training", [False, True])
def test_resnext_grouped_conv_equals_split_transform_merge(training: bool) -> None:
    block = bz.create_block("resnext", 64, 128, stride=2, dtype=torch.float64)
    assert (block.cardinality, block.width) == (32, 64)  # d = 2
    randomize_norms(block)
    block.train(training)
    x = torch.randn(2, 64, 9, 7, dtype=torch.float64)
    with torch.no_grad():
        expected = split_transform_merge(block, x, training)
        torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["residual", "resnext", "basic_residual"])
@pytest.mark.parametrize("attention", [None, "se", "gc"])
def test_zero_init_last_makes_the_block_relu_of_the_shortcut(name: str, attention) -> None:
    block = bz.create_block(name, 64, zero_init_last=True, attention=attention).train()
    assert isinstance(block.shortcut, nn.Identity)
    assert torch.count_nonzero(block.body[-1].bn.weight) == 0
    x = torch.randn(2, 64, 6, 5)
    torch.testing.assert_close(block(x), torch.relu(x), rtol=0, atol=0)
    down = bz.create_block(name, 64, 128, 2, zero_init_last=True, attention=attention).eval()
    with torch.no_grad():
        torch.testing.assert_close(down(x), torch.relu(down.shortcut(x)), rtol=0, atol=0)
    assert not torch.equal(bz.create_block(name, 64)(x), torch.relu(x))  # default: not zero


@pytest.mark.parametrize("name", ["residual", "basic_residual"])
@pytest.mark.parametrize("attention", ["se", "gc", "coord_att"])
def test_attention_sits_after_the_last_bn_and_before_the_add(name: str, attention: str) -> None:
    block = bz.create_block(name, 32, 64, 2, attention=attention).eval()
    assert isinstance(block.attention, bz.block_info(attention).cls)
    assert block.attention.in_channels == 64
    if attention == "gc":  # GC's last conv starts at zero: make it do something
        nn.init.normal_(block.attention.channel_add[-1].weight)
    seen: dict[str, torch.Tensor] = {}
    block.body[-1].bn.register_forward_hook(lambda m, i, o: seen.update(last_bn=o))
    block.attention.register_forward_hook(lambda m, i, o: seen.update(att_in=i[0], att_out=o))
    x = torch.randn(2, 32, 9, 7)
    with torch.no_grad():
        y = block(x)
        assert seen["att_in"] is seen["last_bn"]
        assert not torch.allclose(seen["att_out"], seen["att_in"])
        torch.testing.assert_close(y, torch.relu(seen["att_out"] + block.shortcut(x)))


def test_attention_kwargs_reach_the_attention_block() -> None:
    block = bz.create_block("residual", 64, 256, attention="se", attention_kwargs={"reduction": 4})
    assert block.attention.rd_channels == 64
    # SE-ResNet-50's first block: SE on 256 channels with r = 16 adds 2 * 256 * 16 + 16 + 256
    se = bz.create_block("residual", 64, 256, attention="se")
    assert n_params(se) - 75_008 == 2 * 256 * 16 + 16 + 256


def test_rejects_blocks_of_the_wrong_kind_and_bad_options() -> None:
    with pytest.raises(ValueError, match=r"ResidualBottleneck: attention must name a registered "
                                         r"attention-kind block.*'spd_conv'.*'downsample'"):
        bz.create_block("residual", 16, attention="spd_conv")
    with pytest.raises(ValueError, match=r"conv must name a registered conv-kind block.*'se'"):
        bz.create_block("residual", 16, conv="se")
    with pytest.raises(ValueError, match=r"Bottleneck: conv must.*'no_such': not a registered"):
        bz.create_block("bottleneck", 16, conv="no_such")
    with pytest.raises(ValueError, match="BasicResidual: attention must.*'residual'"):
        bz.create_block("basic_residual", 16, attention="residual")
    with pytest.raises(ValueError, match="conv_kwargs .* without a conv block"):
        bz.create_block("residual", 16, conv_kwargs={"k": 1})
    with pytest.raises(ValueError, match="attention_kwargs .* without an attention block"):
        bz.create_block("residual", 16, attention_kwargs={"reduction": 4})
    with pytest.raises(ValueError, match="conv_norm_act=False needs a conv block"):
        bz.create_block("residual", 16, conv_norm_act=False)
    with pytest.raises(ValueError, match="zero_init_last needs a norm layer with a weight"):
        bz.create_block("basic_residual", 16, zero_init_last=True, norm_layer=None)
    for bad in ({"expansion": 0}, {"cardinality": 2.5}, {"base_width": True}):
        with pytest.raises(ValueError, match="ResidualBottleneck: .* must be a positive integer"):
            bz.create_block("residual", 16, **bad)
    with pytest.raises(ValueError, match="Bottleneck: expansion must be a positive integer"):
        bz.create_block("bottleneck", 16, expansion=-1)
    for name in ("bottleneck", "residual", "basic_residual"):
        with pytest.raises(ValueError, match="stride must be 1 or 2"):
            bz.create_block(name, 16, stride=3)


class _PlainConv(Block):
    """A test-only conv-kind block: one 3x3 convolution without bias (no paper, arXiv 0000.0)."""

    def __init__(self, in_channels, out_channels=None, stride=1, *, marker: int = 0) -> None:
        super().__init__(in_channels, out_channels, stride)
        self.marker = marker
        self.conv = nn.Conv2d(in_channels, self.out_channels, 3, stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.conv(x)


@pytest.fixture
def plain_conv(monkeypatch: pytest.MonkeyPatch) -> str:
    """Register ``_PlainConv`` as a conv-kind block for one test only."""
    info = registry.BlockInfo(
        name="test_plain_conv", cls=_PlainConv, kind="conv", paper="test", arxiv="0000.0",
        year=2000, summary="test only",
    )
    monkeypatch.setitem(registry._REGISTRY, "test_plain_conv", info)
    return "test_plain_conv"


@pytest.mark.parametrize("name", ["bottleneck", "residual"])
def test_conv_option_replaces_only_the_3x3_convolution(name: str, plain_conv: str) -> None:
    plain = bz.create_block(name, 32, 64, 2)
    swapped = bz.create_block(name, 32, 64, 2, conv=plain_conv, conv_kwargs={"marker": 7})
    conv2 = swapped.body.conv2
    assert isinstance(conv2.conv, _PlainConv) and conv2.conv.marker == 7
    assert (conv2.conv.in_channels, conv2.conv.out_channels, conv2.conv.stride) == (16, 16, 2)
    assert isinstance(conv2.bn, nn.BatchNorm2d) and isinstance(conv2.act, nn.ReLU)
    # the same weights give the same function: only the convolution was swapped
    with torch.no_grad():
        swapped.body.conv2.conv.conv.weight.copy_(plain.body.conv2.conv.weight)
    state = {k.replace("conv2.conv.conv.", "conv2.conv."): v
             for k, v in swapped.state_dict().items()}
    plain.load_state_dict(state)
    x = torch.randn(2, 32, 9, 7)
    torch.testing.assert_close(swapped(x), plain(x))
    bare = bz.create_block(name, 32, 64, 2, conv=plain_conv, conv_norm_act=False)
    assert isinstance(bare.body.conv2.bn, nn.Identity)
    assert isinstance(bare.body.conv2.act, nn.Identity)


CONV_BLOCKS = bz.list_blocks("conv")


@pytest.mark.skipif(not CONV_BLOCKS, reason="no conv-kind block is registered yet")
@pytest.mark.parametrize("conv", CONV_BLOCKS)
def test_residual_accepts_every_registered_conv_block(conv: str) -> None:
    block = bz.create_block("residual", 32, 256, 2, conv=conv, attention="se").train()
    assert isinstance(block.body.conv2.conv, bz.block_info(conv).cls)
    x = torch.randn(2, 32, 9, 7)
    y = block(x)
    assert y.shape == (2, 256, 5, 4)
    y.square().mean().backward()
    assert all(p.grad is not None for p in block.parameters())


def _reference_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``relu(attention(body(x)) + shortcut(x))`` with out-of-place ops only."""
    out = x
    for unit in block.body:
        out = unit.bn(unit.conv(out))
        if not isinstance(unit.act, nn.Identity):
            out = torch.relu(out)
    shortcut = block.shortcut(x) if isinstance(block.shortcut, nn.Identity) else \
        block.shortcut.bn(block.shortcut.conv(x))
    return torch.relu(block.attention(out) + shortcut)


@pytest.mark.parametrize("attention", [None, "se"])
@pytest.mark.parametrize(("grad", "train"), [(True, True), (True, False), (False, False)])
def test_in_place_add_and_activations_keep_values_gradients_and_the_input(
    attention: str | None, grad: bool, train: bool
) -> None:
    block = bz.create_block("residual", 16, 32, 2, attention=attention).double().train(train)
    randomize_norms(block)
    x = torch.randn(2, 16, 9, 7, dtype=torch.double, requires_grad=grad)
    before = x.detach().clone()
    with torch.set_grad_enabled(grad):
        y = block(x)
        expected = _reference_forward(block, x)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(x.detach(), before)  # the block input is never written
    if grad:
        (gx,) = torch.autograd.grad(y.square().sum(), x)
        (gx_ref,) = torch.autograd.grad(expected.square().sum(), x)
        torch.testing.assert_close(gx, gx_ref)
        assert torch.autograd.gradcheck(block, (x,))


def test_in_place_add_leaves_hooked_branch_outputs_alone_in_training_too() -> None:
    block = bz.create_block("residual", 16, 16).double().train()
    randomize_norms(block)
    seen: dict[str, torch.Tensor] = {}
    block.body[-1].register_forward_hook(lambda m, i, o: seen.update(branch=o.detach()))
    x = torch.randn(2, 16, 5, 5, dtype=torch.double, requires_grad=True)
    y = block(x)
    assert not torch.allclose(seen["branch"], y)
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("attention", [None, "se"])
@pytest.mark.parametrize(
    "where",
    ["body", "body.conv3", "body.conv3.bn", "body.conv3.act", "attention", "attention.gate"],
)
def test_a_hook_handed_the_branch_output_keeps_what_it_was_handed(
    attention: str | None, where: str
) -> None:
    block = bz.create_block("residual", 16, 16, attention=attention).eval()
    randomize_norms(block)
    try:
        hooked = block.get_submodule(where)
    except AttributeError:
        pytest.skip(f"no {where} without an attention block")
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooked.register_forward_hook(lambda m, i, o: kept.append((o, o.clone())))
    with torch.no_grad():
        block(torch.randn(2, 16, 5, 5))
    (handed, copy), = kept
    assert torch.equal(handed, copy)


def test_the_hook_search_stops_at_the_layer_that_makes_the_branch_output() -> None:
    from blockzoo.blocks.residual import _hook_may_see_output

    block = bz.create_block("residual", 16, 16)
    units = (block.body, block.attention)
    assert not _hook_may_see_output(units)
    handle = block.body[0].conv.register_forward_hook(lambda m, i, o: None)
    assert not _hook_may_see_output(units)  # its output is not the branch output
    handle.remove()
    block.body.conv3.act.register_forward_hook(lambda m, i, o: None)
    assert _hook_may_see_output(units)


def _adds(block: nn.Module, x: torch.Tensor) -> collections.Counter:
    with torch.profiler.profile() as prof:
        block(x).sum().backward()
    names = (e.name for e in prof.events())
    return collections.Counter(n for n in names if n in ("aten::add", "aten::add_"))


def test_shortcut_is_added_in_place_in_training_after_an_se_block() -> None:
    block = bz.create_block("residual", 16, 16, attention="se").train()
    adds = _adds(block, torch.randn(2, 16, 6, 6, requires_grad=True))
    assert adds["aten::add_"] >= 1 and adds["aten::add"] == 0, adds


@pytest.mark.parametrize("attention", [nn.Sigmoid(), nn.ReLU(), nn.Softmax(dim=1)])
def test_shortcut_is_not_added_into_an_output_that_the_backward_pass_reads(
    attention: nn.Module,
) -> None:
    block = bz.create_block("residual", 16, 16).double().train()
    randomize_norms(block)
    block.attention = attention  # each saves its result for its backward pass
    x = torch.randn(2, 16, 5, 5, dtype=torch.double, requires_grad=True)
    y = block(x)
    expected = _reference_forward(block, x)
    torch.testing.assert_close(y, expected)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    (gx_ref,) = torch.autograd.grad(expected.square().sum(), x)
    torch.testing.assert_close(gx, gx_ref)
