"""Training, accuracy benchmarking and using trained models: ``blockzoo train``,
``bench-accuracy``, ``predict`` and ``eval``.

>>> from blockzoo.train import TrainConfig, train, load_trained
>>> result = train(TrainConfig(conv="dynamic_conv", attention="se", data="synthetic",
...                            epochs=2, out="runs/demo"))  # doctest: +SKIP
>>> model, transform = load_trained("runs/demo")  # doctest: +SKIP

See ``docs/training.md``. Settings: :mod:`blockzoo.train.config`; datasets:
:mod:`blockzoo.train.data`; model, optimiser and schedules: :mod:`blockzoo.train.build`; the
loop: :mod:`blockzoo.train.engine`; per-epoch numbers: :mod:`blockzoo.train.metrics`;
checkpoints: :mod:`blockzoo.train.checkpoint`; the run directory and preprocessing:
:mod:`blockzoo.train.run`; predict/eval: :mod:`blockzoo.train.inference`; torchrun/DDP:
:mod:`blockzoo.train.distributed`; the accuracy benchmark: :mod:`blockzoo.train.bench`.
"""

from .bench import bench_accuracy
from .checkpoint import (
    CheckpointError,
    export_safetensors,
    load_checkpoint,
    load_safetensors,
    save_checkpoint,
)
from .config import TrainConfig
from .data import DATASETS, SYNTHETIC_CLASSES, DataBundle, build_data, make_synthetic
from .engine import TrainingDiverged, TrainingInterrupted, TrainResult, train
from .inference import TrainedModel, evaluate_folder, imagenet_classes, load_trained, predict
from .run import Preprocessing

__all__ = [
    "DATASETS",
    "SYNTHETIC_CLASSES",
    "CheckpointError",
    "DataBundle",
    "Preprocessing",
    "TrainConfig",
    "TrainResult",
    "TrainedModel",
    "TrainingDiverged",
    "TrainingInterrupted",
    "bench_accuracy",
    "build_data",
    "evaluate_folder",
    "export_safetensors",
    "imagenet_classes",
    "load_checkpoint",
    "load_safetensors",
    "load_trained",
    "make_synthetic",
    "predict",
    "save_checkpoint",
    "train",
]
