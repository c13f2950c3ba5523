"""Divergence losses between the student's and the teacher's softened class distributions.

- ``LogitsDistillationLoss``: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
  Network", arXiv 1503.02531. Reference behaviour: NVIDIA ModelOpt 0.47
  ``modelopt/torch/distill/losses.py`` (Apache-2.0), default reduction changed to batchmean.
- ``ReverseKLLoss``: KL(student ‖ teacher), the mode-seeking direction (e.g. MiniLLM, Gu et al.,
  arXiv 2306.08543).
- ``JSDLoss``: generalized Jensen-Shannon divergence of GKD (Agarwal et al., "On-Policy
  Distillation of Language Models", arXiv 2306.13649); endpoint convention of TRL's
  ``GKDTrainer.generalized_jsd_loss`` and Liger-Kernel (Apache-2.0).
- ``SkewKLLoss`` / ``SkewReverseKLLoss``: Ko et al., "DistiLLM: Towards Streamlined Distillation
  for Large Language Models", arXiv 2402.03898; reference code jongwooko/distillm (MIT).
- ``TVDLoss``: total variation distance (e.g. Wen et al., "f-Divergence Minimization for
  Sequence-Level Knowledge Distillation", arXiv 2307.15190).

Each is a ``LogitDivergenceLoss`` (``_logit_loss.py``): the shared base does the input handling,
masking, reduction and T²; the classes here only name their divergence from ``_divergences.py``.
Top-k KL, DKD and MFT live in ``topk.py``, ``dkd.py`` and ``mft.py``.
"""

from typing import Any

from torch import Tensor

from .._recipes import LossRecipe
from .._validation import check_unit_interval
from ._divergences import (
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    total_variation,
)
from ._logit_loss import LogitDivergenceLoss
from ._registry import register_loss

# TopKTeacher moved to topk.py; this re-export keeps `from kdistill.losses.logits import
# TopKTeacher` (kdistill.cache) working until those imports use `kdistill.losses`.
from .topk import TopKTeacher as TopKTeacher

__all__ = [
    "JSDLoss",
    "LogitsDistillationLoss",
    "ReverseKLLoss",
    "SkewKLLoss",
    "SkewReverseKLLoss",
    "TVDLoss",
]


@register_loss(
    "logits_distillation", recipe=LossRecipe(lambda: LogitsDistillationLoss(temperature=2.0))
)
class LogitsDistillationLoss(LogitDivergenceLoss):
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

    def divergence(self, student_log_probs: Tensor, teacher: Any, labels: Tensor | None) -> Tensor:
        """Forward KL(teacher ‖ student) per position."""
        return forward_kl(student_log_probs, teacher)


@register_loss("reverse_kl", recipe=LossRecipe(lambda: ReverseKLLoss(temperature=2.0)))
class ReverseKLLoss(LogitDivergenceLoss):
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

    def divergence(self, student_log_probs: Tensor, teacher: Any, labels: Tensor | None) -> Tensor:
        """Reverse KL(student ‖ teacher) per position."""
        return reverse_kl(student_log_probs, teacher)


@register_loss("jsd", recipe=LossRecipe(lambda: JSDLoss(beta=0.3, temperature=2.0)))
class JSDLoss(LogitDivergenceLoss):
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
        self.beta = check_unit_interval("beta", beta)

    def divergence(self, student_log_probs: Tensor, teacher: Any, labels: Tensor | None) -> Tensor:
        """Generalized JSD(β) per position."""
        return generalized_jsd(student_log_probs, teacher, self.beta)


@register_loss("skew_kl", recipe=LossRecipe(lambda: SkewKLLoss(alpha=0.1, temperature=2.0)))
class SkewKLLoss(LogitDivergenceLoss):
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
        self.alpha = check_unit_interval("alpha", alpha)

    def divergence(self, student_log_probs: Tensor, teacher: Any, labels: Tensor | None) -> Tensor:
        """Skew KL(p ‖ α·p + (1−α)·q) per position."""
        return skew_forward_kl(student_log_probs, teacher, self.alpha)


@register_loss(
    "skew_reverse_kl", recipe=LossRecipe(lambda: SkewReverseKLLoss(alpha=0.1, temperature=2.0))
)
class SkewReverseKLLoss(LogitDivergenceLoss):
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
        self.alpha = check_unit_interval("alpha", alpha)

    def divergence(self, student_log_probs: Tensor, teacher: Any, labels: Tensor | None) -> Tensor:
        """Skew reverse KL(q ‖ (1−α)·p + α·q) per position."""
        return skew_reverse_kl(student_log_probs, teacher, self.alpha)


@register_loss("tvd", recipe=LossRecipe(lambda: TVDLoss(temperature=2.0)))
class TVDLoss(LogitDivergenceLoss):
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

    temperature_squared = False

    def divergence(self, student_log_probs: Tensor, teacher: Any, labels: Tensor | None) -> Tensor:
        """Total variation distance per position."""
        return total_variation(student_log_probs, teacher)
