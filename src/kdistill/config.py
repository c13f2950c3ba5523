"""Configs of the distillation modes, validated once at ``convert`` and JSON-able for checkpoints.

Configs are plain dataclasses (torch is kdistill's only dependency). ``from_user`` turns what a user
passes to ``convert`` (a dict or a config) into a validated config and reports every problem at
once; ``to_json`` / ``from_json`` record it in a checkpoint without code or pickles.
"""

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from torch import nn

from ._errors import unknown_name_message
from ._serialization import build_object, check_json_value, describe_object, resolve_factory
from .balancers import BALANCERS, DistillationLossBalancer
from .losses._registry import LOSSES

__all__ = ["ExportStudentConfig", "KDLossConfig", "LayerwiseKDConfig", "TeacherSpec"]

Criterion: TypeAlias = dict[tuple[str, str], nn.Module]


class _ConfigErrors:
    """Collects validation problems and raises them together (one exception, every message)."""

    def __init__(self) -> None:
        self.problems: list[tuple[type[Exception], str]] = []

    def add(self, kind: type[Exception], message: str) -> None:
        self.problems.append((kind, message))

    def raise_if_any(self, prefix: str) -> None:
        if not self.problems:
            return
        if len(self.problems) == 1:
            kind, message = self.problems[0]
            raise kind(f"{prefix}: {message}")
        kinds = {kind for kind, _ in self.problems}
        kind = kinds.pop() if len(kinds) == 1 else ValueError
        lines = "\n".join(f"  - {message}" for _, message in self.problems)
        raise kind(f"{prefix}: {len(self.problems)} problems:\n{lines}")


@dataclass(frozen=True)
class TeacherSpec:
    """How to obtain the teacher: an instance, or a factory called with ``args``/``kwargs``."""

    instance: nn.Module | None = None
    factory: Callable[..., Any] | None = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def build(self) -> nn.Module:
        """Return the instance, or call the factory; a non-module result raises ``TypeError``."""
        if self.instance is not None:
            return self.instance
        assert self.factory is not None, "TeacherSpec holds neither an instance nor a factory"
        teacher = self.factory(*self.args, **self.kwargs)
        if not isinstance(teacher, nn.Module):
            raise TypeError(
                f"`teacher_model` factory {_callable_name(self.factory)} returned "
                f"{type(teacher).__name__}, expected an nn.Module."
            )
        return teacher

    def to_json(self) -> dict:
        """Record the factory by import path and JSON arguments (an instance by class name only)."""
        if self.instance is not None:
            return {"kind": "instance", "class": type(self.instance).__qualname__}
        assert self.factory is not None, "TeacherSpec holds neither an instance nor a factory"
        try:
            args = check_json_value(list(self.args), "Teacher factory arguments")
            kwargs = check_json_value(dict(self.kwargs), "Teacher factory keyword arguments")
        except ValueError as err:
            return {"kind": "unrecorded", "reason": str(err)}
        return {
            "kind": "factory",
            "module": self.factory.__module__,
            "qualname": self.factory.__qualname__,
            "args": args,
            "kwargs": kwargs,
        }

    @classmethod
    def from_json(cls, record: Any) -> "TeacherSpec":
        """Resolve a recorded factory under restore's safety rule (see ``resolve_factory``)."""
        if not isinstance(record, dict) or "kind" not in record:
            raise ValueError(f"Malformed teacher record {record!r}.")
        if record["kind"] == "instance":
            raise ValueError(
                f"The teacher was an instance of {record.get('class')!r} when saved, so it cannot "
                "be rebuilt from the checkpoint. Pass it: restore(model, f, teacher_model=teacher)."
            )
        if record["kind"] == "unrecorded":
            raise ValueError(
                "The teacher factory's arguments could not be saved "
                f"({record.get('reason')}). Pass it: restore(model, f, teacher_model=...)."
            )
        args, kwargs = record.get("args", []), record.get("kwargs", {})
        if (
            record["kind"] != "factory"
            or not isinstance(args, list)
            or not isinstance(kwargs, dict)
        ):
            raise ValueError(f"Malformed teacher record {record!r}.")
        factory = resolve_factory(record.get("module"), record.get("qualname"))
        return cls(factory=factory, args=tuple(args), kwargs=dict(kwargs))


def _callable_name(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _parse_teacher(value: Any, errors: _ConfigErrors) -> TeacherSpec | None:
    if value is None:
        errors.add(
            ValueError, "missing required field `teacher_model` (a module, class or factory)."
        )
        return None
    if isinstance(value, TeacherSpec):
        return value
    if isinstance(value, nn.Module):
        return TeacherSpec(instance=value)
    factory, args, kwargs = value, (), {}
    if isinstance(value, tuple):
        if not 1 <= len(value) <= 3:
            errors.add(
                TypeError,
                f"`teacher_model` tuple must be (fn,), (fn, args) or (fn, args, kwargs), got "
                f"{len(value)} elements.",
            )
            return None
        factory = value[0]
        args = value[1] if len(value) > 1 else ()
        kwargs = value[2] if len(value) > 2 else {}
        if not isinstance(args, tuple | list) or not isinstance(kwargs, Mapping):
            errors.add(
                TypeError,
                f"`teacher_model` tuple must hold (fn, args: tuple|list, kwargs: dict), got "
                f"args={type(args).__name__}, kwargs={type(kwargs).__name__}.",
            )
            return None
    if not callable(factory):
        errors.add(
            TypeError,
            f"`teacher_model` must be an nn.Module, a class, a callable or a (fn, args, kwargs) "
            f"tuple, got {type(factory).__name__}.",
        )
        return None
    qualname = getattr(factory, "__qualname__", "")
    if getattr(factory, "__name__", "") == "<lambda>" or "<locals>" in qualname:
        kind = "a lambda" if getattr(factory, "__name__", "") == "<lambda>" else "a local function"
        errors.add(
            ValueError,
            f"`teacher_model` is {kind} ({qualname}). The teacher is rebuilt from this callable "
            "when a checkpoint is restored, so it must be importable by name: define it at module "
            "level, or pass an nn.Module instance.",
        )
        return None
    return TeacherSpec(factory=factory, args=tuple(args), kwargs=dict(kwargs))


def _parse_criterion(value: Any, errors: _ConfigErrors) -> Criterion | None:
    if value is None:
        errors.add(ValueError, "missing required field `criterion` (a loss or {(s, t): loss}).")
        return None
    if isinstance(value, nn.Module):
        return {("", ""): value}
    if not isinstance(value, Mapping):
        errors.add(
            TypeError,
            f"`criterion` must be an nn.Module loss or a dict {{(student_layer, teacher_layer): "
            f"loss}}, got {type(value).__name__}.",
        )
        return None
    if not value:
        errors.add(ValueError, "`criterion` is empty: give at least one (student, teacher) pair.")
        return None
    criterion: Criterion = {}
    for key, loss in value.items():
        if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, str) for k in key)):
            errors.add(
                TypeError,
                f"`criterion` key {key!r} must be a (student_layer, teacher_layer) tuple of "
                "strings ('' is the whole model).",
            )
            continue
        if not isinstance(loss, nn.Module):
            hint = " Instantiate it: pass Loss(), not Loss." if isinstance(loss, type) else ""
            errors.add(
                TypeError,
                f"`criterion` value for {key!r} must be an nn.Module loss, got "
                f"{type(loss).__name__}.{hint}",
            )
            continue
        criterion[key] = loss
    return criterion


def _check_balancer(balancer: Any, num_pairs: int | None, errors: _ConfigErrors) -> None:
    if balancer is None:
        if num_pairs is not None and num_pairs > 1:
            errors.add(
                ValueError,
                f"`criterion` has {num_pairs} loss pairs but `loss_balancer` is None: pass a "
                "balancer (e.g. StaticLossBalancer(kd_loss_weight=[...])) to combine them.",
            )
        return
    if not isinstance(balancer, DistillationLossBalancer):
        errors.add(
            TypeError,
            f"`loss_balancer` must be a DistillationLossBalancer instance or None, got "
            f"{type(balancer).__name__}.",
        )
        return
    if any(True for _ in balancer.parameters()):
        errors.add(
            ValueError,
            f"`loss_balancer` {type(balancer).__name__} has parameters; balancers may not hold "
            "parameters (put learnable parts in a loss instead).",
        )
    num_weights = getattr(balancer, "num_weights", None)
    if num_weights is not None and num_pairs is not None and num_weights != num_pairs:
        errors.add(
            ValueError,
            f"`loss_balancer` {type(balancer).__name__} has {num_weights} weight(s) but "
            f"`criterion` has {num_pairs} loss pair(s): give one weight per pair.",
        )


@dataclass
class KDLossConfig:
    """Config of the ``"kd_loss"`` mode (SPEC §1).

    Fields are validated by ``from_user``; the required ones (``teacher_model``, ``criterion``)
    default to ``None`` so that a missing one is reported by name.
    """

    teacher_model: Any = field(
        default=None,
        metadata={
            "description": "nn.Module, class, zero-argument callable, or (fn, args, kwargs)."
        },
    )
    criterion: Any = field(
        default=None,
        metadata={
            "description": "A loss (output to output) or {(student_layer, teacher_layer): loss}."
        },
    )
    loss_balancer: Any = field(
        default=None,
        metadata={"description": "A DistillationLossBalancer, or None for a single loss pair."},
    )
    expose_minimal_state_dict: bool = field(
        default=True, metadata={"description": "Hide the teacher's weights from state_dict()."}
    )

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of the accepted config keys."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_user(cls, value: Any, mode: str) -> "KDLossConfig":
        """Validate a dict or config instance, reporting every problem in one exception."""
        if isinstance(value, KDLossConfig):
            value = {name: getattr(value, name) for name in KDLossConfig.field_names()}
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise TypeError(
                f"Config of mode {mode!r} must be a dict or {cls.__name__}, got "
                f"{type(value).__name__}."
            )
        errors = _ConfigErrors()
        for key in value:
            if key not in cls.field_names():
                errors.add(
                    ValueError, unknown_name_message("config key", str(key), cls.field_names())
                )
        teacher = _parse_teacher(value.get("teacher_model"), errors)
        criterion = _parse_criterion(value.get("criterion"), errors)
        balancer = value.get("loss_balancer")
        _check_balancer(balancer, len(criterion) if criterion else None, errors)
        expose = value.get("expose_minimal_state_dict", True)
        if not isinstance(expose, bool):
            errors.add(
                TypeError,
                f"`expose_minimal_state_dict` must be a bool, got {type(expose).__name__}.",
            )
        errors.raise_if_any(f"Invalid config for mode {mode!r}")
        return cls(
            teacher_model=teacher,
            criterion=criterion,
            loss_balancer=balancer,
            expose_minimal_state_dict=expose,
        )

    @property
    def teacher_spec(self) -> TeacherSpec:
        """The validated teacher (``teacher_model`` after ``from_user``)."""
        return self.teacher_model

    def to_json(self) -> dict:
        """A JSON-able record: teacher by reference, losses and balancer by registered name."""
        return {
            "teacher_model": self.teacher_spec.to_json(),
            "criterion": [
                {
                    "student_layer": s,
                    "teacher_layer": t,
                    "loss": describe_object(loss, LOSSES, allow_torch_losses=True),
                }
                for (s, t), loss in self.criterion.items()
            ],
            "loss_balancer": None
            if self.loss_balancer is None
            else describe_object(self.loss_balancer, BALANCERS),
            "expose_minimal_state_dict": self.expose_minimal_state_dict,
        }

    @classmethod
    def from_json(cls, record: Any, mode: str, teacher_model: Any = None) -> "KDLossConfig":
        """Rebuild a config from ``to_json`` output; ``teacher_model`` overrides the record."""
        expected = {"teacher_model", "criterion", "loss_balancer", "expose_minimal_state_dict"}
        if not isinstance(record, dict) or set(record) != expected:
            raise ValueError(f"Malformed {mode!r} config record: expected keys {sorted(expected)}.")
        if not isinstance(record["criterion"], list):
            raise ValueError(f"Malformed {mode!r} config record: `criterion` must be a list.")
        criterion = {}
        for item in record["criterion"]:
            if not isinstance(item, dict) or set(item) != {
                "student_layer",
                "teacher_layer",
                "loss",
            }:
                raise ValueError(f"Malformed criterion entry {item!r}.")
            key = (item["student_layer"], item["teacher_layer"])
            criterion[key] = build_object(item["loss"], LOSSES, allow_torch_losses=True)
        balancer = (
            None
            if record["loss_balancer"] is None
            else build_object(record["loss_balancer"], BALANCERS)
        )
        teacher = (
            teacher_model
            if teacher_model is not None
            else TeacherSpec.from_json(record["teacher_model"])
        )
        if isinstance(teacher, TeacherSpec):
            teacher = (teacher.factory, teacher.args, teacher.kwargs)
        return cls.from_user(
            {
                "teacher_model": teacher,
                "criterion": criterion,
                "loss_balancer": balancer,
                "expose_minimal_state_dict": record["expose_minimal_state_dict"],
            },
            mode,
        )


@dataclass
class LayerwiseKDConfig(KDLossConfig):
    """Config of the ``"layerwise_kd"`` mode: same fields as ``KDLossConfig``.

    Each paired student layer receives its teacher layer's *input*, and only the paired student
    layers are trained (all other student parameters are frozen until ``export``).
    """


@dataclass
class ExportStudentConfig:
    """Config of the ``"export_student"`` mode (no fields)."""

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of the accepted config keys (none)."""
        return []

    @classmethod
    def from_user(cls, value: Any, mode: str) -> "ExportStudentConfig":
        """Accept ``None``, ``{}`` or an instance."""
        if value is None or isinstance(value, cls) or value == {}:
            return cls()
        if isinstance(value, Mapping):
            raise ValueError(f"Mode {mode!r} takes no config keys, got {sorted(map(str, value))}.")
        raise TypeError(
            f"Config of mode {mode!r} must be a dict or None, got {type(value).__name__}."
        )

    def to_json(self) -> dict:
        """No fields: an empty record."""
        return {}

    @classmethod
    def from_json(cls, record: Any, mode: str, teacher_model: Any = None) -> "ExportStudentConfig":
        """Rebuild from an empty record."""
        return cls.from_user(record, mode)
