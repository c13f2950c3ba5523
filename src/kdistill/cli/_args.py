"""What the ``kdistill`` commands share: errors, argparse types, checks, ``MODULE:FACTORY``.

Besides the error classes, this holds the argparse types, the device and output-directory checks
made before any work, and building a model from ``MODULE:FACTORY``.

Errors: a command raises :class:`UsageError` when its arguments are wrong in themselves (exit
status 2, like argparse's own errors) and :class:`CLIError` when the work fails (exit status 1);
``kdistill.cli.__main__.main`` prints either on one line.
"""

import argparse
import importlib
import inspect
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "CLIError",
    "UsageError",
    "add_factory_arguments",
    "build_module",
    "check_device",
    "device_name",
    "factory_spec",
    "first_line",
    "json_object",
    "load_factory",
    "positive_float",
    "positive_int",
    "prepare_output_dir",
    "remove_empty_dirs",
]

_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
_FACTORY_SPEC = re.compile(rf"{_DOTTED}:{_DOTTED}")


class CLIError(Exception):
    """A user error found while running a command: one line on stderr, exit status 1."""

    exit_status = 1


class UsageError(CLIError):
    """The command line is wrong in itself (as argparse reports it): exit status 2."""

    exit_status = 2


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (``""`` if it has none)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else ""


# ---------------------------------------------------------------- argparse types
def positive_int(text: str) -> int:
    """``argparse`` type: an integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """``argparse`` type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def device_name(text: str) -> str:
    """``argparse`` type: a torch device that holds data, such as ``cpu``, ``cuda`` or ``cuda:1``.

    ``meta`` is refused: meta tensors have shapes but no values, so nothing can be computed.
    """
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"expected a torch device such as cpu or cuda:0, got {text!r}"
        ) from None
    if device.type == "meta":
        raise argparse.ArgumentTypeError(
            "the meta device holds no data, so no model can run on it; use cpu, cuda or mps"
        )
    return str(device)


def json_object(text: str) -> dict[str, Any]:
    """``argparse`` type: a JSON object of keyword arguments, e.g. ``'{"hidden": [64]}'``."""
    try:
        value = json.loads(text)
    except ValueError as error:  # JSONDecodeError, or a number too long to convert
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected a JSON object such as '{{\"in_features\": 64}}', got {text!r}"
        )
    return value


def factory_spec(text: str) -> str:
    """``argparse`` type: ``MODULE:FACTORY``, both dotted Python names (nothing is imported yet)."""
    if _FACTORY_SPEC.fullmatch(text) is None:
        raise argparse.ArgumentTypeError(
            f"expected MODULE:FACTORY such as kdistill.testing.models:tiny_mlp, got {text!r}"
        )
    return text


def add_factory_arguments(
    parser: argparse.ArgumentParser,
    name: str,
    help: str,
    *,
    positional: bool = False,
    required: bool = False,
) -> None:
    """Add a model given as ``MODULE:FACTORY`` (``name`` or ``--name``) and ``--name-kwargs``.

    Args:
        parser: The command's parser.
        name: ``"model"`` or ``"teacher"``: the argument's name and the model's role in the help.
        help: The help of the ``MODULE:FACTORY`` argument.
        positional: A positional argument instead of the option ``--name``.
        required: The option is required (options only).
    """
    if positional:
        parser.add_argument(name, type=factory_spec, metavar="MODULE:FACTORY", help=help)
    else:
        parser.add_argument(
            f"--{name}", type=factory_spec, metavar="MODULE:FACTORY", help=help, required=required
        )
    parser.add_argument(
        f"--{name}-kwargs",
        type=json_object,
        default={},
        metavar="JSON",
        help=f"keyword arguments of the {name}'s factory, as a JSON object (default: {{}})",
    )


# ---------------------------------------------------------------- checks at the start of a run
def check_device(device: str) -> None:
    """Raise :class:`CLIError` when ``device`` (from :func:`device_name`) is not usable here."""
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {device}: CUDA is not available here; use --device cpu.")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"--device {device}: MPS is not available here; use --device cpu.")
    if kind != "cpu":
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as error:  # AssertionError: torch without CUDA
            raise CLIError(f"--device {device} cannot be used: {first_line(error)}") from error


def prepare_output_dir(path: Path, option: str) -> list[Path]:
    """Create ``path`` (with its parents) and check that files can be written in it.

    Called before any work, so a bad output directory fails in a second, not after training.

    Args:
        path: The output directory.
        option: How the command line names it (e.g. ``"--output-dir"``), for the message.

    Returns:
        The directories this call created, outermost first (see :func:`remove_empty_dirs`).

    Raises:
        CLIError: The directory cannot be created, is not a directory, or is not writable.
    """
    missing = []
    for directory in (path, *path.parents):
        if directory.exists() or directory.is_symlink():
            break
        missing.append(directory)
    if path.exists() and not path.is_dir():
        raise CLIError(f"{option} {str(path)!r} exists and is not a directory.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CLIError(
            f"{option} {str(path)!r}: cannot create the directory ({error.strerror})."
        ) from error
    if not path.is_dir():
        raise CLIError(f"{option} {str(path)!r} exists and is not a directory.")
    probe = path / f".kdistill-write-check-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as error:
        remove_empty_dirs(missing[::-1])
        raise CLIError(
            f"{option} {str(path)!r} is not writable ({error.strerror}); choose another directory."
        ) from error
    return missing[::-1]


def remove_empty_dirs(created: list[Path]) -> None:
    """Remove the directories :func:`prepare_output_dir` created, innermost first, while empty."""
    for directory in reversed(created):
        try:
            directory.rmdir()
        except OSError:  # not empty (something useful was written) or already gone
            return


# ---------------------------------------------------------------- MODULE:FACTORY
def load_factory(spec: str) -> Callable[..., Any]:
    """Import ``MODULE:FACTORY`` (e.g. ``kdistill.testing.models:tiny_mlp``) and return it.

    ``FACTORY`` may be dotted (``module:Class.build``). This imports ``MODULE``: the user names code
    to run on the command line, so only modules they trust. The working directory is searched
    first, as with ``python -m``.

    Raises:
        CLIError: The module cannot be imported, has no such attribute, or it is not callable.
    """
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:  # a console script does not search it; `python -m` does
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name or module_name.startswith(f"{error.name}."):
            raise CLIError(f"{spec}: cannot import module {error.name!r}.") from error
        raise CLIError(f"{spec}: importing {module_name!r} failed: {first_line(error)}") from error
    except Exception as error:  # the user's module raised while being imported
        raise CLIError(
            f"{spec}: importing {module_name!r} failed ({type(error).__name__}: "
            f"{first_line(error)})."
        ) from error
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(obj) if not n.startswith("_"))
            raise CLIError(f"{module_name!r} has no attribute {attr!r}. Available: {public[:30]}.")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CLIError(f"{spec!r} is a {type(obj).__name__}, not a callable that builds a model.")
    return obj


def build_module(spec: str, kwargs: dict[str, Any], kwargs_option: str) -> nn.Module:
    """Call the factory ``spec`` with ``kwargs`` and check that it returns an ``nn.Module``.

    Args:
        spec: ``MODULE:FACTORY``.
        kwargs: Its keyword arguments (from a JSON option).
        kwargs_option: The option that gives ``kwargs`` (named in the message when they do not
            fit the factory's signature).

    Raises:
        UsageError: ``kwargs`` do not fit the factory's signature (a missing or unknown argument).
        CLIError: The factory raised, or returned something that is not an ``nn.Module``.
    """
    factory = load_factory(spec)
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # no signature to check (some builtins): just call it
        signature = None
    if signature is not None:
        try:
            signature.bind(**kwargs)
        except TypeError as error:
            required = {
                name: "..."
                for name, p in signature.parameters.items()
                if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            }
            hint = f", e.g. {kwargs_option} '{json.dumps(required)}'" if required else ""
            parameters = ", ".join(
                name if p.default is p.empty else f"{name}={p.default!r}"
                for name, p in signature.parameters.items()
            )
            raise UsageError(
                f"{spec}({parameters}) does not accept these arguments ({error}); give its "
                f"keyword arguments as a JSON object with {kwargs_option}{hint}."
            ) from error
    try:
        model = factory(**kwargs)
    except Exception as error:
        raise CLIError(
            f"{spec}(**{json.dumps(kwargs)}) raised {type(error).__name__}: {first_line(error)}"
        ) from error
    if not isinstance(model, nn.Module):
        raise CLIError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module.")
    return model
