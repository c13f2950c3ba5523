"""The batch convention of ``TeacherCache.build`` and ``TeacherCache.verify``.

A dataloader yields either

- a tuple or list ``(sample_ids, inputs, *rest)``, e.g. from
  ``DataLoader(TensorDataset(torch.arange(N), x, y))``; ``rest`` (labels, ...) is ignored; or
- a mapping with keys ``"sample_id"`` and ``"input"`` (other keys are ignored).

``sample_ids`` is an integer tensor ``[B]`` (or a list of ints), unique across the dataset.
``inputs`` is either a tensor ``[B, ...]``, passed as ``teacher(inputs)``, or a mapping of keyword
tensors ``[B, ...]`` (e.g. ``input_ids`` and ``attention_mask``), passed as ``teacher(**inputs)``.
"""

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..losses._utils import extract_logits

__all__ = ["input_keys", "layer_tensor", "split_batch"]


def split_batch(batch: Any) -> tuple[Tensor, Tensor | Mapping[str, Tensor]]:
    """Split a batch into ``(sample_ids [B] int64, teacher inputs)`` (see the module docstring).

    Raises:
        TypeError: The batch follows neither convention, or the ids are not integers.
    """
    if isinstance(batch, Mapping):
        if "sample_id" not in batch or "input" not in batch:
            raise TypeError(
                "A mapping batch must have the keys 'sample_id' and 'input', got keys "
                f"{sorted(map(str, batch))}."
            )
        ids, inputs = batch["sample_id"], batch["input"]
    elif isinstance(batch, tuple | list) and len(batch) >= 2:
        ids, inputs = batch[0], batch[1]
    else:
        raise TypeError(
            "Each batch must be a tuple (sample_ids, inputs, ...) — e.g. from "
            "DataLoader(TensorDataset(torch.arange(N), x, y)) — or a mapping with keys "
            f"'sample_id' and 'input'; got {type(batch).__name__}."
        )
    ids = torch.as_tensor(ids)
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(
            f"Sample ids must be a 1-D integer tensor [B], got dtype {ids.dtype} and shape "
            f"{tuple(ids.shape)}."
        )
    if not isinstance(inputs, Tensor | Mapping):
        raise TypeError(
            "Teacher inputs must be a tensor [B, ...] or a mapping of keyword tensors, got "
            f"{type(inputs).__name__}."
        )
    return ids.to(torch.int64), inputs


def input_keys(inputs: Tensor | Mapping[str, Tensor]) -> list[str] | None:
    """``None`` for one input tensor, else the sorted keyword names (``input_keys``)."""
    return None if isinstance(inputs, Tensor) else sorted(inputs)


def layer_tensor(output: Any, layer: str) -> Tensor:
    """The tensor a teacher layer produced: itself, its ``logits``, or a tuple's first element.

    The same unwrapping as the logit losses (``extract_logits``), so a cached layer holds what a
    loss would have read from the live one.
    """
    tensor = extract_logits(output, f"teacher layer {layer!r}")
    if not isinstance(tensor, Tensor):
        raise TypeError(
            f"Teacher layer {layer!r} returned a `logits` of type {type(tensor).__name__}: a "
            "cache stores tensors."
        )
    return tensor
