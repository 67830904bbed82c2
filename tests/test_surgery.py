"""Model surgery: replace_convs, insert_after/insert_before, function preservation, dry runs."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import blockzoo as bz
from blockzoo.blocks.base import Block, named_open_modules
from blockzoo.layers import ConvNormAct
from blockzoo.models.base import init_conv_norm_act
from blockzoo.surgery import (
    NOT_PRESERVABLE,
    GatedResidual,
    insert_after,
    insert_before,
    preservable_convs,
    replace_convs,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
#: The conv-kind blocks that replace_convs makes function-preserving.
PRESERVING_CONVS = ["dynamic_conv", "cond_conv", "deform_conv", "mdeform_conv"]
#: Blocks that cannot start as an arbitrary dense conv (preserve=True must refuse them).
NON_PRESERVING_CONVS = ["sk_conv", "involution", "acmix", "separable_conv", "spd_conv"]


def _resnet18() -> nn.Module:
    return torchvision.models.resnet18(num_classes=10).eval()


def _step(model: nn.Module, lr: float = 0.1) -> None:
    """One SGD step on a random batch of two 64x64 images, in training mode."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    logits = model(torch.randn(2, 3, 64, 64))
    F.cross_entropy(logits, torch.tensor([1, 7]) % logits.shape[1]).backward()
    opt.step()
    opt.zero_grad()
    model.eval()


def _assert_preserved_then_learns(model: nn.Module, edit) -> object:
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    report = edit(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    _step(model)
    with torch.no_grad():
        assert (model(x) - before).abs().max() > 1e-3
    return report


# --------------------------------------------------------------------------- insert


def test_insert_se_as_gated_residual_preserves_resnet18_then_trains() -> None:
    model = _resnet18()
    report = _assert_preserved_then_learns(
        model, lambda m: insert_after(m, "se", where=lambda name, mod: name.endswith("bn2"))
    )
    assert report.names == [f"layer{i}.{j}.bn2" for i in range(1, 5) for j in range(2)]
    assert {c.preservation for c in report.changes} == {"gated residual"}
    # SE(C) has 2 * C * r + C + r parameters with r = max(8, C / 16); plus one gamma each.
    expected = sum(2 * (2 * c * max(8, c // 16) + c + max(8, c // 16) + 1)
                   for c in (64, 128, 256, 512))
    assert report.param_delta == expected
    wrapped = model.layer1[0].bn2
    assert isinstance(wrapped, nn.Sequential) and isinstance(wrapped[0], nn.BatchNorm2d)
    assert isinstance(wrapped[1], GatedResidual) and isinstance(wrapped[1].block, bz.SqueezeExcite)
    assert wrapped[1].gamma.item() != 0.0  # the first step moved gamma


def test_gated_residual_block_params_learn_from_the_second_step() -> None:
    model = _resnet18()
    insert_after(model, "coord_att", where="layer2.0.bn2")
    gate = model.layer2[0].bn2[1]
    for step in range(2):
        model.train()
        F.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.tensor([0, 1])).backward()
        block_grad = sum(p.grad.abs().sum() for p in gate.block.parameters())
        assert gate.gamma.grad.abs() > 0
        assert (block_grad > 0) == (step == 1)  # gamma = 0 blocks the first step's gradient
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 0.1 * p.grad
        model.zero_grad()


def test_gated_residual_formula() -> None:
    se = bz.SqueezeExcite(16)
    gate = GatedResidual(se)
    x = torch.randn(2, 16, 5, 3)
    torch.testing.assert_close(gate(x), x, rtol=0, atol=0)
    with torch.no_grad():
        gate.gamma.fill_(0.25)
    torch.testing.assert_close(gate(x), x + 0.25 * (se(x) - x))
    with torch.no_grad():
        gate.gamma.fill_(1.0)
    torch.testing.assert_close(gate(x), se(x))
    assert gate.in_channels == gate.out_channels == 16


def test_gc_is_inserted_bare_because_it_starts_as_the_identity() -> None:
    model = _resnet18()
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        before = model(x)
    report = insert_after(model, "gc", where=lambda name, mod: type(mod).__name__ == "BasicBlock")
    assert len(report.changes) == 8 and {c.preservation for c in report.changes} == {
        "identity init"
    }
    assert isinstance(model.layer3[1][1], bz.GlobalContext)  # no GatedResidual around it
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    # GC configured to scale the features is not the identity: it gets the gate.
    report = insert_after(model, "gc", where="layer4.1.0.bn2", fusion_types=("channel_mul",))
    assert report.changes[0].preservation == "gated residual"


def test_insert_before_infers_channels_with_a_probe_pass() -> None:
    model = _resnet18()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    report = insert_before(model, "coord_att", where=["layer4", "layer2.1"])
    assert sorted(report.names) == ["layer2.1", "layer4"]
    assert isinstance(model.layer4[0], GatedResidual)
    assert model.layer4[0].block.in_channels == 256  # layer4's input
    assert model.layer2[1][0].block.in_channels == 128
    assert isinstance(model.layer4[1], nn.Sequential) and len(model.layer4[1]) == 2
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    assert model.training is False and model.layer4[0].training is False


def test_probe_uses_example_input_and_restores_training_flags() -> None:
    model = nn.Sequential(nn.Conv2d(5, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 4, 1))
    model.train()
    model[2].eval()
    insert_after(model, "se", where="1", example_input=torch.randn(1, 5, 9, 9))
    assert model[1][1].block.in_channels == 12
    assert model.training and model[0].training and not model[2].training


def test_preserve_false_inserts_the_bare_block() -> None:
    model = _resnet18()
    x = torch.randn(1, 3, 64, 64)
    before = model(x)
    report = insert_after(model, "se", where="layer1.0.bn2", preserve=False)
    assert report.changes[0].preservation == "none"
    assert isinstance(model.layer1[0].bn2[1], bz.SqueezeExcite)
    assert (model(x) - before).abs().max() > 1e-4


def test_dry_run_lists_changes_and_leaves_the_model_alone() -> None:
    model = _resnet18()
    keys = list(model.state_dict())
    dry = insert_after(model, "se", where=lambda n, m: n.endswith("bn2"), dry_run=True)
    assert list(model.state_dict()) == keys and isinstance(model.layer1[0].bn2, nn.BatchNorm2d)
    assert dry.dry_run and "would change 8 module(s)" in str(dry)
    real = insert_after(model, "se", where=lambda n, m: n.endswith("bn2"))
    assert dry.rows() == real.rows() and dry.param_delta == real.param_delta
    assert real.params_after == sum(p.numel() for p in model.parameters())
    assert "changed 8 module(s)" in str(real) and "layer4.1.bn2" in str(real)


def test_nested_targets_are_each_wrapped_once() -> None:
    model = _resnet18()
    x = torch.randn(1, 3, 32, 32)
    before = model(x)
    where = ["layer1", "layer1.0", "layer1.0.bn2"]
    dry = insert_after(model, "se", where=where, dry_run=True)
    assert isinstance(model.layer1[0], torchvision.models.resnet.BasicBlock)  # undone
    report = insert_after(model, "se", where=where)
    assert report.names == where and dry.params_after == report.params_after
    assert report.params_after == sum(p.numel() for p in model.parameters())
    block = model.layer1[0][0][0]  # layer1 -> its wrapper -> layer1.0's wrapper -> the block
    assert isinstance(block, torchvision.models.resnet.BasicBlock)
    assert isinstance(block.bn2[1], GatedResidual) and isinstance(model.layer1[1], GatedResidual)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_insert_errors() -> None:
    model = _resnet18()
    with pytest.raises(ValueError, match="keeps its input's shape"):
        insert_after(model, "spd_conv", where="layer1")
    with pytest.raises(ValueError, match="did you mean layer1"):
        insert_after(model, "se", where="layer_1")
    with pytest.raises(ValueError, match="where="):
        insert_after(model, "se", None)
    with pytest.raises(ValueError, match=r"fc: its output was not an \(N, C, H, W\)"):
        insert_after(model, "se", where="fc")
    with pytest.raises(KeyError, match="did you mean"):
        insert_before(model, "coord_attention", where="layer1")
    assert isinstance(model.layer1, nn.Sequential) and len(model.layer1) == 2  # untouched


def test_only_composite_blockzoo_blocks_are_searched() -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), bz.SqueezeExcite(16))
    assert replace_convs(model, "deform_conv").names == ["0"]  # not the SE's fc1/fc2 1x1 convs
    assert replace_convs(model, "deform_conv").names == []  # nor the new offset predictor
    model = nn.Sequential(bz.create_block("bottleneck", 16, 32)).eval()
    x = torch.randn(1, 16, 7, 5)
    before = model(x)
    report = replace_convs(model, "deform_conv", where=lambda n, conv: conv.kernel_size == (3, 3))
    assert report.names == ["0.body.conv2.conv"]
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), bz.SqueezeExcite(16))
    report = insert_after(model, "gc", where=lambda name, m: isinstance(m, nn.Conv2d))
    assert report.names == ["0"]


# --------------------------------------------------------------------------- replace_convs


@pytest.mark.parametrize("name", PRESERVING_CONVS)
def test_replace_convs_preserves_resnet18_then_trains(name: str) -> None:
    assert name in preservable_convs()
    model = _resnet18()
    cls = bz.block_info(name).cls
    report = _assert_preserved_then_learns(
        model,
        lambda m: replace_convs(m, name, where=lambda n, conv: conv.kernel_size == (3, 3)
                                and n.startswith(("layer1", "layer3"))),
    )
    assert report.names == [f"layer{i}.{j}.conv{k}" for i in (1, 3) for j in range(2)
                            for k in (1, 2)]
    assert {c.preservation for c in report.changes} == {"exact"}
    assert isinstance(model.layer3[0].conv1, cls) and model.layer3[0].conv1.stride == 2
    assert report.params_after == sum(p.numel() for p in model.parameters())


def test_replace_convs_on_a_timm_model_with_insertions() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10).eval()

    def edit(m: nn.Module) -> None:
        report = replace_convs(
            m, "dynamic_conv", where=lambda n, conv: conv.kernel_size == (3, 3) and conv.groups == 1
        )
        assert len(report.changes) == 11  # 3 deep-stem convs + 2 per BasicBlock
        insert_after(m, "coord_att", where=lambda n, mod: n.endswith("bn2"))

    _assert_preserved_then_learns(model, edit)
    assert isinstance(model.conv1[0], bz.block_info("dynamic_conv").cls)


def test_dynamic_conv_experts_all_equal_the_conv_and_then_diverge() -> None:
    conv = nn.Conv2d(8, 12, 3, padding=1, bias=True)
    model = nn.Sequential(conv)
    replace_convs(model, "dynamic_conv")
    block = model[0]
    experts = block.expert_weights()
    for k in range(block.num_experts):
        torch.testing.assert_close(experts[k], conv.weight, rtol=0, atol=0)
        torch.testing.assert_close(block.bias[k], conv.bias, rtol=0, atol=0)
    x = torch.randn(4, 8, 6, 6)
    block(x).square().mean().backward()
    with torch.no_grad():
        block.weight -= block.weight.grad
    experts = block.expert_weights()
    assert (experts[0] - experts[1]).abs().max() > 0  # per-sample routing breaks the symmetry


@pytest.mark.parametrize("experts", [8, 3, 1])
def test_cond_conv_routing_is_paired_to_sum_to_half_the_experts(experts: int) -> None:
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1)
    model = nn.Sequential(conv)
    replace_convs(model, "cond_conv", num_experts=experts)
    block = model[0]
    x = torch.randn(5, 6, 9, 7)
    routing = block.routing(x)
    torch.testing.assert_close(routing.sum(dim=1), torch.full((5,), experts / 2))
    assert routing.std(dim=0).max() > 0 or experts == 1  # still input-dependent
    torch.testing.assert_close(block.expert_weights()[0], conv.weight * (2 / experts))
    torch.testing.assert_close(block(x), conv(x), rtol=1e-5, atol=1e-5)
    block(x).square().mean().backward()
    grads = block.weight.grad.reshape(experts, -1)
    assert experts == 1 or (grads[0] - grads[-1]).abs().max() > 0  # the experts will diverge


def test_deformable_convs_copy_the_kernel_with_zero_offsets() -> None:
    for name, factor in (("deform_conv", 1.0), ("mdeform_conv", 2.0)):
        conv = nn.Conv2d(4, 6, 3, padding=2, dilation=2)
        model = nn.Sequential(conv)
        replace_convs(model, name)
        block = model[0]
        torch.testing.assert_close(block.weight, conv.weight * factor, rtol=0, atol=0)
        torch.testing.assert_close(block.bias, conv.bias, rtol=0, atol=0)
        assert block.dilation == 2 and not block.offset_conv.weight.any()
        x = torch.randn(2, 4, 11, 8)
        torch.testing.assert_close(block(x), conv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NON_PRESERVING_CONVS)
def test_blocks_that_cannot_reproduce_a_conv_refuse_preserve(name: str) -> None:
    assert name in NOT_PRESERVABLE and name not in preservable_convs()
    model = nn.Sequential(nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU())
    with pytest.raises(ValueError, match="preserve=False"):
        replace_convs(model, name)
    assert type(model[0]) is nn.Conv2d
    report = replace_convs(model, name, preserve=False)
    assert report.names == ["0"] and report.changes[0].preservation == "none"
    assert model(torch.randn(1, 32, 9, 7)).shape == (1, 32, 5, 4)


def test_replace_convs_skips_convs_whose_output_size_differs() -> None:

    class StdConv(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = (self.weight - self.weight.mean()) / self.weight.std()
            return F.conv2d(x, w, self.bias, self.stride, self.padding)

    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),  # no padding
        nn.Conv2d(8, 8, 4, padding=2),  # even kernel
        nn.Conv2d(8, 8, (1, 3), padding=(0, 1)),  # non-square
        nn.Conv2d(8, 8, 3, stride=4, padding=1),  # stride the block does not take
        StdConv(8, 8, 3, padding=1),  # its own forward
        nn.Conv2d(8, 8, 3, padding=1, groups=2),  # fine: groups are passed on
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
    )
    report = replace_convs(model, "dynamic_conv")
    assert report.names == ["5"]
    assert "blockzoo blocks pad with zeros" in dict(report.skipped)["6"]
    reasons = dict(report.skipped)
    assert "same padding" in reasons["0"] and "even kernel" in reasons["1"]
    assert "square" in reasons["2"] and "strides (1, 2)" in reasons["3"]
    assert "own forward" in reasons["4"]
    assert model[5].groups == 2 and type(model[0]) is nn.Conv2d


def test_replace_convs_errors_and_verification(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
    with pytest.raises(ValueError, match="insert_after"):
        replace_convs(model, "se")
    with pytest.raises(ValueError, match=r"layer1 is a Sequential, not an nn.Conv2d.*'layer1\.'"):
        replace_convs(_resnet18(), "dynamic_conv", where="layer1")
    with pytest.raises(ValueError, match="different kernel_size"):
        replace_convs(model, "dynamic_conv", kernel_size=5)
    with pytest.raises(ValueError, match="bias=False"):
        replace_convs(model, "dynamic_conv", bias=False)
    with pytest.raises(ValueError, match="could not be built for any matched conv.*temperature"):
        replace_convs(model, "dynamic_conv", temperature=-1.0)
    # An initialiser that does not reproduce the conv is caught before the model is touched.
    monkeypatch.setattr(bz.DynamicConv2d, "init_from_conv", lambda block, conv: None)
    with pytest.raises(ValueError, match="does not reproduce"):
        replace_convs(model, "dynamic_conv")
    assert type(model[0]) is nn.Conv2d


def test_replace_convs_keeps_dtype_and_reports_skips_from_block_constraints() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)).double()
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    before = model(x)
    report = replace_convs(model, "dynamic_conv", where=["0", "1"])
    assert model[0].weight.dtype == torch.float64
    torch.testing.assert_close(model(x), before, rtol=1e-10, atol=1e-10)
    assert str(report).startswith("replace_convs('dynamic_conv') changed 2 module(s)")
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1),
                          nn.Conv2d(32, 24, 3, padding=1), nn.Conv2d(24, 24, 3, padding=1))
    report = replace_convs(model, "involution", preserve=False)
    assert report.names == ["0"]
    assert dict(report.skipped)["1"] == "involution keeps the channel count, the conv maps 16 to 32"
    assert "Involution" in dict(report.skipped)["3"]  # 24 channels: not groups of 16


# --------------------------------------------------------------------------- block rules


def test_conv_takeover_rules_live_on_the_block_classes() -> None:
    for name in bz.list_blocks("conv") + bz.list_blocks("downsample"):
        cls = bz.block_info(name).cls
        implements = cls.init_from_conv is not Block.init_from_conv
        assert (cls.conv_preservation is None) == implements, name
        assert (name in preservable_convs()) == implements, name
        assert NOT_PRESERVABLE.get(name) == cls.conv_preservation, name
    assert preservable_convs() == sorted(PRESERVING_CONVS)
    assert set(NON_PRESERVING_CONVS) <= set(NOT_PRESERVABLE)
    with pytest.raises(ValueError, match="SKConv: cannot take over a convolution's weights: its "
                       "branches end in BatchNorm"):
        bz.create_block("sk_conv", 16).init_from_conv(nn.Conv2d(16, 16, 3, padding=1))


def test_one_sealed_subtree_walk_for_surgery_and_model_init() -> None:
    conv = nn.Conv2d(16, 16, 3, padding=1)
    model = nn.Sequential(
        conv, bz.SqueezeExcite(16), bz.create_block("bottleneck", 16, 32),
        GatedResidual(bz.CoordinateAttention(32)), ConvNormAct(32, 32, 3),
        bz.create_block("spd_conv", 32, 32), conv,
    )
    names = [name for name, _ in named_open_modules(model)]
    assert names[0] == "0" and names[-1] == "6"  # a shared module is listed at every path
    assert "1" in names and not any(n.startswith("1.") for n in names)  # attention: sealed
    assert "2.body.conv2.conv" in names  # composite: opened
    assert "3" in names and not any(n.startswith("3.") for n in names)  # surgery's wrapper
    assert "4.conv" in names
    assert "5" in names and not any(n.startswith("5.") for n in names)  # downsample: sealed
    inner = model[5].conv.conv.weight.detach().clone()
    outer = model[4].conv.weight.detach().clone()
    init_conv_norm_act(model)  # the model initialiser walks the same modules
    assert torch.equal(model[5].conv.conv.weight, inner)
    assert not torch.equal(model[4].conv.weight, outer)


# --------------------------------------------------------------------------- odd models


def test_a_shared_conv_is_replaced_once_at_every_path() -> None:
    for where in (None, "2", ["0"], lambda name, conv: name == "2"):
        conv = nn.Conv2d(8, 8, 3, padding=1)
        model = nn.Sequential(conv, nn.ReLU(), conv).eval()
        x = torch.randn(2, 8, 6, 5)
        before = model(x)
        dry = replace_convs(model, "dynamic_conv", where, dry_run=True)
        report = replace_convs(model, "dynamic_conv", where)
        assert isinstance(model[0], bz.DynamicConv2d) and model[2] is model[0]  # still tied
        assert report.names == ["0", "2"] and len(report.changes) == 1
        assert report.changes[0].also_at == ("2",) and "0 = 2" in str(report)
        total = sum(p.numel() for p in model.parameters())
        assert report.params_before == 584 and report.params_after == total == 2392
        assert dry.params_after == total and dry.rows() == report.rows()
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_a_shared_module_gets_one_insertion_at_every_path() -> None:
    for operation in (insert_after, insert_before):
        conv = nn.Conv2d(8, 8, 3, padding=1)
        model = nn.Sequential(conv, nn.ReLU(), conv).eval()
        x = torch.randn(1, 8, 7, 7)
        before = model(x)
        report = operation(model, "se", where="2")
        assert isinstance(model[0], nn.Sequential) and model[2] is model[0]
        assert report.names == ["0", "2"]
        assert report.params_after == sum(p.numel() for p in model.parameters())
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_a_module_shared_with_a_blocks_insides_is_refused_naming_its_paths() -> None:
    se = bz.SqueezeExcite(16)
    model = nn.Sequential(se.fc1, se)
    with pytest.raises(ValueError, match=r"0 is also used as 1\.fc1.*untie"):
        replace_convs(model, "dynamic_conv", where="0")
    assert model[0] is se.fc1


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_scripted_and_traced_models_are_refused() -> None:
    eager = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()).eval()
    scripted = torch.jit.script(eager)
    traced = torch.jit.trace(eager, torch.randn(1, 3, 8, 8))
    for model in (scripted, traced, nn.Sequential(traced)):
        with pytest.raises(ValueError, match="TorchScript module.*edit the eager nn.Module"):
            replace_convs(model, "dynamic_conv")
        with pytest.raises(ValueError, match="TorchScript module"):
            insert_after(model, "se", where=lambda name, module: True)


def test_inserting_after_a_conv1d_or_conv3d_is_refused() -> None:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1d = nn.Conv1d(8, 8, 3)
            self.conv3d = nn.Conv3d(8, 8, 3)
            self.bn1d = nn.BatchNorm1d(8)

    model = Mixed()
    with pytest.raises(ValueError, match=r"conv1d is a Conv1d: its output is 3-D.*\(N, C, H, W\)"):
        insert_after(model, "se", "conv1d")
    with pytest.raises(ValueError, match="conv3d is a Conv3d: its input is 5-D"):
        insert_before(model, "se", "conv3d")
    with pytest.raises(ValueError, match="bn1d is a BatchNorm1d"):
        insert_after(model, "se", "bn1d")
    assert isinstance(model.conv1d, nn.Conv1d)


def test_a_frozen_conv_gives_a_frozen_block() -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1),
                          nn.Conv2d(8, 8, 3, stride=2, padding=1))
    model[0].requires_grad_(False)
    model[1].weight.requires_grad_(False)  # BitFit: only the bias trains
    model[2].requires_grad_(False)
    replace_convs(model, "deform_conv", where=["0", "1"])
    replace_convs(model, "spd_conv", where="2", preserve=False)
    assert not any(p.requires_grad for p in model[0].parameters())
    assert not any(p.requires_grad for p in model[2].parameters())
    assert model[1].bias.requires_grad
    assert not model[1].weight.requires_grad and not model[1].offset_conv.weight.requires_grad


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
def test_hooks_move_to_the_replacement_and_do_not_fire_while_probing() -> None:
    model = _resnet18()
    calls: list[str] = []
    conv = model.layer2[0].conv1
    handle = conv.register_forward_hook(lambda m, args, out: calls.append(type(m).__name__))
    conv.register_full_backward_hook(lambda m, grad_in, grad_out: calls.append("backward"))
    model.layer1.register_forward_pre_hook(lambda m, args: calls.append("layer1"))
    everywhere = nn.modules.module.register_module_forward_hook(
        lambda m, args, out: calls.append("global"))
    try:
        insert_before(model, "coord_att", where="layer2.1")  # a probe pass
        report = replace_convs(model, "dynamic_conv", where="layer2.0.conv1")  # a check pass
    finally:
        everywhere.remove()
    assert calls == []
    assert "layer2.0.conv1: its 1 forward hook(s), 1 full backward hook(s) move to the " \
        "block" in str(report)
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    assert calls == ["layer1", "DynamicConv2d", "backward"]
    handle.remove()  # the user's handle still reaches the hook
    calls.clear()
    model(torch.randn(1, 3, 32, 32))
    assert calls == ["layer1"]
    legacy = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
    legacy[0].register_backward_hook(lambda m, grad_in, grad_out: None)
    legacy[0].register_state_dict_post_hook(lambda m, state, prefix, local: None)
    report = replace_convs(legacy, "dynamic_conv")
    assert report.notes == ["0: its 1 state-dict hook(s), 1 non-full backward hook(s) are dropped"]
    conv = nn.utils.weight_norm(nn.Conv2d(3, 8, 3, padding=1))
    model = nn.Sequential(conv)
    x = torch.randn(1, 3, 6, 6)
    before = model(x)
    report = replace_convs(model, "dynamic_conv")
    assert report.notes == ["0: its 1 weight_norm/spectral_norm hook(s) are dropped"]
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_spd_conv_before_a_norm_layer_is_built_without_its_own_norm_and_act() -> None:
    model = _resnet18()
    report = replace_convs(model, "spd_conv", preserve=False,
                           where=lambda name, conv: conv.stride == (2, 2))
    assert len(report.changes) == 7 and len(report.notes) == 7
    shortcut = model.layer2[0].downsample
    assert isinstance(shortcut[0], bz.SPDConv) and isinstance(shortcut[1], nn.BatchNorm2d)
    assert isinstance(shortcut[0].conv.bn, nn.Identity)
    assert isinstance(shortcut[0].conv.act, nn.Identity)
    assert "layer2.0.downsample.0: layer2.0.downsample.1 (BatchNorm2d) follows it, so spd_conv " \
        "is built without its own norm and activation" in str(report)
    assert "spd_conv(64, 128, stride=2) without norm/act" in str(report)
    # Asked for explicitly, or with no norm after the conv, the block keeps them.
    model = _resnet18()
    replace_convs(model, "spd_conv", "layer2.0.conv1", preserve=False, act_layer="relu")
    assert isinstance(model.layer2[0].conv1.conv.bn, nn.BatchNorm2d)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
    report = replace_convs(model, "spd_conv", preserve=False)
    assert isinstance(model[0].conv.bn, nn.BatchNorm2d) and report.notes == []


def test_temperature_schedule_is_public_for_fine_tuning_after_surgery() -> None:
    model = _resnet18()
    replace_convs(model, "dynamic_conv", where="layer4.1.conv2")
    assert model.layer4[1].conv2.temperature == 30.0  # near-uniform routing until annealed
    schedule = bz.TemperatureSchedule(model, epochs=10)
    for _ in range(10):
        schedule.step()
    assert model.layer4[1].conv2.temperature == 1.0
    guide = (Path(__file__).resolve().parents[1] / "docs" / "howto_integrations.md").read_text()
    assert "bz.TemperatureSchedule(model, epochs=" in guide


# --------------------------------------------------------------------------- examples


@pytest.mark.parametrize("script", ["torchvision_resnet.py", "torchvision_mobilenetv3.py"])
def test_examples_run(script: str, capsys: pytest.CaptureFixture) -> None:
    main = runpy.run_path(str(EXAMPLES / script), run_name="example")["main"]
    main(["--size", "64"])
    out = capsys.readouterr().out
    assert "largest output change" in out
    if script == "torchvision_resnet.py":
        assert "epoch 1: loss" in out and "DY-Conv temperature 27.1 -> 24.2" in out
