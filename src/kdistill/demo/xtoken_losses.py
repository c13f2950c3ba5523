"""ULD and hybrid ULD against a *top-k* teacher (an offline cache), for ``kdistill demo xtoken``.

``kdistill.losses.cross_tokenizer`` computes ``ULDLoss`` and ``HybridULDLoss`` from the teacher's
full distribution over its V_t tokens (49,152 for SmolLM2). A ``kdistill.TeacherCache`` built
with ``top_k=k`` keeps only the k largest teacher probabilities of each position, their token ids
and the mass ``r`` of the other V_t − k tokens (``kdistill.TopKTeacher``). From those, this
module computes the two losses exactly except for the unknown tail:

- **ULD** (sorted-probability transport, the shorter side zero-padded): the k known teacher
  probabilities are the k largest, so they are the first k of the teacher's sorted vector and
  face the student's k largest. The other V_t − k teacher entries are unknown except for their
  sum ``r``; they face the student's sorted tail, whose transport cost
  ``Σ_{j≥k} |q↓_j − p↓_j|`` is replaced by its lower bound ``|Σ_{j≥k} q↓_j − r|`` (triangle
  inequality; attained when the teacher's tail is proportional to the student's)::

      uld_topk = Σ_{j<k} |q↓_j − p↓_j| + |Σ_{j≥k} q↓_j − r|      (q↓ zero-padded to length k)

  so ``uld_topk ≤ ULD ≤ uld_topk + 2·min(Σ_{j≥k} q↓_j, r)``, and ``uld_topk = ULD`` when the
  top-k hold all of the teacher's mass (r = 0, e.g. k = V_t).
- **Hybrid** (``HybridULDLoss``'s formula: exact KL over the shared tokens, weighted by the
  teacher's shared mass, plus ULD over the rest): the shared-token KL uses the teacher's shared
  tokens among its top-k (the others have unknown, at most ``p↓_{k-1}``, probabilities, and are
  treated as 0), ``P̂ = Σ_{shared top-k} p``; the rest's ULD uses the not-shared top-k
  probabilities as the known head and the whole tail mass ``r`` as the rest's unknown tail (with
  the bound above). It equals ``HybridULDLoss`` when r = 0.

The tail mass of SmolLM2 at k = 64 on the demo's text is small (``report.json`` records its mean
and a check of both approximations against the exact losses on real teacher logits).
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill import TopKTeacher
from kdistill._validation import check_choice, check_non_negative, check_positive
from kdistill.xtoken import SharedVocabulary

__all__ = ["DIVERGENCES", "TopKCrossTokenizerLoss", "topk_hybrid_terms", "topk_uld_distance"]

DIVERGENCES = ("uld", "hybrid_uld")


def topk_uld_distance(
    student_probs: Tensor,
    teacher_head: Tensor,
    teacher_tail: Tensor,
    known: Tensor | None = None,
) -> Tensor:
    """ULD between a full student distribution and a teacher known by its largest entries.

    With ``q↓`` the student's probabilities sorted in decreasing order (zero-padded to the
    teacher head's length), ``p↓`` the ``n`` known teacher entries sorted likewise and ``r`` the
    teacher's remaining mass: ``Σ_{j<n} |q↓_j − p↓_j| + |Σ_{j≥n} q↓_j − r|``. The known entries
    must be the teacher's largest (as a top-k is), so that they are the head of its sorted
    vector; the tail term is the smallest transport cost any teacher tail of mass ``r`` could
    have (module docstring).

    Args:
        student_probs: ``[..., V_s]`` probabilities (or non-negative masses, e.g. the part of a
            distribution outside the shared tokens).
        teacher_head: ``[..., k]`` the teacher's largest probabilities, any order.
        teacher_tail: ``[...]`` the teacher mass outside the known entries (``r``).
        known: ``[..., k]`` bool, False for entries of ``teacher_head`` that are left out of the
            teacher side (the hybrid loss passes the rest of a vocabulary this way: its shared
            tokens are compared by the KL term); None: all used.

    Returns:
        ``[...]``, float like ``student_probs``.
    """
    k = teacher_head.shape[-1]
    if known is None:
        known = torch.ones_like(teacher_head, dtype=torch.bool)
    count = known.sum(-1, keepdim=True)  # [..., 1] n, the known entries per position
    head = teacher_head.masked_fill(~known, -1.0).sort(dim=-1, descending=True).values
    head = head.clamp(min=0.0)  # [..., k]: the n known entries first, then zeros (not counted)
    student_sorted = student_probs.sort(dim=-1, descending=True).values  # [..., V_s]
    width = max(k, student_sorted.shape[-1])
    student_sorted = F.pad(student_sorted, (0, width - student_sorted.shape[-1]))
    in_head = torch.arange(width, device=student_probs.device) < count  # [..., width]
    head = F.pad(head, (0, width - k))
    head_cost = ((student_sorted - head).abs() * in_head).sum(-1)
    student_tail = (student_sorted * ~in_head).sum(-1)
    return head_cost + (student_tail - teacher_tail.to(student_tail.dtype)).abs()


def topk_hybrid_terms(
    student_log_probs: Tensor,
    teacher: TopKTeacher,
    teacher_to_student: Tensor,
    student_shared: Tensor,
    student_rest: Tensor,
) -> tuple[Tensor, Tensor]:
    """The hybrid loss's two terms (``hybrid_uld_terms``) against a top-k teacher.

    With the teacher's top-k probabilities ``p_i`` (token ids ``a_i``), ``b_i`` the student id of
    ``a_i`` when that token is shared, ``P̂ = Σ_{shared i} p_i``, ``Q = Σ_{shared b} q_b`` (all
    shared student ids) and ``r`` the teacher's tail mass:

    - ``kl = Σ_{shared i} p_i·(log p_i − log q_{b_i}) − P̂·log P̂ + P̂·log Q``;
    - ``uld = topk_uld_distance(q_rest, p_{not-shared i}, r)``, ``q_rest`` the student's
      probabilities of its not-shared ids.

    Args:
        student_log_probs: ``[N, V_s]`` student log-probabilities at temperature T.
        teacher: Top-k teacher at the same positions: ``log_probs``/``indices`` ``[N, k]``,
            ``log_tail_mass`` ``[N]``.
        teacher_to_student: ``[V_t]`` int64, the student id of each teacher id, -1 if not shared.
        student_shared: ``[K]`` int64 shared student ids.
        student_rest: ``[V_s − K]`` int64 the other student ids.

    Returns:
        ``(kl, uld)``, each ``[N]``.
    """
    teacher_log_probs = teacher.log_probs.to(student_log_probs.dtype)
    mapped = teacher_to_student[teacher.indices]  # [N, k]
    shared = mapped >= 0
    probs = teacher_log_probs.exp()
    mass = (probs * shared).sum(-1)  # P̂
    student_at = student_log_probs.gather(-1, mapped.clamp(min=0))  # [N, k]
    kl = torch.where(shared, probs * (teacher_log_probs - student_at), 0.0).sum(-1)
    log_shared_mass = torch.logsumexp(student_log_probs.index_select(-1, student_shared), dim=-1)
    kl = kl - torch.xlogy(mass, mass) + mass * log_shared_mass
    tail = _tail_mass(teacher, student_log_probs.dtype)
    rest = student_log_probs.index_select(-1, student_rest).exp()
    return kl, topk_uld_distance(rest, probs, tail, known=~shared)


def _tail_mass(teacher: TopKTeacher, dtype: torch.dtype) -> Tensor:
    """``r``, the teacher's mass outside its top-k: ``[N]``."""
    if teacher.log_tail_mass is not None:
        return teacher.log_tail_mass.to(dtype).exp()
    return (1.0 - teacher.log_probs.to(dtype).exp().sum(-1)).clamp(min=0.0)


class TopKCrossTokenizerLoss(nn.Module):
    """ULD or hybrid ULD at aligned positions, the teacher given as a ``TopKTeacher``.

    At each kept aligned pair (teacher position i, student position j) the student's
    ``log_softmax(s_j / T)`` is compared with the teacher's cached top-k at i (computed at the
    same T) by ``topk_uld_distance`` (``"uld"``) or by
    ``kl_weight · T² · kl + uld_weight · uld`` of ``topk_hybrid_terms`` (``"hybrid_uld"``, the
    formula of ``HybridULDLoss``); the mean over kept pairs is returned (0 when none is kept).

    Args:
        divergence: ``"uld"`` or ``"hybrid_uld"``.
        temperature: T of the student's softmax; must equal the teacher's top-k temperature.
        shared: ``"hybrid_uld"`` only: the shared vocabulary (``TokenAligner.shared_vocabulary``).
        kl_weight: ``"hybrid_uld"`` only: weight of the shared-token KL term.
        uld_weight: ``"hybrid_uld"`` only: weight of the ULD term on the other tokens.

    Raises:
        ValueError: Unknown divergence, a bad weight or temperature, or ``shared`` missing for
            (or given to) the divergence that needs it (does not).
    """

    def __init__(
        self,
        divergence: str,
        temperature: float = 1.0,
        shared: SharedVocabulary | None = None,
        kl_weight: float = 1.0,
        uld_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.divergence = check_choice("divergence", divergence, DIVERGENCES)
        self.temperature = check_positive("temperature", temperature, max_value=1e6)
        self.kl_weight = check_non_negative("kl_weight", kl_weight, max_value=1e6)
        self.uld_weight = check_non_negative("uld_weight", uld_weight, max_value=1e6)
        if (divergence == "hybrid_uld") != (shared is not None):
            raise ValueError(
                "`shared` (the shared vocabulary) is needed by divergence='hybrid_uld' and only "
                f"by it, got divergence={divergence!r} and shared={type(shared).__name__}."
            )
        tables: dict[str, Tensor] = {}
        if shared is not None:
            keep = torch.ones(shared.student_size, dtype=torch.bool)
            keep[shared.student_ids] = False
            tables = {
                "teacher_to_student": shared.teacher_to_student(),
                "student_shared": shared.student_ids,
                "student_rest": keep.nonzero().squeeze(1),
            }
        for name, table in tables.items():
            self.register_buffer(name, table, persistent=False)
        self._has_tables = bool(tables)

    def per_pair(self, student_logits: Tensor, teacher: TopKTeacher) -> Tensor:
        """The loss at each pair: ``student_logits`` ``[N, V_s]``, ``teacher`` ``[N, k]`` → ``[N]``.

        Raises:
            ValueError: The teacher's top-k were computed at another temperature.
        """
        if teacher.temperature != self.temperature:
            raise ValueError(
                f"The teacher's top-k were computed at temperature {teacher.temperature}, the "
                f"loss uses {self.temperature}: build the cache at the loss's temperature."
            )
        dtype = torch.promote_types(student_logits.dtype, torch.float32)  # float32 or float64
        log_probs = F.log_softmax(student_logits.to(dtype) / self.temperature, dim=-1)
        if not self._has_tables:
            tail = _tail_mass(teacher, dtype)
            return topk_uld_distance(log_probs.exp(), teacher.log_probs.to(dtype).exp(), tail)
        kl, uld = topk_hybrid_terms(
            log_probs,
            teacher,
            self.get_buffer("teacher_to_student"),
            self.get_buffer("student_shared"),
            self.get_buffer("student_rest"),
        )
        return self.kl_weight * self.temperature**2 * kl + self.uld_weight * uld

    def forward(self, student_logits: Tensor, teacher: TopKTeacher, alignment: Any) -> Tensor:
        """Mean loss over the kept aligned pairs.

        Args:
            student_logits: ``[B, T_s, V_s]``.
            teacher: ``TopKTeacher`` with ``[B, T_t, k]`` fields (e.g. from a ``CachedTeacher``).
            alignment: ``kdistill.xtoken.TokenAlignment`` (``[B, P]`` positions and mask).

        Returns:
            A scalar, float32 (float64 for float64 logits).
        """
        keep = alignment.mask.to(student_logits.device)  # [B, P]
        student = alignment.gather_student(student_logits)[keep]  # [N, V_s]
        gathered = TopKTeacher(
            alignment.gather_teacher(teacher.log_probs)[keep],
            alignment.gather_teacher(teacher.indices)[keep],
            None
            if teacher.log_tail_mass is None
            else alignment.gather_teacher(teacher.log_tail_mass)[keep],
            teacher.temperature,
        )
        return self.per_pair(student, gathered).sum() / keep.sum().clamp(min=1)
