"""Counting what a module costs: parameters and FLOPs, the same rule everywhere in blockzoo.

FLOPs are 2 per multiply-add. Convolutions and matrix products are counted by
``torch.utils.flop_counter.FlopCounterMode``; work a block does with elementwise operations that
the counter cannot see is declared by the block's ``extra_flops(x)`` hook in the same unit and
added here (docs/profiling.md states the rule). The count is taken on the PyTorch reference forms
of the blocks (the compiled CPU kernels of :mod:`blockzoo.ops` are switched off while counting),
so it is the same whichever implementation is installed or active.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..ops import fast_ops


def map_elements(x: torch.Tensor, channels: int | None = None, stride: int = 1) -> int:
    """``N * channels * ceil(H / stride) * ceil(W / stride)`` for an input ``x`` of shape
    ``(N, C, H, W)`` (``channels`` defaults to ``C``): the size of a feature map, the unit in
    which ``extra_flops`` hooks count their elementwise multiply-adds."""
    n, c, h, w = x.shape
    return n * (c if channels is None else channels) * (-(-h // stride)) * (-(-w // stride))


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def backward_from_sum(out: torch.Tensor) -> None:
    """Backpropagate ``out.sum()`` (in float32 at least), the pass profiling times."""
    out.float().sum().backward()


def count_flops(module: nn.Module, x: torch.Tensor, backward: bool = False) -> int:
    """FLOPs (2 per multiply-add) of one forward (and backward) pass at ``x``'s size."""
    extra = 0

    def add_extra(mod: nn.Module, args: tuple) -> None:
        nonlocal extra
        extra += int(mod.extra_flops(args[0]))

    hooks = [
        m.register_forward_pre_hook(add_extra)
        for m in module.modules()
        if callable(getattr(m, "extra_flops", None))
    ]
    try:
        with fast_ops(False), FlopCounterMode(display=False) as counter:
            out = module(x)
            if backward:
                backward_from_sum(out)
    finally:
        for h in hooks:
            h.remove()
    # Backward of the elementwise work costs about twice its forward, like a conv's.
    return int(counter.get_total_flops()) + extra * (3 if backward else 1)
