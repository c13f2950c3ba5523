r"""``kdistill cache-teacher``: run a teacher once over a demo dataset and write a teacher cache.

Example (the MNIST demo's teacher, whose weights the demo stores as a plain state dict)::

    kdistill cache-teacher out/mnist-teacher-cache \
        --teacher kdistill.demo.mnist:build_mlp \
        --teacher-kwargs '{"in_features": 784, "hidden": [1200, 1200], "num_classes": 10}' \
        --checkpoint ~/.cache/kdistill/mnist-teacher-<key>.pt --dataset mnist --dtype float32

Sample ids are the row numbers of the chosen split, so a training loop over
``TensorDataset(torch.arange(N), x, y)`` of the same split finds every sample in the cache.
"""

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill.cli._demo import positive_float, positive_int

__all__ = ["add_parser", "run"]

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def add_parser(subparsers: Any) -> None:
    """Add the ``cache-teacher`` subcommand (handler: ``run``)."""
    from kdistill.demo.data import DATASETS

    parser = subparsers.add_parser(
        "cache-teacher",
        help="run a teacher once over a demo dataset and cache its outputs for offline KD",
        description=(
            "Build a teacher by calling MODULE:FACTORY (the module is imported, so only name code "
            "you trust), optionally load a state dict, run it once over a demo dataset and write "
            "a kdistill teacher cache (use it with kdistill.CachedTeacher). Re-running the same "
            "command resumes an interrupted build."
        ),
    )
    parser.add_argument("output", type=Path, metavar="OUTPUT_DIR", help="cache directory")
    parser.add_argument(
        "--teacher",
        required=True,
        metavar="MODULE:FACTORY",
        help="e.g. kdistill.demo.mnist:build_mlp",
    )
    parser.add_argument(
        "--teacher-kwargs",
        default="{}",
        metavar="JSON",
        help="keyword arguments of the factory, as a JSON object",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="teacher weights: a state dict file or a kdistill.save checkpoint (weights only)",
    )
    parser.add_argument(
        "--dataset", choices=DATASETS, default="auto", help="demo dataset (default: auto)"
    )
    parser.add_argument(
        "--split", choices=("train", "test"), default="train", help="(default: train)"
    )
    parser.add_argument("--limit", type=positive_int, help="cache only the first N samples")
    parser.add_argument(
        "--layers",
        nargs="+",
        default=[""],
        metavar="NAME",
        help="teacher modules to cache ('' is the output; default: '')",
    )
    parser.add_argument("--top-k", type=positive_int, help="keep only the top-k log-probs")
    parser.add_argument(
        "--temperature",
        type=positive_float,
        default=1.0,
        help="temperature of the top-k log-probs (default: 1)",
    )
    parser.add_argument("--dtype", choices=tuple(_DTYPES), default="float16")
    parser.add_argument("--batch-size", type=positive_int, default=256)
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing cache")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run)


def _load_teacher(args: argparse.Namespace) -> nn.Module:
    from kdistill.cli import CLIError
    from kdistill.inspect_model import load_factory

    try:
        kwargs = json.loads(args.teacher_kwargs)
    except json.JSONDecodeError as error:
        raise CLIError(f"--teacher-kwargs is not valid JSON: {error}.") from None
    if not isinstance(kwargs, dict):
        raise CLIError(f"--teacher-kwargs must be a JSON object, got {args.teacher_kwargs!r}.")
    try:
        factory = load_factory(args.teacher)
    except ModuleNotFoundError as error:
        raise CLIError(f"{args.teacher}: cannot import module {error.name!r}.") from None
    except (ValueError, TypeError) as error:
        raise CLIError(str(error)) from None
    teacher = factory(**kwargs)
    if not isinstance(teacher, nn.Module):
        raise CLIError(f"{args.teacher} returned a {type(teacher).__name__}, not an nn.Module.")
    if args.checkpoint is not None:
        if not args.checkpoint.is_file():
            raise CLIError(f"--checkpoint {str(args.checkpoint)!r} does not exist.")
        try:
            state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        except Exception as error:  # any unreadable file: report it on one line
            raise CLIError(f"cannot read --checkpoint {str(args.checkpoint)!r}: {error}") from None
        if isinstance(state, dict) and "model_state_dict" in state:
            state = state["model_state_dict"]  # a kdistill.save checkpoint
        try:
            teacher.load_state_dict(state)
        except (RuntimeError, TypeError) as error:
            raise CLIError(
                f"--checkpoint does not fit {args.teacher}: {str(error).splitlines()[0]}"
            ) from None
    return teacher


def run(args: argparse.Namespace) -> int:
    """Build (or resume, or check) the cache and print a summary; return 0."""
    from torch.utils.data import DataLoader, TensorDataset

    from kdistill.cli import CLIError
    from kdistill.demo.data import load_dataset

    from .store import TeacherCache

    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise CLIError(f"--device {args.device!r} is not a torch device.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {args.device}: CUDA is not available here; use --device cpu.")
    teacher = _load_teacher(args).to(device)
    try:
        data = load_dataset(args.dataset)
    except (ValueError, ImportError) as error:
        raise CLIError(str(error)) from None
    if data.note:
        print(f"note: {data.note}")
    x = data.x_train if args.split == "train" else data.x_test
    x = x[: args.limit]
    loader = DataLoader(TensorDataset(torch.arange(len(x)), x), batch_size=args.batch_size)
    try:
        cache = TeacherCache.build(
            teacher,
            loader,
            args.output,
            layers=args.layers,
            top_k=args.top_k,
            temperature=args.temperature,
            dtype=_DTYPES[args.dtype],
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (ValueError, TypeError) as error:
        raise CLIError(str(error).replace("overwrite=True", "--overwrite")) from None
    print(
        f"teacher cache: {cache.path} ({cache.num_samples} samples of {data.name} "
        f"{args.split}, layers {cache.layers}, {cache.manifest['dtype']}, "
        f"top_k {args.top_k}): {cache.nbytes} bytes, "
        f"{cache.nbytes / cache.num_samples:.1f} bytes/sample; teacher fingerprint "
        f"{cache.teacher_fingerprint[:16]}"
    )
    return 0
