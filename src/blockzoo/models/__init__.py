"""Networks built from blockzoo's blocks, by name: ``create_model("sknet50")``.

Each named model is a configuration of a generic builder (:class:`ResNetLike`,
:class:`MobileNetV2`) registered with its ``default_cfg`` (input size, normalisation, the paper's
figures and training notes, the checkpoints its authors released). Importing this package
registers every model; :mod:`blockzoo.models.pretrained` loads the authors' checkpoints.
"""

from .base import FeatureInfo, StagedNet
from .mobilenet import MOBILENETV2_SETTINGS, MobileNetV2
from .pretrained import LAYOUTS, PretrainedError, ReleasedWeights, load_pretrained
from .registry import ModelInfo, create_model, list_models, model_info, register_model
from .resnet import ResNetLike, make_stem

__all__ = [
    "LAYOUTS",
    "FeatureInfo",
    "MOBILENETV2_SETTINGS",
    "MobileNetV2",
    "ModelInfo",
    "PretrainedError",
    "ReleasedWeights",
    "ResNetLike",
    "StagedNet",
    "create_model",
    "list_models",
    "load_pretrained",
    "make_stem",
    "model_info",
    "register_model",
]
