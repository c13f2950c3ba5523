"""Several named teachers as one module: ``TeacherDict``, and the rules for teacher names.

``convert`` accepts ``teacher_model={"big": big, "expert": expert}``; the teachers then live in a
``TeacherDict`` (an ``nn.ModuleDict``) whose children are the named teachers. Its ``forward`` runs
every teacher on the same inputs, so forward hooks on ``"big"`` or ``"big.blocks.11"`` capture
exactly what they capture on the live teacher, and the criterion's dotted names resolve as they
do for one teacher (``get_submodule("big.blocks.11")``).

Names are checked by ``teacher_name_problem`` wherever they come from: ``convert``, a checkpoint
record (``restore``) or a teacher-cache manifest.
"""

import functools
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from ._errors import unknown_name_message

__all__ = [
    "MAX_TEACHERS",
    "MAX_TEACHER_NAME_CHARS",
    "TeacherDict",
    "describe_names",
    "teacher_layer_problem",
    "teacher_name_problem",
]

MAX_TEACHERS = 256
"""Most teachers one model (or one checkpoint record, or one cache) may name."""
MAX_TEACHER_NAME_CHARS = 128
"""Longest accepted teacher name."""


class TeacherDict(nn.ModuleDict):
    """Named teachers that run together: ``forward`` calls each one on the same inputs.

    ``DistillationModel.teacher_model`` is a ``TeacherDict`` when ``teacher_model`` was a dict
    ``{name: teacher}``; its children are the teachers, in the dict's order, so
    ``model.teacher_model["big"]`` and ``get_submodule("big.blocks.11")`` reach them. Passing a
    ``TeacherDict`` as ``teacher_model`` is the same as passing the dict of its items.

    Teacher protocol: ``kd_teacher_names`` lists the names (see ``DistillationModel``).

    Args:
        teachers: ``{name: module}``; names are identifiers (letters, digits, ``_``; no dots).

    Raises:
        ValueError: A name that is not a valid teacher name (see ``teacher_name_problem``).
        TypeError: A value that is not an ``nn.Module``.

    Example:
        >>> import torch
        >>> teachers = TeacherDict({"a": torch.nn.Linear(4, 3), "b": torch.nn.Linear(4, 3)})
        >>> sorted(teachers(torch.randn(2, 4)))
        ['a', 'b']
    """

    def __init__(self, teachers: Mapping[str, nn.Module] | None = None) -> None:
        super().__init__()
        for name, teacher in (teachers or {}).items():
            problem = teacher_name_problem(name)
            if problem is not None:
                raise ValueError(f"Teacher name {name!r} {problem}.")
            if not isinstance(teacher, nn.Module):
                raise TypeError(
                    f"Teacher {name!r} must be an nn.Module, got {type(teacher).__name__}."
                )
            self[name] = teacher

    @property
    def kd_teacher_names(self) -> tuple[str, ...]:
        """The teachers' names, in order."""
        return tuple(self.keys())

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Run every teacher on the same inputs; ``{name: output}`` in order."""
        return {name: teacher(*args, **kwargs) for name, teacher in self.items()}


@functools.cache
def _reserved_names() -> frozenset[str]:
    """Attribute names of a ``TeacherDict``, which ``nn.ModuleDict`` refuses as keys."""
    probe = TeacherDict()
    return frozenset(dir(probe)) | frozenset(vars(probe))


def teacher_name_problem(name: Any) -> str | None:
    """Why ``name`` cannot name a teacher (``None`` if it can).

    A teacher name is a string of at most ``MAX_TEACHER_NAME_CHARS`` characters that is a Python
    identifier (so it holds no dot: the criterion's ``"big.blocks.11"`` splits at the first dot
    into teacher and layer) and is not an attribute of ``TeacherDict`` (``"forward"``,
    ``"keys"``, ``"training"``, ...).
    """
    if not isinstance(name, str):
        return f"must be a string, got {type(name).__name__}"
    if len(name) > MAX_TEACHER_NAME_CHARS:
        return f"is longer than {MAX_TEACHER_NAME_CHARS} characters"
    if "." in name:
        return "holds a dot, which separates teacher and layer in criterion names"
    if not name.isidentifier():
        return "is not a Python identifier (letters, digits and '_', not starting with a digit)"
    if name in _reserved_names():
        return "is an attribute of TeacherDict (like 'forward' or 'keys')"
    return None


def teacher_layer_problem(
    layer: str, names: tuple[str, ...], teacher_names: list[str]
) -> str | None:
    """Why ``layer`` names no layer of several named teachers (``None``: it names one).

    Args:
        layer: A dotted name, ``"<teacher>"`` or ``"<teacher>.<layer>"``.
        names: The teachers' names.
        teacher_names: Every module name of the teachers' container (``named_modules``).

    Returns:
        A message for ``""`` (ambiguous: which teacher?), an unknown teacher (listing the
        teachers) or an unknown layer (listing that teacher's layers); else ``None``.
    """
    if layer == "":
        example = names[0]
        return (
            f"Teacher layer '' (the whole teacher) is ambiguous with several teachers "
            f"{describe_names(names)}: name one teacher ({example!r}), a layer of one "
            f"({example + '.<layer>'!r}), or several as a tuple, e.g. "
            f"('', {tuple(names[:2])!r})."
        )
    head = layer.partition(".")[0]
    if head not in names:
        return unknown_name_message(
            "teacher",
            head,
            names,
            fix=f"In teacher layer {layer!r}: a teacher layer is '<teacher>' or "
            "'<teacher>.<layer>'.",
        )
    if layer not in teacher_names:
        own = [n for n in teacher_names if n == head or n.startswith(head + ".")]
        return unknown_name_message(
            "teacher layer",
            layer,
            own,
            fix=f"It names layer {layer[len(head) + 1 :]!r} of teacher {head!r}.",
        )
    return None


def describe_names(names: Iterable[str]) -> str:
    """``['big', 'expert']`` for messages, cut after 20 names."""
    names = list(names)
    shown = repr(names[:20])
    return shown if len(names) <= 20 else f"{shown[:-1]}, ... ({len(names)} in all)]"
