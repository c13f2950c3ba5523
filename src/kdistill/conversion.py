"""``convert`` and ``export``: the entry points of ``modelopt.torch.distill``."""

from collections.abc import Mapping
from typing import Any

from torch import nn

from .config import ExportStudentConfig, KDLossConfig
from .model import DistillationModel
from .modes import get_mode

__all__ = ["convert", "export", "normalize_modes"]


def normalize_modes(mode: Any) -> list[tuple[str, Any]]:
    """Accept ``[("kd_loss", cfg)]``, ``("kd_loss", cfg)``, ``{"kd_loss": cfg}`` or ``"name"``.

    Returns:
        A list of ``(mode_name, raw_config)``; names are checked against the mode registry.
    """
    if isinstance(mode, str):
        items: list[Any] = [(mode, None)]
    elif isinstance(mode, Mapping):
        items = list(mode.items())
    elif isinstance(mode, tuple) and len(mode) == 2 and isinstance(mode[0], str):
        items = [mode]
    elif isinstance(mode, list | tuple):
        items = [(m, None) if isinstance(m, str) else m for m in mode]
    else:
        raise TypeError(
            f"`mode` must be a mode name, a (name, config) tuple, a list of them or a dict, got "
            f"{type(mode).__name__}. Example: mode=[('kd_loss', config)]."
        )
    if not items:
        raise ValueError("`mode` is empty: give at least one mode, e.g. [('kd_loss', config)].")
    result = []
    for item in items:
        if not (isinstance(item, tuple | list) and len(item) == 2):
            raise TypeError(f"Each mode must be a (name, config) pair or a name, got {item!r}.")
        get_mode(item[0])  # unknown names raise here, before anything changes
        result.append((item[0], item[1]))
    return result


def convert(model: nn.Module, mode: Any) -> nn.Module:
    """Convert ``model`` for distillation, **in place**, and return the same object.

    The model's class becomes a generated subclass of both ``DistillationModel`` and its own
    class, so ``isinstance(model, StudentCls)`` keeps holding. Everything is validated before
    anything changes (config keys, types, the balancer and the layer names of both models, all
    reported in one error): a failed ``convert`` leaves the model exactly as it was (class,
    weights, hooks, ``requires_grad`` and train/eval flags).

    Args:
        model: The student.
        mode: ``[("kd_loss", config)]`` (also ``("kd_loss", config)``, ``{"kd_loss": config}``,
            or a mode name alone when its config has only defaults). Modes: ``"kd_loss"``,
            ``"layerwise_kd"``, ``"export_student"``; one mode per call.

    Returns:
        ``model``, now a ``DistillationModel`` (or, for ``"export_student"``, the plain student).

    Raises:
        ValueError: Unknown mode / config key / layer name, missing field, bad weights, or more
            than one mode in one call.
        TypeError: A value of the wrong type (e.g. a criterion that is not an ``nn.Module``).
        RuntimeError: The model is already converted.

    Example:
        >>> import torch, kdistill as mtd
        >>> student, teacher = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
        >>> model = mtd.convert(student, mode=[("kd_loss", {
        ...     "teacher_model": teacher, "criterion": mtd.LogitsDistillationLoss()})])
        >>> isinstance(model, torch.nn.Linear) and isinstance(model, mtd.DistillationModel)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}.")
    modes = normalize_modes(mode)
    names = [name for name, _ in modes]
    if len(modes) > 1:
        twice = sorted({name for name in names if names.count(name) > 1})
        detail = f" ({twice} listed twice)" if twice else ""
        raise ValueError(
            f"`mode` lists {len(modes)} modes {names}{detail}, but convert applies one mode per "
            "call and a model holds one distillation mode: give one, e.g. [('kd_loss', config)]."
        )
    ((name, raw),) = modes
    descriptor = get_mode(name)
    if descriptor.converts and isinstance(model, DistillationModel):
        raise RuntimeError(
            f"The model is already a DistillationModel ({type(model).__name__}); export it "
            "with kdistill.export(model) before converting again."
        )
    config_class = descriptor.config_class
    config: KDLossConfig | ExportStudentConfig
    if issubclass(config_class, KDLossConfig):  # the converting modes: checked against the model
        config = config_class.from_user(raw, name, student=model)
    else:
        config = config_class.from_user(raw, name)
    return descriptor.apply(model, config)


def export(model: nn.Module) -> nn.Module:
    """Return the plain student: hooks, teacher, loss modules and temporary state removed.

    Works in place and returns the same object, now an instance of the student's own class.
    The flags ``convert`` changed are restored: the teacher's ``requires_grad`` and train/eval
    flags, and (``layerwise_kd``) the student parameters it froze.

    Raises:
        RuntimeError: ``model`` is not a DistillationModel.
    """
    return get_mode("export_student").apply(model, ExportStudentConfig())
