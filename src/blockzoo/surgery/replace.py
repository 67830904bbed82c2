"""``replace_convs``: swap ``nn.Conv2d`` modules for a conv-kind block of the same geometry.

How a block takes over a conv's weights is the block's own rule
(:meth:`~blockzoo.blocks.base.Block.init_from_conv`, or the reason it cannot in
:attr:`~blockzoo.blocks.base.Block.conv_preservation`); this module checks the geometry, builds the
blocks, verifies them numerically and carries over what the conv had: ``requires_grad``, forward
hooks and full backward hooks.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from .. import blocks as _blocks  # noqa: F401  (registers every block before NOT_PRESERVABLE)
from ..registry import BlockInfo, block_info, create_block, list_blocks
from .matching import Target, Where, find_targets, placement, probing, put, random_input
from .report import Change, SurgeryReport, parameter_count

#: Kinds of block that can stand in for a convolution.
CONV_KINDS = ("conv", "downsample")

#: Norm layers after which a block that ends in its own norm and activation drops them.
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _conv_block_names() -> list[str]:
    return sorted(name for kind in CONV_KINDS for name in list_blocks(kind))


def preservable_convs() -> list[str]:
    """Names of the conv-kind blocks that :func:`replace_convs` can make function-preserving."""
    return [n for n in _conv_block_names() if block_info(n).cls.conv_preservation is None]


#: Why each conv-kind block that cannot start as an arbitrary dense ``nn.Conv2d`` cannot
#: (its class's ``conv_preservation``; ``preserve=True`` raises with it).
NOT_PRESERVABLE: dict[str, str] = {
    n: block_info(n).cls.conv_preservation
    for n in _conv_block_names()
    if block_info(n).cls.conv_preservation is not None
}


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


def _conv_kwargs(cls: type[nn.Module], conv: nn.Conv2d, given: dict[str, Any]) -> dict:
    """The conv's geometry as keyword arguments, for those the block's constructor accepts."""
    params = inspect.signature(cls.__init__).parameters
    geometry = {
        "kernel_size": conv.kernel_size[0],
        "dilation": conv.dilation[0],
        "groups": conv.groups,
        "bias": conv.bias is not None,
    }
    return {k: v for k, v in geometry.items() if k in params and k not in given}


def _norm_after(model: nn.Module, paths: list[str]) -> str | None:
    """``"<name> (<Norm>)"`` when, at every path, the next module of the parent is a norm."""
    found = []
    for path in paths:
        parent_name, _, key = path.rpartition(".")
        siblings = list(model.get_submodule(parent_name)._modules.items())
        index = [k for k, _ in siblings].index(key)
        if index + 1 == len(siblings) or not isinstance(siblings[index + 1][1], NORM_LAYERS):
            return None
        norm_key, norm = siblings[index + 1]
        found.append(f"{parent_name + '.' if parent_name else ''}{norm_key} "
                     f"({type(norm).__name__})")
    return found[0]


def _check_reproduces(conv: nn.Conv2d, block: nn.Module, name: str) -> None:
    """Raise unless ``block`` computes ``conv`` on a random input (eval mode, float64 tolerance)."""
    p = conv.weight
    x = random_input(conv.in_channels, 7, 9, p.device, p.dtype)
    with probing(conv, block):
        want, got = conv(x), block(x)
    tol = (torch.finfo(p.dtype).eps ** 0.5) * 0.1 * (1.0 + want.abs().max().item())
    if got.shape != want.shape or (got - want).abs().max().item() > tol:
        error = (got - want).abs().max().item() if got.shape == want.shape else got.shape
        raise ValueError(
            f"{name}: the initialised block does not reproduce the conv it replaces "
            f"(max difference {error}); please report this as a blockzoo bug, or pass "
            f"preserve=False"
        )


def _carry_requires_grad(conv: nn.Conv2d, block: nn.Module) -> None:
    """A frozen conv gives a frozen block: the block's parameters take the conv weight's
    ``requires_grad``, and a ``bias`` parameter of the block the conv bias's."""
    block.requires_grad_(conv.weight.requires_grad)
    bias = block._parameters.get("bias")
    if bias is not None and conv.bias is not None:
        bias.requires_grad_(conv.bias.requires_grad)


#: Hook tables that move from a replaced conv to its block (with their ``*_with_kwargs`` and
#: ``always_called`` companions), and those that are dropped.
_FORWARD_HOOKS = {"_forward_pre_hooks": "forward pre-hook", "_forward_hooks": "forward hook"}
_FORWARD_COMPANIONS = ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs",
                       "_forward_hooks_always_called")
_FULL_BACKWARD_HOOKS = {
    "_backward_pre_hooks": "full backward pre-hook", "_backward_hooks": "full backward hook",
}
_STATE_DICT_HOOKS = {
    "_state_dict_hooks": "state-dict hook",
    "_state_dict_pre_hooks": "state-dict pre-hook",
    "_load_state_dict_pre_hooks": "load-state-dict pre-hook",
    "_load_state_dict_post_hooks": "load-state-dict post-hook",
}


def _hook_tables(conv: nn.Module) -> tuple[dict[str, str], dict[str, str]]:
    """``(moved, dropped)``: the conv's hook tables that move to the block and those that do not
    (a legacy, non-full backward hook sees the conv's internals, so it is dropped)."""
    full = conv._is_full_backward_hook is not False
    moved = {**_FORWARD_HOOKS, **(_FULL_BACKWARD_HOOKS if full else {})}
    legacy = {} if full else {"_backward_hooks": "non-full backward hook"}
    return moved, {**_STATE_DICT_HOOKS, **legacy}


def _reparametrisations(conv: nn.Module) -> list[int]:
    """Ids of the conv's ``weight_norm``/``spectral_norm`` pre-hooks: they compute the conv's
    own weight (which the block has copied), so they stay behind."""
    return [key for key, hook in conv._forward_pre_hooks.items()
            if isinstance(hook, (WeightNorm, SpectralNorm))]


def _hook_notes(name: str, conv: nn.Module) -> list[str]:
    """Report notes on the conv's hooks: which move to the block, which are dropped."""
    moved, dropped = _hook_tables(conv)
    reparametrised = len(_reparametrisations(conv))
    counts = {kind: len(getattr(conv, t)) for t, kind in moved.items()}
    counts["forward pre-hook"] -= reparametrised
    notes = []
    found = [f"{n} {kind}(s)" for kind, n in counts.items() if n]
    if found:
        notes.append(f"{name}: its {', '.join(found)} move to the block")
    found = [f"{len(getattr(conv, t))} {kind}(s)" for t, kind in dropped.items()
             if getattr(conv, t)]
    found += [f"{reparametrised} weight_norm/spectral_norm hook(s)"] if reparametrised else []
    if found:
        notes.append(f"{name}: its {', '.join(found)} are dropped")
    return notes


def _move_hooks(conv: nn.Module, block: nn.Module) -> None:
    """Give ``block`` the conv's forward and full backward hooks; the handles keep working."""
    moved, _ = _hook_tables(conv)
    for key in _reparametrisations(conv):
        del conv._forward_pre_hooks[key]
    if conv._is_full_backward_hook:
        block._is_full_backward_hook = True
    for table in (*moved, *_FORWARD_COMPANIONS):
        tables = getattr(conv, table)
        tables.update(getattr(block, table))
        setattr(block, table, tables)  # the same dict: a handle's remove() reaches the block


def _build(
    model: nn.Module, target: Target, info: BlockInfo, block_kwargs: dict[str, Any]
) -> tuple[nn.Module, str | None]:
    """The block that replaces ``target``, freshly initialised, and a note when it was built
    without its own norm and activation (a ``ValueError`` if the block's constraints refuse)."""
    conv = target.module
    kwargs = {**_conv_kwargs(info.cls, conv, block_kwargs), **block_kwargs}
    note = None
    if info.cls.ends_with_norm_act and not {"norm_layer", "act_layer"} & block_kwargs.keys():
        norm = _norm_after(model, target.paths)
        if norm is not None:
            kwargs.update(norm_layer=None, act_layer=None)
            note = (
                f"{target.name}: {norm} follows it, so {info.name} is built without its own norm "
                f"and activation (norm_layer=None, act_layer=None; pass them to override)"
            )
    block = create_block(
        info.name, conv.in_channels, conv.out_channels, stride=conv.stride[0],
        **{**placement(conv, model), **kwargs},
    )
    block.train(conv.training)
    return block, note


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
    (a bottleneck) are searched. A conv used at several places is replaced by one block put at
    every place (the weights stay tied).

    ``preserve=True``: each block is initialised to compute exactly the conv it replaces (see
    :func:`preservable_convs`), checked on a random input; a block that cannot (``NOT_PRESERVABLE``
    says why) raises a ``ValueError`` before the model is touched. ``preserve=False`` keeps the
    blocks' own initialisation. Either way the block's parameters are frozen where the conv's
    were (``requires_grad``), the conv's forward hooks (and full backward hooks) move to the
    block, and a block that ends in its own norm and activation (``spd_conv``,
    ``separable_conv``) is built without them where a norm layer follows the conv.
    """
    info = block_info(with_)
    if info.kind not in CONV_KINDS:
        raise ValueError(
            f"replace_convs needs a block of kind {CONV_KINDS}, {with_!r} is {info.kind!r}; "
            f"use insert_after/insert_before for attention blocks"
        )
    reason = info.cls.conv_preservation
    if preserve and reason is not None:
        raise ValueError(
            f"{with_!r} cannot replace a convolution with preserve=True: {reason}. Blocks that "
            f"can: {preservable_convs()}. Pass preserve=False to insert it freshly initialised "
            f"(the model's outputs change and need fine-tuning)."
        )
    targets = find_targets("replace_convs", model, where, nn.Conv2d)
    if where is not None and not callable(where):
        for t in targets:
            if not isinstance(t.module, nn.Conv2d):
                raise ValueError(
                    f"{t.name} is a {type(t.module).__name__}, not an nn.Conv2d; to replace the "
                    f"convs inside it, pass where=lambda name, conv: "
                    f"name.startswith({t.name + '.'!r})"
                )
    report = SurgeryReport("replace_convs", with_, dry_run, parameter_count(model))
    edits, refused = [], []
    for target in targets:
        conv = target.module
        if not isinstance(conv, nn.Conv2d):
            continue
        problem = _conv_problem(conv, info)
        if problem is not None:
            report.skipped.append((target.name, problem))
            continue
        try:
            block, note = _build(model, target, info, block_kwargs)
        except ValueError as err:  # the block's own constraints, e.g. channel divisibility
            report.skipped.append((target.name, str(err)))
            refused.append(err)
            continue
        if preserve:
            block.init_from_conv(conv)
            _check_reproduces(conv, block, f"{target.name} -> {with_}")
        _carry_requires_grad(conv, block)
        if note is not None:
            report.notes.append(note)
        k, s, g = conv.kernel_size[0], conv.stride[0], conv.groups
        report.changes.append(Change(
            target.name,
            f"Conv2d({conv.in_channels}, {conv.out_channels}, k={k}, stride={s}, groups={g})",
            f"{with_}({block.in_channels}, {block.out_channels}, stride={block.stride})"
            + (" without norm/act" if note is not None else ""),
            parameter_count(conv), parameter_count(block), "exact" if preserve else "none",
            tuple(target.paths[1:]),
        ))
        report.notes += _hook_notes(target.name, conv)
        edits.append((target, block))
    if refused and not edits:  # every build failed: most likely a bad option, not the convs
        raise ValueError(f"{with_} could not be built for any matched conv: {refused[0]}")
    undo = put(model, [(target.paths, block) for target, block in edits])
    report.params_after = parameter_count(model)
    if dry_run:
        undo()
    else:
        for target, block in edits:
            _move_hooks(target.module, block)
    return report
