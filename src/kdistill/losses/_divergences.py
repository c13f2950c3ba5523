"""Per-position divergences between a teacher and a student distribution over the last axis.

One implementation of each formula, shared by the plain logit losses and the memory-efficient
LLM losses. Inputs are log-probabilities in float32 (``log_softmax`` of temperature-scaled
logits), shape ``[..., C]``; outputs have shape ``[...]``. The teacher side is never
differentiated by callers (they pass detached tensors). The last section compares distributions
over two different vocabularies (``[..., V_s]`` and ``[..., V_t]``): ULD's transport distance
(``uld_distance``) and the two terms of the hybrid ULD loss (``hybrid_uld_terms``, with the
shared-vocabulary split ``SharedIndex``); their papers are cited in ``cross_tokenizer.py``.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SharedIndex",
    "forward_kl",
    "generalized_jsd",
    "hybrid_uld_terms",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tempered_log_probs",
    "topk_forward_kl",
    "topk_forward_kl_sparse",
    "topk_log_tail_mass",
    "total_variation",
    "uld_distance",
    "upcast",
]


def upcast(x: Tensor) -> Tensor:
    """Promote half precision (float16/bfloat16) to float32; float32 and float64 stay as they are.

    Loss math runs in at least float32; float64 inputs keep float64 so that ``gradcheck`` works.
    """
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def tempered_log_probs(logits: Tensor, temperature: float) -> Tensor:
    """``log_softmax(logits / T)`` over the last axis, in at least float32 (float64 stays).

    The one softmax of every logit loss, plain and chunked. T = 1 skips the division (exact).
    """
    logits = upcast(logits)
    return F.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)


def _kl(p_log: Tensor, q_log: Tensor) -> Tensor:
    """KL(p ‖ q) = Σ p·(log p − log q); terms with p = 0 contribute exactly 0 (not nan)."""
    p = p_log.exp()
    terms = torch.where(p > 0, p * (p_log - q_log), p.new_zeros(()))
    return terms.sum(-1)


def _log_mixture(a_log: Tensor, b_log: Tensor, weight_a: float) -> Tensor:
    """``log(w·a + (1−w)·b)`` from log-probabilities, computed stably with ``logsumexp``."""
    if weight_a == 0.0:
        return b_log
    if weight_a == 1.0:
        return a_log
    return torch.logsumexp(
        torch.stack([a_log + math.log(weight_a), b_log + math.log(1 - weight_a)]), dim=0
    )


def forward_kl(student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
    """KL(teacher ‖ student): the Hinton KD divergence (mass-covering).

    Computed as ``Σ xlogy(p, p) − Σ p·log q`` with the (detached) teacher's ``p``, so the gradient
    graph holds only ``p·log q``: this is the hot path of every KD step, and each extra op costs
    a measurable share of a small model's step. Classes with p = 0 contribute exactly 0 when the
    student's log q is finite (always, for finite logits); as with ``F.kl_div``, p = 0 against
    log q = −inf gives nan, so mask classes with a large negative finite logit, not −inf.
    """
    teacher_probs = teacher_log_probs.exp()
    cross = teacher_probs * student_log_probs
    return (torch.xlogy(teacher_probs, teacher_probs) - cross).sum(-1)


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
    mixture_log_probs = _log_mixture(teacher_log_probs, student_log_probs, beta)
    return beta * _kl(teacher_log_probs, mixture_log_probs) + (1 - beta) * _kl(
        student_log_probs, mixture_log_probs
    )


def total_variation(student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
    """Total variation distance ``½ Σ |p_T − p_S|``, in [0, 1]."""
    return 0.5 * (teacher_log_probs.exp() - student_log_probs.exp()).abs().sum(-1)


def skew_forward_kl(student_log_probs: Tensor, teacher_log_probs: Tensor, alpha: float) -> Tensor:
    """Skew KL of DistiLLM (Ko et al., 2024, arXiv 2402.03898): ``KL(T ‖ α·T + (1−α)·S)``.

    α = 0 is forward KL(T ‖ S); α = 1 is identically 0. The mixture keeps the student's
    log-probability finite where the student puts (almost) no mass, which bounds the gradient.
    """
    return _kl(teacher_log_probs, _log_mixture(teacher_log_probs, student_log_probs, alpha))


def skew_reverse_kl(student_log_probs: Tensor, teacher_log_probs: Tensor, alpha: float) -> Tensor:
    """Skew reverse KL of DistiLLM (Ko et al., 2024): ``KL(S ‖ (1−α)·T + α·S)``.

    α = 0 is reverse KL(S ‖ T); α = 1 is identically 0.
    """
    return _kl(student_log_probs, _log_mixture(student_log_probs, teacher_log_probs, alpha))


def topk_log_tail_mass(log_probs: Tensor, indices: Tensor) -> Tensor:
    """``log(1 − Σ_{i ∈ indices} p_i)`` computed exactly as the log-sum of the other classes.

    Args:
        log_probs: Log-probabilities ``[..., C]``.
        indices: Class indices ``[..., k]`` (distinct along the last axis).

    Returns:
        ``[...]``; a very negative finite number (not ``-inf``) when ``indices`` cover every
        class, so that gradients stay finite.
    """
    # a finite fill (not -inf) keeps logsumexp's backward free of nan when nothing is left
    fill = torch.finfo(log_probs.dtype).min
    rest = log_probs.scatter(-1, indices, fill)
    return torch.logsumexp(rest, dim=-1)


def topk_forward_kl_sparse(
    student_log_probs: Tensor,
    teacher_topk_log_probs: Tensor,
    teacher_topk_indices: Tensor,
    teacher_log_tail: Tensor | None = None,
) -> Tensor:
    """Forward KL over the teacher's top-k classes plus one bucket for the remaining mass.

    With teacher top-k probabilities ``p_i`` (``i ∈ K``), teacher tail ``p_R = 1 − Σ_K p_i``, the
    student's probabilities ``q_i`` on the same classes and student tail ``q_R = 1 − Σ_K q_i``:
    ``Σ_{i∈K} p_i·(log p_i − log q_i) + p_R·(log p_R − log q_R)``. Both sides are distributions
    over k + 1 buckets, so no teacher mass is dropped; with k = C it is the full forward KL.

    Args:
        student_log_probs: Student log-probabilities ``[..., C]``.
        teacher_topk_log_probs: Teacher log-probabilities of its top-k classes ``[..., k]``.
        teacher_topk_indices: Their class indices ``[..., k]`` (int64, distinct).
        teacher_log_tail: ``log p_R`` ``[...]``; when ``None`` it is computed as
            ``log(1 − Σ exp(teacher_topk_log_probs))`` (clamped at 0 mass).

    Returns:
        ``[...]``.
    """
    # cached teachers may come in half precision: do the bucket arithmetic in the student's dtype
    teacher_topk_log_probs = teacher_topk_log_probs.to(student_log_probs.dtype)
    if teacher_log_tail is None:
        tail = (1 - teacher_topk_log_probs.exp().sum(-1)).clamp(min=0)
        teacher_log_tail = tail.log()
    teacher_log_tail = teacher_log_tail.to(student_log_probs.dtype)
    student_topk = student_log_probs.gather(-1, teacher_topk_indices)
    student_tail = topk_log_tail_mass(student_log_probs, teacher_topk_indices)
    teacher_buckets = torch.cat([teacher_topk_log_probs, teacher_log_tail.unsqueeze(-1)], dim=-1)
    student_buckets = torch.cat([student_topk, student_tail.unsqueeze(-1)], dim=-1)
    return forward_kl(student_buckets, teacher_buckets)


def topk_forward_kl(student_log_probs: Tensor, teacher_log_probs: Tensor, k: int) -> Tensor:
    """``topk_forward_kl_sparse`` with the top-k and exact tail taken from dense teacher log-probs.

    Args:
        student_log_probs: ``[..., C]``.
        teacher_log_probs: ``[..., C]``.
        k: Number of teacher classes kept (clamped to C).

    Returns:
        ``[...]``.
    """
    values, indices = teacher_log_probs.topk(min(k, teacher_log_probs.shape[-1]), dim=-1)
    tail = topk_log_tail_mass(teacher_log_probs, indices)
    return topk_forward_kl_sparse(student_log_probs, values, indices, tail)


# ---------------------------------------------------------------- between two vocabularies
def uld_distance(student_probs: Tensor, teacher_probs: Tensor) -> Tensor:
    """Wasserstein-1 distance of ULD: ``Σ_j |sort↓(q)_j − sort↓(p)_j|``, the shorter side 0-padded.

    With ``m = min(V_s, V_t)`` this is ``Σ_{j<m} |q↓_j − p↓_j|`` plus the mass in the longer
    side's sorted tail (``j ≥ m``), which faces the zero padding. It depends on each distribution
    only through its sorted values, so it is invariant to permutations of either vocabulary.

    Args:
        student_probs: ``[..., V_s]`` probabilities (or any non-negative masses).
        teacher_probs: ``[..., V_t]``, same leading shape.

    Returns:
        ``[...]``; in ``[0, 2]`` for two distributions.

    Example:
        >>> import torch
        >>> uld_distance(torch.tensor([0.5, 0.5]), torch.tensor([0.2, 0.7, 0.1]))
        tensor(0.6000)
    """
    student_sorted = student_probs.sort(dim=-1, descending=True).values
    teacher_sorted = teacher_probs.sort(dim=-1, descending=True).values
    m = min(student_sorted.shape[-1], teacher_sorted.shape[-1])
    head = (student_sorted[..., :m] - teacher_sorted[..., :m]).abs().sum(-1)
    return head + student_sorted[..., m:].sum(-1) + teacher_sorted[..., m:].sum(-1)


class SharedIndex:
    """Index tensors that split two vocabularies into shared and not-shared ("rest") ids.

    Args:
        teacher_shared: ``[K]`` int64 teacher ids; ``student_shared[k]`` is the student id of the
            same token.
        student_shared: ``[K]`` int64 student ids.
        teacher_size: V_t, the teacher's number of logits.
        student_size: V_s.

    Raises:
        ValueError: An id is out of range for its vocabulary size.
    """

    def __init__(
        self, teacher_shared: Tensor, student_shared: Tensor, teacher_size: int, student_size: int
    ) -> None:
        self.identity = False
        for role, ids, size in (
            ("teacher", teacher_shared, teacher_size),
            ("student", student_shared, student_size),
        ):
            if ids.numel() and int(ids.max()) >= size:
                raise ValueError(
                    f"Shared {role} token id {int(ids.max())} is out of range for {role} logits "
                    f"of size {size}. The shared-vocabulary map must come from the tokenizers of "
                    "these models (kdistill.xtoken.shared_vocabulary)."
                )
        self.teacher_shared = teacher_shared
        self.student_shared = student_shared
        self.teacher_rest = _complement(teacher_shared, teacher_size)
        self.student_rest = _complement(student_shared, student_size)

    @classmethod
    def identity_map(cls, size: int, device: torch.device) -> "SharedIndex":
        """Every id shared with itself: two copies of one vocabulary of ``size`` ids."""
        ids = torch.arange(size, device=device)
        index = cls(ids, ids, size, size)
        index.identity = True
        return index

    @property
    def covers_both(self) -> bool:
        """Every id of both vocabularies is shared (e.g. identical tokenizers)."""
        return self.teacher_rest.numel() == 0 and self.student_rest.numel() == 0


def _complement(ids: Tensor, size: int) -> Tensor:
    """The ids in ``[0, size)`` that are not in ``ids``, ascending."""
    keep = torch.ones(size, dtype=torch.bool, device=ids.device)
    keep[ids] = False
    return keep.nonzero().squeeze(1)


def hybrid_uld_terms(
    student_log_probs: Tensor, teacher_log_probs: Tensor, index: SharedIndex
) -> tuple[Tensor, Tensor]:
    """The two terms of the hybrid loss: shared-token KL and ULD on the rest.

    With teacher probabilities ``p`` over V_t, student ``q`` over V_s, shared pairs
    ``(a_k, b_k)``, shared masses ``P = Σ_k p[a_k]``, ``Q = Σ_k q[b_k]``, renormalized shared
    distributions ``p̃_k = p[a_k] / P``, ``q̃_k = q[b_k] / Q`` and the not-shared parts ``p_R``,
    ``q_R`` (unnormalized):

    - ``kl = P · KL(p̃ ‖ q̃) = Σ_k p[a_k]·(log p[a_k] − log q[b_k]) − P·log P + P·log Q``
      (0 when P = 0; when every id of both sides is shared, P = Q = 1 and it is computed as
      plain forward KL);
    - ``uld = uld_distance(q_R, p_R)`` (0 when neither side has a rest).

    Args:
        student_log_probs: ``[..., V_s]`` log-probabilities.
        teacher_log_probs: ``[..., V_t]`` log-probabilities (detached by callers).
        index: The shared / rest split of the two vocabularies.

    Returns:
        ``(kl, uld)``, each ``[...]``.
    """
    if index.identity:
        kl = forward_kl(student_log_probs, teacher_log_probs)
        return kl, torch.zeros_like(kl)
    teacher_shared = teacher_log_probs.index_select(-1, index.teacher_shared)  # [..., K]
    student_shared = student_log_probs.index_select(-1, index.student_shared)  # [..., K]
    kl = forward_kl(student_shared, teacher_shared)
    if index.covers_both:
        return kl, torch.zeros_like(kl)
    mass = teacher_shared.exp().sum(-1)  # P
    kl = kl - torch.xlogy(mass, mass) + mass * torch.logsumexp(student_shared, dim=-1)
    uld = uld_distance(
        student_log_probs.index_select(-1, index.student_rest).exp(),
        teacher_log_probs.index_select(-1, index.teacher_rest).exp(),
    )
    return kl, uld
