"""``kdistill inspect MODULE:FACTORY --input-shape ...``: submodules, output shapes, parameters."""

import argparse
import os
import sys
from typing import Any

import torch
from torch import nn

from . import CLIError
from ._demo import check_device, device_name

__all__ = ["add_parser", "run"]

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
}


def shape(text: str) -> tuple[int, ...]:
    """``argparse`` type: comma-separated positive sizes, e.g. ``1,784``."""
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated sizes such as 1,784, got {text!r}"
        ) from None
    if any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return sizes


def add_parser(subparsers: Any) -> None:
    """Register ``inspect`` on the ``kdistill`` sub-parsers."""
    parser = subparsers.add_parser(
        "inspect",
        help="list a model's submodules with output shapes, to choose layer pairs",
        description=(
            "Build a model by calling MODULE:FACTORY (no arguments; the module is imported, so "
            "only name code you trust), run one forward on zeros of --input-shape, and print "
            "every named submodule with its output shape and parameter count. With --teacher, "
            "show both models side by side and list the (student, teacher) pairs whose output "
            "shapes are equal."
        ),
    )
    parser.add_argument(
        "model", metavar="MODULE:FACTORY", help="e.g. kdistill.testing.models:tiny_mlp"
    )
    parser.add_argument(
        "--input-shape", type=shape, required=True, metavar="SIZES", help="e.g. 1,784"
    )
    parser.add_argument(
        "--input-dtype",
        choices=sorted(_DTYPES),
        default="float32",
        help="dtype of the zero input (int64 for token ids; default: float32)",
    )
    parser.add_argument("--teacher", metavar="MODULE:FACTORY", help="a teacher to compare with")
    parser.add_argument(
        "--device", type=device_name, default="cpu", help="torch device (default: cpu)"
    )
    parser.set_defaults(handler=run)


def _build(spec: str, device: str) -> nn.Module:
    """Import and call the factory, turning the user's mistakes into one-line errors."""
    from kdistill.inspect_model import load_factory

    try:
        factory = load_factory(spec)
    except ModuleNotFoundError as error:
        raise CLIError(f"{spec}: cannot import module {error.name!r}.") from None
    except (ValueError, TypeError) as error:
        raise CLIError(str(error)) from None
    model = factory()
    if not isinstance(model, nn.Module):
        raise CLIError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module.")
    return model.to(device)


def run(args: argparse.Namespace) -> int:
    """Print the submodule table of the model (and of the teacher, side by side)."""
    from kdistill.inspect_model import format_side_by_side, format_summary, summarize_modules

    check_device(args.device)
    # A console script does not put the working directory on sys.path; `python -m` does.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    example = torch.zeros(args.input_shape, dtype=_DTYPES[args.input_dtype], device=args.device)
    rows = {}
    for role, spec in (("model", args.model), ("teacher", args.teacher)):
        if spec is None:
            continue
        model = _build(spec, args.device)
        try:
            rows[role] = summarize_modules(model, example)
        except (RuntimeError, TypeError, ValueError, IndexError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise CLIError(
                f"{spec}: forward on zeros of shape {list(args.input_shape)} failed "
                f"({type(error).__name__}: {first_line}). Check --input-shape / --input-dtype."
            ) from None
    if args.teacher is None:
        print(format_summary(rows["model"]))
    else:
        print(format_side_by_side(rows["model"], rows["teacher"]))
    return 0
