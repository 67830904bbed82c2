"""``insert_after`` / ``insert_before``: wrap modules as ``Sequential(module, block)`` or
``Sequential(block, module)``, the block's channels read from the module or a probe pass."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..registry import block_info, create_block
from .matching import Target, Where, find_targets, placement, probing, put, random_input
from .report import Change, SurgeryReport, parameter_count


class GatedResidual(nn.Module):
    """``x + gamma * (block(x) - x)`` with a learnable scalar ``gamma`` (0 at insertion).

    At ``gamma = 0`` the wrapper is the identity, so inserting it leaves a network's function
    unchanged; at ``gamma = 1`` it is the block. The first optimiser step moves ``gamma`` (its
    gradient is ``<dL/dy, block(x) - x>``); the block's own parameters receive gradients from the
    step after. The wrapped block must keep its input's shape.
    """

    #: Model surgery does not search inside the wrapper (see ``named_open_modules``).
    sealed = True

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

    def extra_flops(self, x: torch.Tensor) -> int:
        """The blend ``x + gamma * (y - x)``, a 2-term weighted sum: 2 multiply-adds per value
        (docs/profiling.md's FLOPs rule; the wrapped block declares its own)."""
        return 2 * 2 * x.numel()

    def extra_repr(self) -> str:
        return f"gamma={self.gamma.item():.4g}"


#: Modules whose input and output are not ``(N, C, H, W)`` feature maps.
NOT_2D = (
    nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose3d, nn.BatchNorm1d, nn.BatchNorm3d,
    nn.InstanceNorm1d, nn.InstanceNorm3d,
)


def _known_channels(name: str, module: nn.Module, before: bool) -> int | None:
    """Channel count at the module's input (``before``) or output, from its attributes; a
    ``ValueError`` for a module whose tensors are not ``(N, C, H, W)`` (a ``Conv1d``)."""
    if isinstance(module, NOT_2D):
        dims = 3 if "1d" in type(module).__name__.lower() else 5
        raise ValueError(
            f"{name} is a {type(module).__name__}: its {'input' if before else 'output'} is "
            f"{dims}-D, and blockzoo blocks take (N, C, H, W) feature maps"
        )
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return module.num_features
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    value = getattr(module, "in_channels" if before else "out_channels", None)
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
    model: nn.Module, targets: list[Target], before: bool, example_input: torch.Tensor | None
) -> dict[str, int]:
    """Run one forward pass (eval mode, no grad, no user hooks) and read the channels at each
    target module, by its first name."""
    seen: dict[str, set[int]] = {t.name: set() for t in targets}

    def hook(name: str) -> Callable:
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            t = args[0] if before and args else output
            seen[name].add(int(t.shape[1]) if isinstance(t, torch.Tensor) and t.dim() == 4 else 0)

        return record

    x = _default_probe_input(model) if example_input is None else example_input
    try:
        with probing(model):
            for t in targets:
                t.module.register_forward_hook(hook(t.name))
            model(x)
    except Exception as err:
        raise ValueError(
            f"the probe forward pass with an input of shape {tuple(x.shape)} failed ({err}); "
            f"pass example_input=<a tensor the model accepts>"
        ) from err
    side = "input" if before else "output"
    for name, channels in seen.items():
        if not channels or 0 in channels:
            raise ValueError(
                f"{name}: its {side} was not an (N, C, H, W) tensor in the probe forward pass "
                f"(or the module did not run), so a block cannot be placed there"
            )
        if len(channels) > 1:
            raise ValueError(f"{name}: it is used with {sorted(channels)} {side} channels")
    return {name: channels.pop() for name, channels in seen.items()}


def _is_identity(block: nn.Module, channels: int) -> bool:
    """True when the fresh block returns its input unchanged (eval mode, random input)."""
    ref = next(block.parameters(), None)
    x = random_input(channels, 5, 6, None if ref is None else ref.device,
                     None if ref is None else ref.dtype)
    with probing(block):
        return torch.equal(block(x), x)


def _insert(
    operation: str, model: nn.Module, block: str, where: Where, preserve: bool,
    dry_run: bool, example_input: torch.Tensor | None, block_kwargs: dict[str, Any],
) -> SurgeryReport:
    before = operation == "insert_before"
    block_info(block)  # unknown names fail here, with close matches
    if where is None:
        raise ValueError(f"{operation} needs where= (a predicate, a module name or names)")
    targets = find_targets(operation, model, where)
    channels = {
        t.name: c for t in targets if (c := _known_channels(t.name, t.module, before)) is not None
    }
    unknown = [t for t in targets if t.name not in channels]
    if unknown:
        channels.update(_probe_channels(model, unknown, before, example_input))
    report = SurgeryReport(operation, block, dry_run, parameter_count(model))
    edits = []
    for target in targets:
        module, c = target.module, channels[target.name]
        new = create_block(block, c, **{**placement(module, model), **block_kwargs})
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
            target.name, type(module).__name__,
            " -> ".join(type(m).__name__ if m is module else f"{block}({c})" for m in pair)
            + (" [gamma=0]" if kind == "gated residual" else ""),
            0, parameter_count(new), kind, tuple(target.paths[1:]),
        ))
        edits.append((target, wrapped))
    undo = put(model, [(target.paths, wrapped) for target, wrapped in edits])
    report.params_after = parameter_count(model)
    if dry_run:
        undo()
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
    first conv's input channels) in eval mode, without firing the model's own hooks. The block
    must keep its input's shape (attention blocks and shape-preserving convs); a module whose
    output is not ``(N, C, H, W)`` (``Conv1d``, ``Conv3d``, ...) is refused. A module used at
    several places is wrapped once and the wrapper put at every place.

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
