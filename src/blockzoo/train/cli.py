"""The ``blockzoo train`` and ``blockzoo bench-accuracy`` commands."""

from __future__ import annotations

import argparse
import ast
import dataclasses
from typing import Any

from .data import DATASETS
from .engine import OPTIMIZERS, TrainConfig


def parse_kwargs(items: list[str] | None) -> dict[str, Any]:
    """``["layers=(1, 1, 1, 1)", "stem=cifar"]`` -> ``{"layers": (1, 1, 1, 1), "stem": "cifar"}``.

    Values are Python literals where they parse as one, strings otherwise.
    """
    kwargs: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--model-kwargs takes KEY=VALUE items, got {item!r}")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return kwargs


def _none(name: str | None) -> str | None:
    return None if name in (None, "none") else name


def _add_training_options(p: argparse.ArgumentParser) -> None:
    """The options ``train`` and ``bench-accuracy`` share (defaults: :class:`TrainConfig`'s)."""
    d = TrainConfig()
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d.model, help="a blockzoo model name (default: %(default)s)")
    g.add_argument("--model-kwargs", nargs="+", metavar="KEY=VALUE",
                   help="more model options, e.g. layers='(1,1,1,1)' widths='(32,32,64,64)'")
    g.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=d.data, choices=DATASETS)
    g.add_argument("--data-root", default=d.data_root,
                   help="folder holding (or receiving) the dataset (default: %(default)s)")
    g.add_argument("--no-download", dest="download", action="store_false",
                   help="never download CIFAR (fail if it is not under --data-root)")
    g.add_argument("--image-size", type=int, default=None,
                   help="image side (synthetic default 32, imagefolder 224; CIFAR is 32)")
    g.add_argument("--train-size", type=int, default=None,
                   help="synthetic: images generated (default 5000); others: keep the first N")
    g.add_argument("--val-size", type=int, default=None,
                   help="synthetic: images generated (default 1000); others: keep the first N")
    g.add_argument("--data-seed", type=int, default=d.data_seed,
                   help="seed of the synthetic images (default: %(default)s)")
    g.add_argument("--no-augment", dest="augment", action="store_false",
                   help="no random crop (padding side/8) and horizontal flip")
    g.add_argument("--workers", type=int, default=None,
                   help="data loader workers (default: 0 for in-memory data, 4 for imagefolder)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="global batch size, split over torchrun's processes (default: "
                   "%(default)s)")
    g.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS)
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: sgd "
                   "0.1, adamw 2e-3)")
    g.add_argument("--momentum", type=float, default=d.momentum)
    g.add_argument("--no-nesterov", dest="nesterov", action="store_false")
    g.add_argument("--weight-decay", type=float, default=None,
                   help="default: sgd 5e-4, adamw 0.05 (never on biases and norm weights)")
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs,
                   help="linear warm-up before the cosine decay (default: %(default)s)")
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision (default: on with CUDA; CUDA only)")
    g.add_argument("--amp-dtype", default=d.amp_dtype, choices=("bfloat16", "float16"))
    g.add_argument("--no-sync-bn", dest="sync_bn", action="store_false",
                   help="under torchrun on GPUs, keep per-process BatchNorm statistics")
    g.add_argument("--temperature-start", type=float, default=d.temperature_start,
                   help="DY-Conv softmax temperature at epoch 0 (default: %(default)s)")
    g.add_argument("--temperature-end", type=float, default=d.temperature_end)
    g.add_argument("--temperature-epochs", type=int, default=None,
                   help="epochs of linear annealing (default: min(10, epochs - 1))")
    g = p.add_argument_group("run")
    g.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda"))
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (the per-epoch lines stay)")
    g.add_argument("--tensorboard", action="store_true",
                   help="also log to OUT/tensorboard (needs the tensorboard package)")


def config_from_args(args: argparse.Namespace, **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` from parsed options (fields absent from ``args`` keep defaults)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["model_kwargs"] = parse_kwargs(args.model_kwargs)
    values.update(overrides)
    return TrainConfig(**values)


def _cmd_train(args: argparse.Namespace) -> int:
    from .engine import train

    config = config_from_args(args, conv=_none(args.conv), attention=_none(args.attention))
    result = train(config)
    if result.rank == 0 and result.history:
        print(f"final val acc {result.val_acc:.2f}% (best {result.best_val_acc:.2f}%); "
              f"outputs in {result.out}")
    return 0


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench_accuracy, markdown_table

    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    base = config_from_args(args, attention=None)
    summary = bench_accuracy(_names(args.blocks), _names(args.attention),
                             list(range(args.seed_start, args.seed_start + args.seeds)), base,
                             args.out)
    print(markdown_table(summary))
    return 0


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` and ``bench-accuracy`` to the ``blockzoo`` command's sub-parsers."""
    p = subparsers.add_parser(
        "train", help="train a model with a chosen conv block and attention",
        description="Train a model (default resnet_cifar) with a conv block and an attention "
        "block on synthetic data, CIFAR-10/100 or an ImageFolder. Writes config.json, "
        "metrics.csv, last.pt (every epoch, atomically) and model.safetensors to --out. "
        "Under `torchrun --nproc_per_node=N -m blockzoo train ...` it trains with DDP.",
    )
    p.add_argument("--conv", default=None,
                   help="conv-kind block replacing the 3x3 convs (default: none, plain conv)")
    p.add_argument("--attention", default=None,
                   help="attention block after every residual branch (default: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=TrainConfig.out, help="output folder (default: "
                   "%(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint")
    _add_training_options(p)
    p.set_defaults(func=_cmd_train)

    p = subparsers.add_parser(
        "bench-accuracy", help="train every block x attention over seeds; table and plot",
        description="Train every combination of --blocks and --attention for --seeds seeds "
        "and write OUT/results.csv, OUT/results.md (mean +/- std accuracy, params, FLOPs, "
        "train throughput) and OUT/accuracy_vs_flops.png. Finished runs are skipped when "
        "the command is run again; an interrupted run resumes from its checkpoint.",
    )
    p.add_argument("--blocks", default="conv,dynamic_conv",
                   help="comma-separated conv-kind blocks; 'conv' is the plain 3x3 conv "
                   "(default: %(default)s)")
    p.add_argument("--attention", default="none,se",
                   help="comma-separated attention blocks; 'none' for none (default: "
                   "%(default)s)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per combination (default: "
                   "%(default)s)")
    p.add_argument("--seed-start", type=int, default=0, help="first seed (default: 0)")
    p.add_argument("--out", default="runs/bench", help="output folder (default: %(default)s)")
    _add_training_options(p)
    p.set_defaults(func=_cmd_bench)
