"""Distillation modes: each is declared once with its name, config class and conversion.

Mirrors ModelOpt 0.47 ``modelopt/torch/distill/mode.py``: ``"kd_loss"`` and ``"layerwise_kd"``
attach a teacher and losses; ``"export_student"`` (what ``export`` applies) removes them.
"""

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from torch import nn

from ._errors import unknown_name_message
from .config import ExportStudentConfig, KDLossConfig, LayerwiseKDConfig
from .model import DistillationModel, distillation_class

__all__ = ["ModeDescriptor", "get_mode", "list_modes"]


@dataclass(frozen=True)
class ModeDescriptor:
    """A mode: how to validate its config and apply it to a model (in place).

    Attributes:
        name: The mode's name in ``convert(model, mode=[(name, config)])``.
        config_class: Validates the user's config (``from_user``).
        apply: Applies a validated config to a model, in place; all-or-nothing.
        converts: Whether the mode makes a ``DistillationModel`` (``False``: it exports one).
    """

    name: str
    config_class: type[KDLossConfig] | type[ExportStudentConfig]
    apply: Callable[[nn.Module, Any], nn.Module]
    converts: bool


def _apply_kd(model: nn.Module, config: KDLossConfig, mode: str, layerwise: bool) -> nn.Module:
    """Convert ``model`` in place with a config validated against it (``from_user(student=)``)."""
    if isinstance(model, DistillationModel):
        raise RuntimeError(
            f"The model is already a DistillationModel ({type(model).__name__}); export it with "
            "kdistill.export(model) before converting again."
        )
    teacher = config.teacher_spec.build()  # the instance from_user built
    generated = distillation_class(type(model))  # may raise for exotic classes: before any change
    recorded = dataclasses.replace(config, teacher_model=config.teacher_spec.recorded_only())
    model.__class__ = generated
    try:
        cast(DistillationModel, model).setup_(
            teacher,
            config.criterion,
            config.loss_balancer,
            config.expose_minimal_state_dict,
            layerwise=layerwise,
            mode=(mode, recorded),
        )
    except BaseException:
        model.__class__ = generated.original_cls
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
            "kd_loss", KDLossConfig, lambda m, c: _apply_kd(m, c, "kd_loss", False), True
        ),
        ModeDescriptor(
            "layerwise_kd",
            LayerwiseKDConfig,
            lambda m, c: _apply_kd(m, c, "layerwise_kd", True),
            True,
        ),
        ModeDescriptor("export_student", ExportStudentConfig, _apply_export, False),
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
