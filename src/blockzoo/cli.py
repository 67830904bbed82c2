"""The ``blockzoo`` command line (also ``python -m blockzoo``)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import torch

from . import __version__
from .core.formatting import format_rows
from .core.interrupt import Interrupted, signal_name, signals_raise
from .core.validation import cli_float, cli_int
from .registry import KINDS, block_info, list_blocks, unknown_name
from .tools.profile import DEFAULT_BUDGET_S, DEFAULT_THREADS
from .train.checkpoint import CheckpointError
from .train.cli import add_subcommands as add_train_subcommands
from .train.engine import TrainingDiverged, TrainingInterrupted

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _cmd_list(args: argparse.Namespace) -> int:
    from .tools.catalog import catalog_rows

    print(format_rows(catalog_rows(args.kind), args.format))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    info = block_info(args.name)
    defaults = ", ".join(f"{k}={v!r}" for k, v in info.defaults.items())
    strides = ", ".join(map(str, info.strides))
    width = {
        "free": "out_channels is free (default: in_channels)",
        "same": "out_channels must equal in_channels",
        "structural": "out_channels is derived from the configuration (structural)",
    }[info.width]
    compile_note = "yes" if info.fullgraph else "no (see notes)"
    print(f"{info.name}: {info.cls.__name__} ({info.kind})")
    print(f"  paper:    {info.paper} ({info.year})")
    print(f"  paper id: {info.paper_id}  {info.paper_url}")
    print(f"  summary:  {info.summary}")
    print(f"  defaults: {defaults}")
    print(f"  contract: strides {strides}; {width}; torch.compile fullgraph: {compile_note}")
    if info.notes:
        print(f"  notes:    {info.notes}")
    if getattr(info.cls, "compiled_kernels", False):
        from .ops import path_description

        print(f"  implementation: {path_description()}")
    print("  usage:")
    print("    import torch, blockzoo as bz")
    stride = f", stride={info.default_stride}" if info.default_stride != 1 else ""
    print(f"    block = bz.create_block({info.name!r}, 64{stride})")
    print("    y = block(torch.randn(1, 64, 56, 56))")
    return 0


def _writable(path: str, option: str) -> Path:
    """``path`` for ``option``, checked before any work: its folder exists or can be made, and
    it is not a folder itself."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{option} {path}: is a directory; give a file name")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(
            f"{option} {path}: cannot create {target.parent} ({err.strerror})") from err
    if not os.access(target.parent, os.W_OK) or (target.exists()
                                                 and not os.access(target, os.W_OK)):
        raise ValueError(f"{option} {path}: not writable")
    return target


SAVE_FORMATS = {".json": "json", ".csv": "csv", ".md": "markdown"}


def _timing_options(args: argparse.Namespace) -> dict:
    return dict(device=args.device, dtype=DTYPES[args.dtype], backward=args.backward,
                warmup=args.warmup, min_rounds=args.min_rounds, budget=args.budget,
                threads=args.threads)


def _model_input(args: argparse.Namespace, default: tuple[int, int, int]) -> tuple[int, ...]:
    size = (args.size, args.size) if args.size is not None else default[1:]
    return (args.batch or 1, default[0], *size)


def _emit(args: argparse.Namespace, rows: list[dict], machine: dict) -> None:
    """Save (first: a reader that stops early cannot lose the file), print, plot."""
    from .tools.profile import report

    if args.save:
        fmt = SAVE_FORMATS.get(Path(args.save).suffix.lower(), args.format)
        Path(args.save).write_text(report(rows, machine, fmt) + "\n")
    if args.plot:
        from .tools.plot import plot_compare

        plot_compare(rows, args.plot)
    print(report(rows, machine, args.format))
    sys.stdout.flush()
    if args.plot:
        print(f"plot written to {args.plot}", file=sys.stderr)


def _check_outputs(args: argparse.Namespace) -> None:
    for option in ("save", "plot"):
        if getattr(args, option, None):
            _writable(getattr(args, option), f"--{option}")


def _profile_models(args: argparse.Namespace, names: list[str]) -> int:
    """``profile``/``compare`` of whole networks; with an edit, the network before and after."""
    import copy

    from .tools.networks import build_model, edit_model
    from .tools.profile import compare_models, machine_info

    models, default = [], None
    for name in names:
        model, size = build_model(name)
        default = default or size
        models.append((name, model))
    edit = getattr(args, "insert", None) or getattr(args, "replace", None)
    if edit:
        name, model = models[0]
        edited = copy.deepcopy(model)
        report = edit_model(edited, insert=args.insert, after=args.after, before=args.before,
                            replace=args.replace, where=args.where)
        print(str(report).splitlines()[0], file=sys.stderr)
        models = [(f"{name} (before)", model), (f"{name} + {edit} (after)", edited.eval())]
    step, close = _progress(len(models), "model")
    try:
        rows = compare_models(models, _model_input(args, default), progress=step,
                              **_timing_options(args))
    finally:
        close()
    _emit(args, rows, machine_info(args.device, args.threads))
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from .tools.networks import SOURCES, is_model_name, model_names
    from .tools.profile import machine_info, machine_line, profile

    _check_outputs(args)
    if is_model_name(args.name) or args.insert or args.replace:
        return _profile_models(args, [args.name])
    if args.name not in list_blocks():
        models = sorted({m for source in SOURCES for m in model_names(source)})
        raise unknown_name("block or model", args.name, list_blocks() + models,
                           "blockzoo list, blockzoo models --source all")
    if args.plot:
        raise ValueError("--plot draws a comparison: use it with compare, or a network with "
                         "--insert/--replace")
    info = block_info(args.name)
    kwargs = {"stride": args.stride if args.stride is not None else info.default_stride}
    if args.out_channels is not None:
        kwargs["out_channels"] = args.out_channels
    result = profile(args.name, (args.batch or 8, args.in_channels, args.size or 56,
                                 args.size or 56),
                     device=args.device, dtype=DTYPES[args.dtype], backward=args.backward,
                     warmup=args.warmup, repeat=args.min_rounds, threads=args.threads,
                     **kwargs)
    machine = machine_info(args.device, args.threads)

    def render(fmt: str) -> str:
        row = result.as_row()
        if fmt == "json":
            return json.dumps({"machine": machine, "result": row}, indent=2, default=str)
        if fmt in ("markdown", "csv"):
            return format_rows([row], fmt).rstrip("\n")
        width = max(map(len, row))
        return "\n".join([machine_line(machine)]
                         + [f"{key.ljust(width)}  {value}" for key, value in row.items()])

    if args.save:
        Path(args.save).write_text(
            render(SAVE_FORMATS.get(Path(args.save).suffix.lower(), args.format)) + "\n")
    print(render(args.format))
    return 0


def _progress(total: int, unit: str = "block"):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return lambda label: None, lambda: None
    bar = tqdm(total=total, desc="profiling", unit=unit, file=sys.stderr, disable=None)

    def step(label: str) -> None:
        bar.set_postfix_str(label)
        bar.update(1)

    return step, bar.close


def _cmd_compare(args: argparse.Namespace) -> int:
    from .tools.networks import is_model_name
    from .tools.profile import compare, machine_info

    _check_outputs(args)
    if args.models:
        return _profile_models(args, list(args.models) + list(args.names))
    networks = [n for n in args.names if is_model_name(n)]
    if networks and not args.kind and len(networks) == len(args.names):
        return _profile_models(args, list(args.names))
    if networks:
        raise ValueError(f"{', '.join(networks)}: networks and blocks cannot share one table; "
                         "compare networks with --models (ratios against the first)")
    names = list(args.names)
    for kind in args.kind or []:
        names += [n for n in list_blocks(kind) if n not in names]
    if not names:
        raise ValueError("name at least one block, give --kind, or --models NAME ...")
    step, close = _progress(len(names) + 1)
    try:
        rows = compare(names, in_channels=args.in_channels, out_channels=args.out_channels,
                       input_size=(args.size or 56, args.size or 56), batch=args.batch or 8,
                       stride=args.stride or 1, progress=step, **_timing_options(args))
    finally:
        close()
    _emit(args, rows, machine_info(args.device, args.threads))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from .tools.networks import SOURCES, model_rows

    sources = SOURCES if args.source == "all" else (args.source,)
    rows = model_rows(args.pattern, sources)
    if not rows:
        raise ValueError(f"no model matches {args.pattern!r} in {', '.join(sources)}"
                         " (try --source all)")
    print(format_rows(rows, args.format))
    return 0


def _cmd_viz(args: argparse.Namespace) -> int:
    from .tools.viz import visualize

    path = visualize(args.name, args.image, args.out, size=args.size)
    print(f"wrote {path}")
    return 0


def _cmd_yolo(args: argparse.Namespace) -> int:
    try:
        from .integrations.ultralytics import run_cli
    except ImportError as err:  # Ultralytics is the optional extra blockzoo[yolo]
        raise ValueError(str(err)) from err
    run_cli(args.args)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from .models import create_model
    from .models.pretrained import convert_state_dict, read_state_dict

    model = create_model(args.model, num_classes=args.num_classes, device="meta")
    mapped = convert_state_dict(read_state_dict(args.src), model)
    missing = [k for k in model.state_dict() if k not in mapped]
    if missing:
        raise ValueError(f"{args.src}: its classifier does not have {model.num_classes} classes "
                         f"({missing[0]!r} is left unset); pass --num-classes N")
    Path(args.dst).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in mapped.items()}, args.dst,
              metadata={"blockzoo_model": args.model, "num_classes": str(model.num_classes)})
    print(f"wrote {args.dst}: {len(mapped)} tensors of blockzoo {args.model!r}; load it with "
          f"blockzoo.create_model({args.model!r}, pretrained={args.dst!r})")
    return 0


def _add_size_options(p: argparse.ArgumentParser) -> None:
    positive = cli_int(1)  # 0 is refused here, so ``args.size or 56`` only fills in None
    p.add_argument("--in", dest="in_channels", type=positive, default=64, help="input channels")
    p.add_argument("--out", dest="out_channels", type=positive, default=None,
                   help="output channels (default: the block's)")
    p.add_argument("--size", type=positive, default=None,
                   help="input height and width (default: 56 for blocks, the model's own)")
    p.add_argument("--batch", type=positive, default=None,
                   help="batch (default: 8 blocks, 1 models)")
    p.add_argument("--stride", type=positive, default=None,
                   help="stride (default: the block's)")
    p.add_argument("--backward", action="store_true", help="time forward+backward")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    p.add_argument("--threads", type=cli_int(0), default=DEFAULT_THREADS, metavar="N",
                   help=f"intra-op threads for timing (default {DEFAULT_THREADS}: the figure "
                   "least disturbed by other processes; 0 = torch's default); recorded in "
                   "the output")
    p.add_argument("--warmup", type=cli_int(0), default=2, help="warm-up runs before timing")
    p.add_argument("--min-rounds", "--repeat", dest="min_rounds", type=positive, default=5,
                   help="least number of timed (paired) rounds")
    p.add_argument("--budget", type=cli_float(0, strict=True), default=DEFAULT_BUDGET_S,
                   metavar="SECONDS",
                   help="seconds of paired timing per block or model: rounds go on until the "
                   "latency ratio's 95%% interval is within +-10%% or this runs out "
                   f"(default {DEFAULT_BUDGET_S:g})")


def _add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=("table", "markdown", "json", "csv"), default="table")
    p.add_argument("--save", metavar="FILE",
                   help="also write the table to FILE (.json/.csv/.md pick the format); the "
                   "path is checked before profiling starts")
    p.add_argument("--plot", metavar="FILE.png", help="plot FLOPs vs latency to FILE.png")


def _add_model_edit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--insert", metavar="BLOCK",
                   help="insert BLOCK into the model (with --after or --before GLOB) and "
                   "profile it before and after")
    p.add_argument("--after", metavar="GLOB", help="module-name glob, e.g. 'layer*.*.bn2'")
    p.add_argument("--before", metavar="GLOB", help="module-name glob")
    p.add_argument("--replace", metavar="BLOCK",
                   help="replace the model's convs (those matching --where GLOB) with BLOCK")
    p.add_argument("--where", metavar="GLOB", help="module-name glob for --replace (default *)")


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line on stderr (``blockzoo train: error: ...``), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="blockzoo", description="Tested, paper-faithful CNN building blocks for PyTorch."
    )
    parser.add_argument("--version", action="version", version=f"blockzoo {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of errors (may also follow the sub-command)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="table of every registered block",
                       description="Every registered block with its kind, paper, year, "
                       "parameter count (in=64 channels, defaults) and output shape for a "
                       "1x64x56x56 input.")
    p.add_argument("--kind", choices=KINDS, help="only blocks of this kind")
    p.add_argument("--format", choices=("table", "markdown", "json"), default="table")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("info", help="paper, defaults and usage of one block")
    p.add_argument("name")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("profile", help="parameters, FLOPs, latency and memory of one block "
                       "or model", description="Profile one block or model at the given size. "
                       "FLOPs count 2 per multiply-add (docs/profiling.md). A model name "
                       "(blockzoo, torchvision or timm, no weights) with --insert/--replace "
                       "prints the model before and after the edit and the ratios, e.g. "
                       "blockzoo profile resnet18 --insert se --after 'layer*.*.bn2'.")
    p.add_argument("name", help="block or model name")
    _add_size_options(p)
    _add_model_edit_options(p)
    _add_output_options(p)
    p.set_defaults(func=_cmd_profile)

    p = sub.add_parser("compare", help="compare blocks against a plain 3x3 conv baseline",
                       description="Profile blocks side by side. Ratios (*_x) are against a "
                       "3x3 conv + BN + ReLU with the same channels and stride; latency_x is "
                       "the median of paired rounds (baseline and block alternate). With "
                       "--models (or network names alone), whole networks against the first "
                       "one.")
    p.add_argument("names", nargs="*", help="block names (or network names)")
    p.add_argument("--kind", action="append", choices=KINDS,
                   help="add every block of this kind (repeatable)")
    p.add_argument("--models", nargs="+", metavar="MODEL",
                   help="compare networks (blockzoo, torchvision or timm names, no weights); "
                   "ratios against the first")
    _add_size_options(p)
    _add_output_options(p)
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("models", help="networks by name (blockzoo list is for blocks)",
                       description="Models whose names match a glob PATTERN (default: all).")
    p.add_argument("pattern", nargs="?", default="*")
    p.add_argument("--source", choices=("blockzoo", "torchvision", "timm", "all"),
                   default="blockzoo", help="where to look (default: blockzoo's registry)")
    p.add_argument("--format", choices=("table", "markdown", "json", "csv"), default="table")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("viz", help="draw what a block computes on a real image",
                       description="Run an image through a fixed feature extractor and the "
                       "block, and draw the block's attention, routing, kernels or sampling "
                       "points next to the image.")
    p.add_argument("name")
    p.add_argument("image", nargs="?", default=None,
                   help="image file (default: scikit-image's astronaut photograph)")
    p.add_argument("--out", default=None, help="PNG to write (default: reports/viz_NAME.png)")
    p.add_argument("--size", type=cli_int(1), default=224,
                   help="side the image is resized to")
    p.set_defaults(func=_cmd_viz)

    p = sub.add_parser(
        "yolo", help="Ultralytics' own CLI with the blockzoo blocks registered",
        description="Run Ultralytics' command line (train, val, predict, export, ...) with every "
        "blockzoo block usable by name in model YAMLs: 'blockzoo yolo detect train "
        "model=my.yaml data=data.yaml epochs=10' is 'yolo detect train ...' after "
        "blockzoo.integrations.ultralytics.register(). Needs blockzoo[yolo].",
    )
    p.add_argument("args", nargs=argparse.REMAINDER, help="the arguments of Ultralytics' yolo")
    p.set_defaults(func=_cmd_yolo)

    p = sub.add_parser("convert", help="write an authors' checkpoint as a blockzoo state_dict",
                       description="Map a checkpoint (the authors' key layout, or blockzoo's) "
                       "onto a blockzoo model and write its state_dict as safetensors, which "
                       "create_model(NAME, pretrained=DST) loads offline.")
    p.add_argument("src", help="the checkpoint (.pth, .pt, .pth.tar or .safetensors)")
    p.add_argument("dst", help="the safetensors file to write")
    p.add_argument("--model", required=True, help="blockzoo model name (blockzoo.list_models())")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classifier size of the checkpoint (default: the model's cfg)")
    p.set_defaults(func=_cmd_convert)
    add_train_subcommands(sub)
    return parser


#: Exceptions that report a user's mistake (bad value, missing file, refused checkpoint).
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, OSError, CheckpointError)


def _resume_command(command: str, argv: list[str]) -> str:
    """The command line that continues an interrupted ``train`` / ``bench-accuracy``."""
    args = list(argv)
    if command == "train" and "--resume" not in args:
        args.append("--resume")
    from .train.distributed import launched_by_torchrun

    if launched_by_torchrun():
        prefix = f"torchrun --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', '?')} -m"
        return f"{prefix} blockzoo {shlex.join(args)}"
    return f"blockzoo {shlex.join(args)}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``blockzoo`` command; the exit code. User errors are one line on stderr (exit 2),
    a non-finite training loss exit 1, SIGINT 130 and SIGTERM 143; ``--debug`` shows
    tracebacks."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    args = build_parser().parse_args(argv)
    prefix = f"blockzoo {args.command}"
    try:
        with signals_raise():
            code = args.func(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The reader stopped early (``| head``): what it read is what it wanted.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except TrainingInterrupted as err:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone says it
            print(f"{prefix}: {err}; resume with: {_resume_command(args.command, argv)}",
                  file=sys.stderr)
        return err.exit_code
    except (KeyboardInterrupt, Interrupted) as err:
        signum = getattr(err, "signum", 2)
        hint = ("; run the same command again to continue (finished runs are kept)"
                if args.command == "bench-accuracy" else "")
        print(f"{prefix}: interrupted by {signal_name(signum)}{hint}", file=sys.stderr)
        return 128 + signum
    except TrainingDiverged as err:
        if debug:
            raise
        print(f"{prefix}: error: {err}", file=sys.stderr)
        return 1
    except USER_ERRORS as err:
        if debug:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"{prefix}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
