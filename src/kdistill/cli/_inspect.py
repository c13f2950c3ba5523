"""``kdistill inspect MODULE:FACTORY --input-shape ...``: submodules, output shapes, parameters."""

import argparse
from typing import Any

import torch
from torch import nn

from ..inspect_model import format_side_by_side, format_summary, summarize_modules
from ._args import (
    CLIError,
    add_factory_arguments,
    build_module,
    check_device,
    device_name,
    first_line,
)

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
            "Build a model by calling MODULE:FACTORY (with the --model-kwargs JSON object; the "
            "module is imported, so only name code you trust), run one forward on zeros of "
            "--input-shape, and print every named submodule with its output shape and parameter "
            "count. With --teacher, show both models side by side and list the (student, "
            'teacher) pairs whose output shapes are equal, as criterion keys such as ("", "").'
        ),
    )
    add_factory_arguments(parser, "model", "e.g. kdistill.testing.models:tiny_mlp", positional=True)
    parser.add_argument(
        "--input-shape", type=shape, required=True, metavar="SIZES", help="e.g. 1,784"
    )
    parser.add_argument(
        "--input-dtype",
        choices=sorted(_DTYPES),
        default="float32",
        help="dtype of the zero input (int64 for token ids; default: float32)",
    )
    add_factory_arguments(parser, "teacher", "a teacher to compare with")
    parser.add_argument(
        "--device", type=device_name, default="cpu", help="torch device (default: cpu)"
    )
    parser.set_defaults(handler=run)


def _summarize(model: nn.Module, spec: str, example: torch.Tensor) -> list[Any]:
    try:
        return summarize_modules(model, example)
    except Exception as error:  # the user's forward: report it on one line
        raise CLIError(
            f"{spec}: forward on zeros of shape {list(example.shape)} failed "
            f"({type(error).__name__}: {first_line(error)}). Check --input-shape / --input-dtype."
        ) from error


def run(args: argparse.Namespace) -> int:
    """Print the submodule table of the model (and of the teacher, side by side)."""
    check_device(args.device)
    example = torch.zeros(args.input_shape, dtype=_DTYPES[args.input_dtype], device=args.device)
    model = build_module(args.model, args.model_kwargs, "--model-kwargs").to(args.device)
    rows = _summarize(model, args.model, example)
    if args.teacher is None:
        print(format_summary(rows))
        return 0
    teacher = build_module(args.teacher, args.teacher_kwargs, "--teacher-kwargs").to(args.device)
    print(format_side_by_side(rows, _summarize(teacher, args.teacher, example)))
    return 0
