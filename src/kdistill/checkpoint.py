"""``save`` / ``restore`` / ``mode_state``: safe single-file checkpoints of converted models.

A checkpoint is ``{"kdistill_state": <JSON-able modes and configs>, "model_state_dict": ...}``
written with ``torch.save`` and read with ``torch.load(weights_only=True)``: loading it never
unpickles arbitrary objects, never imports a module and only calls user code (see
``_serialization.resolve_factory``). The teacher's weights are never saved.
"""

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from .conversion import convert
from .model import DistillationModel
from .modes import get_mode

__all__ = [
    "STATE_VERSION",
    "mode_state",
    "restore",
    "restore_from_mode_state",
    "save",
]

STATE_VERSION = 1
_STATE_KEY = "kdistill_state"
_WEIGHTS_KEY = "model_state_dict"

FileLike = str | os.PathLike | IO[bytes]


def _name(f: FileLike) -> str:
    return str(f) if isinstance(f, str | os.PathLike) else getattr(f, "name", repr(f))


def mode_state(model: nn.Module) -> dict[str, Any]:
    """The model's modes and their configs as JSON values (no weights).

    A plain (or exported) model has no modes. Raises ``ValueError`` when a loss or balancer is
    not registered, since a checkpoint can only name registered classes.
    """
    modes = []
    if isinstance(model, DistillationModel):
        modes = [{"mode": name, "config": config.to_json()} for name, config in model._kd_modes]
    return {"version": STATE_VERSION, "modes": modes}


def _student_state_dict(model: nn.Module) -> dict[str, Any]:
    if isinstance(model, DistillationModel):
        with model.hide_teacher_model():  # never save the teacher's weights
            return model.state_dict()
    return model.state_dict()


def save(model: nn.Module, f: FileLike) -> None:
    """Write the model's mode state and weights (teacher excluded) to one file, atomically.

    For a path, the checkpoint is written to a temporary file in the same directory and renamed
    over ``f``, so a crash never leaves a half-written file in place of a good one.

    Example:
        >>> import tempfile, os, torch, kdistill as mto
        >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
        >>> mto.save(torch.nn.Linear(2, 2), path)
        >>> sorted(torch.load(path, weights_only=True))
        ['kdistill_state', 'model_state_dict']
    """
    checkpoint = {_STATE_KEY: mode_state(model), _WEIGHTS_KEY: _student_state_dict(model)}
    if not isinstance(f, str | os.PathLike):
        torch.save(checkpoint, f)
        return
    path = Path(f)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read_checkpoint(f: FileLike) -> tuple[dict, dict]:
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
            f"({type(err).__name__}: {(str(err).splitlines() or [''])[0]})."
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
    state, weights = checkpoint.get(_STATE_KEY), checkpoint.get(_WEIGHTS_KEY)
    if not isinstance(weights, Mapping):
        raise ValueError(f"{name} is not a valid kdistill checkpoint: {_WEIGHTS_KEY!r} is missing.")
    return state, dict(weights)


def _parse_state(state: Any, teacher_model: Any) -> list[tuple[str, Any]]:
    """Turn a mode state into ``(mode_name, validated_config)`` pairs, resolving nothing unsafe."""
    if not isinstance(state, Mapping) or not isinstance(state.get("modes"), list):
        raise ValueError("malformed kdistill state: expected {'version': int, 'modes': [...]}.")
    if state.get("version") != STATE_VERSION:
        raise ValueError(
            f"unsupported kdistill state version {state.get('version')!r} "
            f"(this kdistill reads version {STATE_VERSION})."
        )
    parsed = []
    for entry in state["modes"]:
        if not isinstance(entry, Mapping) or set(entry) != {"mode", "config"}:
            raise ValueError(f"malformed mode entry {entry!r}.")
        descriptor = get_mode(entry["mode"])
        config = descriptor.config_class.from_json(entry["config"], entry["mode"], teacher_model)
        parsed.append((descriptor.name, config))
    return parsed


def _check_weights(model: nn.Module, weights: Mapping[str, Any], name: str) -> None:
    """Raise if ``weights`` do not fit ``model`` exactly (keys and shapes), before any copy."""
    expected = _student_state_dict(model)
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in weights
        and isinstance(v, torch.Tensor)
        and (not isinstance(weights[k], torch.Tensor) or weights[k].shape != v.shape)
    ]
    if missing or unexpected or mismatched:
        parts = [
            f"{label} {items[:5]}{' ...' if len(items) > 5 else ''}"
            for label, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", mismatched),
            )
            if items
        ]
        raise ValueError(
            f"The weights in {name} do not fit this model ({'; '.join(parts)}). Restore into a "
            "fresh instance of the architecture that was saved. The model was left unchanged."
        )


def _restore(
    model: nn.Module,
    state: Any,
    teacher_model: Any,
    weights: Mapping[str, Any] | None,
    source: str,
) -> nn.Module:
    """Validate ``state``, re-apply its modes, then check and load ``weights`` (if given)."""
    if isinstance(model, DistillationModel):
        raise RuntimeError(
            "restore expects a plain student, got a DistillationModel: build a fresh student "
            "(or export this one) and restore into it."
        )
    try:
        modes = _parse_state(state, teacher_model)
    except (ValueError, TypeError) as err:
        raise type(err)(f"{source}: {err}") from err
    for mode_name, config in modes:
        model = convert(model, mode=[(mode_name, config)])
    if weights is not None:
        try:
            _check_weights(model, weights, source)
        except ValueError:
            if isinstance(model, DistillationModel):
                model.teardown_()  # leave the student exactly as it came in
            raise
        model.load_state_dict(weights, strict=True)
    return model


def restore_from_mode_state(
    model: nn.Module, state: Mapping[str, Any], teacher_model: Any = None
) -> nn.Module:
    """Re-apply the modes recorded by ``mode_state`` to a fresh student (in place); no weights.

    Args:
        model: A plain instance of the student's architecture.
        state: Output of ``mode_state``.
        teacher_model: Teacher to use instead of the recorded factory (required when the teacher
            was an instance when saved): an nn.Module, a class, a callable or a tuple.

    Raises:
        ValueError: Malformed state, unknown names, or a teacher factory restore may not call.
        RuntimeError: ``model`` is already a DistillationModel.
    """
    return _restore(model, state, teacher_model, None, "mode state")


def restore(model: nn.Module, f: FileLike, teacher_model: Any = None) -> nn.Module:
    """Restore a ``save``d checkpoint into a fresh student, in place, and return it.

    A distillation checkpoint comes back as a ``DistillationModel`` (so training can resume);
    the teacher is rebuilt from its recorded factory (only user code, already imported) or taken
    from ``teacher_model``. Weights are checked for an exact fit before any is copied.

    Raises:
        FileNotFoundError: ``f`` does not exist.
        ValueError: The file is corrupt, truncated, foreign, or does not fit the model; or its
            teacher factory may not be called. The model is left unchanged.
    """
    state, weights = _read_checkpoint(f)
    return _restore(model, state, teacher_model, weights, _name(f))
