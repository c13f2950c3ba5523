"""Decoupled knowledge distillation (DKD).

Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022, arXiv 2203.08679; reference code
megvii-research/mdistiller (MIT), without its epoch warm-up (use ``ScheduledLossBalancer``).
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .._recipes import LossRecipe, labelled_logit_inputs
from .._validation import MAX_SCALE, check_non_negative
from ._divergences import forward_kl
from ._logit_loss import LogitDivergenceLoss
from ._registry import register_loss

__all__ = ["DKDLoss"]


def _binary_log_probs(log_probs: Tensor, is_target: Tensor) -> Tensor:
    """``[log p_y, log(1 − p_y)]`` ``[..., 2]`` from ``[..., C]`` log-probs, the second exactly."""
    target = log_probs.masked_fill(~is_target, float("-inf")).logsumexp(-1)
    rest = log_probs.masked_fill(is_target, float("-inf")).logsumexp(-1)
    return torch.stack([target, rest], dim=-1)


def _non_target_log_probs(log_probs: Tensor, is_target: Tensor) -> Tensor:
    """Log-softmax over the non-target classes ``[..., C]`` (probability 0 at the target).

    ``log_softmax`` is shift invariant, so renormalizing the log-probabilities equals a softmax of
    the tempered logits without the target. The target is filled with the dtype's most negative
    finite value, not −inf: forward KL treats 0·log q as 0 only for finite log q.
    """
    return F.log_softmax(log_probs.masked_fill(is_target, torch.finfo(log_probs.dtype).min), -1)


@register_loss("dkd", recipe=LossRecipe(lambda: DKDLoss(), labelled_logit_inputs))
class DKDLoss(LogitDivergenceLoss):
    """Decoupled knowledge distillation (Zhao et al., CVPR 2022, arXiv 2203.08679).

    With ``y`` the label, ``b = [p_y, 1 − p_y]`` the binary target/non-target split of
    ``p = softmax(z/T)`` and ``p̂`` the distribution over the non-target classes
    (``softmax`` of the logits with class ``y`` removed):
    ``T² · (α · KL(b_T ‖ b_S) + β · KL(p̂_T ‖ p̂_S))`` per position (TCKD + NCKD). Teacher
    detached, float32 math; reduced per position like ``LogitsDistillationLoss`` (the default
    ``"batchmean"`` is the reference code's sum over classes divided by the batch size).
    Positions whose label is ``ignore_index`` or where ``mask`` is False are dropped; an
    all-masked batch gives 0. The reference code's warm-up of the loss over the first epochs is
    left to the balancer (``ScheduledLossBalancer``).

    Args:
        alpha: Weight α ≥ 0 of the target-class term (TCKD).
        beta: Weight β ≥ 0 of the non-target-class term (NCKD).
        temperature: Softmax temperature T > 0.
        reduction: One of ``"batchmean"``, ``"sum"``, ``"mean"``, ``"none"``.
        ignore_index: Label value whose positions are dropped.
    """

    requires_labels = True

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        reduction: str = "batchmean",
        ignore_index: int = -100,
    ) -> None:
        super().__init__(temperature, reduction, ignore_index)
        self.alpha = check_non_negative("alpha", alpha, max_value=MAX_SCALE)
        self.beta = check_non_negative("beta", beta, max_value=MAX_SCALE)

    def divergence(self, student_log_probs: Tensor, teacher: Any, labels: Tensor | None) -> Tensor:
        """TCKD + NCKD per position (``labels`` are the target classes)."""
        num_classes = student_log_probs.shape[-1]
        if num_classes < 2:
            raise ValueError(
                f"DKDLoss needs at least 2 classes to split target and non-target mass, got "
                f"logits of shape {tuple(student_log_probs.shape)}."
            )
        if labels is None:
            raise ValueError(
                "DKDLoss.divergence needs `labels`: the target class of each position."
            )
        is_target = F.one_hot(labels, num_classes).bool()  # [..., C]
        tckd = forward_kl(
            _binary_log_probs(student_log_probs, is_target), _binary_log_probs(teacher, is_target)
        )
        # the teacher's log-probs are this call's own detached tensor: renormalize them in place
        # (log_softmax = x − logsumexp x), so no second [..., C] teacher buffer is alive below
        teacher_non_target = teacher.masked_fill_(is_target, torch.finfo(teacher.dtype).min)
        teacher_non_target -= teacher_non_target.logsumexp(-1, keepdim=True)
        nckd = forward_kl(_non_target_log_probs(student_log_probs, is_target), teacher_non_target)
        return self.alpha * tckd + self.beta * nckd
