"""``save`` / ``restore`` / ``mode_state``: safe single-file checkpoints of converted models.

A checkpoint is ``{"kdistill_state": <JSON modes and configs>, "model_state_dict": ...}`` written
with ``torch.save`` and read with ``torch.load(weights_only=True)``. Everything in it is treated as
hostile: loading never unpickles objects, never imports a module, and calls only what the user
allowed (registered losses and balancers by name; a teacher factory only if passed as
``teacher_model=`` or put in the allow-list, ``kdistill.add_safe_factories``). Records are
size-capped before they are read; losses are built on the ``meta`` device and their shapes
compared with the checkpoint's tensors before any real allocation; every weight is checked before
the first copy, so a failed ``restore`` leaves the model as it was. The teacher's weights are
never saved. See SECURITY.md for the threat model.
"""

import contextlib
import os
import secrets
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, cast

import torch
from torch import nn

from ._serialization import check_json_value, check_record, short_repr
from .config import KDLossRecord, malformed
from .conversion import convert
from .model import LOSS_MODULES_KEY, DistillationModel
from .modes import get_mode

__all__ = [
    "MAX_LOSS_ELEMENTS_WITHOUT_WEIGHTS",
    "STATE_VERSION",
    "FileLike",
    "ModeloptStateManager",
    "checkpoint_dict",
    "mode_state",
    "restore",
    "restore_from_mode_state",
    "save",
    "write_checkpoint",
]

STATE_VERSION = 1
_STATE_KEY = "kdistill_state"
_WEIGHTS_KEY = "model_state_dict"
MAX_LOSS_ELEMENTS_WITHOUT_WEIGHTS = 2**25
"""Most loss-module elements ``restore_from_mode_state`` builds (no tensors bound the sizes)."""

FileLike = str | os.PathLike | IO[bytes]


def _name(f: FileLike) -> str:
    return str(f) if isinstance(f, str | os.PathLike) else getattr(f, "name", repr(f))


def mode_state(model: nn.Module) -> dict[str, Any]:
    """The model's modes and their configs as plain JSON values (no weights).

    A plain (or exported) model has no modes.

    Raises:
        ValueError: A loss or balancer is not registered (a checkpoint can only name
            registered classes).
    """
    modes = []
    if isinstance(model, DistillationModel):
        modes = [{"mode": name, "config": config.to_json()} for name, config in model.kd_modes]
    return check_json_value({"version": STATE_VERSION, "modes": modes}, "The mode state")


def _student_state_dict(model: nn.Module) -> dict[str, Any]:
    if isinstance(model, DistillationModel):
        with model.hide_teacher_model():  # never save the teacher's weights
            return model.state_dict()
    return model.state_dict()


def checkpoint_dict(model: nn.Module, weights: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What ``save`` writes: the mode state and the weights (teacher excluded).

    Args:
        model: The model (converted or plain).
        weights: The weights to write instead of the model's own (e.g. gathered FSDP shards).
    """
    state = mode_state(model)
    return {
        _STATE_KEY: state,
        _WEIGHTS_KEY: dict(_student_state_dict(model) if weights is None else weights),
    }


def write_checkpoint(checkpoint: dict[str, Any], f: FileLike) -> None:
    """``torch.save`` ``checkpoint`` to ``f``; a path is written atomically, honouring the umask.

    The file is written to a new temporary file in the same directory (created exclusively,
    never through a symlink, with the permissions ``open`` gives under the current umask, like
    ``torch.save``: 0644 under umask 022), flushed to disk and renamed over ``f``, so a crash
    never leaves a half-written file in place of a good one.
    """
    if not isinstance(f, str | os.PathLike):
        torch.save(checkpoint, f)
        return
    path = Path(f)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)  # the kernel applies the umask
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save(model: nn.Module, f: FileLike) -> None:
    """Write the model's mode state and weights (teacher excluded) to one file, atomically.

    For a path, the checkpoint is written to a temporary file in the same directory and renamed
    over ``f``, so a crash never leaves a half-written file in place of a good one. The file gets
    the permissions of any new file under the umask, like ``torch.save``. The teacher is recorded
    by reference (a factory by ``module:qualname`` and JSON arguments), never by its weights; a
    teacher that cannot be recorded by name must be passed again at ``restore``.

    Raises:
        ValueError: A loss or balancer is not registered (``register_loss``).

    Example:
        >>> import tempfile, os, torch, kdistill as mto
        >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
        >>> mto.save(torch.nn.Linear(2, 2), path)
        >>> sorted(torch.load(path, weights_only=True))
        ['kdistill_state', 'model_state_dict']
    """
    write_checkpoint(checkpoint_dict(model), f)


def _read_checkpoint(f: FileLike) -> tuple[Any, dict]:
    """Load and check the file's structure; every failure names the file."""
    name = _name(f)
    try:
        checkpoint = torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"Checkpoint file not found: {name}.") from None
    except Exception as err:  # torch raises many types for corrupt/truncated/unsafe files
        raise ValueError(
            f"Cannot read kdistill checkpoint {name}: the file is corrupt, truncated, not a torch "
            "checkpoint, or holds pickled objects that safe (weights_only) loading refuses "
            f"({type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]})."
        ) from err
    if not isinstance(checkpoint, Mapping) or _STATE_KEY not in checkpoint:
        hint = ""
        if isinstance(checkpoint, Mapping) and all(
            isinstance(v, torch.Tensor) for v in checkpoint.values()
        ):
            hint = (
                " It looks like a plain state dict: load it with "
                "model.load_state_dict(torch.load(path, weights_only=True))."
            )
        raise ValueError(f"{name} is not a kdistill checkpoint (no {_STATE_KEY!r} entry).{hint}")
    weights = checkpoint.get(_WEIGHTS_KEY)
    if not isinstance(weights, Mapping) or set(checkpoint) != {_STATE_KEY, _WEIGHTS_KEY}:
        raise ValueError(
            f"{name} is not a valid kdistill checkpoint: expected exactly the entries "
            f"{[_STATE_KEY, _WEIGHTS_KEY]} ({_WEIGHTS_KEY!r} a dict of tensors). Re-save the "
            "model with kdistill.save."
        )
    return checkpoint[_STATE_KEY], dict(weights)


def _parse_state(state: Any) -> KDLossRecord | None:
    """Check the capped JSON structure of a mode state; the distillation record, if any."""
    check_record(state, "the mode state")
    if not isinstance(state, dict) or set(state) != {"version", "modes"}:
        raise malformed("mode state: expected {'version': int, 'modes': [...]}")
    if not isinstance(state["modes"], list):
        raise malformed("mode state: `modes` must be a list")
    if state["version"] != STATE_VERSION:
        raise ValueError(
            f"unsupported kdistill state version {short_repr(state['version'])} (this kdistill "
            f"reads version {STATE_VERSION}). Re-save the model with this kdistill's save."
        )
    entries = state["modes"]
    if not entries:
        return None
    names = [e.get("mode") if isinstance(e, dict) else None for e in entries]
    if len(entries) > 1:
        raise malformed(
            f"mode state: it lists {len(entries)} modes {short_repr(names)}, but save records "
            "at most one distillation mode"
        )
    (entry,) = entries
    if not isinstance(entry, dict) or set(entry) != {"mode", "config"}:
        raise malformed(f"mode entry {short_repr(entry)}")
    if not isinstance(entry["mode"], str) or len(entry["mode"]) > 100:
        raise malformed(f"mode name {short_repr(entry['mode'])}")
    descriptor = get_mode(entry["mode"])  # unknown names list the valid ones
    if not descriptor.converts:
        raise malformed(
            f"mode state: it lists {descriptor.name!r}, which save never records (an exported "
            "model is saved with no modes)"
        )
    return KDLossRecord.parse(entry["config"], descriptor.name)


def _loss_expectations(losses: list[nn.Module]) -> dict[str, torch.Tensor]:
    """``_loss_modules.j.*`` entries the losses (built on meta) will have, as meta tensors."""
    expected: dict[str, torch.Tensor] = {}
    with_params = [loss for loss in losses if any(True for _ in loss.parameters())]
    for j, loss in enumerate(with_params):
        for key, value in loss.state_dict().items():
            expected[f"{LOSS_MODULES_KEY}.{j}.{key}"] = value
    return expected


def _dense_problem(value: torch.Tensor) -> str | None:
    """Why ``value`` cannot be copied into a parameter (``None`` if it can)."""
    if value.layout != torch.strided:
        return f"a {value.layout} tensor (only dense tensors are loaded)"
    if value.device.type == "meta":
        return "a meta tensor (it holds no data)"
    if value.numel() == 0:
        return None
    storage = value.untyped_storage().nbytes()
    span = value.storage_offset() + sum(
        (n - 1) * s for n, s in zip(value.shape, value.stride(), strict=True)
    )
    if any(s < 0 for s in value.stride()) or (span + 1) * value.element_size() > storage:
        return "a tensor whose strides reach outside its storage"
    if value.numel() * value.element_size() > storage:
        return "a tensor whose elements overlap in memory (e.g. expanded)"
    return None


def _check_weights(expected: Mapping[str, Any], weights: Mapping[str, Any], source: str) -> None:
    """Raise unless ``weights`` fit ``expected`` exactly, before any weight is copied.

    Keys must match exactly; every tensor must be dense and strided, hold data (not meta), have
    the expected shape and a dtype that casts to the expected one safely.
    """
    missing = [k for k in expected if k not in weights]
    unexpected = [short_repr(k) for k in weights if k not in expected]
    bad = []
    for key, want in expected.items():
        if key not in weights:
            continue
        got = weights[key]
        if not isinstance(want, torch.Tensor):
            continue  # non-tensor extra state: the module's own set_extra_state checks it
        if not isinstance(got, torch.Tensor):
            bad.append(f"{key}: a {type(got).__name__}, not a tensor")
            continue
        problem = _dense_problem(got)
        if problem is None and got.shape != want.shape:
            problem = f"shape {tuple(got.shape)} vs model {tuple(want.shape)}"
        if problem is None and not torch.can_cast(got.dtype, want.dtype):
            problem = f"dtype {got.dtype} does not cast safely to the model's {want.dtype}"
        if problem is not None:
            bad.append(f"{key}: {problem}")
    if missing or unexpected or bad:
        parts = [
            f"{label} {items[:5]}{' ...' if len(items) > 5 else ''}"
            for label, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("mismatches", bad),
            )
            if items
        ]
        raise ValueError(
            f"The weights in {source} do not fit this model ({'; '.join(parts)}). Restore into a "
            "fresh instance of the architecture that was saved. The model was left unchanged."
        )


def _prefixed(err: Exception, source: str) -> Exception:
    """``err`` as the same basic type with a message that starts with the file's name."""
    kind = type(err) if type(err) in (ValueError, TypeError, RuntimeError) else RuntimeError
    message = str(err)
    if kind is RuntimeError and type(err) is not RuntimeError:
        message = f"{type(err).__name__}: {message}"
    return kind(f"{source}: {message}")


def _restore(
    model: nn.Module,
    state: Any,
    teacher_model: Any,
    weights: dict[str, Any] | None,
    source: str,
) -> nn.Module:
    """Check everything, then re-apply the saved mode and load ``weights`` (if given)."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"`model` must be an nn.Module (a fresh student), got {type(model).__name__}."
        )
    if isinstance(model, DistillationModel):
        raise RuntimeError(
            "restore expects a plain student, got a DistillationModel: build a fresh student "
            "(or export this one) and restore into it."
        )
    try:
        record = _parse_state(state)
        student_expected = model.state_dict()
        if record is None:
            if weights is not None:
                _check_weights(student_expected, weights, source)
                model.load_state_dict(weights, strict=True)
            return model
        meta_losses = record.build_losses(device="meta")  # shapes without allocating
        loss_expected = _loss_expectations(meta_losses)
        if weights is not None:
            _check_weights({**student_expected, **loss_expected}, weights, source)
        else:
            total = sum(t.numel() for t in loss_expected.values())
            if total > MAX_LOSS_ELEMENTS_WITHOUT_WEIGHTS:
                raise ValueError(
                    f"its losses would hold {total} parameter elements, above the "
                    f"{MAX_LOSS_ELEMENTS_WITHOUT_WEIGHTS} a mode state without weights may "
                    "allocate. Restore from the checkpoint file (its tensors bound the sizes)."
                )
        record.build_balancer()  # the arguments are checked before anything else is decided
        teacher, reason = record.teacher_for_restore(teacher_model)
    except (ValueError, TypeError) as err:
        raise _prefixed(err, source) from err
    if teacher is None:
        return _restore_student_only(model, record, weights, source, reason, len(loss_expected))
    try:
        losses = record.build_losses()  # sizes checked above: now allocate for real
        config = record.config(teacher, losses, record.build_balancer())
        model = convert(model, mode=[(record.mode, config)])  # all-or-nothing
    except Exception as err:
        raise _prefixed(err, source) from err
    if weights is not None:
        try:
            model.load_state_dict(weights, strict=True)
        except Exception as err:  # checked above, so not expected: still leave no half state
            cast(DistillationModel, model).teardown_()  # convert made one
            raise _prefixed(err, source) from err
    return model


def _restore_student_only(
    model: nn.Module,
    record: KDLossRecord,
    weights: dict[str, Any] | None,
    source: str,
    reason: str,
    num_loss_tensors: int,
) -> nn.Module:
    """What ModelOpt's ``mto.restore`` does: the plain student with its weights, and a warning."""
    if weights is not None:
        model.load_state_dict(
            {k: v for k, v in weights.items() if not k.startswith(LOSS_MODULES_KEY + ".")},
            strict=True,
        )
    set_aside = f", {num_loss_tensors} loss-module tensor(s) set aside" if num_loss_tensors else ""
    allow = f", or allow the recorded factory: {record.factory_hint}" if record.factory_hint else ""
    names = record.teacher_names
    teachers = "teacher" if names is None else f"teachers {list(names)}"
    warnings.warn(
        f"{source}: the distillation state (mode {record.mode!r}: {teachers}, "
        f"{len(record.pairs)} loss(es), balancer{set_aside}) was not restored because {reason}. "
        "The plain student was restored with its weights. To resume distillation, pass the "
        f"{teachers.partition(' ')[0]}: {record.teacher_hint}{allow}.",
        stacklevel=3,
    )
    return model


def restore_from_mode_state(
    model: nn.Module, state: Mapping[str, Any], teacher_model: Any = None
) -> nn.Module:
    """Re-apply the modes recorded by ``mode_state`` to a fresh student (in place); no weights.

    Args:
        model: A plain instance of the student's architecture.
        state: Output of ``mode_state`` (checked as untrusted input).
        teacher_model: The teacher (an nn.Module, a class, a callable or a tuple), used instead
            of the recorded factory. Without it the recorded factory is called only if it is in
            the allow-list (``add_safe_factories``); otherwise the plain student is returned
            with a warning. For several named teachers, a dict ``{name: teacher}`` of all or
            some of them (as for ``restore``).

    Raises:
        ValueError: Malformed state or unknown names; the model is left unchanged.
        RuntimeError: ``model`` is already a DistillationModel.
    """
    return _restore(model, state, teacher_model, None, "mode state")


def restore(model: nn.Module, f: FileLike, teacher_model: Any = None) -> nn.Module:
    """Restore a ``save``d checkpoint into a fresh student, in place, and return it.

    A distillation checkpoint comes back as a ``DistillationModel`` (so training can resume) when
    the teacher can be rebuilt: from ``teacher_model``, or from the recorded factory if it is in
    the allow-list (``kdistill.add_safe_factories`` / ``@kdistill.safe_factory``). Otherwise (an
    instance teacher, a factory not allowed, no ``teacher_model``) it does what ModelOpt's
    ``mto.restore`` does: the plain student with its weights, and a warning saying what was not
    restored and how to resume. Everything is checked before any weight is copied.

    Several named teachers (``teacher_model={name: teacher}`` at ``convert``) are recorded one by
    one, each as a single teacher is. ``teacher_model`` may then be a dict giving all of them or
    only some: the others are rebuilt from their recorded factories if those are allowed; if any
    teacher cannot be rebuilt, the plain student is returned with the warning above.

    Args:
        model: A fresh, plain instance of the student's architecture.
        f: The file written by ``save`` (path or binary file object).
        teacher_model: The teacher (an nn.Module, a class, a callable or a tuple), or for
            several named teachers a dict ``{name: teacher}`` of all or some of them.

    Raises:
        FileNotFoundError: ``f`` does not exist.
        ValueError: The file is corrupt, truncated, foreign, malformed, or does not fit the
            model; ``teacher_model`` names a teacher the file does not hold. The message names
            the file; the model is left unchanged.
        TypeError: The file holds several teachers and ``teacher_model`` is one plain teacher
            (pass a dict ``{name: teacher}``).
        RuntimeError: ``model`` is already a DistillationModel.

    Example:
        >>> import tempfile, os, torch, kdistill as mto
        >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
        >>> mto.save(torch.nn.Linear(2, 2), path)
        >>> type(mto.restore(torch.nn.Linear(2, 2), path)).__name__
        'Linear'
    """
    state, weights = _read_checkpoint(f)
    return _restore(model, state, teacher_model, weights, _name(f))


class ModeloptStateManager:
    """The part of ModelOpt's ``mto.ModeloptStateManager`` that describes a model's state.

    Only ``has_state`` and ``is_converted`` are provided (enough for code that checks whether
    ``restore`` gave a distillation model); kdistill keeps no per-model state dict to manage.

    Args:
        model: Any module.

    Example:
        >>> import torch, kdistill as mto
        >>> mto.ModeloptStateManager(torch.nn.Linear(2, 2)).has_state
        False
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}.")
        self._model = model

    @property
    def has_state(self) -> bool:
        """Whether the model holds a kdistill mode (it is a ``DistillationModel``)."""
        return isinstance(self._model, DistillationModel)

    @staticmethod
    def is_converted(model: nn.Module) -> bool:
        """Whether ``model`` holds a kdistill mode."""
        return isinstance(model, DistillationModel)
