"""Top-k logit distillation: forward KL on the teacher's k most likely classes plus a tail bucket.

- ``TopKTeacher``: the sparse teacher format (top-k log-probabilities, their indices and the
  log of the remaining mass) that offline teacher caches store, e.g. arcee-ai/DistillKit's
  top-k logit datasets.
- ``TopKLogitsKLLoss``: forward KL over the k + 1 buckets, from dense teacher logits or from a
  ``TopKTeacher``; with k = C it is exactly Hinton KD.
"""

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._recipes import LossRecipe
from .._validation import MAX_SCALE, check_int, check_positive
from ._divergences import (
    tempered_log_probs,
    topk_forward_kl,
    topk_forward_kl_sparse,
    topk_log_tail_mass,
)
from ._logit_loss import LogitDivergenceLoss
from ._registry import register_loss

__all__ = ["TopKLogitsKLLoss", "TopKTeacher"]


@dataclass(frozen=True)
class TopKTeacher:
    """A sparse teacher distribution: its top-k log-probabilities per position (and the tail).

    The input format of ``TopKLogitsKLLoss`` for a cached (offline) teacher. Pass it where the
    teacher logits would go: ``loss(student_logits, TopKTeacher(...))``.

    Attributes:
        log_probs: ``[..., k]`` teacher log-probabilities ``log_softmax(t / temperature)`` of the
            kept classes (any float dtype; float16 is fine for storage).
        indices: ``[..., k]`` int64 class indices of those entries, distinct per position.
        log_tail_mass: Optional ``[...]`` log of the teacher mass outside the kept classes,
            ``log(1 − Σ exp(log_probs))``. When ``None`` it is computed from ``log_probs``;
            store it when ``log_probs`` are rounded (e.g. float16), since ``1 − Σ`` loses
            precision when the top-k hold nearly all the mass.
        temperature: The temperature the log-probabilities were computed at; it must equal the
            loss's temperature (a top-k set cannot be re-tempered exactly).

    Example:
        >>> import torch
        >>> teacher = TopKTeacher.from_logits(torch.randn(2, 5, 100), k=8)
        >>> tuple(teacher.log_probs.shape), tuple(teacher.log_tail_mass.shape)
        ((2, 5, 8), (2, 5))
    """

    log_probs: Tensor
    indices: Tensor
    log_tail_mass: Tensor | None = None
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.log_probs, Tensor) or not isinstance(self.indices, Tensor):
            raise TypeError(
                f"TopKTeacher needs tensors `log_probs` and `indices`, got "
                f"{type(self.log_probs).__name__} and {type(self.indices).__name__}."
            )
        if self.indices.dtype != torch.int64:
            raise TypeError(
                f"TopKTeacher `indices` must be int64, got {self.indices.dtype}: "
                "convert with `indices.long()`."
            )
        if self.log_probs.shape != self.indices.shape or self.log_probs.dim() < 1:
            raise ValueError(
                f"TopKTeacher `log_probs` {tuple(self.log_probs.shape)} and `indices` "
                f"{tuple(self.indices.shape)} must have the same shape [..., k]."
            )
        if self.log_tail_mass is not None and (
            not isinstance(self.log_tail_mass, Tensor)
            or self.log_tail_mass.shape != self.log_probs.shape[:-1]
        ):
            got = getattr(self.log_tail_mass, "shape", type(self.log_tail_mass).__name__)
            raise ValueError(
                f"TopKTeacher `log_tail_mass` must have shape {tuple(self.log_probs.shape[:-1])}, "
                f"got {tuple(got) if isinstance(got, tuple) else got}."
            )
        check_positive("temperature", self.temperature, max_value=MAX_SCALE)

    @property
    def k(self) -> int:
        """Number of kept classes per position."""
        return self.log_probs.shape[-1]

    @classmethod
    def from_logits(cls, logits: Tensor, k: int, temperature: float = 1.0) -> "TopKTeacher":
        """Keep the top-k of ``log_softmax(logits / temperature)``, with the exact tail mass.

        Args:
            logits: Dense teacher logits ``[..., C]`` (detached here).
            k: Classes kept per position (at most C).
            temperature: Softmax temperature T > 0; must match the loss's.

        Returns:
            A ``TopKTeacher`` with float32 ``log_probs`` ``[..., k]`` and ``log_tail_mass``.
        """
        k = check_int("k", k, min_value=1)
        temperature = check_positive("temperature", temperature, max_value=MAX_SCALE)
        if k > logits.shape[-1]:
            raise ValueError(
                f"`k`={k} exceeds the {logits.shape[-1]} classes of logits of shape "
                f"{tuple(logits.shape)}: pick k <= {logits.shape[-1]}."
            )
        log_probs = tempered_log_probs(logits.detach(), temperature)
        values, indices = log_probs.topk(k, dim=-1)
        return cls(values, indices, topk_log_tail_mass(log_probs, indices), temperature)


@register_loss("topk_kl", recipe=LossRecipe(lambda: TopKLogitsKLLoss(k=3, temperature=2.0)))
class TopKLogitsKLLoss(LogitDivergenceLoss):
    """Forward KL on the teacher's top-k classes plus one bucket for the rest of the mass.

    With ``K`` the teacher's k most likely classes at temperature T, ``p``/``q`` the teacher and
    student ``softmax(·/T)``, tails ``p_R = 1 − Σ_K p_i`` and ``q_R = 1 − Σ_K q_i``:
    ``T² · (Σ_{i∈K} p_i·(log p_i − log q_i) + p_R·(log p_R − log q_R))`` per position. Both sides
    are distributions over k + 1 buckets, so a top-k teacher loses no probability mass, and with
    k = C this is exactly Hinton KD. The teacher may be dense logits ``[..., C]`` (top-k taken
    here) or a ``TopKTeacher`` (e.g. from an offline cache) with the same k and temperature; both
    give identical values. Reduced per position like ``LogitsDistillationLoss`` (masked positions
    dropped, an all-masked batch gives 0; ``"mean"`` divides by the full class count C).

    Args:
        k: Number of teacher classes kept per position (clamped to C).
        temperature: Softmax temperature T > 0.
        reduction: One of ``"batchmean"``, ``"sum"``, ``"mean"``, ``"none"``.
        ignore_index: When set, positions whose ``labels`` equal it are masked out.

    Example:
        >>> import torch
        >>> student, teacher = torch.randn(3, 50), torch.randn(3, 50)
        >>> loss = TopKLogitsKLLoss(k=5)
        >>> sparse = TopKTeacher.from_logits(teacher, k=5)
        >>> torch.allclose(loss(student, teacher), loss(student, sparse))
        True
    """

    def __init__(
        self,
        k: int = 64,
        temperature: float = 1.0,
        reduction: str = "batchmean",
        ignore_index: int | None = None,
    ) -> None:
        super().__init__(temperature, reduction, ignore_index)
        self.k = check_int("k", k, min_value=1)

    def teacher_distribution(self, teacher_logits: Any, student_logits: Tensor) -> Any:
        """Dense teachers as in the base class; a ``TopKTeacher`` is checked and passed on.

        Raises:
            ValueError: The ``TopKTeacher``'s leading shape, k or temperature do not match.
        """
        if not isinstance(teacher_logits, TopKTeacher):
            return super().teacher_distribution(teacher_logits, student_logits)
        teacher = teacher_logits
        if teacher.log_probs.shape[:-1] != student_logits.shape[:-1]:
            raise ValueError(
                f"TopKTeacher of shape {tuple(teacher.log_probs.shape)} does not pair with student "
                f"logits of shape {tuple(student_logits.shape)}: leading dimensions differ."
            )
        expected_k = min(self.k, student_logits.shape[-1])
        if teacher.k != expected_k:
            raise ValueError(
                f"TopKLogitsKLLoss(k={self.k}) got a TopKTeacher with k={teacher.k}: build the "
                f"loss with k={teacher.k} (or the cache with top_k={expected_k})."
            )
        if teacher.temperature != self.temperature:
            raise ValueError(
                f"TopKTeacher was computed at temperature {teacher.temperature} but the loss uses "
                f"{self.temperature}: top-k log-probabilities cannot be re-tempered exactly, so "
                "build both with the same temperature."
            )
        return teacher

    def divergence(self, student_log_probs: Tensor, teacher: Any, labels: Tensor | None) -> Tensor:
        """Top-k forward KL with a tail bucket, from dense log-probs or a ``TopKTeacher``."""
        if not isinstance(teacher, TopKTeacher):
            return topk_forward_kl(student_log_probs, teacher, self.k)
        tail = None if teacher.log_tail_mass is None else teacher.log_tail_mass.detach()
        return topk_forward_kl_sparse(
            student_log_probs, teacher.log_probs.detach(), teacher.indices, tail
        )
