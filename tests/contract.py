"""Helpers for the block contract suite: the configurations each registered block is tested in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

import blockzoo as bz

#: bf16 autocast tolerance: ||y_bf16 - y_fp32|| / ||y_fp32|| must stay below this.
BF16_RELATIVE_TOLERANCE = 5e-2

#: Blocks without parameters or buffers (the points about parameters hold vacuously for them).
PARAMETER_FREE = frozenset({"simam"})


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
    outs = [None] + ([info.example_out] if info.width == "free" and info.example_out else [])
    return [
        Config(name, info.example_in, out, stride, dict(info.example_kwargs))
        for stride in info.strides
        for out in outs
    ]


def main_config(name: str) -> Config:
    """The most demanding configuration: changed width and the largest stride."""
    return configs(name)[-1]


def all_configs() -> list[Config]:
    return [c for name in bz.list_blocks() for c in configs(name)]
