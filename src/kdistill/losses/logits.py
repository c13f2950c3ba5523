"""Logit-matching losses: Hinton KD and minifinetuning.

- ``LogitsDistillationLoss``: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
  Network", arXiv 1503.02531. Reference behaviour: NVIDIA ModelOpt 0.47
  ``modelopt/torch/distill/losses.py`` (Apache-2.0), default reduction changed to batchmean.
- ``MFTLoss``: Belcak et al., "Minifinetuning", arXiv 2506.15702; the teacher correction follows
  ModelOpt 0.47 ``MFTLoss._prepare_corrected_distributions`` (Apache-2.0).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._divergences import forward_kl
from ._registry import register_loss
from ._utils import (
    check_logits_pair,
    check_reduction,
    extract_logits,
    position_mask,
    reduce_positions,
)

__all__ = ["LogitsDistillationLoss", "MFTLoss"]


def _check_temperature(temperature: float) -> float:
    if not isinstance(temperature, int | float) or not temperature > 0:
        raise ValueError(f"`temperature` must be a positive number, got {temperature!r}.")
    return float(temperature)


def _scaled_log_probs(logits: Tensor, temperature: float) -> Tensor:
    """``log_softmax(logits / T)`` over the last axis, in float32."""
    return F.log_softmax(logits.float() / temperature, dim=-1)


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


class LogitsDistillationLoss(nn.Module):
    """Hinton knowledge distillation: ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` over the last axis.

    The teacher is detached and everything is computed in float32. The per-position KL (one value
    per sample for ``[B, C]``, per token for ``[B, T, V]``) is reduced by ``reduction``:
    ``"batchmean"`` (mean over positions: torch's batchmean for ``[B, C]``, the mean per token for
    ``[B, T, V]``), ``"sum"``, ``"none"`` (shape ``logits.shape[:-1]``) or ``"mean"`` (also
    divided by the class count: ModelOpt 0.47's default). Masked positions (``mask`` False or
    ``labels == ignore_index``) contribute 0 and are not counted; an all-masked batch gives 0.
    The T² factor keeps gradient magnitudes independent of the temperature.

    Args:
        temperature: Softmax temperature T > 0 applied to both sides.
        reduction: One of ``"batchmean"``, ``"sum"``, ``"mean"``, ``"none"``.
        ignore_index: When set, positions whose ``labels`` equal it are masked out.

    Example:
        >>> import torch
        >>> loss = LogitsDistillationLoss(temperature=2.0)
        >>> logits = torch.randn(4, 10)
        >>> float(loss(logits, logits))
        0.0
    """

    def __init__(
        self,
        temperature: float = 1.0,
        reduction: str = "batchmean",
        ignore_index: int | None = None,
    ) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)
        self.reduction = check_reduction(reduction)
        self.ignore_index = ignore_index

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        *,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Compute the loss.

        Args:
            student_logits: ``[..., C]`` (or a model output holding logits).
            teacher_logits: ``[..., C]``, same shape; detached here.
            labels: ``[...]`` integer labels, used only with ``ignore_index``.
            mask: ``[...]`` bool, True keeps a position.
        """
        student_logits = extract_logits(student_logits, "student")
        teacher_logits = extract_logits(teacher_logits, "teacher").detach()
        check_logits_pair(student_logits, teacher_logits)
        keep = position_mask(student_logits.shape[:-1], mask, labels, self.ignore_index)
        kl = forward_kl(
            _scaled_log_probs(student_logits, self.temperature),
            _scaled_log_probs(teacher_logits, self.temperature),
        )
        kl = kl * self.temperature**2
        return reduce_positions(kl, self.reduction, student_logits.shape[-1], keep)


class MFTLoss(nn.Module):
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

    def __init__(
        self,
        temperature: float = 1.0,
        threshold: float = 0.2,
        reduction: str = "batchmean",
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        if not isinstance(threshold, int | float) or not 0 <= threshold <= 1:
            raise ValueError(f"`threshold` must be a number in [0, 1], got {threshold!r}.")
        self.temperature = _check_temperature(temperature)
        self.threshold = float(threshold)
        self.reduction = check_reduction(reduction)
        self.ignore_index = ignore_index

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        *,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Compute the loss.

        Args:
            student_logits: ``[..., C]``.
            teacher_logits: ``[..., C]``, same shape; detached here.
            labels: ``[...]`` integer class labels (required).
            mask: ``[...]`` bool, True keeps a position.
        """
        if labels is None:
            raise ValueError(
                "MFTLoss needs `labels`: call `model.compute_kd_loss(labels=labels)` "
                "(or `loss(student, teacher, labels=labels)`)."
            )
        student_logits = extract_logits(student_logits, "student")
        teacher_logits = extract_logits(teacher_logits, "teacher").detach()
        check_logits_pair(student_logits, teacher_logits)
        num_classes = student_logits.shape[-1]
        keep = position_mask(student_logits.shape[:-1], mask, labels, self.ignore_index)
        safe_labels = labels.masked_fill(labels == self.ignore_index, 0).reshape(-1)  # [N]
        teacher_probs = _scaled_log_probs(teacher_logits, self.temperature).exp()
        corrected = _mft_corrected_probs(
            teacher_probs.reshape(-1, num_classes), safe_labels, self.threshold
        ).reshape(teacher_probs.shape)
        kl = forward_kl(
            _scaled_log_probs(student_logits, self.temperature),
            corrected.clamp(min=0).log(),
        )
        kl = kl * self.temperature**2
        return reduce_positions(kl, self.reduction, num_classes, keep)


register_loss("logits_distillation", LogitsDistillationLoss)
register_loss("mft", MFTLoss)
