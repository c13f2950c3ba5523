"""JSON records of runtime objects (losses, balancers, teacher factories) and their safe lookup.

A checkpoint never holds code or pickles. Losses and balancers are recorded as a registered name
plus constructor arguments; a teacher factory as ``module`` + ``qualname`` + JSON arguments. On
restore, the factory is looked up among modules the process has *already imported* (nothing is
imported), and only user code may be called: ``nn.Module`` subclasses and plain Python functions
whose source file lies outside the standard library and site-packages.
"""

import inspect
import json
import os
import site
import sys
import sysconfig
import types
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.nn.modules import loss as torch_losses

from ._registry import Registry

__all__ = [
    "build_object",
    "check_json_value",
    "constructor_args",
    "describe_object",
    "resolve_factory",
]

# torch's own losses may be used as criteria; they are recorded under "torch.<ClassName>".
_TORCH_LOSS_PREFIX = "torch."


def _torch_loss_classes() -> dict[str, type[nn.Module]]:
    return {
        name: obj
        for name, obj in vars(torch_losses).items()
        if isinstance(obj, type)
        and issubclass(obj, torch_losses._Loss)
        and not name.startswith("_")
    }


def check_json_value(value: Any, what: str) -> Any:
    """Return ``value`` if it survives a JSON round trip unchanged in meaning, else raise."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{what} must be JSON values (numbers, strings, bools, None, lists, dicts with "
            f"string keys) to be saved, got {value!r}: {err}."
        ) from None
    return value


def constructor_args(obj: nn.Module) -> dict[str, Any]:
    """Constructor arguments of ``obj``, as JSON values.

    ``obj.get_config()`` if defined, else the attributes named like its ``__init__`` parameters
    (parameters without such an attribute keep their defaults).
    """
    if hasattr(obj, "get_config"):
        args = dict(obj.get_config())
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


def build_object(record: Any, registry: Registry, allow_torch_losses: bool = False) -> nn.Module:
    """Rebuild an object recorded by ``describe_object``, resolving the class by name only."""
    if not (
        isinstance(record, dict)
        and set(record) == {"name", "args"}
        and isinstance(record["name"], str)
        and isinstance(record["args"], dict)
    ):
        raise ValueError(
            f'Malformed {registry.kind} record {record!r}: expected {{"name": str, "args": dict}}.'
        )
    name = record["name"]
    if allow_torch_losses and name.startswith(_TORCH_LOSS_PREFIX):
        classes = _torch_loss_classes()
        short = name[len(_TORCH_LOSS_PREFIX) :]
        if short not in classes:
            raise ValueError(f"Unknown torch loss {short!r} in checkpoint.")
        cls = classes[short]
    else:
        cls = registry.get(name)
    return cls(**record["args"])


def _library_roots() -> list[str]:
    """Directories whose code a checkpoint may never make restore call."""
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    roots.update(getattr(site, "getsitepackages", lambda: [])())
    roots.add(site.getusersitepackages())
    roots.add(os.path.dirname(os.__file__))
    return [os.path.realpath(r) for r in roots if r]


def _source_file(obj: Any) -> str | None:
    try:
        source = inspect.getsourcefile(obj) or inspect.getfile(obj)
    except TypeError:
        return None
    return os.path.realpath(source) if source else None


def _is_user_code(obj: Any) -> bool:
    source = _source_file(obj)
    if source is None:
        return False
    parts = source.split(os.sep)
    if "site-packages" in parts or "dist-packages" in parts:
        return False
    return not any(source.startswith(root + os.sep) for root in _library_roots())


def resolve_factory(module_name: str, qualname: str) -> Callable[..., Any]:
    """Find a recorded teacher factory among already-imported modules, refusing non-user code.

    Raises:
        ValueError: The module is not imported, the name is missing, or the object is not an
            ``nn.Module`` subclass or plain function defined in user code.
    """
    fix = "Pass the teacher explicitly: restore(model, f, teacher_model=...)."
    where = f"{module_name}:{qualname}"
    if not isinstance(module_name, str) or not isinstance(qualname, str):
        raise ValueError(f"Malformed teacher factory record {where!r}. {fix}")
    if "<" in qualname:
        raise ValueError(f"Teacher factory {where} is a lambda or local function. {fix}")
    module = sys.modules.get(module_name)
    if module is None:
        raise ValueError(
            f"The checkpoint names teacher factory {where}, but module {module_name!r} is not "
            "imported in this process, and restore never imports modules. Import it before "
            f"restoring, or: {fix}"
        )
    if module_name.split(".")[0] == "kdistill" and not module_name.startswith("kdistill.testing"):
        raise ValueError(
            f"Refusing to call kdistill's own function {where} from a checkpoint. {fix}"
        )
    obj: Any = module
    for part in qualname.split("."):
        # static lookups: never trigger a module's lazy __getattr__ (which could import code)
        namespace = vars(obj) if isinstance(obj, types.ModuleType) else None
        try:
            obj = namespace[part] if namespace is not None else inspect.getattr_static(obj, part)
        except (KeyError, AttributeError):
            raise ValueError(
                f"Teacher factory {where} does not exist in the imported module. {fix}"
            ) from None
    is_module_class = isinstance(obj, type) and issubclass(obj, nn.Module)
    is_function = isinstance(obj, types.FunctionType)
    if not (is_module_class or is_function) or not _is_user_code(obj):
        raise ValueError(
            f"Refusing to call {where} named by the checkpoint: restore only calls nn.Module "
            "subclasses and plain functions defined in your own code (not the standard library, "
            f"site-packages or builtins). {fix}"
        )
    return obj
