"""Helpers for the block contract suite: the configurations each registered block is tested in.

Every registered block is tested with :data:`DEFAULT_EXAMPLE` unless :data:`EXAMPLES` gives it
settings of its own (a wider output, options that exercise more of it, or the constructor
arguments used for ONNX export). A new block that needs non-default test settings adds an
entry to :data:`EXAMPLES`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

import blockzoo as bz


@contextlib.contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True)`` inside, the previous setting restored after."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)


#: bf16 autocast tolerance: ||y_bf16 - y_fp32|| / ||y_fp32|| must stay below this.
BF16_RELATIVE_TOLERANCE = 5e-2


@dataclass(frozen=True)
class Example:
    """The small configuration the contract suite runs a block in.

    ``out_channels`` is used only for blocks whose width is ``"free"`` (besides the default
    ``None``); ``export_kwargs`` are extra constructor arguments for the ONNX export test.
    ``parameter_free`` declares a block without parameters or buffers (SimAM): the points about
    parameters hold vacuously for it, and the suite checks that it has none.
    """

    in_channels: int = 16
    out_channels: int | None = 24
    kwargs: dict[str, Any] = field(default_factory=dict)
    export_kwargs: dict[str, Any] = field(default_factory=dict)
    parameter_free: bool = False


DEFAULT_EXAMPLE = Example()

_RESIDUAL = Example(out_channels=32)
#: Blocks tested with settings other than :data:`DEFAULT_EXAMPLE`.
EXAMPLES: dict[str, Example] = {
    "bottleneck": _RESIDUAL,
    "basic_residual": _RESIDUAL,
    "residual": Example(out_channels=32, kwargs={"attention": "se"}),
    "resnext": Example(out_channels=32, kwargs={"cardinality": 4, "base_width": 16}),
    "sk_unit": _RESIDUAL,
    "inverted_residual": Example(out_channels=32, kwargs={"attention": "coord_att"}),
    "involution": Example(in_channels=32),
    "dense": Example(kwargs={"num_layers": 2, "growth_rate": 8}),
    "nasnet_normal_cell": Example(kwargs={"cell_channels": 8}),
    "amoebanet_normal_cell": Example(kwargs={"cell_channels": 8}),
    # torchvision's deformable op exports as ONNX DeformConv (opset 19); the pure-PyTorch
    # sampler exports in opset 18.
    "deform_conv": Example(export_kwargs={"impl": "torch"}),
    "mdeform_conv": Example(export_kwargs={"impl": "torch"}),
    "simam": Example(parameter_free=True),
}


def example(name: str) -> Example:
    """The contract settings of block ``name``."""
    return EXAMPLES.get(name, DEFAULT_EXAMPLE)


@dataclass(frozen=True)
class Config:
    name: str
    in_channels: int
    out_channels: int | None
    stride: int
    kwargs: dict[str, Any]

    def build(self, **extra: Any) -> torch.nn.Module:
        """The block, with zero-initialised parameters (GC's last convs, deformable offset
        predictors, zero biases) filled with small random values, so that no contract point is
        checked on a block that happens to be an identity or a plain conv when fresh."""
        block = bz.create_block(
            self.name, self.in_channels, self.out_channels, self.stride,
            **{**self.kwargs, **extra},
        )
        with torch.no_grad():
            for p in block.parameters():
                if not p.any():
                    p.normal_(0.0, 0.1)
        return block

    def input(self, n: int, h: int, w: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(n, self.in_channels, h, w, dtype=dtype)

    def expected_shape(self, block: torch.nn.Module, n: int, h: int, w: int) -> tuple:
        s = self.stride
        return (n, block.out_channels, -(-h // s), -(-w // s))

    def __str__(self) -> str:
        return f"{self.name}-out{self.out_channels}-s{self.stride}"


def configs(name: str) -> list[Config]:
    """Every (out_channels, stride) combination the block's registry entry allows."""
    info = bz.block_info(name)
    ex = example(name)
    outs = [None] + ([ex.out_channels] if info.width == "free" and ex.out_channels else [])
    return [
        Config(name, ex.in_channels, out, stride, dict(ex.kwargs))
        for stride in info.strides
        for out in outs
    ]


def main_config(name: str) -> Config:
    """The most demanding configuration: changed width and the largest stride."""
    return configs(name)[-1]


def all_configs() -> list[Config]:
    return [c for name in bz.list_blocks() for c in configs(name)]
