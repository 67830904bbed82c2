"""The ``blockzoo train``, ``bench-accuracy``, ``predict`` and ``eval`` commands."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from ..blocks.dynamic import DY_CONV_TEMPERATURE
from ..core.validation import cli_float, cli_int
from .config import OPTIMIZERS, TrainConfig
from .data import DATASETS

POSITIVE = cli_int(1)
NON_NEGATIVE = cli_int(0)


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


def _add_training_options(p: argparse.ArgumentParser) -> None:
    """The options ``train`` and ``bench-accuracy`` share (defaults: :class:`TrainConfig`'s)."""
    d = TrainConfig()
    t = DY_CONV_TEMPERATURE
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
    g.add_argument("--image-size", type=POSITIVE, default=None,
                   help="image side (synthetic default 32, imagefolder 224; CIFAR is 32)")
    g.add_argument("--train-size", type=POSITIVE, default=None,
                   help="synthetic: images generated (default 5000); others: keep the first N")
    g.add_argument("--val-size", type=POSITIVE, default=None,
                   help="synthetic: images generated (default 1000); others: keep the first N")
    g.add_argument("--data-seed", type=NON_NEGATIVE, default=d.data_seed,
                   help="seed of the synthetic images (default: %(default)s)")
    g.add_argument("--no-augment", dest="augment", action="store_false",
                   help="no random crop (padding side/8) and horizontal flip")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="leave out unreadable ImageFolder images (counted in the log) instead "
                   "of refusing to start")
    g.add_argument("--workers", type=NON_NEGATIVE, default=None,
                   help="data loader workers (default: 0 for in-memory data; imagefolder: 4, "
                   "at most the CPU cores)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=POSITIVE, default=d.epochs)
    g.add_argument("--batch-size", type=POSITIVE, default=d.batch_size,
                   help="global batch size, split over torchrun's processes (default: "
                   "%(default)s)")
    g.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS)
    g.add_argument("--lr", type=cli_float(0, strict=True), default=None,
                   help="peak learning rate (default: sgd 0.1, adamw 2e-3)")
    g.add_argument("--momentum", type=cli_float(0), default=d.momentum)
    g.add_argument("--no-nesterov", dest="nesterov", action="store_false")
    g.add_argument("--weight-decay", type=cli_float(0), default=None,
                   help="default: sgd 5e-4, adamw 0.05 (never on biases and norm weights)")
    g.add_argument("--warmup-epochs", type=cli_float(0), default=d.warmup_epochs,
                   help="linear warm-up before the cosine decay (default: %(default)s)")
    g.add_argument("--label-smoothing", type=cli_float(0, 1), default=d.label_smoothing)
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision (default: on with CUDA; CUDA only)")
    g.add_argument("--amp-dtype", default=d.amp_dtype, choices=("bfloat16", "float16"))
    g.add_argument("--no-sync-bn", dest="sync_bn", action="store_false",
                   help="under torchrun on GPUs, keep per-process BatchNorm statistics")
    g.add_argument("--skip-nonfinite", action="store_true",
                   help="skip (and count) batches whose loss is NaN or infinite instead of "
                   "stopping the run")
    g.add_argument("--temperature-start", type=cli_float(0, strict=True), default=None,
                   help="DY-Conv softmax temperature at epoch 1 (default: the model's "
                   f"default_cfg['temperature_schedule'], {t.start:g})")
    g.add_argument("--temperature-end", type=cli_float(0, strict=True), default=None,
                   help=f"final DY-Conv temperature (default: the model's, {t.end:g})")
    g.add_argument("--temperature-epochs", type=POSITIVE, default=None,
                   help=f"epochs of linear annealing (default: the model's, {t.epochs}, at "
                   "most epochs - 1)")
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

    result = train(config_from_args(args))
    if result.rank == 0 and result.history:
        print(f"final val acc {result.val_acc:.2f}% (best {result.best_val_acc:.2f}%); "
              f"outputs in {result.out}")
    return 0


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench_accuracy, markdown_table

    base = config_from_args(args, attention=None)
    summary = bench_accuracy(_names(args.blocks), _names(args.attention),
                             list(range(args.seed_start, args.seed_start + args.seeds)), base,
                             args.out)
    print(markdown_table(summary))
    return 0


def _load(args: argparse.Namespace):
    from .inference import load_trained

    return load_trained(args.run, checkpoint=args.checkpoint, pretrained=args.pretrained,
                        device=args.device)


def _cmd_predict(args: argparse.Namespace) -> int:
    from .inference import predict

    rows = predict(_load(args), args.images, topk=args.topk, batch_size=args.batch_size)
    if args.format == "json":
        print(json.dumps([{"path": r["path"], "top": [{"class": c, "probability": p}
                                                      for c, p in r["top"]]} for r in rows],
                         indent=2))
        return 0
    for row in rows:
        print(row["path"])
        for name, prob in row["top"]:
            print(f"  {100 * prob:6.2f}%  {name}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from ..core.formatting import format_rows
    from .inference import evaluate_folder, plot_confusion

    result = evaluate_folder(_load(args), args.data, batch_size=args.batch_size)
    rows = [{"class": name, "images": r["count"], "correct": r["correct"],
             "accuracy %": f"{r['accuracy']:.2f}"} for name, r in result["per_class"].items()]
    print(format_rows(rows, "table"))
    print(f"accuracy {result['accuracy']:.2f}% "
          f"({sum(r['correct'] for r in result['per_class'].values())}/{result['count']} images)")
    plot = Path(args.plot) if args.plot else (
        Path(args.run) / "confusion_matrix.png" if Path(args.run).is_dir()
        else Path("confusion_matrix.png"))
    plot_confusion(result, plot)
    print(f"confusion matrix written to {plot}", file=sys.stderr)
    return 0


def _add_model_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="a `blockzoo train` output folder, or a model "
                   "name with --pretrained")
    p.add_argument("--pretrained", metavar="FILE", default=None,
                   help="weights of the model named RUN (safetensors or a torch state dict)")
    p.add_argument("--checkpoint", choices=("last", "best"), default="last",
                   help="a run's final weights or its best epoch's (default: %(default)s)")
    p.add_argument("--batch-size", type=POSITIVE, default=32, help="images per forward "
                   "(default: %(default)s)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train``, ``bench-accuracy``, ``predict`` and ``eval`` to ``blockzoo``'s
    sub-parsers."""
    p = subparsers.add_parser(
        "train", help="train a model with a chosen conv block and attention",
        description="Train a model (default resnet_cifar) with a conv block and an attention "
        "block on synthetic data, CIFAR-10/100 or an ImageFolder. Writes config.json, run.json, "
        "metrics.csv, last.pt/previous.pt (every epoch, atomically), best.pt and "
        "model.safetensors to --out. Ctrl-C (or SIGTERM) stops at the next step with a "
        "resumable checkpoint. Under `torchrun --nproc_per_node=N -m blockzoo train ...` it "
        "trains with DDP.",
    )
    p.add_argument("--conv", default=None,
                   help="conv-kind block replacing the 3x3 convs (default: none, plain conv)")
    p.add_argument("--attention", default=None,
                   help="attention block after every residual branch (default: none)")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0)
    p.add_argument("--out", default=TrainConfig.out, help="output folder (default: "
                   "%(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last good checkpoint")
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
    p.add_argument("--seeds", type=POSITIVE, default=3, help="seeds per combination (default: "
                   "%(default)s)")
    p.add_argument("--seed-start", type=NON_NEGATIVE, default=0, help="first seed (default: 0)")
    p.add_argument("--out", default="runs/bench", help="output folder (default: %(default)s)")
    _add_training_options(p)
    p.set_defaults(func=_cmd_bench)

    p = subparsers.add_parser(
        "predict", help="classify images with a trained run or pretrained weights",
        description="Top classes and probabilities of each image (files or folders), read in "
        "batches with the preprocessing the model was trained with: a run's (run.json) or, "
        "for a model name with --pretrained, the network's default_cfg (ImageNet class names "
        "for a 1000-class network).",
    )
    _add_model_source(p)
    p.add_argument("images", nargs="+", metavar="IMAGE|DIR")
    p.add_argument("--topk", type=POSITIVE, default=5, help="classes shown per image "
                   "(default: %(default)s)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=_cmd_predict)

    p = subparsers.add_parser(
        "eval", help="accuracy, per-class accuracy and confusion matrix on an image folder",
        description="Evaluate a run (or a model name with --pretrained) on --data, a folder "
        "with one sub-folder of images per class (class names as the model's; a folder with "
        "train/ and val/ means its val/). Prints the accuracy and the per-class accuracy and "
        "writes a confusion-matrix PNG (default: RUN/confusion_matrix.png).",
    )
    _add_model_source(p)
    p.add_argument("--data", required=True, metavar="DIR")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="where to write the confusion matrix")
    p.set_defaults(func=_cmd_eval)
