"""Use blockzoo blocks by name in Ultralytics YOLO model YAMLs, without editing Ultralytics.

>>> from blockzoo.integrations import ultralytics as bz_yolo
>>> bz_yolo.register()
>>> from ultralytics import YOLO
>>> model = YOLO("examples/yolo/yolov8n-coordatt.yaml")  # doctest: +SKIP

A YAML row names a block by its registry name (``coord_att``), its class name
(``CoordinateAttention``), the CamelCase of its registry name (``CoordAtt``, ``SpdConv``) or, always
unambiguously, ``bz.<registry name>`` (``bz.se``); a bare name that Ultralytics itself defines
stays Ultralytics'. Arguments are ``[out_channels, stride, {keyword options}]``, each optional:

- ``[-1, 1, CoordAtt, []]``: input channels from the previous layer, output = input;
- ``[-1, 1, SPDConv, [256]]``: 256 output channels before the model's width multiplier, which
  Ultralytics applies as ``make_divisible(min(c2, max_channels) * width, 8)``;
- ``[-1, 1, bz.dynamic_conv, [128, 2, {num_experts: 4}]]``: stride and options.

``n`` repeats build ``n`` blocks (after Ultralytics' depth multiplier): the first maps the input
channels to the output channels, the others keep the output channels; every one gets the stride.

How it works: Ultralytics resolves the modules of a YAML inside ``ultralytics.nn.tasks.parse_model``
and infers channels only for its own modules (a set local to that function). :func:`register`
replaces ``parse_model`` in ``ultralytics.nn.tasks`` with a wrapper that rewrites each blockzoo row
into an Ultralytics placeholder (``Conv`` with the requested out-channels, whose channels
Ultralytics computes with its own rules, or ``nn.BatchNorm2d`` for "same as input"), calls the
original ``parse_model``, reads the channel counts off the placeholders and swaps in the blockzoo
blocks. Nothing in Ultralytics' files changes; :func:`unregister` restores the original.

Call :func:`register` in every process that builds a model from a YAML that names blockzoo
blocks (Ultralytics' multi-GPU DDP training starts new processes from a generated script, which
does not call it). Ultralytics is AGPL-3.0 licensed; blockzoo only imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from copy import deepcopy
from typing import Any

from torch import nn

try:
    from ultralytics.nn import tasks as _tasks
    from ultralytics.utils import LOGGER
except ImportError as err:  # pragma: no cover - exercised only without the optional extra
    raise ImportError(
        "blockzoo.integrations.ultralytics needs Ultralytics: pip install 'blockzoo[yolo]'"
    ) from err

from ..core.validation import close_matches
from ..registry import block_info, create_block, list_blocks

PREFIX = "bz."
_MARK = "_blockzoo_original"


def _camel(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_"))


def yaml_names() -> dict[str, str]:
    """Every module name that means a blockzoo block in a YAML, mapped to its registry name.

    Computed from the registry on each call, so blocks registered after :func:`register` work.
    """
    taken = set(vars(_tasks))
    names: dict[str, str] = {}
    by_class: dict[type, list[str]] = {}
    for name in list_blocks():
        info = block_info(name)
        if not info.preset:
            by_class.setdefault(info.cls, []).append(name)
        names[PREFIX + name] = name
        for alias in (name, _camel(name)):
            if alias not in taken:
                names.setdefault(alias, name)
    for cls, registered in by_class.items():
        if len(registered) == 1 and cls.__name__ not in taken:
            names.setdefault(cls.__name__, registered[0])
    return names


def _layer_args(i: int, name: str, args: list) -> tuple[int | None, int | None, dict[str, Any]]:
    """``[out_channels, stride, {options}]`` (each optional) of YAML row ``i``."""
    usage = (f"layer {i} ({name}): arguments are [out_channels, stride, {{options}}], each "
             f"optional, got {args!r}")
    args = list(args)
    options = args.pop() if args and isinstance(args[-1], dict) else {}
    if len(args) > 2 or any(
        not (a is None or (isinstance(a, int) and not isinstance(a, bool) and a >= 1))
        for a in args
    ):
        raise ValueError(usage)
    out_channels, stride = (args + [None, None])[:2]
    if stride is None and len(args) == 2:
        raise ValueError(usage)
    return out_channels, stride, dict(options)


def _placeholder_channels(module: nn.Module) -> tuple[int, int, int]:
    """``(repeats, in_channels, out_channels)`` that Ultralytics computed for a placeholder row."""
    repeats = len(module) if isinstance(module, nn.Sequential) else 1
    first = module[0] if isinstance(module, nn.Sequential) else module
    if isinstance(first, nn.BatchNorm2d):
        return repeats, first.num_features, first.num_features
    return repeats, first.conv.in_channels, first.conv.out_channels


def _scaling(d: dict, yaml_out: int, c2: int) -> str:
    """How Ultralytics turned a row's ``yaml_out`` channels into ``c2`` (empty if unchanged)."""
    if yaml_out == c2:
        return ""
    _, width, max_channels = _scale(d)
    capped = f"min({yaml_out}, {max_channels})" if max_channels < yaml_out else f"{yaml_out}"
    return (f"; the YAML's {yaml_out} output channels are {c2} in this model: width multiple "
            f"{width} gives make_divisible({capped} * {width}, 8) = {c2}")


def _build(i: int, module: str, name: str, out: int | None, stride: int | None, options: dict,
           placeholder: nn.Module, d: dict) -> nn.Module:
    repeats, c1, c2 = _placeholder_channels(placeholder)
    blocks = []
    for k in range(repeats):
        cin = c1 if k == 0 else c2
        try:
            block = create_block(name, cin, None if out is None else c2, stride=stride, **options)
        except (ValueError, TypeError, KeyError) as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            hint = "" if out is None else _scaling(d, out, c2)
            if out is not None and c2 != cin and block_info(name).width == "same":
                hint += (f"; its input has {cin} channels, which it keeps: leave the output "
                         f"channels out ([])")
            raise ValueError(f"layer {i} ({module}): {message}{hint}") from err
        if block.out_channels != c2:
            raise ValueError(
                f"layer {i} ({module}): the block maps {cin} to {block.out_channels} channels; "
                f"give its output channels as the first argument so that Ultralytics can size "
                f"the next layers"
            )
        blocks.append(block)
    module = blocks[0] if repeats == 1 else nn.Sequential(*blocks)
    cls = type(blocks[0])
    module.i, module.f = placeholder.i, placeholder.f
    module.type = f"{cls.__module__}.{cls.__name__}"
    module.np = sum(p.numel() for p in module.parameters())
    return module


def _scale(d: dict) -> tuple[float, float, float]:
    """``(depth, width, max_channels)`` of the model, chosen as Ultralytics' ``parse_model``
    chooses them."""
    scales = d.get("scales")
    if scales:
        return tuple(scales[d.get("scale") or next(iter(scales))])
    return d.get("depth_multiple", 1.0), d.get("width_multiple", 1.0), float("inf")


def _log_table(d: dict, model: nn.Sequential, rows: list, resolved: dict[int, list]) -> None:
    """Ultralytics' layer table; arguments as in the YAML, resolved ones for blockzoo rows."""
    depth = _scale(d)[0]
    LOGGER.info(f"\n{'':>3}{'from':>20}{'n':>3}{'params':>10}  {'module':<45}{'arguments':<30}")
    for i, (m, (f, n, _, args)) in enumerate(zip(model, rows, strict=True)):
        n = max(round(n * depth), 1) if n > 1 else n
        shown = resolved.get(i, args)
        LOGGER.info(f"{i:>3}{f!s:>20}{n:>3}{m.np:10.0f}  {m.type:<45}{shown!s:<30}")


def _ultralytics_modules() -> list[str]:
    """The module names a YAML row may use without blockzoo (``nn.*`` aside)."""
    return [k for k, v in vars(_tasks).items() if isinstance(v, type) and issubclass(v, nn.Module)]


def _check_known(i: int, module: object, names: dict[str, str]) -> None:
    """Refuse a row's module name that neither Ultralytics nor blockzoo defines, with the
    closest names of both (Ultralytics itself fails with a bare ``KeyError``)."""
    if not isinstance(module, str) or module in names or module in vars(_tasks):
        return
    if module.startswith(("nn.", "torchvision.ops.")):
        return
    hint = close_matches(module, [*names, *_ultralytics_modules()])
    raise ValueError(
        f"layer {i}: unknown module {module!r}{hint} (blockzoo names: "
        f"blockzoo.integrations.ultralytics.yaml_names(); Ultralytics' own modules are the "
        f"classes of ultralytics.nn.tasks)"
    )


def _parse_model(original: Callable, d: dict, ch: int, verbose: bool = True) -> tuple:
    names = yaml_names()
    d = deepcopy(d)
    rows = d["backbone"] + d["head"]
    yaml_rows = deepcopy(rows)
    ours: dict[int, tuple[str, str, int | None, int | None, dict]] = {}
    for i, row in enumerate(rows):
        f, _, m, args = row
        _check_known(i, m, names)
        if not (isinstance(m, str) and m in names):
            continue
        name = names[m]
        if not isinstance(f, int):
            raise ValueError(f"layer {i} ({m}): a blockzoo block takes one input, got from={f!r}")
        out_channels, stride, options = _layer_args(i, m, args)
        ours[i] = (m, name, out_channels, stride, options)
        # The placeholder makes Ultralytics compute this row's channels with its own rules.
        row[2], row[3] = ("Conv", [out_channels]) if out_channels else ("nn.BatchNorm2d", [])
    model, save = original(d, ch, verbose=verbose and not ours)
    resolved = {}
    for i, (module, name, out_channels, stride, options) in ours.items():
        model[i] = _build(i, module, name, out_channels, stride, options, model[i], d)
        block = model[i][0] if isinstance(model[i], nn.Sequential) else model[i]
        resolved[i] = [name, block.in_channels, block.out_channels, block.stride, options]
    if verbose and ours:
        _log_table(d, model, yaml_rows, resolved)
    return model, save


def register() -> None:
    """Make every blockzoo block usable by name in Ultralytics model YAMLs (idempotent)."""
    if hasattr(_tasks.parse_model, _MARK):
        return
    original = _tasks.parse_model

    def parse_model(d: dict, ch: int, verbose: bool = True) -> tuple:
        return _parse_model(original, d, ch, verbose)

    parse_model.__doc__ = original.__doc__
    setattr(parse_model, _MARK, original)
    _tasks.parse_model = parse_model


def unregister() -> None:
    """Restore Ultralytics' own ``parse_model``."""
    original = getattr(_tasks.parse_model, _MARK, None)
    if original is not None:
        _tasks.parse_model = original


def is_registered() -> bool:
    return hasattr(_tasks.parse_model, _MARK)


def run_cli(args: Sequence[str]) -> None:
    """Run Ultralytics' own command line (``yolo ARGS``) with the blockzoo blocks registered.

    ``args`` are exactly what follows ``yolo``: ``["detect", "train", "model=my.yaml",
    "data=data.yaml", "epochs=1"]``; every mode (train, val, predict, export, ...) and option
    is Ultralytics'. This is ``blockzoo yolo ...``. Arguments are handed over as a list, so
    values with spaces survive. A malformed argument, which Ultralytics reports as a
    ``SyntaxError`` followed by its help text, becomes a ``ValueError`` with the first line.
    """
    from ultralytics import cfg

    register()
    saved = cfg.ARGV
    cfg.ARGV = ["yolo", *args]  # Ultralytics' entrypoint reads its arguments from here
    try:
        cfg.entrypoint()
    except SyntaxError as err:
        raise ValueError(str(err).strip().splitlines()[0]) from err
    finally:
        cfg.ARGV = saved


__all__ = ["PREFIX", "is_registered", "register", "run_cli", "unregister", "yaml_names"]

