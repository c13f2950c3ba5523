"""Distillation from several teachers at once: ``EnsembleLogitsDistillationLoss``.

- ``combine="probs"``: the student matches the weighted arithmetic mixture of the teachers'
  softened distributions, the target of distilling an ensemble into one model (Hinton, Vinyals &
  Dean, "Distilling the Knowledge in a Neural Network", arXiv 1503.02531). TextBrewer's
  ``MultiTeacherDistiller`` averages the teachers' logits instead (a normalized geometric mixture
  of their distributions), which this loss does not do.
- ``combine="losses"``: the weighted mean of the per-teacher Hinton KD losses, i.e. the sum of
  one ``LogitsDistillationLoss`` term per teacher with normalized weights.

Original implementation (no reference code copied); the per-position divergence is the shared
``kdistill.losses._divergences.forward_kl``, the masking and reduction ``kdistill.losses._utils``.
"""

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._recipes import LossRecipe
from .._validation import MAX_SCALE, check_choice, check_float_list, check_int, check_positive
from ._divergences import forward_kl, upcast
from ._registry import register_loss
from ._utils import (
    check_logits_pair,
    check_reduction,
    extract_logits,
    position_mask,
    reduce_positions,
)

__all__ = ["COMBINE_MODES", "EnsembleLogitsDistillationLoss"]

COMBINE_MODES = ("probs", "losses")
"""How ``EnsembleLogitsDistillationLoss`` combines the teachers."""


def _scaled_log_probs(logits: Tensor, temperature: float) -> Tensor:
    """``log_softmax(logits / T)`` over the last axis, in float32 (float64 stays float64)."""
    return F.log_softmax(upcast(logits) / temperature, dim=-1)


@register_loss(
    "ensemble_logits_distillation",
    recipe=LossRecipe(lambda: EnsembleLogitsDistillationLoss(temperature=2.0)),
)
class EnsembleLogitsDistillationLoss(nn.Module):
    """Hinton KD from K teachers: a mixture of their distributions, or a mean of their losses.

    With the student's ``q = softmax(s/T)``, teacher ``k``'s ``p_k = softmax(t_k/T)`` and the
    weights normalized to sum to one, ``w_k = weights[k] / Σ_j weights[j]`` (uniform when
    ``weights`` is ``None``), the loss per position (sample for ``[B, C]``, token for
    ``[B, T, V]``) is

    - ``combine="probs"``: ``T² · KL(Σ_k w_k·p_k ‖ q)``, distillation from the weighted mixture
      of the teachers' softened distributions (computed as a log-sum-exp of log-probabilities);
    - ``combine="losses"``: ``Σ_k w_k · T² · KL(p_k ‖ q)``, the weighted mean of the per-teacher
      ``LogitsDistillationLoss`` values.

    Both are 0 when every teacher equals the student; ``"probs"`` is never larger than
    ``"losses"`` (KL is convex in its first argument). A teacher with weight 0 does not enter
    the computation (its shape is still checked). Reduced like ``LogitsDistillationLoss``:
    ``"batchmean"`` (mean over kept positions), ``"sum"``, ``"none"`` (shape
    ``logits.shape[:-1]``) or ``"mean"`` (also divided by the class count); masked positions
    (``mask`` False or ``labels == ignore_index``) contribute 0 and are not counted, and an
    all-masked batch gives 0 (with a zero gradient). Teachers are detached; everything is
    computed in float32 (float64 inputs stay float64).

    Used with several teachers, ``convert`` hands the loss a tuple of teacher outputs when its
    criterion key's teacher side is a tuple: ``{("", ("big", "expert")): loss}``. A single tensor
    (or model output) counts as one teacher, which makes the loss ``LogitsDistillationLoss``.

    Args:
        temperature: Softmax temperature T > 0 applied to the student and every teacher.
        weights: One weight per teacher, in the order of the teacher outputs; finite, >= 0,
            with a sum > 0 (normalized here). ``None``: uniform.
        combine: ``"probs"`` (mixture of distributions) or ``"losses"`` (mean of the KD losses).
        reduction: One of ``"batchmean"``, ``"sum"``, ``"mean"``, ``"none"``.
        ignore_index: When set, positions whose ``labels`` equal it are masked out.

    Raises:
        ValueError: A temperature that is not a finite positive number, weights that are
            negative, not finite or sum to 0, an unknown ``combine`` or ``reduction``.
        TypeError: ``weights`` that are not a list of numbers (bools are not numbers).

    Example:
        >>> import torch
        >>> loss = EnsembleLogitsDistillationLoss(temperature=2.0, weights=[0.7, 0.3])
        >>> student, big, expert = torch.randn(4, 10), torch.randn(4, 10), torch.randn(4, 10)
        >>> bool(loss(student, (big, expert)) >= 0)
        True
        >>> abs(float(loss(student, (student, student)))) < 1e-6  # every teacher is the student
        True
    """

    def __init__(
        self,
        temperature: float = 1.0,
        weights: Sequence[float] | None = None,
        combine: str = "probs",
        reduction: str = "batchmean",
        ignore_index: int | None = None,
    ) -> None:
        super().__init__()
        self.temperature = check_positive("temperature", temperature, max_value=MAX_SCALE)
        self.weights: list[float] | None = None
        self._normalized: list[float] | None = None
        if weights is not None:
            self.weights = check_float_list("weights", weights, non_negative=True)
            total = math.fsum(self.weights)
            if not total > 0:
                raise ValueError(
                    f"`weights` must have a sum > 0 (they are normalized to sum to 1), got "
                    f"{weights!r}."
                )
            self._normalized = [w / total for w in self.weights]
        self.combine = check_choice("combine", combine, COMBINE_MODES)
        self.reduction = check_reduction(reduction)
        self.ignore_index = (
            None if ignore_index is None else check_int("ignore_index", ignore_index)
        )

    def extra_repr(self) -> str:
        """Show the arguments."""
        return (
            f"temperature={self.temperature}, weights={self.weights}, combine={self.combine!r}, "
            f"reduction={self.reduction!r}"
        )

    def _teacher_logits(self, teacher_logits: Any, student_logits: Tensor) -> list[Tensor]:
        """The K detached teacher logits ``[..., C]``, each checked against the student's."""
        outputs = list(teacher_logits) if isinstance(teacher_logits, tuple | list) else None
        if outputs is None:
            outputs = [teacher_logits]
        if not outputs:
            raise ValueError(
                "EnsembleLogitsDistillationLoss got an empty tuple of teacher outputs; give at "
                "least one (a criterion key such as ('', ('big', 'expert')))."
            )
        if self.weights is not None and len(self.weights) != len(outputs):
            raise ValueError(
                f"EnsembleLogitsDistillationLoss has {len(self.weights)} weight(s) but got "
                f"{len(outputs)} teacher output(s): give one weight per teacher, in the order of "
                "the criterion key's teacher tuple."
            )
        teachers = []
        for k, output in enumerate(outputs):
            teacher = extract_logits(output, f"teacher {k}").detach()
            try:
                check_logits_pair(student_logits, teacher)
            except ValueError as err:
                raise ValueError(f"Teacher output {k} of {len(outputs)}: {err}") from None
            teachers.append(teacher)
        return teachers

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Any,
        *,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Compute the loss.

        Args:
            student_logits: ``[..., C]`` (or a model output holding logits).
            teacher_logits: A tuple/list of K teacher outputs, each ``[..., C]`` like the
                student's (or a model output holding logits); a single one counts as K = 1.
                Detached here.
            labels: ``[...]`` integer labels, used only with ``ignore_index``.
            mask: ``[...]`` bool, True keeps a position.

        Returns:
            A scalar, or ``[...]`` with ``reduction="none"``.

        Raises:
            ValueError: Class counts or shapes that differ from the student's (naming both), a
                weight count that differs from the number of teachers, no teacher at all.
        """
        student_logits = extract_logits(student_logits, "student")
        teachers = self._teacher_logits(teacher_logits, student_logits)
        weights = self._normalized or [1.0 / len(teachers)] * len(teachers)
        keep = position_mask(student_logits.shape[:-1], mask, labels, self.ignore_index)
        student_log_probs = _scaled_log_probs(student_logits, self.temperature)
        dtype = student_log_probs.dtype
        used = [
            (w, _scaled_log_probs(t, self.temperature).to(dtype))
            for w, t in zip(weights, teachers, strict=True)
            if w > 0
        ]
        if self.combine == "probs":
            if len(used) == 1:
                mixture = used[0][1]
            else:  # log Σ_k w_k·p_k, stably
                mixture = torch.logsumexp(
                    torch.stack([log_probs + math.log(w) for w, log_probs in used]), dim=0
                )
            per_position = forward_kl(student_log_probs, mixture)
        else:
            per_position = used[0][0] * forward_kl(student_log_probs, used[0][1])
            for w, log_probs in used[1:]:
                per_position = per_position + w * forward_kl(student_log_probs, log_probs)
        loss = reduce_positions(per_position, self.reduction, student_logits.shape[-1], keep)
        # T² after the reduction (it is linear), as in LogitsDistillationLoss
        return loss * self.temperature**2 if self.temperature != 1.0 else loss
