"""Multi-process distillation on PyTorch's own engine: DDP and FSDP2 (``fully_shard``).

A ``DistillationModel`` works inside ``DistributedDataParallel`` and ``fully_shard`` as is: the
teacher's parameters are frozen (``requires_grad=False``), so DDP never all-reduces them and FSDP2
never reduce-scatters them. Two helpers cover what the wrappers do not:

- ``wrap_ddp`` also keeps the teacher out of DDP's start-up broadcast of every parameter and its
  per-step buffer broadcast (each rank loads its own copy of the frozen teacher);
- ``save`` writes a regular kdistill checkpoint (teacher excluded) from a DDP-wrapped or
  FSDP2-sharded model, gathering sharded weights first.

Pattern with FSDP2 (shard the teacher as its own unit, so its gathered weights are freed before
the student's forward)::

    from torch.distributed.fsdp import fully_shard
    fully_shard(model.teacher_model)
    fully_shard(model)
"""

import os
from typing import IO, Any

import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import checkpoint_dict, write_checkpoint
from .model import TEACHER_KEY, DistillationModel

__all__ = ["full_state_dict", "save", "unwrap", "wrap_ddp"]

_DDP_IGNORE_ATTR = "_ddp_params_and_buffers_to_ignore"  # read by DistributedDataParallel.__init__


def unwrap(model: nn.Module) -> DistillationModel:
    """The ``DistillationModel`` inside a DDP wrapper (or the model itself).

    Raises:
        TypeError: ``model`` is neither a DistillationModel nor DDP around one.
    """
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    if not isinstance(inner, DistillationModel):
        raise TypeError(
            f"Expected a DistillationModel (made by kdistill.convert), possibly wrapped in "
            f"DistributedDataParallel or sharded with fully_shard, got {type(model).__name__}."
        )
    return inner


def wrap_ddp(model: DistillationModel, **ddp_kwargs: Any) -> DistributedDataParallel:
    """Wrap ``model`` in ``DistributedDataParallel``, leaving the teacher out of every broadcast.

    Gradients of the student (and of loss modules with parameters) are averaged as usual; the
    teacher's parameters and buffers are neither broadcast at construction nor (with
    ``broadcast_buffers=True``) before each forward, so every rank keeps its own frozen teacher.

    Args:
        model: A converted model, on its device.
        **ddp_kwargs: Passed to ``DistributedDataParallel`` (``device_ids``, ...).

    Returns:
        The DDP wrapper; call it for the forward and ``wrapper.module.compute_kd_loss()`` after.

    Raises:
        TypeError: ``model`` is not a DistillationModel.
    """
    model = unwrap(model)
    teacher = model.teacher_model
    names = {f"{TEACHER_KEY}.{name}" for name, _ in teacher.named_parameters()}
    names |= {f"{TEACHER_KEY}.{name}" for name, _ in teacher.named_buffers()}
    had_attr = hasattr(model, _DDP_IGNORE_ATTR)
    previous = getattr(model, _DDP_IGNORE_ATTR, [])
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, sorted(names | set(previous))
    )
    try:
        return DistributedDataParallel(model, **ddp_kwargs)
    finally:  # DDP reads the list at construction only; leave the model as it was
        if had_attr:
            setattr(model, _DDP_IGNORE_ATTR, previous)
        else:
            delattr(model, _DDP_IGNORE_ATTR)


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The student's full state dict (teacher excluded), gathering FSDP2 shards.

    **Collective** when the model is sharded: call it on every rank. Sharded weights are
    all-gathered to CPU on rank 0 only (other ranks get ``{}``); unsharded (plain or DDP) models
    return their own state dict on every rank.

    Args:
        model: A DistillationModel, DDP around one, or one sharded with ``fully_shard``.
    """
    model = unwrap(model)
    with model.hide_teacher_model():  # never the teacher, whatever expose_minimal_state_dict says
        state = model.state_dict()
        if any(isinstance(value, DTensor) for value in state.values()):
            state = get_model_state_dict(
                model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
    return state


def save(model: nn.Module, f: str | os.PathLike | IO[bytes], rank: int = 0) -> None:
    """Write a ``kdistill.save`` checkpoint from one rank of a (possibly sharded) run.

    **Collective**: call it on every rank. The student's weights are gathered (see
    ``full_state_dict``) and rank ``rank`` writes the file atomically; restore it with
    ``kdistill.restore`` into a plain, unsharded student, in any process count.

    Args:
        model: A DistillationModel, DDP around one, or one sharded with ``fully_shard``.
        f: Path or binary file object (used on the writing rank only).
        rank: The rank that writes; it must be 0 when the model is sharded.

    Raises:
        ValueError: A sharded model with ``rank`` other than 0 (shards are gathered on rank 0).
    """
    inner = unwrap(model)
    sharded = any(isinstance(value, DTensor) for value in inner.state_dict().values())
    if sharded and rank != 0:
        raise ValueError(
            f"`rank` must be 0 for a sharded model (its weights are gathered on rank 0), got "
            f"{rank}."
        )
    state = full_state_dict(inner)
    current = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if current == rank:
        write_checkpoint(checkpoint_dict(inner, weights=state), f)
    if sharded:
        dist.barrier()  # nobody reads the file before it exists
