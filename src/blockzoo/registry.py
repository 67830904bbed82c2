"""The block registry: names, paper metadata, defaults and contract notes for every block.

A block joins blockzoo by decorating its class with :func:`register_block`; from then on
:func:`create_block` builds it by name, ``blockzoo list`` shows it and the contract test suite
(``tests/test_contract.py``) runs every contract point over it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .core.validation import close_matches

KINDS = ("attention", "conv", "downsample", "block", "cell")

_REGISTRY: dict[str, BlockInfo] = {}


@dataclass(frozen=True)
class BlockInfo:
    """What the registry knows of one block: its paper and what a user reads before using it.

    ``strides`` are the strides the entry accepts (the class's ``allowed_strides`` unless the
    entry lists them); ``width`` (``"free"``, ``"same"`` or ``"structural"``) is the class's rule
    for ``out_channels`` (see :class:`~blockzoo.blocks.base.Block`). ``fullgraph`` is False only
    where ``torch.compile(fullgraph=True)`` cannot work, with the reason in ``notes``. ``preset``
    holds constructor arguments this name stands for (``resnext`` is ``residual`` with
    ``cardinality=32, base_width=4``).
    """

    name: str
    cls: type[nn.Module]
    kind: str
    paper: str
    arxiv: str
    year: int
    summary: str
    preset: dict[str, Any] = field(default_factory=dict)
    strides: tuple[int, ...] = (1, 2)
    fullgraph: bool = True
    notes: str = ""

    @property
    def width(self) -> str:
        """The class's ``out_channels`` rule: ``"free"``, ``"same"`` or ``"structural"``."""
        return getattr(self.cls, "width", "free")

    @property
    def defaults(self) -> dict[str, Any]:
        """Keyword defaults of the constructor, with this entry's preset applied."""
        params = inspect.signature(self.cls.__init__).parameters
        skip = {"self", "in_channels", "device", "dtype"}
        found = {
            name: p.default
            for name, p in params.items()
            if name not in skip
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            and p.default is not inspect.Parameter.empty
        }
        found.update(self.preset)
        return found

    @property
    def default_stride(self) -> int:
        return int(self.defaults.get("stride", 1))

    @property
    def arxiv_url(self) -> str:
        return f"https://arxiv.org/abs/{self.arxiv}"


def register_block(
    name: str,
    *,
    kind: str,
    paper: str,
    arxiv: str,
    year: int,
    summary: str,
    **options: Any,
) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator that registers a block under ``name`` (see :class:`BlockInfo`).

    May be stacked to register one class under several names with different ``preset`` kwargs.
    ``strides`` defaults to the class's ``allowed_strides``; a class that sets none (any stride)
    must list the strides its entry stands for.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown block kind {kind!r}; choose one of {KINDS}")

    def decorate(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise ValueError(f"block name {name!r} is already registered")
        strides = options.get("strides", getattr(cls, "allowed_strides", None))
        if strides is None:
            raise ValueError(
                f"block {name!r}: {cls.__name__} sets no allowed_strides, so give strides="
            )
        _REGISTRY[name] = BlockInfo(
            name=name, cls=cls, kind=kind, paper=paper, arxiv=arxiv, year=year, summary=summary,
            **{**options, "strides": tuple(strides)},
        )
        return cls

    return decorate


def unknown_name(what: str, name: str, known: Iterable[str], listing: str) -> KeyError:
    """``KeyError("unknown <what> 'name'; did you mean ...? (see <listing>)")``, up to three
    close matches from ``known``."""
    return KeyError(f"unknown {what} {name!r}{close_matches(name, known)} (see {listing})")


def _lookup(name: str) -> BlockInfo:
    """A registered name, or a block class's name (``"SqueezeExcite"``) when exactly one
    registration without a preset builds that class (as the Ultralytics YAML names resolve)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    by_class = [info for info in _REGISTRY.values()
                if info.cls.__name__ == name and not info.preset]
    if len(by_class) == 1:
        return by_class[0]
    if by_class:
        raise KeyError(f"block class {name!r} is registered as "
                       f"{', '.join(repr(i.name) for i in by_class)}; use one of these names")
    raise unknown_name("block", name, _REGISTRY, "blockzoo.list_blocks()")


def list_blocks(kind: str | None = None) -> list[str]:
    """Sorted names of the registered blocks, optionally of one ``kind`` (see ``KINDS``)."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown block kind {kind!r}; choose one of {KINDS}")
    return sorted(n for n, info in _REGISTRY.items() if kind is None or info.kind == kind)


def block_info(name: str) -> BlockInfo:
    """The :class:`BlockInfo` of a registered block; ``KeyError`` with close matches if unknown."""
    return _lookup(name)


def create_block(
    name: str,
    in_channels: int,
    out_channels: int | None = None,
    stride: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build the block registered as ``name`` (or by its class name, e.g. ``"SqueezeExcite"``,
    when one registration without a preset builds that class).

    ``stride=None`` takes the block's default (1 for every block but ``spd_conv``, whose stride is
    its scale, 2). Extra keyword arguments go to the block's constructor.
    """
    info = _lookup(name)
    kw = {**info.preset, **kwargs}
    return info.cls(
        in_channels,
        out_channels=out_channels,
        stride=info.default_stride if stride is None else stride,
        **kw,
    )
