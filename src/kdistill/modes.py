"""Distillation modes: each is declared once with its name, config class and conversion.

Mirrors ModelOpt 0.47 ``modelopt/torch/distill/mode.py``: ``"kd_loss"`` and ``"layerwise_kd"``
attach a teacher and losses; ``"export_student"`` (the export mode of both) removes them.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ._errors import unknown_name_message
from .config import ExportStudentConfig, KDLossConfig, LayerwiseKDConfig
from .model import DistillationModel, distillation_class

__all__ = ["ModeDescriptor", "get_mode", "list_modes"]


@dataclass(frozen=True)
class ModeDescriptor:
    """A mode: how to validate its config and apply it to a model (in place)."""

    name: str
    config_class: type
    apply: Callable[[nn.Module, Any], nn.Module]
    export_mode: str | None = None


def _submodule_names(module: nn.Module) -> list[str]:
    return [name for name, _ in module.named_modules()]


def _check_layers(student: nn.Module, teacher: nn.Module, config: KDLossConfig) -> None:
    """Raise one ``ValueError`` listing every unknown layer name, saying which side."""
    student_names, teacher_names = _submodule_names(student), _submodule_names(teacher)
    problems = []
    for s_name, t_name in config.criterion:
        if s_name not in student_names:
            problems.append(unknown_name_message("student layer", s_name, student_names))
        if t_name not in teacher_names:
            problems.append(unknown_name_message("teacher layer", t_name, teacher_names))
    if problems:
        raise ValueError("Invalid `criterion`: " + " ".join(problems))


def _apply_kd(model: nn.Module, config: KDLossConfig, layerwise: bool) -> nn.Module:
    """Validate everything against the model, then convert it in place."""
    if isinstance(model, DistillationModel):
        raise RuntimeError(
            f"The model is already a DistillationModel ({type(model).__name__}); export it with "
            "kdistill.export(model) before converting again."
        )
    teacher = config.teacher_spec.build()
    if teacher is model:
        raise ValueError("`teacher_model` is the student itself; pass a separate module.")
    _check_layers(model, teacher, config)
    generated = distillation_class(type(model))  # may raise for exotic classes: before any change
    model.__class__ = generated
    try:
        model.setup_(
            teacher,
            config.criterion,
            config.loss_balancer,
            config.expose_minimal_state_dict,
            layerwise=layerwise,
        )
    except BaseException:
        model.__class__ = generated._kd_student_cls
        raise
    return model


def _apply_export(model: nn.Module, config: ExportStudentConfig) -> nn.Module:
    if not isinstance(model, DistillationModel):
        raise RuntimeError(
            f"export expects a DistillationModel made by kdistill.convert, got "
            f"{type(model).__name__}: there is nothing to export."
        )
    model.teardown_()
    return model


_MODES: dict[str, ModeDescriptor] = {
    mode.name: mode
    for mode in (
        ModeDescriptor(
            "kd_loss", KDLossConfig, lambda m, c: _apply_kd(m, c, False), "export_student"
        ),
        ModeDescriptor(
            "layerwise_kd", LayerwiseKDConfig, lambda m, c: _apply_kd(m, c, True), "export_student"
        ),
        ModeDescriptor("export_student", ExportStudentConfig, _apply_export),
    )
}


def get_mode(name: Any) -> ModeDescriptor:
    """The mode registered under ``name``; unknown names list the valid ones."""
    if not isinstance(name, str) or name not in _MODES:
        raise ValueError(unknown_name_message("mode", str(name), _MODES))
    return _MODES[name]


def list_modes() -> list[str]:
    """Names of every mode, sorted."""
    return sorted(_MODES)
