"""The block catalogue: one row of metadata and measured facts per registered block."""

from __future__ import annotations

from typing import Any

import torch

from ..core.counting import count_parameters
from ..registry import block_info, create_block, list_blocks


def catalog_rows(
    kind: str | None = None, in_channels: int = 64, size: int = 56
) -> list[dict[str, Any]]:
    """For each block: name, kind, paper, year, arXiv id, parameters and output shape.

    Parameters and shape are measured on the block built with its defaults,
    ``create_block(name, in_channels)``, run in eval mode on a ``1 x in_channels x size x size``
    input.
    """
    rows = []
    x = torch.randn(1, in_channels, size, size, generator=torch.Generator().manual_seed(0))
    for name in list_blocks(kind):
        info = block_info(name)
        block = create_block(name, in_channels).eval()
        with torch.no_grad():
            shape = tuple(block(x).shape)
        rows.append(
            {
                "name": name,
                "kind": info.kind,
                "paper": info.paper,
                "year": info.year,
                "arxiv": info.arxiv,
                "params": count_parameters(block),
                "output": shape,
            }
        )
    return rows
