"""Training and accuracy benchmarking: ``blockzoo train`` and ``blockzoo bench-accuracy``.

>>> from blockzoo.train import TrainConfig, train
>>> result = train(TrainConfig(conv="dynamic_conv", attention="se", data="synthetic",
...                            epochs=2, out="runs/demo"))  # doctest: +SKIP

See ``docs/training.md``. Datasets: :mod:`blockzoo.train.data`; the loop:
:mod:`blockzoo.train.engine`; checkpoints: :mod:`blockzoo.train.checkpoint`; torchrun/DDP:
:mod:`blockzoo.train.distributed`; the accuracy benchmark: :mod:`blockzoo.train.bench`.
"""

from .bench import bench_accuracy
from .checkpoint import export_safetensors, load_checkpoint, load_safetensors, save_checkpoint
from .data import DATASETS, SYNTHETIC_CLASSES, DataBundle, build_data, make_synthetic
from .engine import TrainConfig, TrainResult, load_trained, train

__all__ = [
    "DATASETS",
    "SYNTHETIC_CLASSES",
    "DataBundle",
    "TrainConfig",
    "TrainResult",
    "bench_accuracy",
    "build_data",
    "export_safetensors",
    "load_checkpoint",
    "load_safetensors",
    "load_trained",
    "make_synthetic",
    "save_checkpoint",
    "train",
]
