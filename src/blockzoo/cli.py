"""The ``blockzoo`` command line (also ``python -m blockzoo``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .core.formatting import format_rows
from .registry import KINDS, block_info, list_blocks
from .train.cli import add_subcommands as add_train_subcommands

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
    print(f"  arXiv:    {info.arxiv}  {info.arxiv_url}")
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


def _profile_options(args: argparse.Namespace) -> dict:
    return dict(device=args.device, dtype=DTYPES[args.dtype], backward=args.backward,
                warmup=args.warmup, repeat=args.repeat)


def _cmd_profile(args: argparse.Namespace) -> int:
    from .tools.profile import profile

    info = block_info(args.name)
    kwargs = {"stride": args.stride if args.stride is not None else info.default_stride}
    if args.out_channels is not None:
        kwargs["out_channels"] = args.out_channels
    result = profile(args.name, (args.batch, args.in_channels, args.size, args.size),
                     **_profile_options(args), **kwargs)
    row = result.as_row()
    width = max(map(len, row))
    for key, value in row.items():
        print(f"{key.ljust(width)}  {value}")
    return 0


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return lambda label: None, lambda: None
    bar = tqdm(total=total, desc="profiling", unit="block", file=sys.stderr, disable=None)

    def step(label: str) -> None:
        bar.set_postfix_str(label)
        bar.update(1)

    return step, bar.close


def _cmd_compare(args: argparse.Namespace) -> int:
    from .tools.profile import compare

    names = list(args.names)
    for kind in args.kind or []:
        names += [n for n in list_blocks(kind) if n not in names]
    if not names:
        raise ValueError("name at least one block or give --kind")
    step, close = _progress(len(names) + 3)
    try:
        rows = compare(names, in_channels=args.in_channels, out_channels=args.out_channels,
                       input_size=(args.size, args.size), batch=args.batch,
                       stride=args.stride or 1, progress=step, **_profile_options(args))
    finally:
        close()
    table = format_rows(rows, args.format)
    print(table)
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save).write_text(table + "\n")
    if args.plot:
        from .tools.plot import plot_compare

        plot_compare(rows, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


def _cmd_viz(args: argparse.Namespace) -> int:
    from .tools.viz import visualize

    path = visualize(args.name, args.image, args.out, size=args.size)
    print(f"wrote {path}")
    return 0


def _add_size_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--in", dest="in_channels", type=int, default=64, help="input channels")
    p.add_argument("--out", dest="out_channels", type=int, default=None,
                   help="output channels (default: the block's)")
    p.add_argument("--size", type=int, default=56, help="input height and width")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--stride", type=int, default=None, help="stride (default: the block's)")
    p.add_argument("--backward", action="store_true", help="time forward+backward")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blockzoo", description="Tested, paper-faithful CNN building blocks for PyTorch."
    )
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

    p = sub.add_parser("profile", help="parameters, FLOPs, latency and memory of one block",
                       description="Profile one block at the given size. FLOPs count 2 per "
                       "multiply-add; latency is the median of --repeat runs.")
    p.add_argument("name")
    _add_size_options(p)
    p.set_defaults(func=_cmd_profile)

    p = sub.add_parser("compare", help="compare blocks against a plain 3x3 conv baseline",
                       description="Profile blocks side by side. Ratios (*_x) are against a "
                       "3x3 conv + BN + ReLU with the same channels and stride.")
    p.add_argument("names", nargs="*", help="block names")
    p.add_argument("--kind", action="append", choices=KINDS,
                   help="add every block of this kind (repeatable)")
    _add_size_options(p)
    p.add_argument("--format", choices=("table", "markdown", "json", "csv"), default="table")
    p.add_argument("--save", metavar="FILE", help="also write the table to FILE")
    p.add_argument("--plot", metavar="FILE.png", help="plot FLOPs vs latency to FILE.png")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("viz", help="draw what a block computes on a real image",
                       description="Run an image through a fixed feature extractor and the "
                       "block, and draw the block's attention, routing, kernels or sampling "
                       "points next to the image.")
    p.add_argument("name")
    p.add_argument("image", nargs="?", default=None,
                   help="image file (default: scikit-image's astronaut photograph)")
    p.add_argument("--out", default=None, help="PNG to write (default: reports/viz_NAME.png)")
    p.add_argument("--size", type=int, default=224, help="side the image is resized to")
    p.set_defaults(func=_cmd_viz)
    add_train_subcommands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError, OSError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"blockzoo {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
