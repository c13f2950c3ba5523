"""Token alignment between two tokenizations of the same text, from their character offsets.

Two positions are *aligned* when the teacher's tokens up to position ``i`` and the student's tokens
up to position ``j`` cover exactly the same text prefix: then the teacher's logits at ``i`` and the
student's logits at ``j`` are both next-token distributions conditioned on the same text, and a
cross-tokenizer loss can compare them. This module finds those pairs from per-token character
spans ``(start, end)`` (the ``offset_mapping`` of a Hugging Face fast tokenizer), vectorized over
a padded batch, in O(T log T) per sequence; it needs torch only.

The rules, applied to each sequence on its own:

1. *Text tokens* are the valid tokens with a non-empty span (``start < end``). Tokens that the
   tokenizer adds without text (BOS/EOS/CLS/SEP: span ``(0, 0)``) and whitespace tokens whose
   span a ``trim_offsets`` post-processor emptied are not text tokens.
2. A text token *ends a prefix* at ``end`` when no later text token starts before ``end``. Byte
   pieces of one character (GPT-2 byte-level BPE splits an emoji into several tokens;
   SentencePiece byte fallback gives ``<0xF0>`` ``<0x9F>`` ...) all carry the character's span,
   so only the last piece ends the prefix: the others end inside the character. A leading space
   in the token (GPT-2 ``Ġthe``, SentencePiece ``▁the``) moves only ``start``, never ``end``, so
   both conventions give the same ends; so does a prepended ``▁`` (its span overlaps the first
   character's, rule 2 drops it).
3. The last non-text token before the first text token (e.g. BOS) ends the empty prefix, at 0:
   it predicts the first token of the text. Non-text tokens anywhere else (EOS, padding, trimmed
   whitespace) end nothing.
4. Teacher position ``i`` and student position ``j`` are paired when they end the same prefix.
   Pairs are listed in increasing position order (the same order on both sides).

Spans must be in the same coordinates on both sides (character offsets into the same string,
or byte offsets), non-decreasing along each sequence, and ``end >= start >= 0``.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TokenAlignment", "align_offsets", "match_prefix_ends", "prefix_ends"]

# Marks a position that ends no prefix (prefix lengths are >= 0).
NO_PREFIX = -1


@dataclass(frozen=True)
class TokenAlignment:
    """Pairs of aligned teacher and student positions of a batch, padded to ``P`` pairs.

    Attributes:
        teacher_positions: ``[B, P]`` int64 token positions in the teacher sequences.
        student_positions: ``[B, P]`` int64 token positions in the student sequences.
        mask: ``[B, P]`` bool; False marks padding slots (their positions are 0).

    Example:
        >>> import torch
        >>> a = TokenAlignment(torch.tensor([[2, 0]]), torch.tensor([[1, 0]]),
        ...                    torch.tensor([[True, False]]))
        >>> a.gather_student(torch.arange(10.0).view(1, 5, 2)).tolist()
        [[[2.0, 3.0], [0.0, 1.0]]]
    """

    teacher_positions: Tensor
    student_positions: Tensor
    mask: Tensor

    def __post_init__(self) -> None:
        shapes = {tuple(t.shape) for t in (self.teacher_positions, self.student_positions)}
        shapes.add(tuple(self.mask.shape))
        if len(shapes) != 1 or self.mask.ndim != 2:
            raise ValueError(
                "TokenAlignment needs teacher_positions, student_positions and mask of one shape "
                f"[B, P], got {tuple(self.teacher_positions.shape)}, "
                f"{tuple(self.student_positions.shape)} and {tuple(self.mask.shape)}."
            )
        if self.mask.dtype != torch.bool:
            raise TypeError(f"`mask` must be a bool tensor, got {self.mask.dtype}.")

    @property
    def num_pairs(self) -> Tensor:
        """``[B]`` number of aligned pairs per sequence."""
        return self.mask.sum(1)

    def to(self, device: torch.device | str) -> "TokenAlignment":
        """A copy on ``device``."""
        return TokenAlignment(
            self.teacher_positions.to(device),
            self.student_positions.to(device),
            self.mask.to(device),
        )

    def gather_teacher(self, values: Tensor) -> Tensor:
        """``values[b, teacher_positions[b, p]]``: ``[B, T_t, ...] -> [B, P, ...]``."""
        return _gather(values, self.teacher_positions)

    def gather_student(self, values: Tensor) -> Tensor:
        """``values[b, student_positions[b, p]]``: ``[B, T_s, ...] -> [B, P, ...]``."""
        return _gather(values, self.student_positions)


def _gather(values: Tensor, positions: Tensor) -> Tensor:
    if values.ndim < 2 or values.shape[0] != positions.shape[0]:
        raise ValueError(
            f"Expected values [B, T, ...] with B = {positions.shape[0]}, got shape "
            f"{tuple(values.shape)}."
        )
    rows = torch.arange(positions.shape[0], device=positions.device)[:, None]  # [B, 1]
    return values[rows, positions.to(values.device)]


def _check_offsets(offsets: Tensor, mask: Tensor | None, prefix: str = "") -> Tensor:
    """Validate ``[B, T, 2]`` integer spans and return the ``[B, T]`` bool token mask."""
    if not isinstance(offsets, Tensor) or offsets.ndim != 3 or offsets.shape[-1] != 2:
        raise ValueError(
            f"`{prefix}offsets` must be a tensor [B, T, 2] of (start, end) spans, got "
            f"{getattr(offsets, 'shape', type(offsets).__name__)}."
        )
    if offsets.dtype.is_floating_point or offsets.dtype == torch.bool:
        raise TypeError(f"`{prefix}offsets` must be an integer tensor, got {offsets.dtype}.")
    if mask is None:
        return torch.ones(offsets.shape[:2], dtype=torch.bool, device=offsets.device)
    if not isinstance(mask, Tensor) or mask.shape != offsets.shape[:2]:
        raise ValueError(
            f"`{prefix}mask` must be a tensor of shape {tuple(offsets.shape[:2])}, got "
            f"{getattr(mask, 'shape', type(mask).__name__)}."
        )
    return mask.to(device=offsets.device, dtype=torch.bool)


def prefix_ends(offsets: Tensor, mask: Tensor | None = None) -> Tensor:
    """The length of the text prefix each position ends (rules 1-3 of the module docstring).

    Args:
        offsets: ``[B, T, 2]`` integer ``(start, end)`` spans.
        mask: ``[B, T]`` bool, True for real tokens (False: padding). None: all real.

    Returns:
        ``[B, T]`` int64: the prefix length (``end``, or 0 for the BOS-like anchor) at positions
        that end a prefix, -1 elsewhere. Along a sequence the non-negative values are strictly
        increasing.

    Example:
        >>> import torch
        >>> # BOS, "ab", then two byte pieces of one character "é" (both span (2, 3)), EOS
        >>> spans = torch.tensor([[[0, 0], [0, 2], [2, 3], [2, 3], [0, 0]]])
        >>> prefix_ends(spans).tolist()
        [[0, 2, -1, 3, -1]]
    """
    mask = _check_offsets(offsets, mask)
    offsets = offsets.long()
    start, end = offsets[..., 0], offsets[..., 1]  # [B, T]
    batch, length = start.shape
    if length == 0:
        return end.clone()
    text = mask & (end > start)
    # start of the next text token: a suffix minimum over later text tokens' starts
    big = torch.iinfo(torch.int64).max
    starts = torch.where(text, start, torch.full_like(start, big))
    suffix_min = starts.flip(1).cummin(1).values.flip(1)  # min over positions >= t
    next_start = torch.cat([suffix_min[:, 1:], suffix_min.new_full((batch, 1), big)], dim=1)
    ends = torch.where(text & (next_start >= end), end, torch.full_like(end, NO_PREFIX))
    # the anchor of the empty prefix: the last non-text real token before the first text token
    positions = torch.arange(length, device=offsets.device).expand(batch, length)
    first_text = torch.where(text, positions, torch.full_like(positions, length)).amin(1)
    before = mask & ~text & (positions < first_text[:, None])
    anchor = torch.where(before, positions, torch.full_like(positions, -1)).amax(1)  # [B]
    has_anchor = anchor >= 0
    rows = torch.arange(batch, device=offsets.device)[has_anchor]
    ends[rows, anchor[has_anchor]] = 0
    return ends


def match_prefix_ends(teacher_ends: Tensor, student_ends: Tensor) -> TokenAlignment:
    """Pair the teacher and student positions that end the same prefix (rule 4).

    Args:
        teacher_ends: ``[B, T_t]`` from ``prefix_ends`` (-1: ends nothing).
        student_ends: ``[B, T_s]`` likewise.

    Returns:
        The aligned pairs, padded to the largest pair count of the batch.

    Example:
        >>> import torch
        >>> a = match_prefix_ends(torch.tensor([[0, 2, -1, 5]]), torch.tensor([[2, 3, 5]]))
        >>> a.teacher_positions.tolist(), a.student_positions.tolist(), a.mask.tolist()
        ([[1, 3]], [[0, 2]], [[True, True]])
    """
    if teacher_ends.ndim != 2 or student_ends.ndim != 2:
        raise ValueError(
            f"Prefix ends must be [B, T], got {tuple(teacher_ends.shape)} and "
            f"{tuple(student_ends.shape)}."
        )
    if teacher_ends.shape[0] != student_ends.shape[0]:
        raise ValueError(
            f"Teacher and student batches differ: {teacher_ends.shape[0]} vs "
            f"{student_ends.shape[0]} sequences."
        )
    batch, student_len = student_ends.shape
    device = teacher_ends.device
    student_ends = student_ends.to(device).long()
    teacher_ends = teacher_ends.long()
    if student_len == 0:
        student_pos = torch.zeros_like(teacher_ends)
        found = torch.zeros_like(teacher_ends, dtype=torch.bool)
    else:
        # the student's ends increase along the sequence; a running max fills the -1 gaps and
        # keeps it sorted, so a binary search finds the one position that ends each prefix
        running = student_ends.cummax(1).values.contiguous()
        student_pos = torch.searchsorted(running, teacher_ends.contiguous()).clamp(
            max=student_len - 1
        )
        found = student_ends.gather(1, student_pos) == teacher_ends
    paired = (teacher_ends >= 0) & found  # [B, T_t]
    counts = paired.sum(1)
    num_pairs = int(counts.max()) if batch else 0
    # compact each row's pairs to the front: slot = running count; unpaired go to a spill slot
    slots = torch.where(paired, paired.cumsum(1) - 1, torch.full_like(teacher_ends, num_pairs))
    teacher_positions = torch.arange(teacher_ends.shape[1], device=device).expand_as(slots)
    out_t = teacher_ends.new_zeros((batch, num_pairs + 1))
    out_s = teacher_ends.new_zeros((batch, num_pairs + 1))
    out_t.scatter_(1, slots, torch.where(paired, teacher_positions, 0))
    out_s.scatter_(1, slots, torch.where(paired, student_pos, 0))
    mask = torch.arange(num_pairs, device=device)[None, :] < counts[:, None]
    return TokenAlignment(out_t[:, :num_pairs], out_s[:, :num_pairs], mask)


def align_offsets(
    teacher_offsets: Tensor,
    student_offsets: Tensor,
    teacher_mask: Tensor | None = None,
    student_mask: Tensor | None = None,
) -> TokenAlignment:
    """Aligned teacher/student positions of two tokenizations of the same texts.

    ``match_prefix_ends(prefix_ends(teacher), prefix_ends(student))``; see the module docstring
    for the rules.

    Args:
        teacher_offsets: ``[B, T_t, 2]`` integer ``(start, end)`` spans of the teacher tokens.
        student_offsets: ``[B, T_s, 2]`` spans of the student tokens, same coordinates.
        teacher_mask: ``[B, T_t]`` bool, False for padding. None: no padding.
        student_mask: ``[B, T_s]`` likewise.

    Returns:
        The pairs, as ``[B, P]`` position tensors and a mask.

    Example:
        >>> import torch
        >>> # "abcd": teacher "a" + "bcd", student "ab" + "cd": only the whole word aligns
        >>> a = align_offsets(torch.tensor([[[0, 1], [1, 4]]]), torch.tensor([[[0, 2], [2, 4]]]))
        >>> a.teacher_positions.tolist(), a.student_positions.tolist()
        ([[1]], [[1]])
    """
    teacher_mask = _check_offsets(teacher_offsets, teacher_mask, "teacher_")
    student_mask = _check_offsets(student_offsets, student_mask, "student_")
    return match_prefix_ends(
        prefix_ends(teacher_offsets, teacher_mask), prefix_ends(student_offsets, student_mask)
    )
