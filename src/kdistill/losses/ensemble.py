"""Distillation from several teachers at once: ``EnsembleLogitsDistillationLoss``.

- ``combine="probs"``: the student matches the weighted arithmetic mixture of the teachers'
  softened distributions, the target of distilling an ensemble into one model (Hinton, Vinyals &
  Dean, "Distilling the Knowledge in a Neural Network", arXiv 1503.02531). TextBrewer's
  ``MultiTeacherDistiller`` averages the teachers' logits instead (a normalized geometric mixture
  of their distributions), which this loss does not do.
- ``combine="losses"``: the weighted mean of the per-teacher Hinton KD losses, i.e. the sum of
  one ``LogitsDistillationLoss`` term per teacher with normalized weights.

Original implementation (no reference code copied). A ``LogitDivergenceLoss`` whose teacher side
is a tuple of teachers: the base class does the input handling, masking, reduction and T², and
the per-position divergence is the shared ``kdistill.losses._divergences.forward_kl``.
"""

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._recipes import LossRecipe, ensemble_logit_inputs
from .._validation import check_choice, check_float_list
from ._divergences import forward_kl, tempered_log_probs
from ._logit_loss import LogitDivergenceLoss
from ._registry import register_loss

__all__ = ["COMBINE_MODES", "EnsembleLogitsDistillationLoss"]

COMBINE_MODES = ("probs", "losses")
"""How ``EnsembleLogitsDistillationLoss`` combines the teachers."""


@register_loss(
    "ensemble_logits_distillation",
    recipe=LossRecipe(
        lambda: EnsembleLogitsDistillationLoss(temperature=2.0, weights=[0.7, 0.3]),
        ensemble_logit_inputs(num_teachers=2),
    ),
)
class EnsembleLogitsDistillationLoss(LogitDivergenceLoss):
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

    # the teacher side is a tuple of K teachers, not the dense log-probs the chunked loss has
    lm_head_divergence = False

    def __init__(
        self,
        temperature: float = 1.0,
        weights: Sequence[float] | None = None,
        combine: str = "probs",
        reduction: str = "batchmean",
        ignore_index: int | None = None,
    ) -> None:
        super().__init__(temperature, reduction, ignore_index)
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

    def extra_repr(self) -> str:
        """Show the arguments."""
        return (
            f"temperature={self.temperature}, weights={self.weights}, combine={self.combine!r}, "
            f"reduction={self.reduction!r}"
        )

    def teacher_distribution(
        self, teacher_logits: Any, student_logits: Tensor
    ) -> list[tuple[float, Tensor]]:
        """``(w_k, log_softmax(t_k / T))`` for the teachers of weight > 0 (all are checked).

        Args:
            teacher_logits: A tuple/list of K teacher outputs, or one output (K = 1).
            student_logits: ``[..., C]``, to check each teacher against.

        Raises:
            ValueError: No teacher, a weight count that is not K, or a teacher whose shape does
                not pair with the student's (the message names the teacher and both sizes).
        """
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
            try:
                teachers.append(self.dense_teacher(output, student_logits, f"teacher {k}"))
            except ValueError as err:
                raise ValueError(f"Teacher output {k} of {len(outputs)}: {err}") from None
        weights = self._normalized or [1.0 / len(teachers)] * len(teachers)
        return [
            (w, tempered_log_probs(t, self.temperature))
            for w, t in zip(weights, teachers, strict=True)
            if w > 0
        ]

    def divergence(self, student_log_probs: Tensor, teacher: Any, labels: Tensor | None) -> Tensor:
        """The mixture's (``"probs"``) or the weighted per-teacher (``"losses"``) forward KL.

        ``teacher`` is the list of ``(w_k, log-probs [..., C])`` of ``teacher_distribution``.
        """
        used = [(w, log_probs.to(student_log_probs.dtype)) for w, log_probs in teacher]
        if self.combine == "probs":
            if len(used) == 1:
                mixture = used[0][1]
            else:  # log Σ_k w_k·p_k, stably
                mixture = torch.logsumexp(
                    torch.stack([log_probs + math.log(w) for w, log_probs in used]), dim=0
                )
            return forward_kl(student_log_probs, mixture)
        per_position = used[0][0] * forward_kl(student_log_probs, used[0][1])
        for w, log_probs in used[1:]:
            per_position = per_position + w * forward_kl(student_log_probs, log_probs)
        return per_position
