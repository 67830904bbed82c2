"""timm bridges: blockzoo attention in timm models, blockzoo models in timm's registry.

>>> import timm
>>> from blockzoo.integrations.timm import attn_layer
>>> model = timm.create_model("resnet18", block_args=dict(attn_layer=attn_layer("coord_att")))

timm's ResNet family (and SKNet, VoVNet, MaxxViT) builds attention with
``create_attn(attn_layer, channels, **dd)``, which calls a class (or any callable) as
``attn_layer(channels, device=..., dtype=...)``; :func:`attn_layer` returns such a callable for any
shape-preserving blockzoo block. ResNet takes it as ``block_args=dict(attn_layer=...)``. timm's
ResNet re-initialises every conv it contains when built, blockzoo blocks' included (GC's
zero-initialised last conv then starts random); to add attention to a model with its weights,
use :func:`blockzoo.surgery.insert_after`, which preserves its function.

:func:`register_models` adds blockzoo models to timm's registry as ``blockzoo_<name>``
(``timm.create_model("blockzoo_rednet50")``): timm model names cannot contain ``/`` or ``:``,
which it reserves for Hugging Face Hub ids and local paths, and ``.`` separates a pretrained tag.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

try:
    from timm.models import register_model
except ImportError as err:  # pragma: no cover - exercised only without timm installed
    raise ImportError("blockzoo.integrations.timm needs timm: pip install timm") from err

import blockzoo

from ..registry import block_info, create_block

PREFIX = "blockzoo_"


def attn_layer(name: str, **kwargs: Any) -> Callable[..., nn.Module]:
    """A timm ``attn_layer``: ``attn_layer(name)(channels, **kw)`` builds blockzoo block ``name``.

    ``kwargs`` are the block's options (e.g. ``reduction=16``); ``device``/``dtype`` and any other
    keyword timm passes at build time are forwarded too. The block must keep its input's shape
    (``width="same"``), as timm inserts attention in place.
    """
    info = block_info(name)
    if info.width != "same" or info.strides != (1,):
        raise ValueError(
            f"timm inserts attn_layer where the shape must not change; {name!r} is a "
            f"{info.kind} block with width {info.width!r} and strides {info.strides}"
        )
    return functools.partial(create_block, name, **kwargs)


def _blockzoo_models() -> dict[str, Callable[..., nn.Module]]:
    """``blockzoo.list_models()`` as name -> factory, empty while blockzoo has no models API."""
    list_models = getattr(blockzoo, "list_models", None)
    create_model = getattr(blockzoo, "create_model", None)
    if list_models is None or create_model is None:
        return {}
    return {name: functools.partial(create_model, name) for name in list_models()}


def _entrypoint(model_name: str, factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    def entrypoint(
        pretrained: bool = False,
        pretrained_cfg: Any = None,
        pretrained_cfg_overlay: Any = None,
        cache_dir: Any = None,
        **kwargs: Any,
    ) -> nn.Module:
        if pretrained:
            raise ValueError(f"{model_name}: blockzoo provides no pretrained weights")
        return factory(**kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = model_name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"blockzoo model {model_name[len(PREFIX):]!r} (random initialisation)."
    return entrypoint


def register_models(
    factories: Mapping[str, Callable[..., nn.Module]] | None = None, prefix: str = PREFIX
) -> list[str]:
    """Register models with timm as ``<prefix><name>``; return the registered timm names.

    ``factories`` maps a name to a callable taking timm's keyword arguments (``num_classes``,
    ``in_chans``, ...) and returning the model; by default every name in
    ``blockzoo.list_models()``, built with ``blockzoo.create_model(name, **kwargs)``.
    ``timm.create_model(name, pretrained=True)`` raises: blockzoo ships no weights.
    """
    factories = _blockzoo_models() if factories is None else factories
    if any(c in prefix for c in "/:."):
        raise ValueError(f"timm model names cannot contain '/', ':' or '.', got prefix {prefix!r}")
    module = sys.modules[__name__]
    names = []
    for name, factory in factories.items():
        fn = _entrypoint(prefix + name, factory)
        # timm lists a model under its entrypoint's module; keep the entrypoint importable there.
        setattr(module, fn.__name__, fn)
        register_model(fn)
        names.append(fn.__name__)
    return names


__all__ = ["PREFIX", "attn_layer", "register_models"]
