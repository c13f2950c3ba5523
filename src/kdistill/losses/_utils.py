"""The one shared helper for logit losses: input unwrapping, class checks, masking and reduction.

Every logit loss (plain, chunked or fused) goes through these functions, so masking and
reduction cannot drift between variants.
"""

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "REDUCTIONS",
    "check_logits_pair",
    "extract_logits",
    "position_mask",
    "reduce_positions",
]

REDUCTIONS: tuple[str, ...] = ("batchmean", "sum", "mean", "none")
"""The ``reduction`` values of the logit losses (see ``reduce_positions``)."""


def extract_logits(output: Any, role: str) -> Tensor:
    """Return the logits tensor held by a model output.

    Args:
        output: A tensor, a tuple/list (first element), a mapping with ``"logits"`` or an object
            with a ``logits`` attribute (e.g. a Hugging Face ``ModelOutput``).
        role: ``"student"`` or ``"teacher"``, used in the error message.
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits") and isinstance(output.logits, Tensor):
        return output.logits
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"Cannot find {role} logits in an output of type {type(output).__name__}: expected a "
        "Tensor, a tuple/list whose first element is a Tensor, or an object/mapping with `logits`."
    )


def check_logits_pair(
    student_logits: Tensor, teacher_logits: Tensor, same_classes: bool = True
) -> None:
    """Raise ``ValueError`` naming both shapes when student and teacher logits do not pair up.

    Args:
        student_logits: ``[..., C_s]``.
        teacher_logits: ``[..., C_t]``.
        same_classes: Also require ``C_s == C_t`` (False for losses between vocabularies).
    """
    if same_classes and student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"Student and teacher class counts differ: student has {student_logits.shape[-1]} "
            f"classes (shape {tuple(student_logits.shape)}), teacher has "
            f"{teacher_logits.shape[-1]} (shape {tuple(teacher_logits.shape)}). Logit losses "
            "compare distributions over the same classes."
        )
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"Student logits of shape {tuple(student_logits.shape)} and teacher logits of shape "
            f"{tuple(teacher_logits.shape)} differ in their leading (batch/token) dimensions."
        )


def position_mask(
    shape: torch.Size,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int | None = None,
) -> Tensor | None:
    """Combine an explicit boolean ``mask`` and ``labels != ignore_index`` into one position mask.

    Args:
        shape: The per-position shape, i.e. ``logits.shape[:-1]`` (``[B]`` or ``[B, T]``).
        mask: Optional, same shape; True (or 1) keeps a position.
        labels: Optional integer labels of the same shape, used with ``ignore_index``.
        ignore_index: Label value whose positions are dropped (e.g. ``-100``).

    Returns:
        A bool tensor of ``shape``, or ``None`` when every position counts.
    """
    keep = None
    if mask is not None:
        if mask.shape != shape:
            raise ValueError(f"`mask` must have shape {tuple(shape)}, got {tuple(mask.shape)}.")
        keep = mask.to(torch.bool)
    if labels is not None and ignore_index is not None:
        if labels.shape != shape:
            raise ValueError(f"`labels` must have shape {tuple(shape)}, got {tuple(labels.shape)}.")
        keep_labels = labels != ignore_index
        keep = keep_labels if keep is None else keep & keep_labels
    return keep


def reduce_positions(
    per_position: Tensor, reduction: str, num_classes: int, mask: Tensor | None = None
) -> Tensor:
    """Reduce a per-position loss ``[...]`` (one value per sample or token).

    Args:
        per_position: Loss per position, shape ``logits.shape[:-1]``, float32.
        reduction: ``"batchmean"`` (mean over kept positions), ``"sum"``, ``"mean"`` (sum divided
            by kept positions times ``num_classes``, like torch's elementwise mean) or ``"none"``.
        num_classes: Size of the class axis that was summed over.
        mask: Optional bool mask of the same shape; masked positions contribute exactly 0 and are
            not counted. An all-masked batch reduces to 0 (and still back-propagates).
    """
    if mask is None:
        # fused reductions: one op (and one backward node) each
        if reduction == "none" or per_position.numel() == 0:
            return per_position if reduction == "none" else per_position.sum()
        if reduction == "sum":
            return per_position.sum()
        mean = per_position.mean()
        return mean if reduction == "batchmean" else mean / num_classes
    # where (not multiply) so that inf/nan at masked positions cannot leak into the result
    per_position = torch.where(mask, per_position, per_position.new_zeros(()))
    count = mask.sum().clamp(min=1)
    if reduction == "none":
        return per_position
    total = per_position.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / count
    return total / (count * num_classes)
