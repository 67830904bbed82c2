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
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

try:
    from timm.models import generate_default_cfgs, register_model
    from timm.models._builder import resolve_pretrained_cfg
except ImportError as err:  # pragma: no cover - exercised only without timm installed
    raise ImportError("blockzoo.integrations.timm needs timm: pip install timm") from err

import blockzoo

from ..models.registry import create_model as _create_model
from ..registry import block_info, create_block

PREFIX = "blockzoo_"

#: timm's pretrained cfgs of the registered blockzoo models (timm reads them from here).
default_cfgs: dict[str, Any] = {}


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


@functools.cache
def _built_cfg(name: str) -> dict[str, Any]:
    """The ``default_cfg`` of blockzoo model ``name`` as built (on the meta device: no memory)."""
    return dict(blockzoo.create_model(name, device="meta").default_cfg)


def pretrained_cfgs(name: str, prefix: str = PREFIX) -> dict[str, dict[str, Any]]:
    """timm pretrained cfgs of blockzoo model ``name``: ``{"<prefix><name>.<tag>": cfg}`` for
    each released checkpoint (``url`` where a direct one exists, ``origin_url`` the page it is
    published on, its ``license``), or ``{"<prefix><name>": cfg}`` when none is released.

    Every cfg has the input size (and ``min_input_size``), ``interpolation``, ``crop_pct``,
    ``mean``/``std``, ``num_classes``, ``pool_size``, ``first_conv`` and ``classifier`` of the
    blockzoo ``default_cfg``.
    """
    cfg = _built_cfg(name)
    base = dict(
        input_size=cfg["input_size"], min_input_size=cfg["min_input_size"],
        interpolation=cfg["interpolation"], crop_pct=cfg["crop_pct"], crop_mode="center",
        mean=cfg["mean"], std=cfg["std"], num_classes=cfg["num_classes"],
        pool_size=cfg["pool_size"], first_conv=cfg["first_conv"], classifier=cfg["classifier"],
        paper_name=cfg["paper"], paper_ids=f"arXiv:{cfg['arxiv']}",
    )
    if not cfg["weights"]:
        return {prefix + name: base}
    return {
        f"{prefix}{name}.{w.tag}": dict(base, url=w.url, origin_url=w.page, license=w.license,
                                        description=w.notes)
        for w in cfg["weights"]
    }


def _source(name: str, pretrained_cfg: Any, tag: str | None) -> Any:
    """What to give ``blockzoo.create_model(pretrained=...)`` for a timm pretrained cfg: its
    ``file`` (``pretrained_cfg_overlay=dict(file=...)``), its ``url``, or the released
    checkpoint of its tag (whose missing URL ``load_pretrained`` reports with the page)."""
    if pretrained_cfg.file:
        return pretrained_cfg.file
    if pretrained_cfg.url:
        return pretrained_cfg.url
    weights = blockzoo.model_info(name).default_cfg["weights"]
    return next((w for w in weights if w.tag == tag), True)


def _entrypoint(model_name: str, factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    blockzoo_name = getattr(factory, "args", (None,))[0]
    native = getattr(factory, "func", None) is _create_model

    def entrypoint(
        pretrained: bool = False,
        pretrained_cfg: Any = None,
        pretrained_cfg_overlay: Any = None,
        cache_dir: Any = None,
        **kwargs: Any,
    ) -> nn.Module:
        if not native:
            if pretrained:
                raise ValueError(f"{model_name}: blockzoo provides no pretrained weights")
            return factory(**kwargs)
        cfg = resolve_pretrained_cfg(model_name, pretrained_cfg, pretrained_cfg_overlay)
        source = _source(blockzoo_name, cfg, cfg.tag) if pretrained else False
        if source is True and not blockzoo.model_info(blockzoo_name).default_cfg["weights"]:
            # timm's convention for an architecture without weights (its scripts default to
            # pretrained=True): a warning and the random initialisation
            warnings.warn(f"{model_name}: no pretrained weights exist for this model; using "
                          f"random initialization", stacklevel=2)
            source = False
        model = factory(pretrained=source, **kwargs)
        merged = {**cfg.to_dict(), **model.default_cfg}
        model.default_cfg = model.pretrained_cfg = merged
        return model

    entrypoint.__name__ = entrypoint.__qualname__ = model_name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"blockzoo model {model_name[len(PREFIX):]!r}."
    return entrypoint


def register_models(
    factories: Mapping[str, Callable[..., nn.Module]] | None = None, prefix: str = PREFIX
) -> list[str]:
    """Register models with timm as ``<prefix><name>``; return the registered timm names.

    ``factories`` maps a name to a callable taking timm's keyword arguments (``num_classes``,
    ``in_chans``, ...) and returning the model; by default every name in
    ``blockzoo.list_models()``, built with ``blockzoo.create_model(name, **kwargs)``
    (``device``, ``dtype``, ``features_only``, ``out_indices``, ``global_pool``, ... included).

    For blockzoo's models a pretrained cfg is registered with each name (:func:`pretrained_cfgs`),
    so ``timm.models.get_pretrained_cfg``, ``timm.data.resolve_data_config`` and
    ``timm.create_model(name, pretrained=True)`` work: the weights are those of
    ``blockzoo.create_model(name, pretrained=...)`` (the tag's released checkpoint, or a local
    file given as ``pretrained_cfg_overlay=dict(file="path")``); for a model without released
    weights timm's convention holds (a warning, random initialisation). The model's
    ``pretrained_cfg`` is timm's cfg with blockzoo's ``default_cfg`` over it. Other factories
    have no weights: ``pretrained=True`` raises.
    """
    factories = _blockzoo_models() if factories is None else factories
    if any(c in prefix for c in "/:."):
        raise ValueError(f"timm model names cannot contain '/', ':' or '.', got prefix {prefix!r}")
    module = sys.modules[__name__]
    names = []
    for name, factory in factories.items():
        fn = _entrypoint(prefix + name, factory)
        if getattr(factory, "func", None) is _create_model:
            # timm reads the pretrained cfgs of an entrypoint from its module's default_cfgs
            default_cfgs.update(generate_default_cfgs(pretrained_cfgs(name, prefix)))
        # timm lists a model under its entrypoint's module; keep the entrypoint importable there.
        setattr(module, fn.__name__, fn)
        register_model(fn)
        names.append(fn.__name__)
    return names


__all__ = ["PREFIX", "attn_layer", "pretrained_cfgs", "register_models"]
