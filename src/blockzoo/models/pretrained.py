"""Pretrained weights: the checkpoints the authors released, and their key layouts.

Every network's ``default_cfg["weights"]`` lists :class:`ReleasedWeights` (facts: where the
authors publish the file, the accuracy they report, its license, the SHA-256 where known, and
its key ``layout``). :func:`load_pretrained` loads

- ``True``: the first released checkpoint that has a direct URL, downloaded into torch.hub's
  cache (``torch.hub.get_dir()/checkpoints``) and checked against its SHA-256; without a direct
  URL (or offline) it raises naming the page to download from and the ``pretrained="path"`` form;
- a local file (``.safetensors``, or a pickled ``.pth``/``.pt``/``.pth.tar`` read with
  ``torch.load(weights_only=True)``), in blockzoo's own key names or in the layout of any
  checkpoint the network lists;
- an ``http(s)://`` URL (cached in the same place; checked when it is a listed checkpoint's URL).

A *layout* is a filter function ``(state_dict, model) -> state_dict`` that renames the authors'
keys into blockzoo's (:data:`LAYOUTS`). It refuses, naming the first key it cannot place, any
file whose keys do not map completely onto the network (wrong family, wrong depth, missing or
surplus keys, wrong shapes), so a checkpoint is never half-loaded.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.error
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.serialization import safe_torch_load

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ReleasedWeights:
    """One checkpoint released by a network's authors (or by torchvision), as published.

    - ``tag``: a short name (``"tv_in1k"``), timm's pretrained tag;
    - ``page``: where the authors publish it (a repository README or a model card);
    - ``url``: a direct download URL, ``None`` when the page only links a file-sharing service
      (a browser download);
    - ``sha256``: the file's SHA-256 (hex) or its leading hex digits as the authors publish
      them (torchvision's file names carry the first 8), ``None`` when unknown;
    - ``top1``: the ImageNet top-1 (%) the publisher reports for this file;
    - ``license``: the license the publisher states for the file (or its code);
    - ``layout``: the key layout (:data:`LAYOUTS`) of the file;
    - ``notes``: anything a user must know (e.g. an evaluation resize).
    """

    tag: str
    page: str
    url: str | None
    sha256: str | None
    top1: float | None
    license: str
    layout: str
    notes: str = ""


class PretrainedError(ValueError):
    """A checkpoint that cannot be found, downloaded, verified or mapped onto the network."""


# --------------------------------------------------------------------------- reading files


def _strip_prefix(state: StateDict, prefix: str) -> StateDict:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """The tensors of a checkpoint file, unwrapped from training wrappers.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(map_location="cpu", weights_only=True)``. A dict holding ``"state_dict"`` or
    ``"model"`` (mmcls, torchvision's and most training scripts' checkpoints) is unwrapped, and
    a ``"module."`` prefix on every key (``DataParallel``) is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained: no such file {str(path)!r}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    else:
        state = safe_torch_load(path)  # refuses pickled code, names a corrupt file
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise PretrainedError(f"pretrained: {str(path)!r} holds no state_dict of tensors")
    return _strip_prefix(dict(state), "module.")


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 (hex) of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_mismatch(path: Path, expected: str | None) -> str | None:
    """The file's SHA-256 when it does not start with ``expected`` (else ``None``)."""
    if expected is None:
        return None
    actual = file_sha256(path)
    return None if actual.startswith(expected.lower()) else actual


def download(url: str, sha256: str | None = None, page: str | None = None) -> Path:
    """``url`` in torch.hub's cache (downloaded once), checked against ``sha256``.

    A fresh download is checked before it enters the cache (a mismatch is deleted); a cached
    file is checked again on every use.
    """
    directory = Path(torch.hub.get_dir()) / "checkpoints"
    path = directory / os.path.basename(url.split("?")[0])
    if path.is_file():
        actual = _sha256_mismatch(path, sha256)
        if actual:
            raise PretrainedError(
                f"pretrained: the cached {str(path)!r} has SHA-256 {actual}, expected "
                f"{sha256}...; delete it to download {url} again"
            )
        return path
    directory.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        torch.hub.download_url_to_file(url, str(partial), progress=False)
    except (urllib.error.URLError, OSError) as err:
        where = f" (page: {page})" if page else ""
        raise PretrainedError(
            f"pretrained: cannot download {url}{where}: {err}. Download the file yourself "
            f"and pass pretrained=\"path/to/file\""
        ) from err
    actual = _sha256_mismatch(partial, sha256)
    if actual:
        partial.unlink()
        raise PretrainedError(
            f"pretrained: {url} downloaded with SHA-256 {actual}, expected {sha256}...; the "
            f"file was not kept"
        )
    partial.replace(path)
    return path


# --------------------------------------------------------------------------- layouts


def _unmatched(model_name: str, layout: str, key: str, why: str) -> PretrainedError:
    return PretrainedError(
        f"{model_name}: checkpoint key {key!r} {why} (layout {layout!r}); the file is not a "
        f"complete {layout} checkpoint of this network"
    )


def _left_out(model: nn.Module) -> Callable[[str], bool]:
    """Keys a complete checkpoint has but ``model`` was built without: the classifier
    (``num_classes=0``), the head conv and the stages after ``out_indices`` (``features_only``).
    """
    prefixes = []
    if not isinstance(getattr(model, "fc", None), nn.Linear):
        prefixes.append("fc.")
    if getattr(model, "head_conv", None) is None:
        prefixes.append("head_conv.")
    built = len(getattr(model, "stages", ()))
    stage = re.compile(r"^stages\.(\d+)\.")

    def left_out(key: str) -> bool:
        match = stage.match(key)
        if match and getattr(model, "features_only", False) and int(match.group(1)) >= built:
            return True
        return any(key.startswith(p) for p in prefixes)

    return left_out


def _adapt_first_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """A first-conv weight for ``in_chans`` inputs, as timm adapts one: summed over the input
    channels for 1, else repeated and scaled by ``channels / in_chans``."""
    channels = weight.shape[1]
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    repeat = -(-in_chans // channels)
    return weight.repeat(1, repeat, 1, 1)[:, :in_chans] * (channels / in_chans)


def map_keys(
    state: Mapping[str, torch.Tensor],
    model: nn.Module,
    rename: Callable[[str], str | None],
    layout: str,
) -> StateDict:
    """``state`` with every key renamed by ``rename`` (``None``: no place in blockzoo's
    layout), checked to cover ``model``'s state_dict exactly with the same shapes.

    Keys of parts the model was built without (classifier with ``num_classes=0``, head and
    later stages with ``features_only``) are dropped; a classifier of another number of classes
    is dropped (the model keeps its new one); a first conv of another number of input channels
    is adapted (:func:`_adapt_first_conv`). Anything else that does not fit raises
    :class:`PretrainedError` naming the first key that does not map (or the first tensor of the
    network the file leaves unset).
    """
    cfg = getattr(model, "default_cfg", {})
    name = cfg.get("architecture", type(model).__name__)
    first_conv = f"{cfg.get('first_conv')}.weight"
    target = model.state_dict()
    left_out = _left_out(model)
    out: StateDict = {}
    fresh: set[str] = set()
    for key, value in state.items():
        new = rename(key)
        if new is not None and new not in target and left_out(new):
            continue
        if new is None or new not in target:
            raise _unmatched(name, layout, key, "has no place in the network")
        want = tuple(target[new].shape)
        if tuple(value.shape) != want:
            if new in ("fc.weight", "fc.bias"):
                fresh.update(("fc.weight", "fc.bias"))
                continue
            if new == first_conv and value.dim() == 4 and value.shape[0] == want[0] \
                    and value.shape[2:] == want[2:]:
                value = _adapt_first_conv(value, want[1])
            else:
                raise _unmatched(name, layout, key, f"has shape {tuple(value.shape)}, the "
                                 f"network's {new!r} {want}")
        if new in out:
            raise _unmatched(name, layout, key, f"maps onto {new!r} a second time")
        out[new] = value
    for key in fresh:
        out.pop(key, None)
    missing = [k for k in target if k not in out and k not in fresh]
    if missing:
        raise PretrainedError(
            f"{name}: the {layout} checkpoint leaves {len(missing)} tensors of the network unset, "
            f"the first {missing[0]!r}; the file is not a complete checkpoint of this network"
        )
    return out


def _rules(*rules: tuple[str, str]) -> Callable[[str], str | None]:
    """A renaming function from ``(regex, replacement)`` rules applied in order; ``{stage}`` in
    a replacement is the 1-based ``layer<n>`` index of the key minus one."""
    compiled = [(re.compile(p), r) for p, r in rules]

    def rename(key: str) -> str | None:
        match = re.search(r"layer(\d)\.", key)
        for pattern, repl in compiled:
            if pattern.search(key):
                repl = repl.replace("{stage}", str(int(match.group(1)) - 1) if match else "?")
                return pattern.sub(repl, key, count=1)
        return None

    return rename


#: The torchvision ResNet bottleneck keys (``layer<n>.<i>.bn<k>``, ``downsample.0/1``) and stem
#: and classifier, shared by torchvision's ResNet-50 and the ACmix reference ResNet.
_TV_RESNET = (
    (r"^conv1\.weight$", "stem.conv.conv.weight"),
    (r"^bn1\.", "stem.conv.bn."),
    (r"^fc\.", "fc."),
    (r"^layer\d\.(\d+)\.bn(\d)\.", r"stages.{stage}.\1.body.conv\2.bn."),
    (r"^layer\d\.(\d+)\.downsample\.0\.", r"stages.{stage}.\1.shortcut.conv."),
    (r"^layer\d\.(\d+)\.downsample\.1\.", r"stages.{stage}.\1.shortcut.bn."),
)


def _torchvision_resnet(model: nn.Module) -> Callable[[str], str | None]:
    """torchvision's ResNet (``conv1``, ``bn1``, ``layer<n>.<i>.conv<k>``/``bn<k>``,
    ``downsample.0/1``, ``fc``) onto ``ResNetLike`` with ``"residual"`` bottlenecks."""
    return _rules(*_TV_RESNET,
                  (r"^layer\d\.(\d+)\.conv(\d)\.", r"stages.{stage}.\1.body.conv\2.conv."))


def _acmix_resnet(model: nn.Module) -> Callable[[str], str | None]:
    """The ACmix reference ResNet (``ResNet/ResNet_ImageNet.py``): torchvision's names, with
    ``conv2`` an ACmix module (``rate1``, ``rate2``, ``conv1``-``conv3``, ``conv_p``, ``fc``,
    ``dep_conv``; blockzoo's :class:`~blockzoo.blocks.ACmix` uses the same names)."""
    return _torchvision_resnet(model)


def _mmcls_rednet(model: nn.Module) -> Callable[[str], str | None]:
    """The involution authors' mmcls RedNet (``backbone.stem.<0-4>``,
    ``backbone.layer<n>.<i>.conv1``/``bn1``/``conv2.conv1``/``conv2.conv2``/``bn2``/``conv3``/
    ``bn3``/``downsample``, ``head.fc``); the involution's ``conv1`` (1x1 + BN + ReLU) is
    blockzoo's ``reduce``, its ``conv2`` (1x1 with bias, ``K*K*groups`` outputs) ``span``."""
    return _rules(
        (r"^backbone\.stem\.0\.(conv|bn)\.", r"stem.conv1.\1."),
        (r"^backbone\.stem\.1\.conv1\.(conv|bn)\.", r"stem.involution.reduce.\1."),
        (r"^backbone\.stem\.1\.conv2\.conv\.", "stem.involution.span."),
        (r"^backbone\.stem\.2\.", "stem.bn."),
        (r"^backbone\.stem\.4\.(conv|bn)\.", r"stem.conv2.\1."),
        (r"^backbone\.layer\d\.(\d+)\.conv2\.conv1\.(conv|bn)\.",
         r"stages.{stage}.\1.body.conv2.conv.reduce.\2."),
        (r"^backbone\.layer\d\.(\d+)\.conv2\.conv2\.conv\.",
         r"stages.{stage}.\1.body.conv2.conv.span."),
        (r"^backbone\.layer\d\.(\d+)\.conv([13])\.", r"stages.{stage}.\1.body.conv\2.conv."),
        (r"^backbone\.layer\d\.(\d+)\.bn(\d)\.", r"stages.{stage}.\1.body.conv\2.bn."),
        (r"^backbone\.layer\d\.(\d+)\.downsample\.0\.", r"stages.{stage}.\1.shortcut.conv."),
        (r"^backbone\.layer\d\.(\d+)\.downsample\.1\.", r"stages.{stage}.\1.shortcut.bn."),
        (r"^head\.fc\.", "fc."),
    )


def _mobilenetv2_rename(
    model: nn.Module,
    units: tuple[dict[int, str], dict[int, str]],
    outer: tuple[tuple[str, str], ...],
) -> Callable[[str], str | None]:
    """Rename MobileNetV2 keys: ``outer`` rules for the stem/head/classifier, and
    ``features.<b>.conv.<j>.<rest>`` -> ``<block b>.<units[first][j]><rest>``, where block
    ``b`` (1-based) is the ``b``-th inverted residual of blockzoo's stages and ``units[0]``
    (expanding blocks) / ``units[1]`` (the first, ``t = 1`` block) name the ``j``-th entry."""
    blocks = [f"stages.{s}.{i}" for s, depth in enumerate(model.stage_depths)
              for i in range(depth)]
    pattern = re.compile(r"^features\.(\d+)\.conv\.(\d+)\.(.*)$")
    head = str(len(blocks) + 1)
    outer_rules = [(re.compile(p.replace("{head}", head)), r) for p, r in outer]

    def rename(key: str) -> str | None:
        for rule, repl in outer_rules:
            if rule.search(key):
                return rule.sub(repl, key, count=1)
        match = pattern.match(key)
        if match is None or not 1 <= int(match.group(1)) <= len(blocks):
            return None
        b, j = int(match.group(1)), int(match.group(2))
        unit = units[1 if b == 1 else 0].get(j)
        return None if unit is None else f"{blocks[b - 1]}.{unit}{match.group(3)}"

    return rename


def _torchvision_mobilenetv2(model: nn.Module) -> Callable[[str], str | None]:
    """torchvision's MobileNetV2 (``features.0`` stem, ``features.<b>.conv`` =
    [Conv2dNormActivation expand], Conv2dNormActivation depthwise, 1x1 conv, BN;
    ``features.18`` head conv; ``classifier.1``)."""
    rename = _mobilenetv2_rename(
        model,
        ({0: "expand.", 1: "depthwise.", 2: "project.conv.", 3: "project.bn."},
         {0: "depthwise.", 1: "project.conv.", 2: "project.bn."}),
        ((r"^features\.0\.0\.", "stem.conv."), (r"^features\.0\.1\.", "stem.bn."),
         (r"^features\.{head}\.0\.", "head_conv.conv."),
         (r"^features\.{head}\.1\.", "head_conv.bn."),
         (r"^classifier\.1\.", "fc.")),
    )
    unit = re.compile(r"\.(expand|depthwise)\.([01])\.")

    def tv_rename(key: str) -> str | None:
        new = rename(key)
        # inside a Conv2dNormActivation, .0 is the conv and .1 the BN
        if new is None or not unit.search(new):
            return None if new is None or re.search(r"\.(expand|depthwise)\.", new) else new
        return unit.sub(lambda m: f".{m.group(1)}.{('conv', 'bn')[int(m.group(2))]}.", new)

    return tv_rename


def _coordatt_mbv2(model: nn.Module) -> Callable[[str], str | None]:
    """The coordinate-attention authors' ``mbv2_ca.py`` (``features.<b>.conv`` = 1x1 conv, BN,
    ReLU6, depthwise conv, BN, ReLU6, CoordAtt, 1x1 conv, BN; head ``conv.0/1``;
    ``classifier.1``); CoordAtt's ``conv2``/``conv3`` are blockzoo's ``conv_h``/``conv_w``."""
    rename = _mobilenetv2_rename(
        model,
        ({0: "expand.conv.", 1: "expand.bn.", 3: "depthwise.conv.", 4: "depthwise.bn.",
          6: "attention.", 7: "project.conv.", 8: "project.bn."},
         {0: "depthwise.conv.", 1: "depthwise.bn.", 3: "project.conv.", 4: "project.bn."}),
        ((r"^features\.0\.0\.", "stem.conv."), (r"^features\.0\.1\.", "stem.bn."),
         (r"^conv\.0\.", "head_conv.conv."), (r"^conv\.1\.", "head_conv.bn."),
         (r"^classifier\.1\.", "fc.")),
    )

    def ca_rename(key: str) -> str | None:
        new = rename(key)
        if new is not None and ".attention." in new:
            new = new.replace(".attention.conv2.", ".attention.conv_h.")
            new = new.replace(".attention.conv3.", ".attention.conv_w.")
        return new

    return ca_rename


#: Key layouts by name: ``model -> rename(author_key) -> blockzoo_key | None``.
_RENAMERS: dict[str, Callable[[nn.Module], Callable[[str], str | None]]] = {
    "blockzoo": lambda model: lambda key: key,
    "torchvision_resnet": _torchvision_resnet,
    "torchvision_mobilenetv2": _torchvision_mobilenetv2,
    "mmcls_rednet": _mmcls_rednet,
    "coordatt_mbv2": _coordatt_mbv2,
    "acmix_resnet": _acmix_resnet,
}


def _filter(layout: str) -> Callable[[Mapping[str, torch.Tensor], nn.Module], StateDict]:
    def filter_state_dict(state: Mapping[str, torch.Tensor], model: nn.Module) -> StateDict:
        return map_keys(state, model, _RENAMERS[layout](model), layout)

    filter_state_dict.__name__ = f"filter_{layout}"
    filter_state_dict.__doc__ = _RENAMERS[layout].__doc__
    return filter_state_dict


#: The filter function of every key layout: ``(state_dict, model) -> blockzoo state_dict``
#: (:func:`map_keys` with the layout's renaming).
LAYOUTS: dict[str, Callable[[Mapping[str, torch.Tensor], nn.Module], StateDict]] = {
    name: _filter(name) for name in _RENAMERS
}


def network_layouts(model: nn.Module) -> list[str]:
    """The layouts ``model`` reads: blockzoo's, those of its released checkpoints and any
    other its ``default_cfg["layouts"]`` names."""
    cfg = getattr(model, "default_cfg", {})
    names = ["blockzoo", *(w.layout for w in cfg.get("weights", ())), *cfg.get("layouts", ())]
    return [name for name in dict.fromkeys(names) if name in LAYOUTS]


def convert_state_dict(
    state: Mapping[str, torch.Tensor], model: nn.Module, layouts: list[str] | None = None
) -> StateDict:
    """``state`` in blockzoo's key names for ``model``, from whichever of ``layouts`` (default:
    :func:`network_layouts`) maps it completely.

    When none does, the error is that of the layout that placed the most keys (the file's
    likely layout), naming its first unmatched key.
    """
    errors = []
    for layout in layouts or network_layouts(model):
        try:
            return LAYOUTS[layout](state, model)
        except PretrainedError as err:
            errors.append((layout, err))
    layout, err = max(errors, key=lambda e: _placed(state, model, e[0]))
    raise err


def _placed(state: Mapping[str, torch.Tensor], model: nn.Module, layout: str) -> int:
    """How many of ``state``'s keys ``layout`` renames onto a key of ``model``."""
    target = model.state_dict()
    probe = _RENAMERS[layout](model)
    return sum(probe(k) in target for k in state)


def load_pretrained(
    model: nn.Module, pretrained: bool | str | os.PathLike | ReleasedWeights
) -> None:
    """Load ``pretrained`` into ``model`` (built by :func:`blockzoo.create_model`, whose
    ``default_cfg`` names the network and lists its released checkpoints).

    ``True``: the first listed checkpoint with a direct URL; a :class:`ReleasedWeights`: that
    one; an ``http(s)://`` string: that URL; any other string or path: a local file. See the
    module docstring for the formats and :func:`map_keys` for what must match.
    """
    cfg = model.default_cfg
    name = cfg["architecture"]
    weights = tuple(cfg["weights"])
    layouts = None
    if pretrained is True:
        if not weights:
            raise PretrainedError(
                f"{name}: no released pretrained weights are known for this network; train it "
                f"or pass pretrained=\"path/to/checkpoint\" (a blockzoo state_dict)"
            )
        readable = [w for w in weights if w.layout in LAYOUTS]
        if not readable:
            w = weights[0]
            raise PretrainedError(
                f"{name}: the released checkpoint {w.tag!r} ({w.page}) is in the {w.layout!r} "
                f"format, which blockzoo cannot read ({w.notes}); pass pretrained=\"path\" with a "
                f"blockzoo state_dict instead"
            )
        direct = [w for w in readable if w.url]
        if not direct:
            w = readable[0]
            raise PretrainedError(
                f"{name}: the released checkpoint {w.tag!r} has no direct download URL; download "
                f"it from {w.page} and pass pretrained=\"path/to/file\""
            )
        pretrained = direct[0]
    if isinstance(pretrained, ReleasedWeights):
        if pretrained.url is None:
            raise PretrainedError(
                f"{name}: the released checkpoint {pretrained.tag!r} has no direct download "
                f"URL; download it from {pretrained.page} and pass pretrained=\"path/to/file\""
            )
        if pretrained.layout not in LAYOUTS:
            raise PretrainedError(
                f"{name}: the released checkpoint {pretrained.tag!r} is in the "
                f"{pretrained.layout!r} format, which blockzoo cannot read ({pretrained.notes})"
            )
        path = download(pretrained.url, pretrained.sha256, pretrained.page)
        layouts = [pretrained.layout]
    elif isinstance(pretrained, str) and re.match(r"^https?://", pretrained):
        known = next((w for w in weights if w.url == pretrained), None)
        path = download(pretrained, known.sha256 if known else None,
                        known.page if known else None)
        layouts = [known.layout] if known else None
    else:
        path = Path(pretrained)
    state = read_state_dict(path)
    model.load_state_dict(convert_state_dict(state, model, layouts), strict=False)
