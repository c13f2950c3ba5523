"""Cross-tokenizer logit losses: teacher and student distributions over different vocabularies.

- ``ULDLoss``: Boizard, El Haddad, Hudelot & Colombo, "Towards Cross-Tokenizer Distillation: the
  Universal Logit Distillation Loss for LLMs", arXiv 2402.12030 (TMLR 2025). The Wasserstein-1
  distance between the two next-token distributions under a uniform transport cost has the
  closed form of the paper: sort each side's probabilities in decreasing order, pad the smaller
  vocabulary with zeros, sum the absolute differences. Reference implementation: the authors'
  ``Nicolas-BZRD/llm-recipes``, ``models/distillation_model.py`` (``DistillationLoss``) at
  commit 8e69e7a987530f0e44f66bbd1c729db448c17164 (no license file in the repository; no code
  copied): softmax at a temperature, no T² factor, sum over the vocabulary, mean over tokens.
- ``HybridULDLoss``: the idea of TRL's GOLD trainer (``trl/experimental/gold/gold_trainer.py``,
  ``ULDLoss._compute_hybrid_uld_loss``, at commit 0048aad6d3b8285590e4b8634e5f80c531e420ec,
  Apache-2.0): compare the tokens both vocabularies share directly and fall back to ULD for the
  others. GOLD uses a JSD on the raw shared probabilities with weights K/V; kdistill's formula
  (below) is an exact, renormalized KL weighted by the teacher's shared mass, so that it equals
  forward KL when the tokenizers are identical.

Both compare the distributions at *aligned positions*: the pairs of teacher and student token
positions that end the same text prefix (``kdistill.xtoken.TokenAligner``), passed as
``alignment=``. The memory-efficient variant on hidden states and lm_heads is
``kdistill.losses.lm_head_cross_tokenizer.LMHeadCrossTokenizerLoss``.
"""

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from .._recipes import LossRecipe, cross_vocab_logit_inputs
from .._validation import check_non_negative
from ._divergences import SharedIndex, hybrid_uld_terms, uld_distance
from ._logit_loss import LogitDivergenceLoss
from ._registry import register_loss
from ._utils import extract_logits, position_mask

__all__ = [
    "AlignedPositions",
    "HybridULDLoss",
    "ULDLoss",
    "aligned_pairs",
    "check_alignment",
]

CROSS_TOKENIZER_REDUCTIONS: tuple[str, ...] = ("batchmean", "sum", "none")


class AlignedPositions(Protocol):
    """What the losses read from ``alignment=`` (e.g. a ``kdistill.xtoken.TokenAlignment``).

    Attributes:
        teacher_positions: ``[B, P]`` int64 positions in the teacher sequences.
        student_positions: ``[B, P]`` int64 positions in the student sequences.
        mask: ``[B, P]`` bool, False for padding slots.
    """

    teacher_positions: Tensor
    student_positions: Tensor
    mask: Tensor


def _gather(values: Tensor, positions: Tensor) -> Tensor:
    """``values[b, positions[b, p]]``: ``[B, T, ...] -> [B, P, ...]``."""
    rows = torch.arange(positions.shape[0], device=values.device)[:, None]
    return values[rows, positions.to(values.device)]


def check_alignment(alignment: Any, student: Tensor, teacher: Tensor) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``alignment`` fits the inputs ``[B, T, ...]``."""
    tensors: list[Tensor] = []
    for name in ("teacher_positions", "student_positions", "mask"):
        value = getattr(alignment, name, None)
        if not isinstance(value, Tensor):
            raise TypeError(
                "`alignment` must have tensors `teacher_positions`, `student_positions` and "
                f"`mask` (e.g. kdistill.xtoken.TokenAlignment), got {type(alignment).__name__}."
            )
        tensors.append(value)
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1 or tensors[0].ndim != 2:
        raise ValueError(f"`alignment` tensors must share one shape [B, P], got {sorted(shapes)}.")
    for role, x in (("student", student), ("teacher", teacher)):
        if x.ndim < 3 or x.shape[0] != tensors[0].shape[0]:
            raise ValueError(
                f"With `alignment`, {role} inputs must be [B, T, ...] with B = "
                f"{tensors[0].shape[0]}, got shape {tuple(x.shape)}."
            )


def aligned_pairs(
    student: Tensor,
    teacher: Tensor,
    alignment: AlignedPositions | None,
    keep_student: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Student and teacher values at the aligned positions, and which pairs count.

    Args:
        student: ``[B, T_s, ...]`` (or ``[..., X]`` without alignment).
        teacher: ``[B, T_t, ...]`` (or the student's leading shape without alignment).
        alignment: The pairs; None: the inputs are already paired position by position.
        keep_student: ``[B, T_s]`` bool (or the leading shape without alignment) or None.

    Returns:
        ``(student [B, P, ...], teacher [B, P, ...], keep [B, P] or None)``.
    """
    if alignment is None:
        if student.shape[:-1] != teacher.shape[:-1]:
            raise ValueError(
                f"Student inputs {tuple(student.shape)} and teacher inputs "
                f"{tuple(teacher.shape)} differ in their leading (batch/token) dimensions. "
                "Pass `alignment=` (kdistill.xtoken.TokenAligner) to pair positions of "
                "sequences tokenized differently."
            )
        return student, teacher, keep_student
    check_alignment(alignment, student, teacher)
    keep = alignment.mask.to(device=student.device, dtype=torch.bool)
    if keep_student is not None:
        keep = keep & _gather(keep_student, alignment.student_positions)
    student = _gather(student, alignment.student_positions)
    teacher = _gather(teacher, alignment.teacher_positions)
    return student, teacher, keep


class _CrossTokenizerLoss(LogitDivergenceLoss):
    """Base of ULD and hybrid ULD: the logit-loss preamble, at aligned position pairs.

    ``forward`` unwraps and detaches like every logit loss, builds the kept-position mask over
    the student positions, gathers both sides (and the mask) at the aligned pairs, and then runs
    the shared ``teacher_distribution`` and ``reduce_divergence`` on ``[B, P, V]`` pairs.
    """

    # ULD is a bounded distance (no T², like TVD); the hybrid applies T² to its KL term itself
    temperature_squared = False
    same_classes = False
    reductions = CROSS_TOKENIZER_REDUCTIONS
    # their chunked form is LMHeadCrossTokenizerLoss, which also pairs positions
    lm_head_divergence = False

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Any,
        *,
        alignment: AlignedPositions | None = None,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Compute the loss at the aligned positions.

        Args:
            student_logits: ``[B, T_s, V_s]`` (or a model output holding logits). Without
                ``alignment``: ``[..., V_s]``.
            teacher_logits: ``[B, T_t, V_t]``; detached here. Without ``alignment``:
                ``[..., V_t]`` with the student's leading shape.
            alignment: The aligned position pairs (``kdistill.xtoken.TokenAlignment``); the
                loss is taken at those pairs only. None: positions pair up one to one.
            labels: Integer labels over the *student* positions (``[B, T_s]``, not shifted:
                ``labels[b, t]`` decides position t), used with ``ignore_index``.
            mask: Bool over the student positions, True keeps a position.

        Returns:
            A scalar (``"batchmean"``: mean over kept pairs; ``"sum"``), or ``[B, P]`` (or the
            leading shape) for ``"none"`` with 0 at dropped pairs. Float32 (float64 inputs stay
            float64).
        """
        student = extract_logits(student_logits, "student")
        teacher = extract_logits(teacher_logits, "teacher").detach()
        keep = position_mask(student.shape[:-1], mask, labels, self.ignore_index)
        student, teacher, keep = aligned_pairs(student, teacher, alignment, keep)
        return self.reduce_divergence(
            student, self.teacher_distribution(teacher, student), None, keep
        )


# different vocabularies: no student input equals a teacher input, so no zero_when_equal check
# (ULD of identical distributions is 0: tests/unit/losses/test_cross_tokenizer.py)
_CROSS_VOCAB_INPUTS = cross_vocab_logit_inputs(5, 8)


@register_loss(
    "uld",
    recipe=LossRecipe(lambda: ULDLoss(temperature=2.0), _CROSS_VOCAB_INPUTS, zero_when_equal=False),
)
class ULDLoss(_CrossTokenizerLoss):
    """Universal Logit Distillation (Boizard et al., 2024): transport between sorted probabilities.

    At each aligned position, with ``q = softmax(s/T)`` over the student's V_s tokens and
    ``p = softmax(t/T)`` over the teacher's V_t tokens, both sorted in decreasing order and the
    shorter one padded with zeros to ``max(V_s, V_t)``:
    ``ULD = Σ_j |q↓_j − p↓_j|`` — the Wasserstein-1 distance of the paper's closed form. It
    needs no correspondence between the vocabularies (it is invariant to permuting either) and
    is 0 iff the two sorted distributions are equal. Not multiplied by T² (like the paper and
    ``TVDLoss``: the distance is bounded, in [0, 2]).

    Reduction over kept pairs: ``"batchmean"`` (mean per pair, the paper's mean over tokens),
    ``"sum"`` or ``"none"``. A pair is dropped when its alignment slot is padding, ``mask`` is
    False at its student position or ``labels`` there equal ``ignore_index``; an all-dropped
    batch gives 0 (and zero gradients). Teacher detached, computed in float32.

    Args:
        temperature: Softmax temperature T > 0 of both sides.
        reduction: ``"batchmean"``, ``"sum"`` or ``"none"``.
        ignore_index: With ``labels``, positions whose label equals it are dropped.

    Example:
        >>> import torch
        >>> loss = ULDLoss()
        >>> student, teacher = torch.randn(2, 4, 8), torch.randn(2, 4, 30)
        >>> float(loss(teacher[..., :8], teacher[..., :8]))
        0.0
        >>> loss(student, teacher).shape
        torch.Size([])
    """

    def divergence(self, student_log_probs: Tensor, teacher: Any, labels: Tensor | None) -> Tensor:
        """``uld_distance(q, p)`` at each position: ``[...]``."""
        return uld_distance(student_log_probs.exp(), teacher.exp())


def _check_ids(name: str, ids: Any) -> list[int]:
    if isinstance(ids, Tensor):
        if ids.ndim != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(f"`{name}` must be a 1-D integer tensor, got {ids.dtype} {ids.shape}.")
        ids = ids.tolist()
    if isinstance(ids, str | bytes) or not isinstance(ids, Sequence):
        raise TypeError(f"`{name}` must be a sequence of token ids, got {type(ids).__name__}.")
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"`{name}` must hold non-negative integer token ids.")
    if len(set(ids)) != len(ids):
        raise ValueError(
            f"`{name}` holds a token id twice: the shared-vocabulary map must be one to one."
        )
    return list(ids)


@register_loss(
    "hybrid_uld",
    recipe=LossRecipe(
        lambda: HybridULDLoss([0, 2, 7], [4, 1, 0], temperature=2.0),
        _CROSS_VOCAB_INPUTS,
        zero_when_equal=False,
    ),
)
class HybridULDLoss(_CrossTokenizerLoss):
    """Exact KL on the tokens both vocabularies share, ULD on the rest (GOLD's hybrid).

    Shared tokens are pairs ``(a_k, b_k)`` of teacher and student ids that spell the same text
    (``kdistill.xtoken.shared_vocabulary``). At each aligned position, with ``p = softmax(t/T)``
    (teacher, V_t), ``q = softmax(s/T)`` (student, V_s), shared masses ``P = Σ_k p[a_k]`` and
    ``Q = Σ_k q[b_k]``, the shared distributions renormalized on each side ``p̃_k = p[a_k]/P``,
    ``q̃_k = q[b_k]/Q``, and the not-shared probabilities ``p_R``, ``q_R`` (not renormalized)::

        loss = kl_weight · T² · P · KL(p̃ ‖ q̃)  +  uld_weight · Σ_j |sort↓(q_R)_j − sort↓(p_R)_j|

    The KL term is weighted by the teacher's shared mass P (a constant: the teacher is
    detached), so positions where the teacher's next token is mostly outside the shared
    vocabulary count little in it; the ULD term (zero-padded like ``ULDLoss``) covers that mass
    and the split between shared and not-shared mass, since it is at least ``|P − Q|``. T²
    applies to the KL term only (Hinton's convention for KL, the paper's for ULD). With
    identical tokenizers (every id shared one to one, ``teacher_ids = student_ids = None``),
    P = Q = 1, the ULD term vanishes and the loss is exactly
    ``kl_weight · LogitsDistillationLoss(temperature=T)``.

    Reduction, masking and dtypes as in ``ULDLoss``.

    Args:
        teacher_ids: ``[K]`` teacher ids of the shared tokens (a sequence or 1-D tensor), e.g.
            ``aligner.shared_vocabulary.teacher_ids``. None (with ``student_ids`` None): the
            identity map over vocabularies of the same size.
        student_ids: ``[K]`` student ids, ``student_ids[k]`` paired with ``teacher_ids[k]``.
        temperature: Softmax temperature T > 0 of both sides.
        kl_weight: Weight of the shared-token KL term (>= 0).
        uld_weight: Weight of the ULD term on the not-shared tokens (>= 0).
        reduction: ``"batchmean"``, ``"sum"`` or ``"none"``.
        ignore_index: With ``labels``, positions whose label equals it are dropped.

    Example:
        >>> import torch
        >>> from kdistill import LogitsDistillationLoss
        >>> student, teacher = torch.randn(3, 6), torch.randn(3, 6)
        >>> torch.allclose(HybridULDLoss(temperature=2.0)(student, teacher),
        ...                LogitsDistillationLoss(temperature=2.0)(student, teacher))
        True
        >>> loss = HybridULDLoss(teacher_ids=[0, 1, 2], student_ids=[3, 0, 1])
        >>> loss(torch.randn(2, 5, 4), torch.randn(2, 5, 9)).shape
        torch.Size([])
    """

    _teacher_index: Tensor  # [K] buffers (non-persistent), set in __init__
    _student_index: Tensor

    def __init__(
        self,
        teacher_ids: Sequence[int] | Tensor | None = None,
        student_ids: Sequence[int] | Tensor | None = None,
        temperature: float = 1.0,
        kl_weight: float = 1.0,
        uld_weight: float = 1.0,
        reduction: str = "batchmean",
        ignore_index: int | None = None,
    ) -> None:
        super().__init__(temperature, reduction, ignore_index)
        if (teacher_ids is None) != (student_ids is None):
            raise ValueError(
                "Give both `teacher_ids` and `student_ids` (the shared-vocabulary map, e.g. "
                "from kdistill.xtoken.shared_vocabulary), or neither (identical vocabularies)."
            )
        self.kl_weight = check_non_negative("kl_weight", kl_weight, max_value=1e6)
        self.uld_weight = check_non_negative("uld_weight", uld_weight, max_value=1e6)
        self.teacher_ids = None if teacher_ids is None else _check_ids("teacher_ids", teacher_ids)
        self.student_ids = None if student_ids is None else _check_ids("student_ids", student_ids)
        if (
            self.teacher_ids is not None
            and self.student_ids is not None
            and len(self.teacher_ids) != len(self.student_ids)
        ):
            raise ValueError(
                f"`teacher_ids` and `student_ids` must pair up one to one, got "
                f"{len(self.teacher_ids)} and {len(self.student_ids)} ids."
            )
        # index tensors follow the loss across devices; not part of the state_dict
        for name, values in (
            ("_teacher_index", self.teacher_ids),
            ("_student_index", self.student_ids),
        ):
            index = torch.tensor(values or [], dtype=torch.int64)
            self.register_buffer(name, index, persistent=False)
        self._index_cache: tuple[tuple[Any, ...], SharedIndex] | None = None

    def get_config(self) -> dict[str, Any]:
        """The JSON-able constructor arguments (the shared ids as lists)."""
        return {
            "teacher_ids": self.teacher_ids,
            "student_ids": self.student_ids,
            "temperature": self.temperature,
            "kl_weight": self.kl_weight,
            "uld_weight": self.uld_weight,
            "reduction": self.reduction,
            "ignore_index": self.ignore_index,
        }

    def extra_repr(self) -> str:
        """Sizes and weights (not the id lists), shown by ``repr``."""
        shared = "identity" if self.teacher_ids is None else f"{len(self.teacher_ids)} pairs"
        return (
            f"shared={shared}, temperature={self.temperature}, kl_weight={self.kl_weight}, "
            f"uld_weight={self.uld_weight}, reduction={self.reduction!r}"
        )

    def shared_index(
        self, teacher_size: int, student_size: int, device: torch.device
    ) -> SharedIndex:
        """The shared / rest split for logits of sizes V_t and V_s (cached per sizes and device).

        Raises:
            ValueError: Without a map the sizes differ, or a shared id is out of range.
        """
        key = (teacher_size, student_size, device)
        if self._index_cache is not None and self._index_cache[0] == key:
            return self._index_cache[1]
        if self.teacher_ids is None:
            if teacher_size != student_size:
                raise ValueError(
                    f"HybridULDLoss without a shared-vocabulary map compares identical "
                    f"vocabularies, but the student has {student_size} logits and the teacher "
                    f"{teacher_size}. Pass teacher_ids/student_ids from "
                    "kdistill.xtoken.shared_vocabulary(teacher_tokenizer, student_tokenizer)."
                )
            index = SharedIndex.identity_map(teacher_size, device)
        else:
            index = SharedIndex(
                self._teacher_index.to(device),
                self._student_index.to(device),
                teacher_size,
                student_size,
            )
        self._index_cache = (key, index)
        return index

    def divergence(self, student_log_probs: Tensor, teacher: Any, labels: Tensor | None) -> Tensor:
        """``kl_weight · T² · kl + uld_weight · uld`` (``hybrid_uld_terms``) at each position."""
        index = self.shared_index(teacher.shape[-1], student_log_probs.shape[-1], teacher.device)
        kl, uld = hybrid_uld_terms(student_log_probs, teacher, index)
        loss = kl * (self.kl_weight * self.temperature**2)
        return loss if index.covers_both else loss + self.uld_weight * uld
