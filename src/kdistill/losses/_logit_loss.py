"""The base class of every logit loss: one divergence hook, one shared preamble.

The shape is that of Liger-Kernel's chunked distillation base
(``liger_kernel/chunked_loss/fused_linear_distillation.py`` at v0.8.5, BSD-2-Clause: a base that
owns the plumbing and a single ``distillation_loss_fn`` per loss); the code is kdistill's own.
A subclass implements ``divergence`` on log-probabilities; the base does everything else, the
same way for every loss, and ``LMHeadDistillationLoss`` calls the same hook on its chunks.
"""

import abc
from typing import Any, ClassVar

from torch import Tensor, nn

from .._validation import MAX_SCALE, check_choice, check_int, check_positive
from ._divergences import tempered_log_probs
from ._utils import (
    REDUCTIONS,
    check_logits_pair,
    extract_logits,
    position_mask,
    reduce_positions,
)

__all__ = ["LogitDivergenceLoss"]


class LogitDivergenceLoss(nn.Module, abc.ABC):
    """Base of the logit losses: ``forward`` is shared, subclasses give the per-position divergence.

    ``loss(student_logits, teacher_logits, *, labels=None, mask=None)`` does, in order:

    1. take the logits out of each input (a Tensor, a tuple/list's first element, or a mapping /
       object with ``logits``, e.g. a Hugging Face ``ModelOutput``);
    2. ``teacher_distribution``: detach the teacher, check that the shapes pair up (a
       ``ValueError`` naming both sizes), and compute ``log_softmax(t / T)`` in float32 (float64
       inputs stay float64, for ``gradcheck``);
    3. when ``requires_labels``, check ``labels`` (``[...]``, the logits' leading shape) and pass
       them on with ``ignore_index`` positions set to class 0 (those positions are masked anyway);
    4. ``divergence(log_softmax(s / T), teacher, labels)``: the loss per position ``[...]``;
    5. reduce: ``"batchmean"`` (mean over kept positions), ``"sum"``, ``"mean"`` (also divided by
       the student's class count) or ``"none"`` (``[...]``). A position is kept when ``mask`` is
       True there and its label is not ``ignore_index``; masked positions contribute exactly 0
       (even if their values are inf/nan) and are not counted; an all-masked batch gives 0 and a
       zero gradient;
    6. multiply by T² when ``temperature_squared`` (so gradient magnitudes do not depend on T).

    To add a loss, subclass, implement ``divergence``, declare any extra constructor arguments
    (validated with ``kdistill._validation``) and register it::

        @register_loss("my_kl", recipe=LossRecipe(lambda: MyKLLoss(temperature=2.0)))
        class MyKLLoss(LogitDivergenceLoss):
            def divergence(self, student_log_probs, teacher_log_probs, labels):
                return forward_kl(student_log_probs, teacher_log_probs)

    A registered subclass is also available to ``LMHeadDistillationLoss(divergence="my_kl")``,
    which calls the same ``divergence`` on ``[chunk, V]`` log-probabilities (``labels`` then are
    the shifted next-token targets ``[chunk]``).

    Two kinds of subclass change the preamble, not the hook: a loss whose teacher side is not
    one dense tensor overrides ``teacher_distribution`` (``TopKLogitsKLLoss``: a sparse
    ``TopKTeacher``; ``EnsembleLogitsDistillationLoss``: a tuple of K teachers), and a loss
    that must pair positions before comparing them (the cross-tokenizer losses) writes its own
    ``forward`` from ``dense_teacher`` / ``teacher_distribution`` and ``reduce_divergence``.

    Class attributes:
        temperature_squared: Multiply the reduced loss by T² (False for bounded divergences, e.g.
            TVD).
        requires_labels: ``divergence`` needs ``labels`` (e.g. DKD, MFT); ``forward`` raises
            without them.
        same_classes: Student and teacher must have the same class count (False for losses that
            compare distributions over different vocabularies; the leading shapes must still
            match).
        reductions: The accepted ``reduction`` values.
        lm_head_divergence: ``LMHeadDistillationLoss(divergence=name)`` may use the loss: its
            ``divergence`` takes the dense teacher log-probabilities of the default
            ``teacher_distribution``.

    Args:
        temperature: Softmax temperature T, finite, > 0 and at most ``1e6`` (T² stays finite).
        reduction: One of ``"batchmean"``, ``"sum"``, ``"mean"``, ``"none"``.
        ignore_index: When set, positions whose ``labels`` equal it are masked out.
    """

    temperature_squared: ClassVar[bool] = True
    requires_labels: ClassVar[bool] = False
    same_classes: ClassVar[bool] = True
    reductions: ClassVar[tuple[str, ...]] = REDUCTIONS
    lm_head_divergence: ClassVar[bool] = True

    def __init__(
        self,
        temperature: float = 1.0,
        reduction: str = "batchmean",
        ignore_index: int | None = None,
    ) -> None:
        super().__init__()
        self.temperature = check_positive("temperature", temperature, max_value=MAX_SCALE)
        self.reduction = check_choice("reduction", reduction, self.reductions)
        self.ignore_index = (
            None if ignore_index is None else check_int("ignore_index", ignore_index)
        )

    # ------------------------------------------------------------------ hooks
    @abc.abstractmethod
    def divergence(self, student_log_probs: Tensor, teacher: Any, labels: Tensor | None) -> Tensor:
        """The loss at each position, before reduction and T² (the one hook to implement).

        Args:
            student_log_probs: ``log_softmax(s / T)`` ``[..., C_s]``, float32 (or float64).
            teacher: What ``teacher_distribution`` returned; by default the detached
                ``log_softmax(t / T)`` ``[..., C_t]``, a tensor of this call only (the hook may
                overwrite it in place to save memory).
            labels: ``[...]`` integer classes when ``requires_labels`` (``ignore_index``
                positions set to 0), else None.

        Returns:
            ``[...]``: one value per position.
        """

    def teacher_distribution(self, teacher_logits: Any, student_logits: Tensor) -> Any:
        """The teacher side given to ``divergence``: detached ``log_softmax(t / T)`` ``[..., C]``.

        Override it for teachers that are not dense logits (``TopKLogitsKLLoss`` accepts a sparse
        ``TopKTeacher``, ``EnsembleLogitsDistillationLoss`` a tuple of teachers).

        Raises:
            TypeError: No logits found in ``teacher_logits``.
            ValueError: The shapes do not pair up (both sizes named).
        """
        return tempered_log_probs(
            self.dense_teacher(teacher_logits, student_logits), self.temperature
        )

    def dense_teacher(
        self, teacher_logits: Any, student_logits: Tensor, role: str = "teacher"
    ) -> Tensor:
        """The detached teacher logits ``[..., C]``, checked against the student's.

        Args:
            teacher_logits: A Tensor or a model output holding logits.
            student_logits: ``[..., C_s]``, to check the shapes against.
            role: Names the teacher in the error messages.

        Raises:
            TypeError: No logits found in ``teacher_logits``.
            ValueError: The shapes do not pair up (both sizes named).
        """
        teacher = extract_logits(teacher_logits, role)
        if teacher.requires_grad:  # nothing to cut otherwise (teachers run under no_grad)
            teacher = teacher.detach()
        check_logits_pair(student_logits, teacher, self.same_classes)
        return teacher

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Any,
        *,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Compute the loss (see the class docstring for the steps).

        Args:
            student_logits: ``[..., C]`` (or a model output holding logits).
            teacher_logits: ``[..., C]``, same shape (or a model output); detached here.
            labels: ``[...]`` integer labels: the targets of losses that need them, and
                dropped positions where they equal ``ignore_index``.
            mask: ``[...]`` bool, True keeps a position.

        Returns:
            A scalar, or ``[...]`` with ``reduction="none"``; float32 (float64 for float64
            inputs).
        """
        student_logits = extract_logits(student_logits, "student")
        teacher = self.teacher_distribution(teacher_logits, student_logits)
        positions = student_logits.shape[:-1]
        targets = self._targets(labels, positions) if self.requires_labels else None
        keep = position_mask(positions, mask, labels, self.ignore_index)
        return self.reduce_divergence(student_logits, teacher, targets, keep)

    def reduce_divergence(
        self, student_logits: Tensor, teacher: Any, labels: Tensor | None, keep: Tensor | None
    ) -> Tensor:
        """Steps 4 to 6 of ``forward``: ``divergence`` on ``log_softmax(s / T)``, reduce, T².

        Args:
            student_logits: ``[..., C_s]`` student logits (not detached).
            teacher: What ``teacher_distribution`` returned for them.
            labels: ``[...]`` targets for ``divergence`` (``ignore_index`` replaced), or None.
            keep: ``[...]`` bool, the kept positions (None: all).

        Returns:
            The reduced loss (``[...]`` for ``reduction="none"``).
        """
        per_position = self.divergence(
            tempered_log_probs(student_logits, self.temperature), teacher, labels
        )
        loss = reduce_positions(per_position, self.reduction, student_logits.shape[-1], keep)
        # T² after the reduction (it is linear): one multiply on a scalar instead of [...]
        if self.temperature_squared and self.temperature != 1.0:
            loss = loss * self.temperature**2
        return loss

    def _targets(self, labels: Tensor | None, positions: tuple[int, ...]) -> Tensor:
        """``labels`` checked against the positions, ``ignore_index`` replaced by class 0."""
        if labels is None:
            raise ValueError(
                f"{type(self).__name__} needs `labels` (the target class of each position): call "
                "`model.compute_kd_loss(labels=labels)` or `loss(student, teacher, labels=labels)`."
            )
        if labels.shape != positions:
            raise ValueError(
                f"`labels` must have shape {tuple(positions)} (the logits without their class "
                f"axis), got {tuple(labels.shape)}."
            )
        if self.ignore_index is None:
            return labels
        return labels.masked_fill(labels == self.ignore_index, 0)
