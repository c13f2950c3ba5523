"""JSON records of runtime objects (losses, balancers, teacher factories) and their safe lookup.

A checkpoint never holds code or pickles. Losses and balancers are recorded as a registered name
plus constructor arguments; a teacher factory as ``module`` + ``qualname`` + JSON arguments. On
restore nothing named by a file is imported, resolved from ``sys.modules`` or reached by walking
attributes: a loss or balancer class comes from kdistill's registries (filled by
``register_loss``/``register_balancer``), and a teacher factory is called only if the user put it
in the allow-list below (``add_safe_factories`` / ``@safe_factory``), the principle of
``torch.serialization.add_safe_globals``. Records read from a file are checked against size
caps (``check_record``) before anything else looks at them.
"""

import inspect
import json
import math
import reprlib
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn.modules import loss as torch_losses

from ._registry import Registry

__all__ = [
    "MAX_RECORD_CHARS",
    "MAX_RECORD_DEPTH",
    "MAX_RECORD_ITEMS",
    "add_safe_factories",
    "build_object",
    "check_json_value",
    "check_record",
    "clear_safe_factories",
    "constructor_args",
    "describe_object",
    "factory_name",
    "get_safe_factories",
    "lookup_safe_factory",
    "safe_factory",
    "short_repr",
]

F = TypeVar("F", bound=Callable[..., Any])

# torch's own losses may be used as criteria; they are recorded under "torch.<ClassName>".
_TORCH_LOSS_PREFIX = "torch."

MAX_RECORD_DEPTH = 32
"""Deepest nesting of lists/dicts accepted in a record read from a file."""
MAX_RECORD_ITEMS = 10_000
"""Most values (containers, keys and scalars together) accepted in a record read from a file."""
MAX_RECORD_CHARS = 1_000_000
"""Most characters (all strings and keys together) accepted in a record read from a file."""
_MAX_INT = 2**63

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 80
_repr.maxlist = _repr.maxdict = 6
_repr.maxlevel = 3


def short_repr(value: Any) -> str:
    """``repr`` cut to a readable length (records from files may be huge)."""
    return _repr.repr(value)


# ----------------------------------------------------------------------------- the allow-list
_SAFE_FACTORIES: dict[str, Callable[..., Any]] = {}


def factory_name(fn: Any) -> str | None:
    """The name ``"module:qualname"`` under which ``fn`` is recorded, or ``None``.

    Lambdas, functions and classes defined inside functions, ``functools.partial`` objects and
    other callables without a module-level name cannot be recorded by name.
    """
    module = getattr(fn, "__module__", None)
    try:
        qualname = fn.__qualname__
    except AttributeError:
        return None
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
        return None
    return f"{module}:{qualname}"


def add_safe_factories(factories: Iterable[Callable[..., Any]]) -> None:
    """Allow ``restore`` to call these teacher factories when a checkpoint names them.

    ``restore`` rebuilds a checkpoint's teacher only from ``teacher_model=`` or from a factory in
    this allow-list, looked up by the exact ``module:qualname`` recorded at ``save`` (the
    principle of ``torch.serialization.add_safe_globals``). Registering the same object twice is
    a no-op.

    Args:
        factories: Module-level functions or classes (``nn.Module`` subclasses included).

    Raises:
        TypeError: An entry is not callable, or is a lambda / local function / partial, which
            cannot be recorded by name (pass such a teacher as ``teacher_model=`` instead).
        ValueError: Another object is already allowed under the same name.

    Example:
        >>> import torch, kdistill
        >>> def build_teacher(hidden: int = 32) -> torch.nn.Module:
        ...     return torch.nn.Linear(4, hidden)
        >>> kdistill.add_safe_factories([build_teacher])
        >>> build_teacher in kdistill.get_safe_factories()
        True
        >>> kdistill.clear_safe_factories()
    """
    if callable(factories) or isinstance(factories, str | bytes):
        raise TypeError(
            "`factories` must be a list of callables, e.g. add_safe_factories([build_teacher])."
        )
    entries = list(factories)
    names = []
    for fn in entries:
        if not callable(fn):
            raise TypeError(f"Safe factories must be callables, got {type(fn).__name__}.")
        name = factory_name(fn)
        if name is None:
            raise TypeError(
                f"{fn!r} has no module-level name (a lambda, a local function or class, or a "
                "partial), so no checkpoint can name it. Define it at module level, or pass the "
                "teacher at restore: restore(model, f, teacher_model=...)."
            )
        known = _SAFE_FACTORIES.get(name)
        if known is not None and known is not fn:
            raise ValueError(
                f"Another callable is already allowed as {name!r} ({known!r}); restore looks "
                "factories up by name, so names must be unique. clear_safe_factories() first."
            )
        names.append(name)
    for name, fn in zip(names, entries, strict=True):
        _SAFE_FACTORIES[name] = fn


def safe_factory(fn: F) -> F:
    """Decorator form of ``add_safe_factories([fn])``; returns ``fn`` unchanged.

    Example:
        >>> import torch, kdistill
        >>> @kdistill.safe_factory
        ... def make_teacher() -> torch.nn.Module:
        ...     return torch.nn.Linear(4, 3)
        >>> make_teacher in kdistill.get_safe_factories()
        True
        >>> kdistill.clear_safe_factories()
    """
    add_safe_factories([fn])
    return fn


def get_safe_factories() -> list[Callable[..., Any]]:
    """The teacher factories ``restore`` may call (see ``add_safe_factories``)."""
    return list(_SAFE_FACTORIES.values())


def clear_safe_factories() -> None:
    """Empty the allow-list of teacher factories."""
    _SAFE_FACTORIES.clear()


def lookup_safe_factory(name: str) -> Callable[..., Any] | None:
    """The allowed factory recorded as ``name`` (``"module:qualname"``), or ``None``."""
    return _SAFE_FACTORIES.get(name)


# ----------------------------------------------------------------------------- records
def check_record(value: Any, where: str) -> None:
    """Check that a record read from a file is plain JSON within the size caps.

    Iterative (no recursion), and it stops at the first cap exceeded, so any input is checked in
    bounded time and memory. Accepted: dicts with string keys, lists, strings, bools, ``None``,
    integers with ``|x| < 2**63`` and finite floats.

    Raises:
        ValueError: A value of another type (tensors, tuples, bytes, ...), a NaN / infinite
            float, a huge integer, or a record past ``MAX_RECORD_DEPTH`` /
            ``MAX_RECORD_ITEMS`` / ``MAX_RECORD_CHARS``.
    """
    items = chars = 0
    stack: list[tuple[Any, int, str]] = [(value, 0, where)]
    while stack:
        node, depth, path = stack.pop()
        items += 1
        if items > MAX_RECORD_ITEMS:
            raise ValueError(f"{where} holds more than {MAX_RECORD_ITEMS} values.")
        if depth > MAX_RECORD_DEPTH:
            raise ValueError(f"{where} is nested deeper than {MAX_RECORD_DEPTH} levels.")
        if isinstance(node, dict):
            for key, child in node.items():
                if not isinstance(key, str):
                    raise ValueError(f"{path} has a non-string key {short_repr(key)}.")
                chars += len(key)
                stack.append((child, depth + 1, f"{path}.{key[:40]}"))
        elif isinstance(node, list):
            stack.extend((child, depth + 1, f"{path}[{i}]") for i, child in enumerate(node))
        elif isinstance(node, str):
            chars += len(node)
        elif isinstance(node, bool) or node is None:
            pass
        elif isinstance(node, int):
            if not -_MAX_INT < node < _MAX_INT:
                raise ValueError(f"{path} is an integer too large for a kdistill record.")
        elif isinstance(node, float):
            if not math.isfinite(node):
                raise ValueError(f"{path} is {node!r}; records hold finite numbers only.")
        else:
            raise ValueError(
                f"{path} is a {type(node).__name__}; records hold JSON values only (dicts, lists, "
                "strings, numbers, bools, None)."
            )
        if chars > MAX_RECORD_CHARS:
            raise ValueError(f"{where} holds more than {MAX_RECORD_CHARS} characters.")


def check_json_value(value: Any, what: str) -> Any:
    """Return ``value`` as plain JSON (tuples become lists) if it can be saved, else raise."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{what} must be JSON values (numbers, strings, bools, None, lists, dicts with "
            f"string keys) to be saved, got {short_repr(value)}: {err}."
        ) from None


def _torch_loss_classes() -> dict[str, type[nn.Module]]:
    return {
        name: obj
        for name, obj in vars(torch_losses).items()
        if isinstance(obj, type)
        and issubclass(obj, torch_losses._Loss)
        and not name.startswith("_")
    }


def constructor_args(obj: nn.Module) -> dict[str, Any]:
    """Constructor arguments of ``obj``, as JSON values.

    ``obj.get_config()`` if defined, else the attributes named like its ``__init__`` parameters
    (parameters without such an attribute keep their defaults).
    """
    get_config = getattr(obj, "get_config", None)
    if get_config is not None:
        args = dict(get_config())
    else:
        args = {}
        for name, param in inspect.signature(type(obj).__init__).parameters.items():
            if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            if hasattr(obj, name):
                args[name] = getattr(obj, name)
            elif param.default is param.empty:
                raise ValueError(
                    f"Cannot record {type(obj).__name__}: its constructor argument {name!r} is not "
                    f"stored as an attribute. Store it as `self.{name}` or define `get_config()`."
                )
    return check_json_value(args, f"Constructor arguments of {type(obj).__name__}")


def describe_object(obj: nn.Module, registry: Registry, allow_torch_losses: bool = False) -> dict:
    """Record ``obj`` as ``{"name": registered_name, "args": {...}}``."""
    name = registry.name_of(type(obj))
    if (
        name is None
        and allow_torch_losses
        and _torch_loss_classes().get(type(obj).__name__) is type(obj)
    ):
        name = _TORCH_LOSS_PREFIX + type(obj).__name__
    if name is None:
        fix = (
            f"kdistill.register_loss('my_name', {type(obj).__name__})"
            if registry.kind == "loss"
            else f"kdistill.register_balancer('my_name', {type(obj).__name__})"
        )
        raise ValueError(
            f"{type(obj).__name__} is not a registered {registry.kind}, so a checkpoint cannot "
            f"name it. Register it first: {fix}."
        )
    return {"name": name, "args": constructor_args(obj)}


def _resolve_class(name: str, registry: Registry, allow_torch_losses: bool) -> type:
    if len(name) > 200:
        raise ValueError(f"Unknown {registry.kind} {short_repr(name)} (name too long).")
    if allow_torch_losses and name.startswith(_TORCH_LOSS_PREFIX):
        classes = _torch_loss_classes()
        short = name[len(_TORCH_LOSS_PREFIX) :]
        if short not in classes:
            raise ValueError(f"Unknown torch loss {short_repr(short)}.")
        return classes[short]
    return registry.get(name)


def build_object(
    record: Any,
    registry: Registry,
    allow_torch_losses: bool = False,
    device: str | None = None,
) -> nn.Module:
    """Rebuild an object recorded by ``describe_object``, resolving the class by name only.

    Args:
        record: ``{"name": str, "args": dict}``, already checked by ``check_record``.
        registry: Where ``name`` is looked up.
        allow_torch_losses: Also accept ``"torch.<LossClass>"`` (torch's own losses).
        device: Build under ``torch.device(device)``, e.g. ``"meta"`` to learn parameter shapes
            without allocating memory.

    Raises:
        ValueError: A malformed record, an unknown name, or arguments the constructor refuses.
        TypeError: Arguments of the wrong type, or that the constructor does not take.
    """
    if not (
        isinstance(record, dict)
        and set(record) == {"name", "args"}
        and isinstance(record["name"], str)
        and isinstance(record["args"], dict)
    ):
        raise ValueError(
            f"malformed {registry.kind} record {short_repr(record)}: expected "
            '{"name": str, "args": dict}.'
        )
    name, args = record["name"], record["args"]
    cls = _resolve_class(name, registry, allow_torch_losses)
    try:
        if device is None:
            return cls(**args)
        with torch.device(device):
            return cls(**args)
    except (TypeError, ValueError, RuntimeError) as err:
        kind = TypeError if isinstance(err, TypeError) else ValueError
        raise kind(
            f"{registry.kind} {name!r} cannot be built from its recorded arguments "
            f"{short_repr(args)}: {err}"
        ) from err
