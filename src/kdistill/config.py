"""Configs of the distillation modes, validated once at ``convert`` and JSON-able for checkpoints.

Configs are plain dataclasses (torch is kdistill's only dependency). ``from_user`` turns what a user
passes to ``convert`` (a dict or a config) into a validated config and reports every problem at
once (unknown keys, wrong types, balancer problems and unknown layer names together); ``to_json``
records it in a checkpoint without code or pickles, and ``KDLossRecord`` reads such a record back
from an untrusted file without building or calling anything.

Several teachers: ``teacher_model={"big": ..., "expert": ...}`` becomes a ``TeacherDictSpec`` (one
``TeacherSpec`` per name, each recorded as a single teacher is), built into a ``TeacherDict``; a
criterion key's teacher side is then ``"big"``, ``"big.blocks.11"`` or a tuple of such names.
"""

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeAlias, cast

from torch import nn

from ._errors import unknown_name_message
from ._serialization import (
    build_object,
    check_json_value,
    describe_object,
    factory_name,
    lookup_safe_factory,
    short_repr,
)
from .balancers import BALANCERS, DistillationLossBalancer
from .losses._registry import LOSSES
from .teachers import (
    MAX_TEACHERS,
    TeacherDict,
    describe_names,
    teacher_layer_problem,
    teacher_name_problem,
)

__all__ = [
    "Criterion",
    "ExportStudentConfig",
    "KDLossConfig",
    "KDLossRecord",
    "LayerwiseKDConfig",
    "TeacherDictSpec",
    "TeacherSide",
    "TeacherSpec",
    "malformed",
]

TeacherSide: TypeAlias = str | tuple[str, ...]
"""A criterion key's teacher side: one teacher layer name, or a tuple of them."""
Criterion: TypeAlias = dict[tuple[str, TeacherSide], nn.Module]

_RESAVE = (
    "The file was not written by kdistill.save, or was edited: re-save the model with "
    "kdistill.save."
)


def malformed(what: str) -> ValueError:
    """The error for a record that ``to_json`` cannot have written."""
    return ValueError(f"malformed {what}. {_RESAVE}")


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
    """How to obtain the teacher, and how a checkpoint records it.

    Exactly one of ``instance`` (used as is) or ``factory`` (called with ``args``/``kwargs``) is
    set, except in the copy a converted model keeps for ``save`` (``recorded_only``), which holds
    only ``record``: converted models then never keep the user's factory (a lambda or a local
    function would make them unpicklable).
    """

    instance: nn.Module | None = None
    factory: Callable[..., Any] | None = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    record: dict | None = None

    def build(self, field_name: str = "`teacher_model`") -> nn.Module:
        """Return the instance, or call the factory; a non-module result raises ``TypeError``.

        Args:
            field_name: How messages name the teacher (e.g. ``"`teacher_model['big']`"``).
        """
        if self.instance is not None:
            return self.instance
        if self.factory is None:
            raise RuntimeError("This TeacherSpec only records a teacher; it cannot build one.")
        teacher = self.factory(*self.args, **self.kwargs)
        if not isinstance(teacher, nn.Module):
            raise TypeError(
                f"{field_name} factory {_callable_name(self.factory)} returned "
                f"{type(teacher).__name__}, expected an nn.Module."
            )
        return teacher

    def to_json(self) -> dict:
        """The checkpoint record; never raises.

        A factory with a module-level name and JSON arguments is recorded by name
        (``{"kind": "factory", "module", "qualname", "args", "kwargs"}``); an instance by its
        class name; anything else (lambda, local function, partial, non-JSON arguments) as
        ``{"kind": "unrecorded", "reason": ...}``: the teacher must then be passed at restore.
        """
        if self.record is not None:
            return self.record
        if self.instance is not None:
            return {"kind": "instance", "class": type(self.instance).__qualname__}
        name = factory_name(self.factory)
        if name is None:
            return {
                "kind": "unrecorded",
                "reason": f"the factory {self.factory!r} has no module-level name",
            }
        try:
            args = check_json_value(list(self.args), "Teacher factory arguments")
            kwargs = check_json_value(dict(self.kwargs), "Teacher factory keyword arguments")
        except ValueError as err:
            return {"kind": "unrecorded", "reason": str(err)}
        module, _, qualname = name.partition(":")
        return {
            "kind": "factory",
            "module": module,
            "qualname": qualname,
            "args": args,
            "kwargs": kwargs,
        }

    def recorded_only(self) -> "TeacherSpec":
        """A spec holding only this one's checkpoint record."""
        return TeacherSpec(record=self.to_json())

    def with_built(self, teacher: nn.Module) -> "TeacherSpec":
        """A spec of the built ``teacher`` that keeps this one's checkpoint record."""
        return TeacherSpec(instance=teacher, record=self.to_json())


@dataclass(frozen=True)
class TeacherDictSpec:
    """Several named teachers (``teacher_model={name: teacher}``), each a ``TeacherSpec``.

    ``build`` gives a ``TeacherDict`` (the ``container`` when there is one: a ``TeacherDict``
    passed by the user, or the one ``from_user`` built). The checkpoint record is
    ``{"kind": "dict", "teachers": {name: <the single-teacher record>}}``.
    """

    teachers: dict[str, TeacherSpec]
    container: TeacherDict | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """The teachers' names, in order."""
        return tuple(self.teachers)

    def build(self) -> TeacherDict:
        """Return the container, or build each teacher (factories called in order)."""
        if self.container is not None:
            return self.container
        return TeacherDict(
            {name: spec.build(f"`teacher_model[{name!r}]`") for name, spec in self.teachers.items()}
        )

    def to_json(self) -> dict:
        """The checkpoint record; never raises."""
        return {
            "kind": "dict",
            "teachers": {name: spec.to_json() for name, spec in self.teachers.items()},
        }

    def recorded_only(self) -> "TeacherDictSpec":
        """A spec holding only the checkpoint records."""
        return TeacherDictSpec({name: spec.recorded_only() for name, spec in self.teachers.items()})

    def with_built(self, teachers: TeacherDict) -> "TeacherDictSpec":
        """A spec of the built ``teachers`` that keeps the checkpoint records."""
        return TeacherDictSpec(
            {name: spec.with_built(teachers[name]) for name, spec in self.teachers.items()},
            container=teachers,
        )


def _callable_name(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _parse_teacher(
    value: Any, errors: _ConfigErrors, field_name: str = "`teacher_model`"
) -> TeacherSpec | None:
    """One teacher: an instance, a class or callable, or a ``(fn, args, kwargs)`` tuple."""
    if isinstance(value, TeacherSpec):
        return value
    if isinstance(value, nn.Module):
        return TeacherSpec(instance=value)
    factory, args = value, ()
    kwargs: dict[str, Any] = {}
    if isinstance(value, tuple):
        if not 1 <= len(value) <= 3:
            errors.add(
                TypeError,
                f"{field_name} tuple must be (fn,), (fn, args) or (fn, args, kwargs), got "
                f"{len(value)} elements.",
            )
            return None
        factory = value[0]
        args = value[1] if len(value) > 1 else ()
        kwargs = value[2] if len(value) > 2 else {}
        if not isinstance(args, tuple | list) or not isinstance(kwargs, Mapping):
            errors.add(
                TypeError,
                f"{field_name} tuple must hold (fn, args: tuple|list, kwargs: dict), got "
                f"args={type(args).__name__}, kwargs={type(kwargs).__name__}.",
            )
            return None
    if not callable(factory):
        errors.add(
            TypeError,
            f"{field_name} must be an nn.Module, a class, a callable or a (fn, args, kwargs) "
            f"tuple, got {type(factory).__name__}.",
        )
        return None
    return TeacherSpec(factory=factory, args=tuple(args), kwargs=dict(kwargs))


def _parse_teachers(value: Any, errors: _ConfigErrors) -> TeacherSpec | TeacherDictSpec | None:
    """``teacher_model``: one teacher, or a dict / ``TeacherDict`` of named teachers."""
    if value is None:
        errors.add(
            ValueError,
            "missing required field `teacher_model` (a module, class or factory, or a dict "
            "{name: teacher} of several).",
        )
        return None
    if isinstance(value, TeacherSpec | TeacherDictSpec):
        return value
    container = value if isinstance(value, TeacherDict) else None
    if container is None and not isinstance(value, Mapping):
        return _parse_teacher(value, errors)
    items = list(value.items())
    if not items:
        errors.add(
            ValueError,
            "`teacher_model` is an empty dict: give at least one teacher, e.g. "
            "{'big': big_teacher}.",
        )
        return None
    if len(items) > MAX_TEACHERS:
        errors.add(
            ValueError,
            f"`teacher_model` names {len(items)} teachers; at most {MAX_TEACHERS} are supported.",
        )
        return None
    teachers: dict[str, TeacherSpec] = {}
    for name, teacher in items:
        problem = teacher_name_problem(name)
        if problem is not None:
            kind = TypeError if not isinstance(name, str) else ValueError
            errors.add(
                kind,
                f"`teacher_model` name {short_repr(name)} {problem}: name each teacher with an "
                "identifier such as 'big' or 'expert_1'.",
            )
            continue
        field_name = f"`teacher_model[{name!r}]`"
        if teacher is None or isinstance(teacher, Mapping | TeacherDict | TeacherDictSpec):
            what = "None" if teacher is None else "a dict of teachers (dicts do not nest)"
            errors.add(
                TypeError,
                f"{field_name} is {what}: each teacher must be an nn.Module, a class, a callable "
                "or a (fn, args, kwargs) tuple.",
            )
            continue
        spec = _parse_teacher(teacher, errors, field_name)
        if spec is not None:
            teachers[name] = spec
    if len(teachers) != len(items):
        return None
    return TeacherDictSpec(teachers, container=container)


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
        if not (
            isinstance(key, tuple)
            and len(key) == 2
            and isinstance(key[0], str)
            and (isinstance(key[1], str) or _is_layer_tuple(key[1]))
        ):
            errors.add(
                TypeError,
                f"`criterion` key {short_repr(key)} must be a (student_layer, teacher_layer) tuple "
                "of strings ('' is the whole model); teacher_layer may also be a non-empty tuple "
                "of teacher layer names, e.g. ('', ('big', 'expert')).",
            )
            continue
        if isinstance(key[1], tuple) and len(set(key[1])) != len(key[1]):
            errors.add(
                ValueError,
                f"`criterion` key {key!r} names a teacher layer twice; list each once (use the "
                "loss's weights to weigh a teacher more).",
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


def _is_layer_tuple(value: Any) -> bool:
    """A non-empty tuple of layer names (at most ``MAX_TEACHERS`` of them)."""
    return (
        isinstance(value, tuple)
        and 1 <= len(value) <= MAX_TEACHERS
        and all(isinstance(v, str) for v in value)
    )


def _teacher_layers(side: TeacherSide) -> tuple[str, ...]:
    """The teacher layer names of a criterion key's teacher side."""
    return (side,) if isinstance(side, str) else side


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


def _kd_teacher_names(teacher: nn.Module) -> tuple[str, ...] | None:
    """The teacher protocol's ``kd_teacher_names`` (several named teachers), or ``None``."""
    names = getattr(teacher, "kd_teacher_names", None)
    if isinstance(names, tuple) and names and all(isinstance(n, str) for n in names):
        return names
    return None


def _check_layers(
    student: nn.Module, teacher: nn.Module, criterion: Criterion, errors: _ConfigErrors
) -> None:
    """Add one problem per unknown layer name, saying which side (and teacher), with matches."""
    student_names = [name for name, _ in student.named_modules()]
    teacher_names = [name for name, _ in teacher.named_modules()]
    known_student, known_teacher = set(student_names), set(teacher_names)
    names = _kd_teacher_names(teacher)
    for s_name, t_side in criterion:
        if s_name not in known_student:
            errors.add(ValueError, unknown_name_message("student layer", s_name, student_names))
        for t_name in _teacher_layers(t_side):
            if names is not None:
                problem = teacher_layer_problem(t_name, names, teacher_names)
                if problem is not None:
                    errors.add(ValueError, problem)
            elif t_name not in known_teacher:
                errors.add(ValueError, unknown_name_message("teacher layer", t_name, teacher_names))


def _check_built_teachers(student: nn.Module, teachers: TeacherDict, errors: _ConfigErrors) -> None:
    """Each named teacher is its own module, and none is the student."""
    seen: dict[int, str] = {}
    for name, teacher in teachers.items():
        if teacher is student:
            errors.add(
                ValueError,
                f"`teacher_model[{name!r}]` is the student itself; pass a separate module.",
            )
        elif id(teacher) in seen:
            errors.add(
                ValueError,
                f"`teacher_model[{name!r}]` and `teacher_model[{seen[id(teacher)]!r}]` are the "
                "same module; give each name its own teacher.",
            )
        seen.setdefault(id(teacher), name)


@dataclass
class KDLossConfig:
    """Config of the ``"kd_loss"`` mode (SPEC §1).

    Fields are validated by ``from_user``; the required ones (``teacher_model``, ``criterion``)
    default to ``None`` so that a missing one is reported by name.

    Attributes:
        teacher_model: An nn.Module, a class, any callable, or ``(fn, args, kwargs)``, or a dict
            ``{name: any of these}`` of several named teachers; after ``from_user``, a
            ``TeacherSpec`` (a ``TeacherDictSpec`` for a dict).
        criterion: A loss (output to output) or ``{(student_layer, teacher_layer): loss}``;
            ``teacher_layer`` may be a tuple of teacher layer names (the loss then gets a tuple
            of their outputs).
        loss_balancer: A ``DistillationLossBalancer``, or ``None`` for a single loss pair.
        expose_minimal_state_dict: Hide the teacher's weights from ``state_dict()``.
    """

    teacher_model: Any = None
    criterion: Any = None
    loss_balancer: Any = None
    expose_minimal_state_dict: bool = True
    # layerwise_kd feeds each paired teacher layer's inputs to its student layer
    feeds_teacher_inputs: ClassVar[bool] = False

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of the accepted config keys."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_user(cls, value: Any, mode: str, student: nn.Module | None = None) -> "KDLossConfig":
        """Validate a dict or config instance, reporting every problem in one exception.

        Args:
            value: The config given to ``convert``.
            mode: The mode name (for messages).
            student: When given, the teacher is built (its factory called) and the criterion's
                layer names are checked against both models too; the returned config then holds
                the built teacher.

        Raises:
            ValueError: Unknown keys or layer names, missing fields, bad balancer weights (all
                problems together; ``TypeError`` when every problem is a wrong type).
        """
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
        teacher = _parse_teachers(value.get("teacher_model"), errors)
        criterion = _parse_criterion(value.get("criterion"), errors)
        if criterion and cls.feeds_teacher_inputs:
            for key in criterion:
                if isinstance(key[1], tuple):
                    errors.add(
                        ValueError,
                        f"`criterion` key {key!r}: {mode!r} feeds one teacher layer's input to "
                        "each student layer, so the teacher side must be one layer name, not a "
                        "tuple.",
                    )
        balancer = value.get("loss_balancer")
        _check_balancer(balancer, len(criterion) if criterion else None, errors)
        expose = value.get("expose_minimal_state_dict", True)
        if not isinstance(expose, bool):
            errors.add(
                TypeError,
                f"`expose_minimal_state_dict` must be a bool, got {type(expose).__name__}.",
            )
        if student is not None and teacher is not None and criterion:
            built = teacher.build()  # an exception raised by the factory propagates as is
            if built is student:
                errors.add(
                    ValueError, "`teacher_model` is the student itself; pass a separate module."
                )
            else:
                if isinstance(built, TeacherDict):
                    _check_built_teachers(student, built, errors)
                _check_layers(student, built, criterion, errors)
            # a TeacherDictSpec builds a TeacherDict, a TeacherSpec a module: each gets its own
            teacher = teacher.with_built(built)  # type: ignore[arg-type]
        errors.raise_if_any(f"Invalid config for mode {mode!r}")
        return cls(
            teacher_model=teacher,
            criterion=criterion,
            loss_balancer=balancer,
            expose_minimal_state_dict=expose,
        )

    @property
    def teacher_spec(self) -> TeacherSpec | TeacherDictSpec:
        """The validated teacher(s) (``teacher_model`` after ``from_user``)."""
        return self.teacher_model

    def to_json(self) -> dict:
        """A JSON-able record: teacher by reference, losses and balancer by registered name.

        Raises:
            ValueError: A loss or balancer that is not registered (a checkpoint can only name
                registered classes).
        """
        return {
            "teacher_model": self.teacher_spec.to_json(),
            "criterion": [
                {
                    "student_layer": s,
                    "teacher_layer": t if isinstance(t, str) else list(t),
                    "loss": describe_object(loss, LOSSES, allow_torch_losses=True),
                }
                for (s, t), loss in self.criterion.items()
            ],
            "loss_balancer": None
            if self.loss_balancer is None
            else describe_object(self.loss_balancer, BALANCERS),
            "expose_minimal_state_dict": self.expose_minimal_state_dict,
        }


@dataclass
class LayerwiseKDConfig(KDLossConfig):
    """Config of the ``"layerwise_kd"`` mode: same fields as ``KDLossConfig``.

    Each paired student layer receives its teacher layer's *input*, and only the paired student
    layers are trained (all other student parameters are frozen until ``export``). A criterion
    key's teacher side is therefore one layer name (never a tuple).
    """

    feeds_teacher_inputs: ClassVar[bool] = True


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


_KD_KEYS = frozenset({"teacher_model", "criterion", "loss_balancer", "expose_minimal_state_dict"})
_PAIR_KEYS = frozenset({"student_layer", "teacher_layer", "loss"})


@dataclass(frozen=True)
class KDLossRecord:
    """A ``kd_loss`` / ``layerwise_kd`` config read back from a checkpoint: checked, not built.

    ``parse`` checks the structure only (the record must already have passed
    ``check_record``); nothing is built, imported or called until the caller asks:
    ``build_losses`` (on the ``meta`` device first, to compare shapes), ``build_balancer`` and
    ``teacher_for_restore``.
    """

    mode: str
    pairs: tuple[tuple[str, TeacherSide, dict], ...]
    balancer: dict | None
    expose_minimal_state_dict: bool
    teacher: dict

    @classmethod
    def parse(cls, record: Any, mode: str) -> "KDLossRecord":
        """Check a ``KDLossConfig.to_json`` record's structure.

        Raises:
            ValueError: Any key, type or value that ``to_json`` cannot have written.
        """
        if not isinstance(record, dict) or set(record) != _KD_KEYS:
            raise malformed(f"{mode!r} config record: expected the keys {sorted(_KD_KEYS)}")
        items = record["criterion"]
        if not isinstance(items, list) or not items:
            raise malformed(f"{mode!r} config record: `criterion` must be a non-empty list")
        pairs, seen = [], set()
        for i, item in enumerate(items):
            if not (
                isinstance(item, dict)
                and set(item) == _PAIR_KEYS
                and isinstance(item["student_layer"], str)
                and isinstance(item["loss"], dict)
            ):
                raise malformed(f"criterion entry {i} ({short_repr(item)})")
            teacher_side = item["teacher_layer"]
            if isinstance(teacher_side, list) and _is_layer_tuple(tuple(teacher_side)):
                teacher_side = tuple(teacher_side)
            elif not isinstance(teacher_side, str):
                raise malformed(
                    f"criterion entry {i}: `teacher_layer` {short_repr(teacher_side)} (expected "
                    f"a string or a list of 1 to {MAX_TEACHERS} strings)"
                )
            key = (item["student_layer"], teacher_side)
            if key in seen:
                raise malformed(f"criterion: the pair {short_repr(key)} is listed twice")
            seen.add(key)
            pairs.append((*key, item["loss"]))
        balancer = record["loss_balancer"]
        if balancer is not None and not isinstance(balancer, dict):
            raise malformed(f"`loss_balancer` record {short_repr(balancer)}")
        if not isinstance(record["expose_minimal_state_dict"], bool):
            raise malformed("`expose_minimal_state_dict` (expected a bool)")
        teacher = record["teacher_model"]
        _check_teacher_record(teacher)
        return cls(mode, tuple(pairs), balancer, record["expose_minimal_state_dict"], teacher)

    def build_losses(self, device: str | None = None) -> list[nn.Module]:
        """Build each pair's loss by registered name (under ``torch.device(device)`` if given)."""
        return [
            build_object(loss, LOSSES, allow_torch_losses=True, device=device)
            for _, _, loss in self.pairs
        ]

    def build_balancer(self) -> DistillationLossBalancer | None:
        """Build the balancer by registered name (``None`` if there is none)."""
        if self.balancer is None:
            return None
        return cast(DistillationLossBalancer, build_object(self.balancer, BALANCERS))  # a balancer

    @property
    def teacher_names(self) -> tuple[str, ...] | None:
        """The recorded teachers' names (several named teachers), else ``None``."""
        if self.teacher["kind"] != "dict":
            return None
        return tuple(self.teacher["teachers"])

    def teacher_for_restore(self, teacher_model: Any = None) -> tuple[Any, str]:
        """The ``teacher_model`` to convert with, or ``None`` and why it cannot be rebuilt.

        A given ``teacher_model`` is used as it is (``convert`` then checks the criterion
        against it), except that for several recorded teachers a dict (or ``TeacherDict``) may
        give only some of them: every other one is rebuilt from its allowed factory, and if any
        cannot be, the result is ``None``. Without ``teacher_model``, the recorded factories
        are called if the user allowed them.

        Raises:
            TypeError: Several recorded teachers, and ``teacher_model`` is neither a dict of
                them nor a module holding named teachers (``kd_teacher_names``).
            ValueError: ``teacher_model`` names a teacher the record does not hold.
        """
        names = self.teacher_names
        several = isinstance(teacher_model, Mapping | TeacherDict)
        if names is None:
            if teacher_model is None:
                return _allowed_teacher(self.teacher)
            return teacher_model, ""
        if teacher_model is not None and not several:
            if isinstance(teacher_model, nn.Module) and _kd_teacher_names(teacher_model):
                return teacher_model, ""  # e.g. a CachedTeacher of these teachers
            raise TypeError(
                f"the checkpoint holds the teachers {describe_names(names)}: pass "
                "teacher_model={name: teacher} for all or some of them (the others are rebuilt "
                f"from allowed factories), got {type(teacher_model).__name__}."
            )
        given = dict(teacher_model.items()) if teacher_model is not None else {}
        for name in given:
            if name not in names:
                raise ValueError(
                    unknown_name_message(
                        "teacher in `teacher_model`",
                        str(name),
                        names,
                        fix="Pass only teachers the checkpoint names.",
                    )
                )
        teachers: dict[str, Any] = {}
        problems = []
        for name in names:  # the recorded order: state_dict keys and outputs stay the same
            if name in given:
                teachers[name] = given[name]
                continue
            spec, reason = _allowed_teacher(self.teacher["teachers"][name])
            if spec is None:
                problems.append(f"teacher {name!r} cannot be rebuilt: {reason}")
            else:
                teachers[name] = spec
        if problems:
            return None, "; ".join(problems)
        return teachers, ""

    def _factory_records(self) -> list[dict]:
        records = (
            [self.teacher] if self.teacher["kind"] != "dict" else self.teacher["teachers"].values()
        )
        return [r for r in records if r["kind"] == "factory"]

    @property
    def factory_hint(self) -> str:
        """How to allow the recorded factories not yet allowed, for messages (or empty)."""
        names = [
            f"{r['module']}.{r['qualname']}"
            for r in self._factory_records()
            if lookup_safe_factory(f"{r['module']}:{r['qualname']}") is None
        ]
        if not names:
            return ""
        return f"kdistill.add_safe_factories([{', '.join(names)}])"

    @property
    def teacher_hint(self) -> str:
        """How to pass the teacher(s) at restore, for messages."""
        names = self.teacher_names
        if names is None:
            return "restore(student, f, teacher_model=...)"
        example = ", ".join(f"{name!r}: ..." for name in names[:3])
        more = ", ..." if len(names) > 3 else ""
        return f"restore(student, f, teacher_model={{{example}{more}}}) (all or some of them)"

    def config(
        self,
        teacher: Any,
        losses: list[nn.Module],
        balancer: DistillationLossBalancer | None,
    ) -> dict[str, Any]:
        """The ``convert`` config with the given teacher and the built losses and balancer."""
        return {
            "teacher_model": teacher,
            "criterion": {(s, t): loss for (s, t, _), loss in zip(self.pairs, losses, strict=True)},
            "loss_balancer": balancer,
            "expose_minimal_state_dict": self.expose_minimal_state_dict,
        }


def _allowed_teacher(record: dict) -> tuple[TeacherSpec | None, str]:
    """A one-teacher record's factory if the user allowed it, else ``None`` and the reason."""
    if record["kind"] == "instance":
        return None, (
            f"the teacher was an nn.Module instance ({short_repr(record['class'])}) when "
            "saved, and checkpoints never hold the teacher"
        )
    if record["kind"] == "unrecorded":
        return None, (
            f"the teacher could not be recorded by name when saved ({short_repr(record['reason'])})"
        )
    name = f"{record['module']}:{record['qualname']}"
    factory = lookup_safe_factory(name)
    if factory is None:
        return None, (
            f"its teacher factory {short_repr(name)} is not in kdistill's allow-list "
            "(restore calls no function that a file names unless you allowed it)"
        )
    return TeacherSpec(
        factory=factory, args=tuple(record["args"]), kwargs=dict(record["kwargs"])
    ), ""


_TEACHER_KINDS = {
    "factory": {"kind", "module", "qualname", "args", "kwargs"},
    "instance": {"kind", "class"},
    "unrecorded": {"kind", "reason"},
}


def _check_teacher_record(record: Any) -> None:
    """One teacher's record, or ``{"kind": "dict", "teachers": {name: one teacher's record}}``."""
    if isinstance(record, dict) and record.get("kind") == "dict":
        teachers = record.get("teachers")
        if set(record) != {"kind", "teachers"} or not isinstance(teachers, dict):
            raise malformed(f"teacher dict record {short_repr(record)}")
        if not 1 <= len(teachers) <= MAX_TEACHERS:
            raise malformed(
                f"teacher dict record: it names {len(teachers)} teachers (expected 1 to "
                f"{MAX_TEACHERS})"
            )
        for name, teacher in teachers.items():
            problem = teacher_name_problem(name)
            if problem is not None:
                raise malformed(
                    f"teacher dict record: the teacher name {short_repr(name)} {problem}"
                )
            if isinstance(teacher, dict) and teacher.get("kind") == "dict":
                raise malformed(f"teacher dict record: teacher {name!r} is a nested dict")
            _check_single_teacher_record(teacher)
        return
    _check_single_teacher_record(record)


def _check_single_teacher_record(record: Any) -> None:
    kind = record.get("kind") if isinstance(record, dict) else None
    kind = kind if isinstance(kind, str) else None
    if (
        not isinstance(kind, str)
        or kind not in _TEACHER_KINDS
        or set(record) != _TEACHER_KINDS[kind]
    ):
        raise malformed(f"teacher record {short_repr(record)}")
    if kind == "factory" and not (
        isinstance(record["module"], str)
        and isinstance(record["qualname"], str)
        and isinstance(record["args"], list)
        and isinstance(record["kwargs"], dict)
    ):
        raise malformed(f"teacher factory record {short_repr(record)}")
    if kind != "factory" and not isinstance(record.get("class", record.get("reason")), str):
        raise malformed(f"teacher record {short_repr(record)}")
