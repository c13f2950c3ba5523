"""Logit-matching losses: Hinton KD and minifinetuning.

- ``LogitsDistillationLoss``: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
  Network", arXiv 1503.02531. Reference behaviour: NVIDIA ModelOpt 0.47
  ``modelopt/torch/distill/losses.py`` (Apache-2.0), default reduction changed to batchmean.
- ``MFTLoss``: Belcak et al., "Minifinetuning", arXiv 2506.15702; the teacher correction follows
  ModelOpt 0.47 ``MFTLoss._prepare_corrected_distributions`` (Apache-2.0).
- ``ReverseKLLoss``: KL(student ‖ teacher), the mode-seeking direction (e.g. MiniLLM, Gu et al.,
  arXiv 2306.08543).
- ``JSDLoss``: generalized Jensen-Shannon divergence of GKD (Agarwal et al., "On-Policy
  Distillation of Language Models", arXiv 2306.13649); endpoint convention of TRL's
  ``GKDTrainer.generalized_jsd_loss`` and Liger-Kernel (Apache-2.0).
- ``SkewKLLoss`` / ``SkewReverseKLLoss``: Ko et al., "DistiLLM: Towards Streamlined Distillation
  for Large Language Models", arXiv 2402.03898; reference code jongwooko/distillm (MIT).
- ``TVDLoss``: total variation distance (e.g. Wen et al., "f-Divergence Minimization for
  Sequence-Level Knowledge Distillation", arXiv 2307.15190).
- ``DKDLoss``: Zhao et al., "Decoupled Knowledge Distillation", arXiv 2203.08679; reference code
  megvii-research/mdistiller (MIT), without its epoch warm-up (use ``ScheduledLossBalancer``).
- ``TopKLogitsKLLoss``: forward KL on the teacher's top-k classes plus a tail bucket, the sparse
  target format of cached teachers (e.g. arcee-ai/DistillKit's top-k logit datasets).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._divergences import (
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    topk_forward_kl_sparse,
    topk_log_tail_mass,
    total_variation,
    upcast,
)
from ._registry import register_loss
from ._utils import (
    check_logits_pair,
    check_reduction,
    extract_logits,
    position_mask,
    reduce_positions,
)

__all__ = [
    "DKDLoss",
    "JSDLoss",
    "LogitsDistillationLoss",
    "MFTLoss",
    "ReverseKLLoss",
    "SkewKLLoss",
    "SkewReverseKLLoss",
    "TVDLoss",
    "TopKLogitsKLLoss",
    "TopKTeacher",
]


def _check_temperature(temperature: float) -> float:
    if not isinstance(temperature, int | float) or not temperature > 0:
        raise ValueError(f"`temperature` must be a positive number, got {temperature!r}.")
    return float(temperature)


def _scaled_log_probs(logits: Tensor, temperature: float) -> Tensor:
    """``log_softmax(logits / T)`` over the last axis, in float32 (float64 stays float64)."""
    return F.log_softmax(upcast(logits) / temperature, dim=-1)


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
        loss = reduce_positions(kl, self.reduction, student_logits.shape[-1], keep)
        # T² after the reduction (it is linear): one multiply on a scalar instead of [..]
        return loss * self.temperature**2 if self.temperature != 1.0 else loss


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


def _check_unit_interval(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"`{name}` must be a number in [0, 1], got {value!r}.")
    return float(value)


class _DivergenceLoss(nn.Module):
    """Shared forward of the per-position divergence losses (subclasses give ``_divergence``).

    Unwraps the inputs, detaches the teacher, checks shapes, computes the divergence between
    ``log_softmax(s/T)`` and ``log_softmax(t/T)`` in float32 (float64 inputs stay float64),
    multiplies by T² when ``_t_squared`` and reduces with the shared masking helpers.
    """

    _t_squared = True

    def __init__(self, temperature: float, reduction: str, ignore_index: int | None) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)
        self.reduction = check_reduction(reduction)
        self.ignore_index = ignore_index

    def _divergence(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
        raise NotImplementedError

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

        Returns:
            A scalar, or ``[...]`` with ``reduction="none"``.
        """
        student_logits = extract_logits(student_logits, "student")
        teacher_logits = extract_logits(teacher_logits, "teacher").detach()
        check_logits_pair(student_logits, teacher_logits)
        keep = position_mask(student_logits.shape[:-1], mask, labels, self.ignore_index)
        per_position = self._divergence(
            _scaled_log_probs(student_logits, self.temperature),
            _scaled_log_probs(teacher_logits, self.temperature),
        )
        if self._t_squared:
            per_position = per_position * self.temperature**2
        return reduce_positions(per_position, self.reduction, student_logits.shape[-1], keep)


class ReverseKLLoss(_DivergenceLoss):
    """Reverse KL: ``T² · KL(softmax(s/T) ‖ softmax(t/T)) = T² · Σ q·(log q − log p)``.

    ``q`` is the student and ``p`` the teacher distribution over the last axis. Mode-seeking: the
    student is pushed onto the teacher's main modes instead of covering all of its mass, the
    usual choice for generative LMs (MiniLLM, Gu et al., arXiv 2306.08543). Teacher detached,
    float32 math; reduced per position (sample or token) like ``LogitsDistillationLoss``:
    ``"batchmean"`` averages over kept positions, masked positions (``mask`` False or ``labels ==
    ignore_index``) contribute 0 and are not counted, an all-masked batch gives 0.

    Args:
        temperature: Softmax temperature T > 0 applied to both sides.
        reduction: One of ``"batchmean"``, ``"sum"``, ``"mean"``, ``"none"``.
        ignore_index: When set, positions whose ``labels`` equal it are masked out.

    Example:
        >>> import torch
        >>> logits = torch.randn(4, 10)
        >>> float(ReverseKLLoss()(logits, logits))
        0.0
    """

    def __init__(
        self,
        temperature: float = 1.0,
        reduction: str = "batchmean",
        ignore_index: int | None = None,
    ) -> None:
        super().__init__(temperature, reduction, ignore_index)

    def _divergence(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
        return reverse_kl(student_log_probs, teacher_log_probs)


class JSDLoss(_DivergenceLoss):
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al., 2024, arXiv 2306.13649).

    With teacher ``p = softmax(t/T)``, student ``q = softmax(s/T)`` and mixture
    ``m = β·p + (1−β)·q``: ``T² · (β·KL(p ‖ m) + (1−β)·KL(q ‖ m))`` per position. β = 0.5 is the
    symmetric JSD (bounded by ``T²·log 2``). As β→0 the value divided by β tends to forward
    KL(p ‖ q) and as β→1, divided by (1−β), to reverse KL(q ‖ p); at exactly β = 0 and β = 1 the
    loss *is* forward and reverse KL (TRL and Liger-Kernel convention). Teacher detached, float32
    math, reduced per position like ``LogitsDistillationLoss`` (masked positions dropped, an
    all-masked batch gives 0).

    Args:
        beta: Interpolation β in [0, 1].
        temperature: Softmax temperature T > 0.
        reduction: One of ``"batchmean"``, ``"sum"``, ``"mean"``, ``"none"``.
        ignore_index: When set, positions whose ``labels`` equal it are masked out.
    """

    def __init__(
        self,
        beta: float = 0.5,
        temperature: float = 1.0,
        reduction: str = "batchmean",
        ignore_index: int | None = None,
    ) -> None:
        super().__init__(temperature, reduction, ignore_index)
        self.beta = _check_unit_interval("beta", beta)

    def _divergence(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
        return generalized_jsd(student_log_probs, teacher_log_probs, self.beta)


class SkewKLLoss(_DivergenceLoss):
    """Skew KL of DistiLLM (Ko et al., 2024, arXiv 2402.03898): ``T² · KL(p ‖ α·p + (1−α)·q)``.

    ``p = softmax(t/T)`` is the teacher, ``q = softmax(s/T)`` the student. Mixing a little of the
    teacher into the student side keeps the log finite where the student has no mass, which
    bounds the gradient and stabilises training; α = 0 is forward KL, α = 1 gives 0. Teacher
    detached, float32 math, reduced per position like ``LogitsDistillationLoss``.

    Args:
        alpha: Skew α in [0, 1] (DistiLLM uses 0.1).
        temperature: Softmax temperature T > 0.
        reduction: One of ``"batchmean"``, ``"sum"``, ``"mean"``, ``"none"``.
        ignore_index: When set, positions whose ``labels`` equal it are masked out.
    """

    def __init__(
        self,
        alpha: float = 0.1,
        temperature: float = 1.0,
        reduction: str = "batchmean",
        ignore_index: int | None = None,
    ) -> None:
        super().__init__(temperature, reduction, ignore_index)
        self.alpha = _check_unit_interval("alpha", alpha)

    def _divergence(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
        return skew_forward_kl(student_log_probs, teacher_log_probs, self.alpha)


class SkewReverseKLLoss(_DivergenceLoss):
    """Skew reverse KL of DistiLLM (Ko et al., 2024): ``T² · KL(q ‖ (1−α)·p + α·q)``.

    ``p`` teacher, ``q`` student (softmax of logits / T). α = 0 is reverse KL, α = 1 gives 0.
    Teacher detached, float32 math, reduced per position like ``LogitsDistillationLoss``.

    Args:
        alpha: Skew α in [0, 1] (DistiLLM uses 0.1).
        temperature: Softmax temperature T > 0.
        reduction: One of ``"batchmean"``, ``"sum"``, ``"mean"``, ``"none"``.
        ignore_index: When set, positions whose ``labels`` equal it are masked out.
    """

    def __init__(
        self,
        alpha: float = 0.1,
        temperature: float = 1.0,
        reduction: str = "batchmean",
        ignore_index: int | None = None,
    ) -> None:
        super().__init__(temperature, reduction, ignore_index)
        self.alpha = _check_unit_interval("alpha", alpha)

    def _divergence(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
        return skew_reverse_kl(student_log_probs, teacher_log_probs, self.alpha)


class TVDLoss(_DivergenceLoss):
    """Total variation distance: ``½ · Σ |softmax(t/T) − softmax(s/T)|`` per position, in [0, 1].

    A bounded, symmetric divergence whose gradient cannot blow up (f-divergence KD, Wen et al.,
    arXiv 2307.15190). Not multiplied by T² (the distance is bounded; its gradient scales as 1/T,
    not 1/T²). Teacher detached, float32 math, reduced per position like
    ``LogitsDistillationLoss`` (``"mean"`` also divides by C).

    Args:
        temperature: Softmax temperature T > 0.
        reduction: One of ``"batchmean"``, ``"sum"``, ``"mean"``, ``"none"``.
        ignore_index: When set, positions whose ``labels`` equal it are masked out.
    """

    _t_squared = False

    def __init__(
        self,
        temperature: float = 1.0,
        reduction: str = "batchmean",
        ignore_index: int | None = None,
    ) -> None:
        super().__init__(temperature, reduction, ignore_index)

    def _divergence(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
        return total_variation(student_log_probs, teacher_log_probs)


class DKDLoss(nn.Module):
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
        alpha: Weight α of the target-class term (TCKD).
        beta: Weight β of the non-target-class term (NCKD).
        temperature: Softmax temperature T > 0.
        reduction: One of ``"batchmean"``, ``"sum"``, ``"mean"``, ``"none"``.
        ignore_index: Label value whose positions are dropped.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        reduction: str = "batchmean",
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        for name, value in (("alpha", alpha), ("beta", beta)):
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"`{name}` must be a non-negative number, got {value!r}.")
        self.alpha = float(alpha)
        self.beta = float(beta)
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
            student_logits: ``[..., C]`` with C ≥ 2.
            teacher_logits: ``[..., C]``, same shape; detached here.
            labels: ``[...]`` integer class labels (required).
            mask: ``[...]`` bool, True keeps a position.
        """
        if labels is None:
            raise ValueError(
                "DKDLoss needs `labels` (the target class of each position): call "
                "`model.compute_kd_loss(labels=labels)` or `loss(student, teacher, labels=labels)`."
            )
        student_logits = extract_logits(student_logits, "student")
        teacher_logits = extract_logits(teacher_logits, "teacher").detach()
        check_logits_pair(student_logits, teacher_logits)
        num_classes = student_logits.shape[-1]
        if num_classes < 2:
            raise ValueError(
                f"DKDLoss needs at least 2 classes to split target and non-target mass, got "
                f"logits of shape {tuple(student_logits.shape)}."
            )
        keep = position_mask(student_logits.shape[:-1], mask, labels, self.ignore_index)
        safe_labels = labels.masked_fill(labels == self.ignore_index, 0)
        is_target = F.one_hot(safe_labels, num_classes).bool()  # [..., C]
        per_position = self.alpha * forward_kl(
            self._binary_log_probs(student_logits, is_target),
            self._binary_log_probs(teacher_logits, is_target),
        ) + self.beta * forward_kl(
            self._non_target_log_probs(student_logits, is_target),
            self._non_target_log_probs(teacher_logits, is_target),
        )
        per_position = per_position * self.temperature**2
        return reduce_positions(per_position, self.reduction, num_classes, keep)

    def _binary_log_probs(self, logits: Tensor, is_target: Tensor) -> Tensor:
        """``[log p_y, log(1 − p_y)]`` ``[..., 2]``, the second as an exact log-sum."""
        log_probs = _scaled_log_probs(logits, self.temperature)
        target = log_probs.masked_fill(~is_target, float("-inf")).logsumexp(-1)
        rest = log_probs.masked_fill(is_target, float("-inf")).logsumexp(-1)
        return torch.stack([target, rest], dim=-1)

    def _non_target_log_probs(self, logits: Tensor, is_target: Tensor) -> Tensor:
        """Log-softmax over the non-target classes ``[..., C]`` (probability 0 at the target).

        The target is filled with the dtype's most negative finite value, not −inf: forward KL
        treats 0·log q as 0 only for finite log q.
        """
        scaled = upcast(logits) / self.temperature
        return F.log_softmax(scaled.masked_fill(is_target, torch.finfo(scaled.dtype).min), dim=-1)


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
            self.log_tail_mass.shape != self.log_probs.shape[:-1]
        ):
            raise ValueError(
                f"TopKTeacher `log_tail_mass` must have shape {tuple(self.log_probs.shape[:-1])}, "
                f"got {tuple(self.log_tail_mass.shape)}."
            )
        _check_temperature(self.temperature)

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
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise ValueError(f"`k` must be a positive int, got {k!r}.")
        temperature = _check_temperature(temperature)
        if k > logits.shape[-1]:
            raise ValueError(
                f"`k`={k} exceeds the {logits.shape[-1]} classes of logits of shape "
                f"{tuple(logits.shape)}: pick k <= {logits.shape[-1]}."
            )
        log_probs = _scaled_log_probs(logits.detach(), temperature)
        values, indices = log_probs.topk(k, dim=-1)
        return cls(values, indices, topk_log_tail_mass(log_probs, indices), temperature)


class TopKLogitsKLLoss(nn.Module):
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
        k: Number of teacher classes kept per position.
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
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise ValueError(f"`k` must be a positive int, got {k!r}.")
        self.k = k
        self.temperature = _check_temperature(temperature)
        self.reduction = check_reduction(reduction)
        self.ignore_index = ignore_index

    def _sparse_teacher(
        self, teacher: "Tensor | TopKTeacher", student_logits: Tensor
    ) -> TopKTeacher:
        if not isinstance(teacher, TopKTeacher):
            teacher_logits = extract_logits(teacher, "teacher").detach()
            check_logits_pair(student_logits, teacher_logits)
            return TopKTeacher.from_logits(
                teacher_logits, min(self.k, teacher_logits.shape[-1]), self.temperature
            )
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

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: "Tensor | TopKTeacher",
        *,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Compute the loss.

        Args:
            student_logits: ``[..., C]`` (or a model output holding logits).
            teacher_logits: Dense ``[..., C]`` logits (detached here) or a ``TopKTeacher``
                whose tensors are ``[..., k]``.
            labels: ``[...]`` integer labels, used only with ``ignore_index``.
            mask: ``[...]`` bool, True keeps a position.
        """
        student_logits = extract_logits(student_logits, "student")
        teacher = self._sparse_teacher(teacher_logits, student_logits)
        keep = position_mask(student_logits.shape[:-1], mask, labels, self.ignore_index)
        tail = None if teacher.log_tail_mass is None else teacher.log_tail_mass.detach()
        per_position = topk_forward_kl_sparse(
            _scaled_log_probs(student_logits, self.temperature),
            teacher.log_probs.detach(),
            teacher.indices,
            tail,
        )
        per_position = per_position * self.temperature**2
        return reduce_positions(per_position, self.reduction, student_logits.shape[-1], keep)


register_loss("logits_distillation", LogitsDistillationLoss)
register_loss("mft", MFTLoss)
register_loss("reverse_kl", ReverseKLLoss)
register_loss("jsd", JSDLoss)
register_loss("skew_kl", SkewKLLoss)
register_loss("skew_reverse_kl", SkewReverseKLLoss)
register_loss("tvd", TVDLoss)
register_loss("dkd", DKDLoss)
register_loss("topk_kl", TopKLogitsKLLoss)
