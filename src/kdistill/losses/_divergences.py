"""Per-position divergences between a teacher and a student distribution over the last axis.

One implementation of each formula, shared by the plain logit losses and the memory-efficient
LLM losses. Inputs are log-probabilities in float32 (``log_softmax`` of temperature-scaled
logits), shape ``[..., C]``; outputs have shape ``[...]``. The teacher side is never
differentiated by callers (they pass detached tensors).
"""

import math

import torch
from torch import Tensor

__all__ = ["forward_kl", "generalized_jsd", "reverse_kl", "total_variation"]


def _kl(p_log: Tensor, q_log: Tensor) -> Tensor:
    """KL(p ‖ q) = Σ p·(log p − log q); terms with p = 0 contribute exactly 0 (not nan)."""
    p = p_log.exp()
    terms = torch.where(p > 0, p * (p_log - q_log), p.new_zeros(()))
    return terms.sum(-1)


def forward_kl(student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
    """KL(teacher ‖ student): the Hinton KD divergence (mass-covering)."""
    return _kl(teacher_log_probs, student_log_probs)


def reverse_kl(student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
    """KL(student ‖ teacher): mode-seeking."""
    return _kl(student_log_probs, teacher_log_probs)


def generalized_jsd(student_log_probs: Tensor, teacher_log_probs: Tensor, beta: float) -> Tensor:
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al., 2024, arXiv 2306.13649).

    ``β·KL(T ‖ M) + (1−β)·KL(S ‖ M)`` with the mixture ``M = β·T + (1−β)·S``. As β→0 the value
    divided by β tends to forward KL(T ‖ S); as β→1, divided by (1−β), to reverse KL(S ‖ T).
    At the endpoints themselves (where the mixture formula is identically 0) it returns those
    KLs, the convention of TRL and Liger-Kernel.
    """
    if beta == 0.0:
        return forward_kl(student_log_probs, teacher_log_probs)
    if beta == 1.0:
        return reverse_kl(student_log_probs, teacher_log_probs)
    mixture_log_probs = torch.logsumexp(
        torch.stack([teacher_log_probs + math.log(beta), student_log_probs + math.log(1 - beta)]),
        dim=0,
    )
    return beta * _kl(teacher_log_probs, mixture_log_probs) + (1 - beta) * _kl(
        student_log_probs, mixture_log_probs
    )


def total_variation(student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
    """Total variation distance ``½ Σ |p_T − p_S|``, in [0, 1]."""
    return 0.5 * (teacher_log_probs.exp() - student_log_probs.exp()).abs().sum(-1)
