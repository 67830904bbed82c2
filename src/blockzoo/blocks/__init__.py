"""Block families, one module per family. Importing this package registers every block."""

from .acmix import ACmix, acmix_attention_unfold_reference, local_window_attention
from .attention import CoordinateAttention, GlobalContext, SqueezeExcite
from .base import Block, ExplainKey, ShapePreservingBlock, check_input
from .cells import AmoebaNetNormalCell, NASNetNormalCell, relu_sepconv_bn
from .deform import DeformConv2d, ModulatedDeformConv2d, deform_conv2d_torch
from .dense import DenseBlock, DenseLayer
from .dynamic import (
    CondConv2d,
    DynamicConv2d,
    DynamicConvBnAct,
    TemperatureSchedule,
    set_temperature,
)
from .inception import Inception
from .involution import Involution, involution2d, involution_unfold_reference
from .mobile import InvertedResidual
from .residual import BasicResidual, Bottleneck, ResidualBlock, ResidualBottleneck
from .selective_kernel import SKConv, SKUnit, clamp_groups
from .separable import SeparableConv
from .spd import SpaceToDepth, SPDBottleneck, SPDConv, space_to_depth

__all__ = [
    "ACmix",
    "AmoebaNetNormalCell",
    "BasicResidual",
    "Block",
    "Bottleneck",
    "CondConv2d",
    "CoordinateAttention",
    "DeformConv2d",
    "DenseBlock",
    "DenseLayer",
    "DynamicConv2d",
    "DynamicConvBnAct",
    "ExplainKey",
    "GlobalContext",
    "Inception",
    "InvertedResidual",
    "Involution",
    "ModulatedDeformConv2d",
    "NASNetNormalCell",
    "ResidualBlock",
    "ResidualBottleneck",
    "SKConv",
    "SKUnit",
    "SPDBottleneck",
    "SPDConv",
    "SeparableConv",
    "SpaceToDepth",
    "ShapePreservingBlock",
    "SqueezeExcite",
    "TemperatureSchedule",
    "acmix_attention_unfold_reference",
    "check_input",
    "clamp_groups",
    "deform_conv2d_torch",
    "involution2d",
    "involution_unfold_reference",
    "local_window_attention",
    "set_temperature",
    "relu_sepconv_bn",
    "space_to_depth",
]
