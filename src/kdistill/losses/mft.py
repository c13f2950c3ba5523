"""Minifinetuning (MFT): Hinton KD towards a label-corrected teacher distribution.

Belcak et al., "Minifinetuning", arXiv 2506.15702; the teacher correction follows ModelOpt 0.47
``MFTLoss._prepare_corrected_distributions`` (``modelopt/torch/distill/losses.py``, Apache-2.0).
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .._recipes import LossRecipe, labelled_logit_inputs
from .._validation import check_unit_interval
from ._divergences import forward_kl
from ._logit_loss import LogitDivergenceLoss
from ._registry import register_loss

__all__ = ["MFTLoss"]


def _mft_corrected_probs(probs: Tensor, labels: Tensor, threshold: float) -> Tensor:
    """Correct teacher probabilities ``[N, C]`` towards ``labels`` ``[N]`` (minifinetuning).

    Where the teacher's argmax is wrong, mix in the one-hot label with weight
    ``m = (p_argmax − p_label + θ) / (1 + p_argmax − p_label)``, which leaves the label exactly θ
    ahead of the old argmax. Where it is right, raise the label's probability to
    ``min(p_label + θ, 1)`` (or to 1 when ``p_label > 1 − θ``) by the same kind of mixing.
    """
    p_label = probs.gather(1, labels[:, None]).squeeze(1)  # [N]
    p_argmax, argmax = probs.max(dim=1)  # [N], [N]
    wrong = argmax != labels
    mix_wrong = (p_argmax - p_label + threshold) / (1 + p_argmax - p_label)
    target = torch.where(p_label > 1 - threshold, torch.ones_like(p_label), p_label + threshold)
    mix_right = (target - p_label) / (1 - p_label).clamp(min=1e-12)
    mix = torch.where(wrong, mix_wrong, mix_right)[:, None]  # [N, 1]
    one_hot = F.one_hot(labels, probs.shape[1]).to(probs.dtype)
    return (1 - mix) * probs + mix * one_hot


@register_loss(
    "mft",
    recipe=LossRecipe(
        lambda: MFTLoss(temperature=2.0), labelled_logit_inputs, zero_when_equal=False
    ),
)
class MFTLoss(LogitDivergenceLoss):
    """Minifinetuning loss: Hinton KD towards a label-corrected teacher distribution.

    The teacher's softened distribution ``p = softmax(t/T)`` is corrected per position so that the
    label is ahead of every other class (see ``threshold``), then the loss is
    ``T² · KL(p_corrected ‖ softmax(s/T))``, reduced like ``LogitsDistillationLoss``. Positions
    whose label equals ``ignore_index`` (or where ``mask`` is False) are dropped.

    Args:
        temperature: Softmax temperature T > 0.
        threshold: Margin θ in [0, 1] by which the label must lead the teacher's former argmax.
        reduction: One of ``"batchmean"``, ``"sum"``, ``"mean"``, ``"none"``.
        ignore_index: Label value to ignore (Hugging Face uses -100).
    """

    requires_labels = True

    def __init__(
        self,
        temperature: float = 1.0,
        threshold: float = 0.2,
        reduction: str = "batchmean",
        ignore_index: int = -100,
    ) -> None:
        super().__init__(temperature, reduction, ignore_index)
        self.threshold = check_unit_interval("threshold", threshold)

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Any,
        labels: Tensor | None = None,
        *,
        mask: Tensor | None = None,
    ) -> Tensor:
        """``LogitDivergenceLoss.forward``; ``labels`` may also come third, positionally.

        ModelOpt's ``MFTLoss()(logits_s, logits_t, labels)`` call therefore works unchanged.
        """
        return super().forward(student_logits, teacher_logits, labels=labels, mask=mask)

    def divergence(self, student_log_probs: Tensor, teacher: Any, labels: Tensor | None) -> Tensor:
        """KL(corrected teacher ‖ student) per position (``labels`` are the target classes)."""
        if labels is None:
            raise ValueError(
                "MFTLoss.divergence needs `labels`: the target class of each position."
            )
        num_classes = student_log_probs.shape[-1]
        corrected = _mft_corrected_probs(
            teacher.exp().reshape(-1, num_classes), labels.reshape(-1), self.threshold
        ).reshape(teacher.shape)
        return forward_kl(student_log_probs, corrected.clamp(min=0).log())
