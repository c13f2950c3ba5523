"""List a model's named submodules with their output shapes, to pick layer pairs for distillation.

``kdistill inspect`` (``kdistill.cli._inspect``) is the command-line front end. The criterion dict
of ``kd_loss`` / ``layerwise_kd`` maps ``(student_layer, teacher_layer)`` names to losses; feature
losses such as MSE need both outputs to have the same shape, which :func:`matching_pairs` lists.

Example:
    >>> import torch
    >>> from kdistill.testing.models import tiny_mlp
    >>> rows = summarize_modules(tiny_mlp(), torch.zeros(1, 16))
    >>> [(row.name, row.output_shape) for row in rows if row.name == "fc1"]
    [('fc1', '[1, 32]')]
"""

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import zip_longest
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "ModuleRow",
    "criterion_key",
    "format_side_by_side",
    "format_summary",
    "matching_pairs",
    "summarize_modules",
]

ROOT_NAME = "(root)"


@dataclass(frozen=True)
class ModuleRow:
    """One named submodule.

    Attributes:
        name: Dotted name for ``get_submodule`` (``""`` is the root).
        type_name: The module's class name.
        output_shape: Its output shape(s) as text, e.g. ``"[1, 32]"``; ``"-"`` if it did not run.
        params: Parameter count, including its children's.
    """

    name: str
    type_name: str
    output_shape: str
    params: int

    @property
    def label(self) -> str:
        """The name to show: ``"(root)"`` for the root module."""
        return self.name or ROOT_NAME


def _shape_text(output: Any) -> str:
    """Shapes of a module output: a tensor, a tuple/list or a mapping of tensors, else its type."""
    if isinstance(output, Tensor):
        return str(list(output.shape))
    if isinstance(output, tuple | list):
        return "(" + ", ".join(_shape_text(item) for item in output) + ")"
    if isinstance(output, dict):  # also Hugging Face ModelOutput, a dict subclass
        return "{" + ", ".join(f"{k}: {_shape_text(v)}" for k, v in output.items()) + "}"
    return type(output).__name__


@torch.no_grad()
def summarize_modules(model: nn.Module, example_input: Tensor) -> list[ModuleRow]:
    """Run one forward on ``example_input`` with hooks and describe every named submodule.

    Args:
        model: Any module; it is put in eval mode and its hooks are removed afterwards.
        example_input: The model's single positional input, e.g. zeros ``[1, 784]``.

    Returns:
        One row per named submodule in ``named_modules()`` order, the root first. A module called
        several times shows each call's shape, joined by ``" | "``.
    """
    shapes: dict[str, list[str]] = {}
    handles = []

    def make_hook(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            shapes.setdefault(name, []).append(_shape_text(output))

        return hook

    modules = list(model.named_modules())
    try:
        for name, module in modules:
            handles.append(module.register_forward_hook(make_hook(name)))
        model.eval()
        model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    return [
        ModuleRow(
            name=name,
            type_name=type(module).__name__,
            output_shape=" | ".join(shapes.get(name, ["-"])),
            params=sum(p.numel() for p in module.parameters()),
        )
        for name, module in modules
    ]


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def format_summary(rows: list[ModuleRow]) -> str:
    """A table with one line per submodule: name, type, output shape, parameters."""
    return _table(
        ("name", "type", "output shape", "params"),
        [(r.label, r.type_name, r.output_shape, f"{r.params:,}") for r in rows],
    )


def matching_pairs(student: list[ModuleRow], teacher: list[ModuleRow]) -> list[tuple[str, str]]:
    """``(student_name, teacher_name)`` pairs whose (single-call, ran) output shapes are equal."""
    return [
        (s.name, t.name)
        for s in student
        if s.output_shape != "-"
        for t in teacher
        if t.output_shape == s.output_shape
    ]


def criterion_key(student_name: str, teacher_name: str) -> str:
    """A pair as a criterion key to paste into a config, e.g. ``("", "head")``.

    ``""`` is the root module: ``criterion_key("", "head")`` returns ``'("", "head")'``.
    """
    return f"({json.dumps(student_name)}, {json.dumps(teacher_name)})"


def format_side_by_side(student: list[ModuleRow], teacher: list[ModuleRow]) -> str:
    """Student and teacher modules side by side (in order), then every pair with equal shapes.

    A row is marked ``=`` when the two modules on it have the same output shape. The pairs are
    printed as criterion keys, ready to paste: ``("fc1", "fc1")``, ``("", "")``.
    """
    empty = ModuleRow("", "", "", 0)
    rows = []
    for s, t in zip_longest(student, teacher, fillvalue=None):
        s_row, t_row = s or empty, t or empty
        same = s is not None and t is not None and s.output_shape == t.output_shape != "-"
        rows.append(
            (
                s_row.label if s else "",
                s_row.output_shape,
                f"{s_row.params:,}" if s else "",
                "=" if same else "",
                t_row.label if t else "",
                t_row.output_shape,
                f"{t_row.params:,}" if t else "",
            )
        )
    header = ("student", "output shape", "params", "", "teacher", "output shape", "params")
    text = _table(header, rows)
    pairs = matching_pairs(student, teacher)
    lines = [
        text,
        "",
        f"pairs with equal output shapes ({len(pairs)}), as criterion keys "
        '(student, teacher); "" is the root:',
    ]
    lines += [f"  {criterion_key(s, t)}" for s, t in pairs] or ["  none"]
    return "\n".join(lines)
