"""Networks built from blockzoo's blocks, by name: ``create_model("sknet50")``.

Each named model is a configuration of a generic builder (:class:`ResNetLike`,
:class:`MobileNetV2`) registered with its ``default_cfg`` (input size, normalisation, the paper's
figures and training notes). Importing this package registers every model.
"""

from .base import FeatureInfo, StagedNet
from .mobilenet import MOBILENETV2_SETTINGS, MobileNetV2
from .registry import ModelInfo, create_model, list_models, model_info, register_model
from .resnet import ResNetLike, make_stem

__all__ = [
    "FeatureInfo",
    "MOBILENETV2_SETTINGS",
    "MobileNetV2",
    "ModelInfo",
    "ResNetLike",
    "StagedNet",
    "create_model",
    "list_models",
    "make_stem",
    "model_info",
    "register_model",
]
