"""Model surgery: put blockzoo blocks into an existing network, keeping what it computes.

Three edits answer "where do I put the block?":

- :func:`replace_convs` swaps matching ``nn.Conv2d`` modules for a conv-kind block with the same
  input and output channels, stride, kernel size, dilation and groups;
- :func:`insert_after` / :func:`insert_before` wrap matching modules as
  ``Sequential(module, block)`` / ``Sequential(block, module)``, with the block's channel count
  inferred from the module (or from a probe forward pass).

With ``preserve=True`` (the default) the edited network computes the same function as before at
the moment of the edit, so a pretrained model keeps its accuracy until fine-tuning starts:

- a replaced conv's weights are copied into the new block by a block-specific initialiser (every
  expert of a dynamic conv is the old kernel; a deformable conv has zero offsets; ...), and the
  result is checked numerically against the old conv before the model is touched; blocks that
  cannot represent an arbitrary dense convolution raise a ``ValueError`` that says why;
- an inserted block that is the identity when fresh (global context) is inserted as it is; any
  other block is inserted as a :class:`GatedResidual` ``x + gamma * (block(x) - x)`` with
  ``gamma = 0``, a learnable scalar.

Every edit returns a :class:`SurgeryReport`; ``dry_run=True`` builds and checks everything and
reports what would change without changing the model. State-dict keys of wrapped modules change
(``layer1.0.bn2.weight`` becomes ``layer1.0.bn2.0.weight``): load pretrained weights before the
edit, which is what function preservation is for.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .blocks.base import Block
from .core.formatting import format_rows
from .registry import BlockInfo, block_info, create_block, list_blocks

Where = Callable[[str, nn.Module], bool] | str | Iterable[str] | None

#: Kinds of block that can stand in for a convolution.
CONV_KINDS = ("conv", "downsample")

#: Why a block cannot start as an arbitrary dense ``nn.Conv2d`` (``preserve=True`` raises).
NOT_PRESERVABLE: dict[str, str] = {
    "sk_conv": "its branches end in BatchNorm + ReLU and are mixed by a softmax, a non-linear "
    "function of the input that no initialisation makes equal to a linear convolution",
    "involution": "its kernel is shared by all channels of a group and mixes no channels, so it "
    "cannot express a dense convolution's cross-channel weights",
    "acmix": "its convolution path is a 1x1 projection of q, k, v followed by grouped shift "
    "kernels, which spans only a subset of dense k x k convolutions, and its attention path is "
    "non-linear",
    "separable_conv": "a depthwise k x k conv followed by a pointwise 1x1 conv has kernels of the "
    "form W[o, i] = P[o, i] * D[i], so it reproduces a dense conv only in special cases (and "
    "BatchNorm and ReLU follow it by default)",
    "spd_conv": "space-to-depth followed by a convolution, BatchNorm and an activation is not "
    "linear in its input, so it cannot equal the strided convolution it replaces",
}

ConvInit = Callable[[nn.Conv2d, nn.Module], None]
_CONV_INITS: dict[str, ConvInit] = {}


def _conv_init(name: str) -> Callable[[ConvInit], ConvInit]:
    """Register a function that makes a fresh block ``name`` compute a given ``nn.Conv2d``."""

    def decorate(fn: ConvInit) -> ConvInit:
        _CONV_INITS[name] = fn
        return fn

    return decorate


def _require_kernel(conv: nn.Conv2d, kernel_shape: torch.Size, has_bias: bool, name: str) -> None:
    if kernel_shape != conv.weight.shape:
        raise ValueError(
            f"{name}: its kernel has shape {tuple(kernel_shape)}, the conv's "
            f"{tuple(conv.weight.shape)} (different kernel_size or groups in the block's options?)"
        )
    if conv.bias is not None and not has_bias:
        raise ValueError(f"{name}: the conv has a bias and the block was built with bias=False")


@torch.no_grad()
def _load_experts(conv: nn.Conv2d, block: nn.Module, scale: float) -> None:
    """Every expert of a dynamic/cond conv := ``scale * W``, every expert bias ``scale * b``."""
    k = block.num_experts
    _require_kernel(conv, block.expert_weights().shape[1:], block.bias is not None,
                    type(block).__name__)
    block.weight.copy_((conv.weight * scale).repeat(k, 1, 1, 1))
    if block.bias is not None:
        bias = torch.zeros_like(block.bias[0]) if conv.bias is None else conv.bias * scale
        block.bias.copy_(bias.expand(k, -1))


@_conv_init("dynamic_conv")
def _init_dynamic_conv(conv: nn.Conv2d, block: nn.Module) -> None:
    """Softmax attention sums to 1, so experts all equal to ``W`` give ``W(x) = W`` for every x.

    The attention keeps its random initialisation: the routing differs per sample and per expert,
    so the experts' gradients differ from the first step and they diverge.
    """
    _load_experts(conv, block, 1.0)


@_conv_init("cond_conv")
@torch.no_grad()
def _init_cond_conv(conv: nn.Conv2d, block: nn.Module) -> None:
    """Sigmoid routing need not sum to 1; pairing the routing rows makes it sum to ``E / 2``.

    Routing row ``e + E//2`` is set to minus row ``e`` (weight and bias), so that
    ``r_e + r_{e + E//2} = sigmoid(z) + sigmoid(-z) = 1`` for every input; with ``E`` odd the last
    row is zeroed (``r = 1/2``). Then ``sum_e r_e = E / 2`` for every input and experts all equal
    to ``(2 / E) W`` give ``W(x) = W`` exactly. The routing stays random and input-dependent (half
    of its rows keep their initialisation), so the experts diverge from the first step; zeroing
    the routing instead would make every expert receive the same update forever.
    """
    fc, e = block.routing_fn, block.num_experts
    half = e // 2
    fc.weight[half:2 * half] = -fc.weight[:half]
    fc.bias[half:2 * half] = -fc.bias[:half]
    if e % 2:
        fc.weight[-1] = 0.0
        fc.bias[-1] = 0.0
    _load_experts(conv, block, 2.0 / e)


@torch.no_grad()
def _load_deform(conv: nn.Conv2d, block: nn.Module, scale: float) -> None:
    _require_kernel(conv, block.weight.shape, block.bias is not None, type(block).__name__)
    block.weight.copy_(conv.weight * scale)
    if block.bias is not None:
        block.bias.copy_(torch.zeros_like(block.bias) if conv.bias is None else conv.bias)
    nn.init.zeros_(block.offset_conv.weight)
    nn.init.zeros_(block.offset_conv.bias)


@_conv_init("deform_conv")
def _init_deform_conv(conv: nn.Conv2d, block: nn.Module) -> None:
    """Zero offsets sample the regular grid: the conv's weight and bias give the conv exactly."""
    _load_deform(conv, block, 1.0)


@_conv_init("mdeform_conv")
def _init_mdeform_conv(conv: nn.Conv2d, block: nn.Module) -> None:
    """Zero offsets, mask ``sigmoid(0) = 1/2`` everywhere: weight ``2 W`` (exact in floating point).

    The bias is not modulated, so it is copied as it is. (A large mask bias would only approach
    ``m = 1``; the factor 2 is exact and keeps the mask's gradient at its largest.)
    """
    _load_deform(conv, block, 2.0)


def preservable_convs() -> list[str]:
    """Names of the conv-kind blocks that :func:`replace_convs` can make function-preserving."""
    return sorted(_CONV_INITS)


class GatedResidual(nn.Module):
    """``x + gamma * (block(x) - x)`` with a learnable scalar ``gamma`` (0 at insertion).

    At ``gamma = 0`` the wrapper is the identity, so inserting it leaves a network's function
    unchanged; at ``gamma = 1`` it is the block. The first optimiser step moves ``gamma`` (its
    gradient is ``<dL/dy, block(x) - x>``); the block's own parameters receive gradients from the
    step after. The wrapped block must keep its input's shape.
    """

    def __init__(self, block: nn.Module, gamma: float = 0.0) -> None:
        super().__init__()
        self.block = block
        ref = next(block.parameters(), None)
        self.gamma = nn.Parameter(
            torch.tensor(
                float(gamma),
                device=None if ref is None else ref.device,
                dtype=None if ref is None else ref.dtype,
            )
        )
        self.in_channels = self.out_channels = getattr(block, "in_channels", None)
        self.stride = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * (self.block(x) - x)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma.item():.4g}"


@dataclass(frozen=True)
class Change:
    """One edited module: its qualified name, what it was, what it became, and the cost."""

    name: str
    old: str
    new: str
    params_before: int
    params_after: int
    preservation: str

    @property
    def param_delta(self) -> int:
        return self.params_after - self.params_before


@dataclass
class SurgeryReport:
    """What an edit changed (or, with ``dry_run``, would change) in a model.

    ``preservation`` of each change is ``"exact"`` (weights copied, checked numerically),
    ``"identity init"`` (a fresh block that is the identity), ``"gated residual"`` (wrapped in
    :class:`GatedResidual` with ``gamma = 0``) or ``"none"`` (``preserve=False``). ``skipped`` lists
    ``(name, reason)`` for matched modules that could not be edited.
    """

    operation: str
    block: str
    dry_run: bool
    params_before: int
    changes: list[Change] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.changes]

    @property
    def param_delta(self) -> int:
        return sum(c.param_delta for c in self.changes)

    @property
    def params_after(self) -> int:
        return self.params_before + self.param_delta

    def rows(self) -> list[dict[str, Any]]:
        return [
            {"module": c.name, "was": c.old, "now": c.new, "params": c.param_delta,
             "preserved": c.preservation}
            for c in self.changes
        ]

    def __str__(self) -> str:
        verb = "would change" if self.dry_run else "changed"
        head = (
            f"{self.operation}({self.block!r}) {verb} {len(self.changes)} module(s); parameters "
            f"{self.params_before:,} -> {self.params_after:,} ({self.param_delta:+,})"
        )
        parts = [head]
        if self.changes:
            parts.append(format_rows(self.rows()))
        parts += [f"skipped {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(parts)


# --------------------------------------------------------------------------- matching


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _is_sealed(module: nn.Module, composite: tuple[type, ...]) -> bool:
    """True for surgery's wrappers and atomic blockzoo blocks (conv, downsample, attention)."""
    return isinstance(module, GatedResidual) or (
        isinstance(module, Block) and not isinstance(module, composite)
    )


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named submodules, leaving out the root and the insides of atomic blockzoo blocks.

    The convs of a conv-kind block (a deformable conv's offset predictor), of a downsampling or
    an attention block are its machinery and are not matched; composite blocks (kind "block" or
    "cell", such as a bottleneck) are searched like any other module.
    """
    composite = tuple(
        block_info(n).cls for n in list_blocks() if block_info(n).kind in ("block", "cell")
    )
    found, sealed = [], []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in sealed):
            continue
        found.append((name, module))
        if _is_sealed(module, composite):
            sealed.append(name + ".")
    return found


def _matcher(where: Where, names: list[str]) -> Callable[[str, nn.Module], bool]:
    if where is None:
        return lambda name, module: True
    if callable(where):
        return where
    wanted = {where} if isinstance(where, str) else set(where)
    missing = sorted(wanted - set(names))
    if missing:
        close = difflib.get_close_matches(missing[0], names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"no module named {', '.join(map(repr, missing))} in the model{hint}")
    return lambda name, module: name in wanted


def _random_input(
    channels: int, h: int, w: int, device: torch.device | None, dtype: torch.dtype | None
) -> torch.Tensor:
    """A fixed random ``(2, channels, h, w)`` test input that leaves the global RNG alone."""
    gen = torch.Generator(device=device or "cpu").manual_seed(0)
    return torch.randn(2, channels, h, w, generator=gen, device=device, dtype=dtype)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, child = name.rpartition(".")
    return model.get_submodule(parent), child


def _placement(module: nn.Module, model: nn.Module) -> dict[str, Any]:
    """``device``/``dtype`` of the module's first tensor (else the model's), for a new block."""
    for source in (module, model):
        for tensor in (*source.parameters(), *source.buffers()):
            if tensor.is_floating_point():
                return {"device": tensor.device, "dtype": tensor.dtype}
    return {}


# --------------------------------------------------------------------------- replace_convs


def _conv_problem(conv: nn.Conv2d, info: BlockInfo) -> str | None:
    """Why ``conv`` cannot be swapped for the block (whose output is ``ceil(H / stride)``)."""
    if type(conv).forward is not nn.Conv2d.forward or (
        type(conv)._conv_forward is not nn.Conv2d._conv_forward
    ):
        return f"{type(conv).__name__} has its own forward (e.g. weight standardisation)"
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    if kh != kw or sh != sw or dh != dw:
        return f"kernel, stride and dilation must be square, got {conv.kernel_size}, " \
            f"{conv.stride}, {conv.dilation}"
    if kh % 2 == 0:
        return f"even kernel size {kh} has no same padding"
    same = dh * (kh - 1) // 2
    if conv.padding not in ("same", (same, same)):
        return f"padding {conv.padding} is not the same padding {same} that gives ceil(H / stride)"
    if conv.padding_mode != "zeros":
        return f"padding_mode {conv.padding_mode!r}: blockzoo blocks pad with zeros"
    if sh not in info.strides:
        return f"{info.name} takes strides {info.strides}, the conv has stride {sh}"
    if info.width == "same" and conv.in_channels != conv.out_channels:
        return f"{info.name} keeps the channel count, the conv maps {conv.in_channels} to " \
            f"{conv.out_channels}"
    return None


def _conv_kwargs(info_cls: type[nn.Module], conv: nn.Conv2d, given: dict[str, Any]) -> dict:
    """The conv's geometry as keyword arguments, for those the block's constructor accepts."""
    params = inspect.signature(info_cls.__init__).parameters
    geometry = {
        "kernel_size": conv.kernel_size[0],
        "dilation": conv.dilation[0],
        "groups": conv.groups,
        "bias": conv.bias is not None,
    }
    return {k: v for k, v in geometry.items() if k in params and k not in given}


def _check_reproduces(conv: nn.Conv2d, block: nn.Module, name: str) -> None:
    """Raise unless ``block`` computes ``conv`` on a random input (eval mode, float64 tolerance)."""
    p = conv.weight
    x = _random_input(conv.in_channels, 7, 9, p.device, p.dtype)
    modes = [m.training for m in block.modules()]
    block.eval()
    with torch.no_grad():
        want, got = conv(x), block(x)
    for m, mode in zip(block.modules(), modes, strict=True):
        m.training = mode
    tol = (torch.finfo(p.dtype).eps ** 0.5) * 0.1 * (1.0 + want.abs().max().item())
    if got.shape != want.shape or (got - want).abs().max().item() > tol:
        error = (got - want).abs().max().item() if got.shape == want.shape else got.shape
        raise ValueError(
            f"{name}: the initialised block does not reproduce the conv it replaces "
            f"(max difference {error}); please report this as a blockzoo bug, or pass "
            f"preserve=False"
        )


def replace_convs(
    model: nn.Module,
    with_: str,
    where: Where = None,
    *,
    preserve: bool = True,
    dry_run: bool = False,
    **block_kwargs: Any,
) -> SurgeryReport:
    """Replace matching ``nn.Conv2d`` modules of ``model`` with the conv-kind block ``with_``.

    Each block is built with the conv's in/out channels and stride, plus the conv's kernel size,
    dilation, groups and bias where the block's constructor takes them (``block_kwargs`` win).
    ``where(name, conv) -> bool``, a module name or a list of names selects the convs (default:
    all). Matched convs whose output size differs from ``ceil(H / stride)`` (no same padding, an
    even or non-square kernel, a stride the block does not take) or whose class has its own
    forward are left alone and listed in ``report.skipped``. Convs inside atomic blockzoo blocks
    (conv, downsample and attention kinds: their machinery) are never matched; composite blocks
    (a bottleneck) are searched.

    ``preserve=True``: each block is initialised to compute exactly the conv it replaces (see
    :func:`preservable_convs`), checked on a random input; a block that cannot (``NOT_PRESERVABLE``
    says why) raises a ``ValueError`` before the model is touched. ``preserve=False`` keeps the
    blocks' own initialisation.
    """
    info = block_info(with_)
    if info.kind not in CONV_KINDS:
        raise ValueError(
            f"replace_convs needs a block of kind {CONV_KINDS}, {with_!r} is {info.kind!r}; "
            f"use insert_after/insert_before for attention blocks"
        )
    if preserve and with_ not in _CONV_INITS:
        reason = NOT_PRESERVABLE.get(with_, "blockzoo has no initialiser that makes it equal "
                                     "an arbitrary nn.Conv2d")
        raise ValueError(
            f"{with_!r} cannot replace a convolution with preserve=True: {reason}. Blocks that "
            f"can: {preservable_convs()}. Pass preserve=False to insert it freshly initialised "
            f"(the model's outputs change and need fine-tuning)."
        )
    report = SurgeryReport("replace_convs", with_, dry_run, _num_params(model))
    candidates = _candidates(model)
    match = _matcher(where, [n for n, _ in candidates])
    if where is not None and not callable(where):
        for name, module in candidates:
            if match(name, module) and not isinstance(module, nn.Conv2d):
                raise ValueError(
                    f"{name} is a {type(module).__name__}, not an nn.Conv2d; to replace the convs "
                    f"inside it, pass where=lambda name, conv: name.startswith({name + '.'!r})"
                )
    edits, refused = [], []
    for name, conv in candidates:
        if not isinstance(conv, nn.Conv2d) or not match(name, conv):
            continue
        problem = _conv_problem(conv, info)
        if problem is not None:
            report.skipped.append((name, problem))
            continue
        kwargs = {**_conv_kwargs(info.cls, conv, block_kwargs), **block_kwargs}
        try:
            block = create_block(
                with_, conv.in_channels, conv.out_channels, stride=conv.stride[0],
                **{**_placement(conv, model), **kwargs},
            )
        except ValueError as err:  # the block's own constraints, e.g. channel divisibility
            report.skipped.append((name, str(err)))
            refused.append(err)
            continue
        block.train(conv.training)
        if preserve:
            _CONV_INITS[with_](conv, block)
            _check_reproduces(conv, block, f"{name} -> {with_}")
        k, s, g = conv.kernel_size[0], conv.stride[0], conv.groups
        report.changes.append(Change(
            name,
            f"Conv2d({conv.in_channels}, {conv.out_channels}, k={k}, stride={s}, groups={g})",
            f"{with_}({block.in_channels}, {block.out_channels}, stride={block.stride})",
            _num_params(conv), _num_params(block), "exact" if preserve else "none",
        ))
        edits.append((name, block))
    if refused and not edits:  # every build failed: most likely a bad option, not the convs
        raise ValueError(f"{with_} could not be built for any matched conv: {refused[0]}")
    if not dry_run:
        for name, block in edits:
            setattr(*_parent(model, name), block)
    return report


# --------------------------------------------------------------------------- insert


def _known_channels(module: nn.Module, before: bool) -> int | None:
    """Channel count at the module's input (``before``) or output, from its attributes."""
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return module.num_features
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    attr = "in_channels" if before else "out_channels"
    value = getattr(module, attr, None)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def _default_probe_input(model: nn.Module) -> torch.Tensor:
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise ValueError(
            "cannot infer channel counts: the model has no nn.Conv2d to size a probe input "
            "from; pass example_input=<a tensor the model accepts>"
        )
    w = first.weight
    return torch.zeros(1, first.in_channels, 64, 64, device=w.device, dtype=w.dtype)


def _probe_channels(
    model: nn.Module, modules: dict[str, nn.Module], before: bool,
    example_input: torch.Tensor | None,
) -> dict[str, int]:
    """Run one forward pass (eval mode, no grad) and read the channels at each module."""
    seen: dict[str, int] = {}

    def hook(name: str) -> Callable:
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            t = args[0] if before and args else output
            if isinstance(t, torch.Tensor) and t.dim() == 4:
                seen[name] = int(t.shape[1])

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    modes = [m.training for m in model.modules()]
    x = _default_probe_input(model) if example_input is None else example_input
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    except Exception as err:
        raise ValueError(
            f"the probe forward pass with an input of shape {tuple(x.shape)} failed ({err}); "
            f"pass example_input=<a tensor the model accepts>"
        ) from err
    finally:
        for h in handles:
            h.remove()
        for m, mode in zip(model.modules(), modes, strict=True):
            m.training = mode
    side = "input" if before else "output"
    for name in modules:
        if name not in seen:
            raise ValueError(
                f"{name}: its {side} was not an (N, C, H, W) tensor in the probe forward pass "
                f"(or the module did not run), so a block cannot be placed there"
            )
    return seen


def _is_identity(block: nn.Module, channels: int) -> bool:
    """True when the fresh block returns its input unchanged (eval mode, random input)."""
    ref = next(block.parameters(), None)
    x = _random_input(channels, 5, 6, None if ref is None else ref.device,
                      None if ref is None else ref.dtype)
    modes = [m.training for m in block.modules()]
    block.eval()
    with torch.no_grad():
        same = torch.equal(block(x), x)
    for m, mode in zip(block.modules(), modes, strict=True):
        m.training = mode
    return same


def _insert(
    operation: str, model: nn.Module, block: str, where: Where, preserve: bool,
    dry_run: bool, example_input: torch.Tensor | None, block_kwargs: dict[str, Any],
) -> SurgeryReport:
    before = operation == "insert_before"
    block_info(block)  # unknown names fail here, with close matches
    if where is None:
        raise ValueError(f"{operation} needs where= (a predicate, a module name or names)")
    report = SurgeryReport(operation, block, dry_run, _num_params(model))
    candidates = _candidates(model)
    match = _matcher(where, [n for n, _ in candidates])
    targets = {name: m for name, m in candidates if match(name, m)}
    channels = {n: c for n, m in targets.items() if (c := _known_channels(m, before)) is not None}
    unknown = {n: m for n, m in targets.items() if n not in channels}
    if unknown:
        channels.update(_probe_channels(model, unknown, before, example_input))
    edits = []
    for name, module in targets.items():
        c = channels[name]
        new = create_block(block, c, **{**_placement(module, model), **block_kwargs})
        if new.out_channels != c or new.stride != 1:
            raise ValueError(
                f"{operation} needs a block that keeps its input's shape; {block!r} built for "
                f"{c} channels maps to {new.out_channels} channels with stride {new.stride} "
                f"(use replace_convs for blocks that change the shape)"
            )
        if not preserve:
            kind = "none"
        elif _is_identity(new, c):
            kind = "identity init"
        else:
            new, kind = GatedResidual(new), "gated residual"
        new.train(module.training)
        pair = (new, module) if before else (module, new)
        wrapped = nn.Sequential(*pair)
        wrapped.training = module.training  # not .train(): it would reset the module's children
        report.changes.append(Change(
            name, type(module).__name__,
            " -> ".join(type(m).__name__ if m is module else f"{block}({c})" for m in pair)
            + (" [gamma=0]" if kind == "gated residual" else ""),
            0, _num_params(new), kind,
        ))
        edits.append((name, wrapped))
    if not dry_run:
        for name, wrapped in edits:
            setattr(*_parent(model, name), wrapped)
    return report


def insert_after(
    model: nn.Module,
    block: str,
    where: Where,
    *,
    preserve: bool = True,
    dry_run: bool = False,
    example_input: torch.Tensor | None = None,
    **block_kwargs: Any,
) -> SurgeryReport:
    """Wrap each matching module as ``Sequential(module, block)``.

    ``where(name, module) -> bool``, a module name or a list of names selects the modules. The
    block is built for the module's output channels: ``out_channels`` of a conv or of any module
    with an integer ``out_channels`` attribute (blockzoo blocks, torchvision's
    ``Conv2dNormActivation``), ``num_features`` of a BatchNorm; otherwise they are read from one
    forward pass of ``example_input`` (default: a ``1 x C x 64 x 64`` zero tensor, ``C`` the
    first conv's input channels) in eval mode. The block must keep its input's shape
    (attention blocks and shape-preserving convs).

    ``preserve=True``: a block that is the identity when fresh (GC) is inserted as it is, any
    other as :class:`GatedResidual` with ``gamma = 0``; ``preserve=False`` inserts the bare block.
    """
    return _insert("insert_after", model, block, where, preserve, dry_run, example_input,
                   block_kwargs)


def insert_before(
    model: nn.Module,
    block: str,
    where: Where,
    *,
    preserve: bool = True,
    dry_run: bool = False,
    example_input: torch.Tensor | None = None,
    **block_kwargs: Any,
) -> SurgeryReport:
    """Wrap each matching module as ``Sequential(block, module)``; see :func:`insert_after`.

    The channel count is the module's input channels (``in_channels``, ``num_features``, or the
    probe forward pass).
    """
    return _insert("insert_before", model, block, where, preserve, dry_run, example_input,
                   block_kwargs)


__all__ = [
    "CONV_KINDS",
    "NOT_PRESERVABLE",
    "Change",
    "GatedResidual",
    "SurgeryReport",
    "insert_after",
    "insert_before",
    "preservable_convs",
    "replace_convs",
]

