"""MobileNetV2 and its attention and dynamic-convolution variants, from one builder.

- MobileNetV2: Inverted Residuals and Linear Bottlenecks, Sandler et al., CVPR 2018,
  arXiv 1801.04381
- Coordinate Attention for Efficient Mobile Network Design, Hou et al., CVPR 2021,
  arXiv 2103.02907 (MobileNetV2 + CA, and its MobileNetV2 + SE comparison)
- Dynamic Convolution: Attention over Convolution Kernels, Chen et al., CVPR 2020,
  arXiv 1912.03458 (DY-MobileNetV2)

The named models are configurations of :class:`MobileNetV2`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..blocks.mobile import InvertedResidual
from ..core.validation import check_bool, check_positive_int, check_positive_number
from ..layers import ConvNormAct, LayerSpec, check_layers, make_divisible
from .base import StagedNet, init_conv_norm_act
from .pretrained import ReleasedWeights
from .registry import default_cfg, register_model

#: MobileNetV2's body (Sandler et al., Table 2): expansion t, output channels c, repeats n,
#: stride s of the first repeat.
MOBILENETV2_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MobileNetV2(StagedNet):
    """MobileNetV2 (Sandler et al., arXiv 1801.04381) with optional attention and conv blocks.

    ``stem`` (3x3 conv stride 2, ``stem_width`` channels, BN, ReLU6) -> the inverted residual
    blocks of ``settings`` (rows ``(t, c, n, s)``, widths scaled by ``width_mult`` and rounded
    to multiples of 8) -> ``head_conv`` (1x1 conv to ``last_channels``, BN, ReLU6) -> global
    average pool -> dropout (``drop_rate = 0.2``) -> linear. The blocks are grouped into four
    stages ending at strides 4, 8, 16 and 32 (24, 32, 96 and 320 channels at width 1.0); with
    ``features_only`` the head conv is not built. ``forward_features`` ends with the head conv
    (``num_features = last_channels``); ``out_indices``, ``global_pool`` and timm's model API:
    see :class:`~blockzoo.models.base.StagedNet`.

    - ``attention``: an attention-kind block put after the depthwise conv (+ BN + ReLU6) of every
      block, on the expanded channels, with ``attention_kwargs``; ``attention_on_t1=False``
      (default) leaves it out of the ``t = 1`` block, as the coordinate attention reference
      code does.
    - ``conv``: a conv-kind block (``"dynamic_conv"``, ...) that replaces every convolution of
      the inverted residual blocks (expansion 1x1, depthwise 3x3 and projection 1x1), built with
      the conv's channels, stride, kernel size and groups, no bias, and ``conv_kwargs``
      (``InvertedResidual(conv=...)``); the stem and the head conv stay static.

    ``torchvision.models.mobilenet_v2()`` and ``MobileNetV2()`` have the same parameter shapes
    (3,504,872 parameters).
    """

    def __init__(
        self,
        *,
        settings: Sequence[tuple[int, int, int, int]] = MOBILENETV2_SETTINGS,
        width_mult: float = 1.0,
        stem_width: int = 32,
        last_channels: int = 1280,
        attention: str | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        attention_on_t1: bool = False,
        conv: str | None = None,
        conv_kwargs: dict[str, Any] | None = None,
        drop_rate: float = 0.2,
        act_layer: LayerSpec = "relu6",
        norm_layer: LayerSpec = "batchnorm",
        num_classes: int = 1000,
        in_chans: int = 3,
        features_only: bool = False,
        out_indices: Sequence[int] | None = None,
        global_pool: str = "avg",
    ) -> None:
        owner = type(self).__name__
        check_positive_int(owner, "in_chans", in_chans)
        check_positive_number(owner, "width_mult", width_mult)
        check_positive_int(owner, "stem_width", stem_width)
        check_positive_int(owner, "last_channels", last_channels)
        check_bool(owner, "attention_on_t1", attention_on_t1)
        check_layers(owner, act_layer=act_layer, norm_layer=norm_layer)
        norm_act = dict(norm_layer=norm_layer, act_layer=act_layer)
        cin = make_divisible(stem_width * width_mult, 8)
        stem = ConvNormAct(in_chans, cin, 3, 2, **norm_act)
        stages: list[list[nn.Module]] = [[]]
        strides: list[int] = [1]
        for t, c, n, s in settings:
            if s == 2 and stages[-1] and strides[-1] == 2:
                stages.append([])
                strides.append(1)
            if s == 2:
                strides[-1] = 2
            cout = make_divisible(c * width_mult, 8)
            use_attention = attention is not None and (t != 1 or attention_on_t1)
            for i in range(n):
                stages[-1].append(InvertedResidual(
                    cin, cout, s if i == 0 else 1, expand_ratio=t,
                    attention=attention if use_attention else None,
                    attention_kwargs=attention_kwargs if use_attention else None,
                    conv=conv, conv_kwargs=conv_kwargs, **norm_act,
                ))
                cin = cout
        modules = [nn.Sequential(*blocks) for blocks in stages]
        last = make_divisible(last_channels * max(1.0, width_mult), 8)
        super().__init__(
            stem, modules, stem_stride=2, stage_strides=strides, in_chans=in_chans,
            num_classes=num_classes, features_only=features_only,
            out_indices=out_indices, global_pool=global_pool,
            head_conv=None if features_only else ConvNormAct(cin, last, 1, **norm_act),
            head_channels=last, drop_rate=drop_rate,
        )
        init_conv_norm_act(self)
        if self.fc is not None and isinstance(self.fc, nn.Linear):
            nn.init.normal_(self.fc.weight, 0.0, 0.01)
            nn.init.zeros_(self.fc.bias)


# --------------------------------------------------------------------------- configurations

_MBV2 = dict(paper="MobileNetV2: Inverted Residuals and Linear Bottlenecks", arxiv="1801.04381")
_CA = dict(paper="Coordinate Attention for Efficient Mobile Network Design", arxiv="2103.02907")
_MBV2_RECIPE = (
    "MobileNetV2 paper: RMSProp (decay 0.9, momentum 0.9), weight decay 4e-5, initial lr 0.045 "
    "decayed by 0.98 per epoch, batch 96 per worker on 16 GPUs, BN momentum 0.997 (TF)."
)
_CA_RECIPE = (
    "Coordinate attention paper (MobileNetV2 experiments): SGD momentum 0.9, weight decay 4e-5, "
    "cosine learning rate from 0.05, batch 256, 200 epochs, random-crop and flip only (no label "
    "smoothing, RandAugment, random erasing or mixup, as its repository stresses)."
)

register_model(
    "mobilenetv2", MobileNetV2,
    default_cfg(
        **_MBV2, paper_params_m=3.5, paper_gmacs=0.300, paper_top1=72.0, training=_MBV2_RECIPE,
        notes="Width 1.0, 224x224: 3,504,872 parameters, exactly torchvision's mobilenet_v2 "
        "(the coordinate attention paper's baseline row says 3.5M, 72.3 top-1; the MobileNetV2 "
        "paper's Table 4 rounds the same network to 3.4M); dropout 0.2 before the classifier.",
        weights=tuple(
            ReleasedWeights(
                tag=tag, url=f"https://download.pytorch.org/models/mobilenet_v2-{sha}.pth",
                page="https://pytorch.org/vision/stable/models/generated/"
                "torchvision.models.mobilenet_v2.html",
                sha256=sha, top1=top1, license="BSD-3-Clause (torchvision)",
                layout="torchvision_mobilenetv2", notes=notes,
            )
            for tag, sha, top1, notes in (
                ("tv_in1k", "b0353104", 71.878, "torchvision MobileNet_V2_Weights.IMAGENET1K_V1; "
                 "evaluated with resize 256, centre crop 224, bilinear."),
                ("tv2_in1k", "7ebf99e0", 72.154, "torchvision MobileNet_V2_Weights.IMAGENET1K_V2 "
                 "(its newer recipe); evaluated with resize 232, centre crop 224, bilinear."),
            )
        ),
    ),
)

register_model(
    "mobilenetv2_ca", MobileNetV2,
    default_cfg(
        **_CA, paper_params_m=3.95, paper_gmacs=0.310, paper_top1=74.3, training=_CA_RECIPE,
        notes="Coordinate attention (reduction 32, at least 8 channels, h-swish) after the "
        "depthwise conv + BN + ReLU6 of every block with t != 1, on the expanded channels, as "
        "the reference mbv2_ca code. The authors' mbv2_ca.pth loads (layout 'coordatt_mbv2'); "
        "their classifier dropout is 0.1 (0.2 here; no effect on evaluation).",
        weights=(ReleasedWeights(
            tag="ca_in1k", page="https://github.com/houqb/CoordAttention",
            url="https://github.com/houqb/CoordAttention/raw/main/mbv2_ca.pth", sha256=None,
            top1=74.3, license="MIT", layout="coordatt_mbv2",
            notes="mbv2_ca.pth, committed to the repository on 2021-04-28 (git blob "
            "07b6640600b7d767acfaebcf5ddb801b675073df; no SHA-256 published). Top-1 is the "
            "paper's (Table: MobileNetV2 + CA, 74.3).",
        ),),
    ),
    attention="coord_att", attention_kwargs={"reduction": 32},
)

register_model(
    "mobilenetv2_se", MobileNetV2,
    default_cfg(
        **_CA, paper_params_m=3.89, paper_gmacs=0.300, paper_top1=73.5, training=_CA_RECIPE,
        notes="The coordinate attention paper's MobileNetV2 + SE comparison: SE (reduction 24, at "
        "least 8 channels, ReLU, sigmoid) in the place of CA (after the depthwise conv of every "
        "block with t != 1). Reduction 24 gives the 3.89M the paper reports; the SE paper's "
        "default reduction 16 would give 4.08M.",
    ),
    attention="se", attention_kwargs={"reduction": 24},
)

register_model(
    "dy_mobilenetv2", MobileNetV2,
    default_cfg(
        paper="Dynamic Convolution: Attention over Convolution Kernels", arxiv="1912.03458",
        paper_params_m=11.1, paper_gmacs=0.3129, paper_top1=75.2,
        training="DY-Conv paper: the MobileNetV2 recipe with K = 4 kernels per layer and the "
        "softmax temperature annealed linearly from 30 to 1 over the first 10 epochs "
        "(blockzoo.TemperatureSchedule(model, 30, 1, 10)); dropout 0.2; kernels' attention "
        "reduction 4.",
        notes="Every conv of the 17 inverted residual blocks (1x1 expansion, 3x3 depthwise, "
        "1x1 projection) is a dynamic conv with K=4 experts (no bias, followed by the block's "
        "BN), its attention pool -> FC(C_in/4) -> ReLU -> FC(4) -> softmax/T; the stem conv "
        "and the 1280-channel head conv stay static: 11,149,736 parameters, the paper's 11.1M "
        "(making the head conv dynamic too would give 12.4M).",
    ),
    conv="dynamic_conv", conv_kwargs={"num_experts": 4},
)
