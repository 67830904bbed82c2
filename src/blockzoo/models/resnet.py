"""ResNet-family networks from one generic builder, :class:`ResNetLike`, and their configurations.

- Deep Residual Learning for Image Recognition, He et al., CVPR 2016, arXiv 1512.03385
- Squeeze-and-Excitation Networks, Hu et al., CVPR 2018, arXiv 1709.01507
- GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond, Cao et al., 2019,
  arXiv 1904.11492
- On the Integration of Self-Attention and Convolution (ACmix), Pan et al., CVPR 2022,
  arXiv 2111.14556
- No More Strided Convolutions or Pooling (SPD-Conv), Sunkara & Luo, ECML PKDD 2022,
  arXiv 2208.03641
- Selective Kernel Networks, Li et al., CVPR 2019, arXiv 1903.06586
- Involution: Inverting the Inherence of Convolution for Visual Recognition (RedNet), Li et al.,
  CVPR 2021, arXiv 2103.06255

Every named model below is a configuration (a dict of :class:`ResNetLike` arguments) registered
with :func:`~blockzoo.models.registry.register_model`; none is a separate copy of ResNet code.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks.spd import SPDBottleneck
from ..core.validation import check_bool, check_positive_int
from ..layers import ConvNormAct, LayerSpec, check_layers, create_act, create_norm
from ..registry import block_info, create_block
from .base import StagedNet, check_positive_ints, init_conv_norm_act
from .pretrained import ReleasedWeights
from .registry import CIFAR_MEAN, CIFAR_STD, default_cfg, register_model

STEMS = ("resnet", "rednet", "cifar", "spd")
#: The max pool of the ``"resnet"`` stem: torchvision's (3x3, stride 2, padding 1, floor) or
#: Caffe's (3x3, stride 2, no padding, ceil), as the SKNet authors' prototxt.
STEM_POOLS = ("torchvision", "caffe")


class CaffeMaxPool2d(nn.MaxPool2d):
    """Caffe's ``pool: MAX, kernel_size: 3, stride: 2`` (no padding, ceil rounding):
    ``ceil((H - 3) / 2) + 1`` outputs. Caffe's windows start at 0 where torchvision's padded
    pool starts at -1, so the two select different pixels even where their sizes agree (at
    224x224 both give 56x56). An input smaller than the kernel is padded with ``-inf`` at its
    end to one full window, so tiny inputs still give a 1x1 output.
    """

    def __init__(self) -> None:
        super().__init__(3, 2, padding=0, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        short_h, short_w = max(0, 3 - x.shape[2]), max(0, 3 - x.shape[3])
        if short_h or short_w:
            x = F.pad(x, (0, short_w, 0, short_h), value=float("-inf"))
        return super().forward(x)


def make_stem(
    kind: str,
    in_chans: int,
    width: int,
    *,
    act_layer: LayerSpec = "relu",
    norm_layer: LayerSpec = "batchnorm",
    pool: str = "torchvision",
) -> tuple[nn.Sequential, int]:
    """The stem ``kind`` from ``in_chans`` to ``width`` channels, and its stride.

    - ``"resnet"``: 7x7 conv stride 2 + BN + ReLU, 3x3 max pool stride 2 (stride 4); ``pool``
      is torchvision's padded pool (``"torchvision"``) or Caffe's (``"caffe"``,
      :class:`CaffeMaxPool2d`);
    - ``"rednet"``: RedNet's (official mmcls ``rednet.py``): 3x3 conv stride 2 to ``width / 2`` +
      BN + ReLU, involution (``width / 2`` channels, ``K = 3``, stride 1), BN, ReLU, 3x3 conv to
      ``width`` + BN + ReLU, 3x3 max pool stride 2 (stride 4);
    - ``"cifar"``: 3x3 conv stride 1 + BN + ReLU, no pooling (stride 1), for 32x32 inputs;
    - ``"spd"``: SPD-Conv's: the strided conv is the reference code's ``Focus`` (space-to-depth,
      scale 2, then a 1x1 conv ``4 * in_chans -> width`` + BN + SiLU) and the max pool is
      replaced in the same way (space-to-depth + 1x1 conv ``4 * width -> width`` + BN + ReLU):
      stride 4, no strided conv and no pooling. (The reference ResNet-50, written for 64x64
      Tiny-ImageNet inputs, has the ``Focus`` and simply drops the max pool; the second
      space-to-depth keeps the ImageNet layout's stride 4 before the first stage.)
    """
    norm_act = dict(norm_layer=norm_layer, act_layer=act_layer)
    if pool not in STEM_POOLS:
        raise ValueError(f"ResNetLike: unknown stem_pool {pool!r}; choose one of {STEM_POOLS}")
    if kind == "resnet":
        layers = OrderedDict(
            conv=ConvNormAct(in_chans, width, 7, 2, **norm_act),
            pool=nn.MaxPool2d(3, 2, padding=1) if pool == "torchvision" else CaffeMaxPool2d(),
        )
        return nn.Sequential(layers), 4
    if kind == "rednet":
        half = width // 2
        layers = OrderedDict(
            conv1=ConvNormAct(in_chans, half, 3, 2, **norm_act),
            involution=create_block("involution", half, kernel_size=3),
            bn=create_norm(norm_layer, half),
            act=create_act(act_layer, inplace=True),
            conv2=ConvNormAct(half, width, 3, **norm_act),
            pool=nn.MaxPool2d(3, 2, padding=1),
        )
        return nn.Sequential(layers), 4
    if kind == "cifar":
        return nn.Sequential(OrderedDict(conv=ConvNormAct(in_chans, width, 3, **norm_act))), 1
    if kind == "spd":
        layers = OrderedDict(
            focus=create_block("spd_conv", in_chans, width, 2, kernel_size=1, act_layer="silu",
                               norm_layer=norm_layer),
            pool=create_block("spd_conv", width, width, 2, kernel_size=1, act_layer=act_layer,
                              norm_layer=norm_layer),
        )
        return nn.Sequential(layers), 4
    raise ValueError(f"ResNetLike: unknown stem {kind!r}; choose one of {STEMS}")


BlockSpec = str | Callable[..., nn.Module]


def _block_factory(block: BlockSpec) -> tuple[Callable[..., nn.Module], set[str] | None]:
    """A ``(in, out, stride, **kw)`` factory for ``block`` and the keywords it accepts.

    ``block`` is a registered block name or a block class; ``None`` for "any keyword".
    """
    if isinstance(block, str):
        cls = block_info(block).cls

        def factory(cin: int, cout: int, stride: int, **kw: Any) -> nn.Module:
            return create_block(block, cin, cout, stride, **kw)

    elif callable(block):
        cls, factory = block, block
    else:
        raise ValueError(f"ResNetLike: block must be a registered block name or a class, "
                         f"got {block!r}")
    params = inspect.signature(cls.__init__ if inspect.isclass(cls) else cls).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return factory, None
    return factory, set(params)


class ResNetLike(StagedNet):
    """A ResNet-style network: a stem, stages of residual blocks, global pooling, a classifier.

    ``block`` is a registered block name (``"residual"``, ``"resnext"``, ``"basic_residual"``,
    ``"sk_unit"``, ...) or a block class, built as ``block(in, out, stride, **kw)``; stage ``i``
    stacks ``layers[i]`` blocks of ``widths[i]`` output channels, the first with ``strides[i]``
    (and the projection shortcut), the others with stride 1. The number of stages is
    ``len(layers)`` (4 for the ImageNet layouts).

    - ``conv``: a registered conv-kind block (``"dynamic_conv"``, ``"sk_conv"``,
      ``"involution"``, ``"acmix"``, ``"deform_conv"``, ...) that replaces the 3x3 conv of every
      bottleneck, built with ``conv_kwargs``; ``conv_norm_act=False`` drops the BN + ReLU after it
      (for conv blocks that end in their own, as SK's).
    - ``attention``: a registered attention-kind block (``"se"``, ``"gc"``, ``"coord_att"``) put
      after the last BN of every block of the stages in ``attention_stages`` (0-based; default:
      all), before the residual add, built with ``attention_kwargs``.
    - ``block_kwargs``: more keyword arguments for every block (e.g. ``cardinality``).
    - ``stem``: ``"resnet"``, ``"rednet"``, ``"cifar"`` or ``"spd"`` (see :func:`make_stem`),
      ``stem_width`` output channels; ``stem_pool``: the ``"resnet"`` stem's max pool,
      ``"torchvision"`` (default) or ``"caffe"`` (:class:`CaffeMaxPool2d`, the SK networks').
    - ``zero_init_last``: zero-initialise the last BN of every residual branch.
    - ``act_layer``/``norm_layer``: for the stem and for blocks whose constructor takes them.

    The plain conv of every conv + norm + act unit gets He fan-out initialisation
    (:func:`~blockzoo.models.base.init_conv_norm_act`). ``features_only``, ``out_indices``,
    ``global_pool``, ``stage_channels``, ``feature_strides`` and timm's model API: see
    :class:`~blockzoo.models.base.StagedNet`.
    """

    def __init__(
        self,
        block: BlockSpec = "residual",
        layers: Sequence[int] = (3, 4, 6, 3),
        widths: Sequence[int] = (256, 512, 1024, 2048),
        *,
        strides: Sequence[int] | None = None,
        stem: str = "resnet",
        stem_width: int = 64,
        stem_pool: str = "torchvision",
        block_kwargs: dict[str, Any] | None = None,
        conv: str | None = None,
        conv_kwargs: dict[str, Any] | None = None,
        conv_norm_act: bool = True,
        attention: str | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        attention_stages: Sequence[int] | None = None,
        zero_init_last: bool = False,
        drop_rate: float = 0.0,
        act_layer: LayerSpec = "relu",
        norm_layer: LayerSpec = "batchnorm",
        num_classes: int = 1000,
        in_chans: int = 3,
        features_only: bool = False,
        out_indices: Sequence[int] | None = None,
        global_pool: str = "avg",
    ) -> None:
        owner = type(self).__name__
        n = len(tuple(layers))
        layers = check_positive_ints(owner, "layers", layers, n)
        widths = check_positive_ints(owner, "widths", widths, n)
        strides = check_positive_ints(
            owner, "strides", strides if strides is not None else (1,) + (2,) * (n - 1), n
        )
        attention_stages = tuple(range(n) if attention_stages is None else attention_stages)
        if not set(attention_stages) <= set(range(n)):
            raise ValueError(f"{owner}: attention_stages must be stage indices in 0..{n - 1}, "
                             f"got {attention_stages}")
        check_positive_int(owner, "in_chans", in_chans)
        check_positive_int(owner, "stem_width", stem_width)
        check_bool(owner, "conv_norm_act", conv_norm_act)
        check_bool(owner, "zero_init_last", zero_init_last)
        check_layers(owner, act_layer=act_layer, norm_layer=norm_layer)
        stem_module, stem_stride = make_stem(
            stem, in_chans, stem_width, act_layer=act_layer, norm_layer=norm_layer,
            pool=stem_pool,
        )
        factory, accepted = _block_factory(block)
        common: dict[str, Any] = dict(block_kwargs or {})
        if conv is not None:
            common.update(conv=conv, conv_kwargs=conv_kwargs, conv_norm_act=conv_norm_act)
        elif conv_kwargs:
            raise ValueError(f"{owner}: conv_kwargs {conv_kwargs} given without conv")
        if zero_init_last:
            common["zero_init_last"] = True
        for name, value in (("act_layer", act_layer), ("norm_layer", norm_layer)):
            if accepted is None or name in accepted:
                common.setdefault(name, value)
        if attention is None and attention_kwargs:
            raise ValueError(f"{owner}: attention_kwargs {attention_kwargs} given without "
                             f"attention")
        stages, cin = [], stem_width
        for i, (depth, width, stride) in enumerate(zip(layers, widths, strides, strict=True)):
            kw = dict(common)
            if attention is not None and i in attention_stages:
                kw.update(attention=attention, attention_kwargs=attention_kwargs)
            unknown = sorted(set(kw) - accepted) if accepted is not None else []
            if unknown:
                raise ValueError(f"{owner}: block {block!r} takes no {', '.join(unknown)}")
            blocks = []
            for j in range(depth):
                blocks.append(factory(cin, width, stride if j == 0 else 1, **kw))
                cin = width
            stages.append(nn.Sequential(*blocks))
        super().__init__(
            stem_module, stages, stem_stride=stem_stride, stage_strides=strides,
            in_chans=in_chans, num_classes=num_classes, features_only=features_only,
            out_indices=out_indices, global_pool=global_pool,
            drop_rate=drop_rate,
        )
        init_conv_norm_act(self)


# --------------------------------------------------------------------------- configurations

_RESNET = dict(paper="Deep Residual Learning for Image Recognition", arxiv="1512.03385")
_TV_PAGE = "https://pytorch.org/vision/stable/models/generated/torchvision.models.{}.html"
_TV_LICENSE = "BSD-3-Clause (torchvision)"
_DEPTHS = {26: (1, 2, 4, 1), 38: (2, 3, 5, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
           152: (3, 8, 36, 3)}
_RESNET_RECIPE = (
    "ResNet paper: SGD momentum 0.9, weight decay 1e-4, batch 256, lr 0.1 divided by 10 when "
    "the error plateaus (60e4 iterations), scale augmentation (shorter side 256-480), 224 crops."
)

register_model(
    "resnet50", ResNetLike,
    default_cfg(
        **_RESNET, paper_params_m=25.6, paper_gmacs=3.8, paper_top1=77.15,
        training=_RESNET_RECIPE,
        notes="ResNet v1.5 (torchvision's layout, stride on the 3x3 conv): 25,557,032 "
        "parameters, exactly torchvision's resnet50, 4.1 GMACs (the paper's v1 strides the first "
        "1x1 conv: 3.8 GMACs). The paper's top-1 (77.15) is 10-crop testing (Table 3); "
        "torchvision's v1.5 weights give 76.13 single-crop.",
        weights=(
            ReleasedWeights(
                tag="tv_in1k", page=_TV_PAGE.format("resnet50"),
                url="https://download.pytorch.org/models/resnet50-0676ba61.pth",
                sha256="0676ba61", top1=76.13, license=_TV_LICENSE,
                layout="torchvision_resnet",
                notes="torchvision ResNet50_Weights.IMAGENET1K_V1; evaluated with resize 256, "
                "centre crop 224, bilinear.",
            ),
            ReleasedWeights(
                tag="tv2_in1k", page=_TV_PAGE.format("resnet50"),
                url="https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
                sha256="11ad3fa6", top1=80.858, license=_TV_LICENSE,
                layout="torchvision_resnet",
                notes="torchvision ResNet50_Weights.IMAGENET1K_V2 (its newer training recipe); "
                "evaluated with resize 232, centre crop 224, bilinear.",
            ),
        ),
    ),
)

register_model(
    "se_resnet50", ResNetLike,
    default_cfg(
        paper="Squeeze-and-Excitation Networks", arxiv="1709.01507",
        paper_params_m=28.1, paper_gmacs=3.87, paper_top1=76.71,
        training="SE paper: SGD momentum 0.9, batch 1024, lr 0.6 divided by 10 every 30 "
        "epochs, 100 epochs, random-size crops 224 and flips, balanced data sampling.",
        notes="SE (reduction 16, FCs with bias) after the last BN of every bottleneck, before "
        "the add; 28,088,024 parameters (timm's seresnet50 count). Paper top-1 is the 224 "
        "single-crop error 23.29 (Table 2).",
    ),
    attention="se",
)

register_model(
    "gc_resnet50", ResNetLike,
    default_cfg(
        paper="GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond",
        arxiv="1904.11492", paper_params_m=28.08, paper_top1=77.70,
        training="GCNet (ImageNet): the standard ResNet-50 recipe of its code base; GC "
        "blocks' last conv zero-initialised.",
        notes="GC (ratio 1/16, attention pooling, channel-add fusion, LayerNorm) after the last "
        "BN of every bottleneck of stages 2-4 (c3-c5), before the add, as the GCNet configs "
        "(stage_with_gcb=(False, True, True, True)). GC in stage 1 as well would add 25,443 "
        "parameters.",
    ),
    attention="gc", attention_stages=(1, 2, 3),
)

register_model(
    "acmix_resnet50", ResNetLike,
    default_cfg(
        paper="On the Integration of Self-Attention and Convolution", arxiv="2111.14556",
        paper_params_m=18.6, paper_gmacs=3.6,
        training="ACmix ResNet: the reference code trains with torchvision's ImageNet example "
        "recipe (SGD, cosine or step schedule; see the repository's main.py).",
        notes="The ACmix reference ResNet-50 layout (LeapLabTHU/ACmix ResNet_ImageNet.py): "
        "every bottleneck's 3x3 conv replaced by ACmix(width, width, k_att=7, head=4, "
        "k_conv=3, stride), followed by BN + ReLU; 7x7 conv stem and projection shortcuts "
        "unchanged. The paper's 18.6M is for its SASA-style table entry; this layout measures "
        "less (see docs/models.md). No ResNet checkpoint is released: the authors' README "
        "lists its ResNet-family (SAN) models as 'In process' and releases ACmix Swin-T/S only; "
        "a state_dict of the reference code (e.g. trained with its main.py) loads "
        "(layout 'acmix_resnet').",
        layouts=("acmix_resnet",),
    ),
    conv="acmix",
)

register_model(
    "spd_resnet50", ResNetLike,
    default_cfg(
        paper="No More Strided Convolutions or Pooling: A New CNN Building Block for "
        "Low-Resolution Images and Small Objects", arxiv="2208.03641", paper_params_m=None,
        training="SPD-Conv paper (ResNet on Tiny-ImageNet / CIFAR): SGD, its repository's "
        "train.py settings; not an ImageNet recipe.",
        notes="SPD-Conv reference ResNet-50 (LabSAINT/SPD-Conv resnet50_spd.py) in the "
        "ImageNet layout: stem = Focus (space-to-depth + 1x1 conv 12 -> 64 + BN + SiLU) and "
        "a second space-to-depth + 1x1 conv (256 -> 64) + BN + ReLU in place of the max pool; "
        "each stride-2 bottleneck's 3x3 conv has stride 1 and is followed by space-to-depth, "
        "BN and ReLU over 4x the width, its last 1x1 conv mapping 4 * width -> out; the "
        "projection shortcuts keep their strided 1x1 conv as in the reference.",
    ),
    block=SPDBottleneck, stem="spd",
)

_REDNET_TRAINING = (
    "RedNet (official mmcls configs rednet*_b32x64_warmup_coslr_imagenet): SGD with Nesterov "
    "momentum 0.9, weight decay 1e-4, batch 2048 (64 GPUs x 32), lr 0.8, linear warm-up over "
    "3130 iterations from 0.25 x lr, cosine annealing to 0, 130 epochs (every depth), label "
    "smoothing 0.1; last BN of every residual branch zero-initialised."
)
_REDNET_FIGURES = {  # depth: (params M, GMACs, top-1) from the RedNet paper's Table 2
    26: (9.23, 1.73, 75.96), 38: (12.39, 2.22, 77.48), 50: (15.54, 2.71, 78.35),
    101: (25.65, 4.74, 78.92), 152: (33.99, 6.79, 79.12),
}
#: The checkpoints of the involution README's model zoo (OneDrive shares of the first author).
_REDNET_SHARES = {
    26: "EWmTnvB1cqtIi-OI4HfxGBgBKzO0w_qc3CnErHhNfBitlg?e=XPws5X",
    38: "ETZIquU7P3lDvru0OAPiTYIBAt-B__2LpP_NeB4sR0hJsg?e=b9Rbl0",
    50: "EZjRG3qUMu5IuR7YH4Giyc8B6koPvu6s8rOlIG8-BuFevg?e=f4ce5G",
    101: "EXAuVXdXz1xAg5eG-dkvwTUBkds2IOK1kglHtkMeGz5z_A?e=vHvh5y",
    152: "ERxcS4wXUCtPl4uUnPoT9vcByzhLA0eHgDE-fw_EESfP0w?e=x0dZWB",
}
for _depth, (_params, _gmacs, _top1) in _REDNET_FIGURES.items():
    register_model(
        f"rednet{_depth}", ResNetLike,
        default_cfg(
            paper="Involution: Inverting the Inherence of Convolution for Visual Recognition",
            arxiv="2103.06255", paper_params_m=_params, paper_gmacs=_gmacs, paper_top1=_top1,
            training=_REDNET_TRAINING,
            notes="Official mmcls RedNet: every bottleneck's 3x3 conv replaced by involution "
            "(K=7, 16 channels per group, reduction 4) + BN + ReLU; stem conv3x3 s2 (32) -> "
            "involution(32, K=3) -> BN -> ReLU -> conv3x3 (64) -> maxpool; stride on the "
            "involution; projection shortcuts 1x1 conv + BN.",
            weights=(ReleasedWeights(
                tag="mmcls_in1k", page="https://github.com/d-li14/involution#model-zoo",
                url=None, sha256=None, top1=_top1, license="MIT", layout="mmcls_rednet",
                notes="mmcls checkpoint (state_dict under 'state_dict', keys 'backbone.*' and "
                "'head.fc.*'), shared on OneDrive: https://hkustconnect-my.sharepoint.com/:u:/g/"
                f"personal/dlibh_connect_ust_hk/{_REDNET_SHARES[_depth]} (a browser download).",
            ),),
        ),
        layers=_DEPTHS[_depth], stem="rednet", conv="involution",
        conv_kwargs={"kernel_size": 7, "group_channels": 16, "reduction": 4},
        zero_init_last=True,
    )

register_model(
    "resnet_cifar", ResNetLike,
    default_cfg(
        **_RESNET, paper_params_m=None, input_size=(3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD,
        num_classes=10,
        training="A CIFAR recipe (not from a paper table): SGD momentum 0.9, weight decay 5e-4, "
        "lr 0.1 with cosine annealing, 200 epochs, batch 128, random crop 32 (padding 4) and "
        "horizontal flip. With conv='dynamic_conv' anneal the temperature 30 -> 1 over the "
        "first 10 epochs (blockzoo.TemperatureSchedule).",
        notes="A small bottleneck ResNet for 32x32 inputs: 3x3 stem (64), no max pool, stages "
        "of 2 bottlenecks with 128/256/512/1024 outputs (3x3 widths 32/64/128/256) at strides "
        "1/2/4/8. conv= and attention= take any registered conv/attention block.",
    ),
    layers=(2, 2, 2, 2), widths=(128, 256, 512, 1024), stem="cifar",
)

_SK = dict(paper="Selective Kernel Networks", arxiv="1903.06586")
_SK_TRAINING = (
    "SKNet (implus/SKNet, Caffe): SENet's data augmentation; the released prototxt uses BN "
    "momentum 0.95 and initialises the fuse layers' weights from N(0, 0.01). Top-1 is the "
    "224x224 single-crop figure of the repository's Table 2."
)
_SK_NOTES = (
    "SK units in the ResNeXt-50 32x4d layout, as the official prototxt: 1x1 conv (out/2) + BN "
    "+ ReLU -> SKConv (M=2 branches: 3x3 groups 32 and 3x3 groups 32 dilation 2, each BN + "
    "ReLU, stride on both; fuse: mean -> 1x1 conv to d = max(C/16, 32) without bias + BN + "
    "ReLU -> 1x1 conv to 2C without bias -> softmax over the branches) -> 1x1 conv + BN; "
    "projection shortcut 1x1 conv (stride) + BN; 7x7 stem + the prototxt's max pool "
    "(pool1/3x3_s2: kernel 3, stride 2, no padding, ceil rounding; stem_pool='torchvision' "
    "gives torchvision's padding 1 / floor pool, which shifts the windows by one pixel and at "
    "193x161 gives 49x41 maps where the prototxt gives 48x40)."
)
for _name, _layers, _params, _gmacs, _top1, _drive in (
    ("sknet50", (3, 4, 6, 3), 27.5, 4.47, 79.21, "1EKanqFkqoU3L6vgSLW3GjPciesZ2rrUH"),
    ("sknet101", (3, 4, 23, 3), 48.9, 8.46, 79.81, "1NEYIYeSXQeinLGU5GH2hf8T6MJytzt0U"),
):
    register_model(
        _name, ResNetLike,
        default_cfg(**_SK, paper_params_m=_params, paper_gmacs=_gmacs, paper_top1=_top1,
                    training=_SK_TRAINING, notes=_SK_NOTES, weights=(ReleasedWeights(
                        tag="caffe_in1k", page="https://github.com/implus/SKNet#trained-models",
                        url=None, sha256=None, top1=_top1,
                        license="none stated", layout="caffe",
                        notes="A Caffe .caffemodel on Google Drive "
                        f"(https://drive.google.com/file/d/{_drive}/view). blockzoo cannot read "
                        "it: see docs/models.md (Released weights) for what reading it needs. "
                        "The repository states no license.",
                    ),)),
        block="sk_unit", layers=_layers, stem_pool="caffe",
    )

register_model(
    "sknet_cifar", ResNetLike,
    default_cfg(
        **_SK, paper_params_m=None, input_size=(3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD,
        num_classes=10,
        training="No paper recipe (the paper has no CIFAR experiment); resnet_cifar's CIFAR "
        "recipe applies.",
        notes="The small SKNet of the widely copied SKNet example, corrected: that example "
        "pools its 4x4 final map (32x32 input, three stride-2 stages) with a fixed "
        "AvgPool2d(8), which raises, and squeezes the batch dimension away at batch 1; here "
        "global average pooling and flatten work for any size and batch. Its stem and its "
        "units' first 1x1 conv lack the ReLU after BN, its convs carry biases before BN and an "
        "extra BN follows the SK conv; here the stem is 3x3 conv (64) + BN + ReLU and every "
        "unit is the paper's (1x1 + BN + ReLU -> SKConv -> 1x1 + BN, + shortcut, ReLU). "
        "Layout kept: three stages of 3 SK units with 256/512/1024 outputs (middle width "
        "out/2), M=2, G=8, r=2, L=32, stride 2 at each stage start (features at strides "
        "2/4/8), a linear classifier.",
    ),
    block="sk_unit", layers=(3, 3, 3), widths=(256, 512, 1024), strides=(2, 2, 2),
    stem="cifar", block_kwargs={"groups": 8, "reduction": 2},
)
