"""``TokenAligner``: tokenize the same texts for a teacher and a student and align the positions."""

from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from .._validation import check_bool, check_int
from ._backend import backend_of, describe_backend, pad_token_id
from .alignment import TokenAlignment, match_prefix_ends, prefix_ends
from .vocab import SharedVocabulary, shared_vocabulary, token_spellings

__all__ = ["AlignedBatch", "TokenAligner"]


@dataclass(frozen=True)
class AlignedBatch:
    """Teacher and student encodings of the same texts and their aligned positions.

    Sequences are padded on the right; ``*_offsets`` are the character spans ``(start, end)``
    of each token in its text (``(0, 0)`` for special tokens and padding).

    Attributes:
        teacher_input_ids: ``[B, T_t]`` int64.
        teacher_attention_mask: ``[B, T_t]`` int64, 1 for real tokens.
        teacher_offsets: ``[B, T_t, 2]`` int64.
        student_input_ids: ``[B, T_s]`` int64.
        student_attention_mask: ``[B, T_s]`` int64.
        student_offsets: ``[B, T_s, 2]`` int64.
        alignment: The aligned position pairs ``[B, P]`` (see ``TokenAlignment``).
    """

    teacher_input_ids: Tensor
    teacher_attention_mask: Tensor
    teacher_offsets: Tensor
    student_input_ids: Tensor
    student_attention_mask: Tensor
    student_offsets: Tensor
    alignment: TokenAlignment

    @property
    def teacher_inputs(self) -> dict[str, Tensor]:
        """``{"input_ids", "attention_mask"}`` for the teacher model."""
        return {"input_ids": self.teacher_input_ids, "attention_mask": self.teacher_attention_mask}

    @property
    def student_inputs(self) -> dict[str, Tensor]:
        """``{"input_ids", "attention_mask"}`` for the student model."""
        return {"input_ids": self.student_input_ids, "attention_mask": self.student_attention_mask}

    def to(self, device: torch.device | str) -> "AlignedBatch":
        """A copy with every tensor on ``device``."""
        return AlignedBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


@dataclass(frozen=True)
class _Encoded:
    input_ids: Tensor  # [B, T]
    attention_mask: Tensor  # [B, T]
    offsets: Tensor  # [B, T, 2]
    prefix_ends: Tensor  # [B, T]


def _is_escape(char: str) -> bool:
    """A lone surrogate standing for an undecodable byte (``errors="surrogateescape"``)."""
    return 0xDC80 <= ord(char) <= 0xDCFF


class _Side:
    """One tokenizer, with a private copy of its Rust backend that neither truncates nor pads."""

    def __init__(self, tokenizer: Any, role: str) -> None:
        backend = backend_of(tokenizer, f"{role}_tokenizer")
        # a copy: the user's tokenizer keeps its truncation/padding settings untouched
        self.backend = type(backend).from_str(backend.to_str())
        self.backend.no_truncation()
        self.backend.no_padding()
        self.pad_id = pad_token_id(tokenizer, backend)
        self.role = role

    @cached_property
    def spellings(self) -> dict[int, tuple[str, bytes]]:
        """``token_spellings`` of this tokenizer (computed on first use)."""
        scheme = describe_backend(self.backend)
        if scheme["word_piece"]:
            raise ValueError(
                f"The {self.role} tokenizer is a WordPiece tokenizer: its tokens do not spell the "
                "text exactly (no spaces), so its token ids cannot be turned into text spans. "
                "Encode texts with the aligner instead (aligner(texts))."
            )
        self.strip_leading = scheme["strip_leading"]
        return token_spellings(self.backend)

    def spans_of_ids(self, ids: list[int], skip_special_tokens: bool) -> tuple[str, list]:
        """The text the token ids spell and each token's character span in it.

        Special tokens spell nothing and get the span (0, 0) when ``skip_special_tokens``;
        otherwise they spell their content. The space a SentencePiece-style tokenizer prepends
        (removed by its decoder) is removed from the first token; a token left without text by
        that gets the first character's span, as in the tokenizer's own offset mapping. Bytes
        that are not valid UTF-8 (a sampled sequence may stop inside a character) become one
        U+FFFD character each: the teacher reads U+FFFD where the student has the raw byte.
        """
        spellings = self.spellings
        pieces: list[bytes | None] = []
        strip = self.strip_leading
        for index in ids:
            if index not in spellings:
                raise ValueError(
                    f"Token id {index} is not in the {self.role} vocabulary ({len(spellings)} ids)."
                )
            kind, value = spellings[index]
            if kind == "special" and skip_special_tokens:
                pieces.append(None)
                continue
            if strip and value:  # the first token that spells something
                removed = len(value) - len(value.lstrip(b" "))
                value = value[min(removed, strip) :]
                strip = 0
            pieces.append(value)
        data = b"".join(p for p in pieces if p)
        text = data.decode("utf-8", errors="surrogateescape")
        char_of_byte: list[int] = []
        for i, char in enumerate(text):
            char_of_byte += [i] * len(char.encode("utf-8", errors="surrogateescape"))
        spans, position = [], 0
        for piece in pieces:
            if piece is None:
                spans.append((0, 0))
            elif not piece:
                spans.append((0, 1) if text else (0, 0))
            else:
                end = position + len(piece)
                spans.append((char_of_byte[position], char_of_byte[end - 1] + 1))
                position = end
        if any(_is_escape(char) for char in text):
            text = "".join("\ufffd" if _is_escape(char) else char for char in text)
        return text, spans

    def encode(
        self, texts: list[str], max_length: int | None, add_special_tokens: bool
    ) -> _Encoded:
        encodings = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        # keep one token past max_length: it tells whether the last kept token ends a character
        keep = [
            len(e.ids) if max_length is None else min(len(e.ids), max_length + 1) for e in encodings
        ]
        ids = [
            torch.tensor(e.ids[:n], dtype=torch.int64) for e, n in zip(encodings, keep, strict=True)
        ]
        spans = [
            torch.tensor(e.offsets[:n], dtype=torch.int64).reshape(n, 2)
            for e, n in zip(encodings, keep, strict=True)
        ]
        input_ids = pad_sequence(ids, batch_first=True, padding_value=self.pad_id)  # [B, T+1]
        offsets = pad_sequence(spans, batch_first=True)  # [B, T+1, 2]
        lengths = torch.tensor(keep, dtype=torch.int64)
        mask = torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]
        ends = prefix_ends(offsets, mask)
        if max_length is not None and input_ids.shape[1] > max_length:
            input_ids, offsets = input_ids[:, :max_length], offsets[:, :max_length]
            mask, ends = mask[:, :max_length], ends[:, :max_length]
        input_ids = input_ids.masked_fill(~mask, self.pad_id)
        offsets = offsets.masked_fill(~mask[..., None], 0)
        return _Encoded(input_ids, mask.long(), offsets, ends)


class TokenAligner:
    """Encode texts with a teacher and a student tokenizer and pair the positions that align.

    For each text, teacher position ``i`` and student position ``j`` are paired when the tokens
    up to them cover the same text prefix, found from the tokenizers' character offsets (rules
    in ``kdistill.xtoken.alignment``: special tokens without text never pair, except a leading
    BOS-like token that pairs with the other side's for the empty prefix; byte pieces of one
    character pair only after the character's last byte; GPT-2 ``Ġ`` and SentencePiece ``▁``
    leading spaces give the same prefix ends). The logits of a causal LM at paired positions are
    next-token distributions conditioned on the same text, which the cross-tokenizer losses
    (``ULDLoss``, ``HybridULDLoss``) compare. Alignment runs on tensors, vectorized over the
    batch, O(T log T) per sequence.

    The aligner keeps private copies of the tokenizers' Rust backends (it never changes yours)
    and encodes without their truncation or padding settings; use ``max_length`` instead.

    Args:
        teacher_tokenizer: A Hugging Face fast tokenizer or a ``tokenizers.Tokenizer``.
        student_tokenizer: Likewise.

    Example:
        >>> from kdistill.xtoken import byte_tokenizer, train_bpe
        >>> teacher = train_bpe(["the cat sat on the mat"] * 10, vocab_size=300)
        >>> aligner = TokenAligner(teacher, byte_tokenizer())
        >>> batch = aligner(["the mat"])
        >>> teacher.convert_ids_to_tokens(batch.teacher_input_ids[0])
        ['the', 'Ġmat']
        >>> batch.alignment.teacher_positions.tolist(), batch.alignment.student_positions.tolist()
        ([[0, 1]], [[2, 6]])
    """

    def __init__(self, teacher_tokenizer: Any, student_tokenizer: Any) -> None:
        self._tokenizers = (teacher_tokenizer, student_tokenizer)
        self._teacher = _Side(teacher_tokenizer, "teacher")
        self._student = _Side(student_tokenizer, "student")

    @cached_property
    def shared_vocabulary(self) -> SharedVocabulary:
        """The id pairs of tokens both vocabularies share (``kdistill.xtoken.shared_vocabulary``).

        Computed on first use (one pass over each vocabulary), then cached.
        """
        return shared_vocabulary(*self._tokenizers)

    def __call__(
        self,
        texts: str | Sequence[str],
        *,
        max_length: int | None = None,
        teacher_max_length: int | None = None,
        student_max_length: int | None = None,
        add_special_tokens: bool = True,
    ) -> AlignedBatch:
        """Encode ``texts`` for both models and align them.

        Args:
            texts: One text or a sequence of texts (the batch).
            max_length: Keep at most this many tokens per sequence on both sides (special tokens
                included; no EOS is re-added after the cut). Positions cut away on either side
                pair with nothing.
            teacher_max_length: Overrides ``max_length`` for the teacher.
            student_max_length: Overrides ``max_length`` for the student.
            add_special_tokens: Let each tokenizer add its special tokens (its post-processor's
                BOS/EOS template), as ``tokenizer(text)`` does.

        Returns:
            The padded encodings and the alignment, on the CPU.

        Raises:
            TypeError: ``texts`` is not a string or a sequence of strings.
            ValueError: ``texts`` is empty, or a length is not a positive integer.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
            raise TypeError(
                f"`texts` must be a string or a sequence of strings, got {type(texts).__name__}."
            )
        lengths = {}
        for name, value in (
            ("max_length", max_length),
            ("teacher_max_length", teacher_max_length),
            ("student_max_length", student_max_length),
        ):
            lengths[name] = None if value is None else check_int(name, value, min_value=1)
        add_special_tokens = check_bool("add_special_tokens", add_special_tokens)
        texts = list(texts)
        if not texts:
            raise ValueError("`texts` is empty: give at least one text.")
        teacher = self._teacher.encode(
            texts,
            lengths["teacher_max_length"] or lengths["max_length"],
            add_special_tokens,
        )
        student = self._student.encode(
            texts,
            lengths["student_max_length"] or lengths["max_length"],
            add_special_tokens,
        )
        return AlignedBatch(
            teacher_input_ids=teacher.input_ids,
            teacher_attention_mask=teacher.attention_mask,
            teacher_offsets=teacher.offsets,
            student_input_ids=student.input_ids,
            student_attention_mask=student.attention_mask,
            student_offsets=student.offsets,
            alignment=match_prefix_ends(teacher.prefix_ends, student.prefix_ends),
        )

    def align_student_ids(
        self,
        student_input_ids: Tensor,
        student_attention_mask: Tensor | None = None,
        *,
        teacher_max_length: int | None = None,
        add_special_tokens: bool = True,
        skip_special_tokens: bool = True,
    ) -> AlignedBatch:
        """Align student token ids as they are (e.g. sampled completions) with the teacher.

        Each row's ids are spelled back into text exactly (the spellings of
        ``kdistill.xtoken.token_spellings``; no re-tokenization, so a non-canonical sampled
        tokenization keeps its own tokens), which gives the student's character spans; the
        teacher encodes that text. The result pairs positions like ``__call__``; the student's
        ids and mask are returned unchanged.

        Args:
            student_input_ids: ``[B, T_s]`` int64 student token ids (any padding side).
            student_attention_mask: ``[B, T_s]``, nonzero for real tokens. None: all real.
            teacher_max_length: Keep at most this many teacher tokens per text.
            add_special_tokens: Let the teacher tokenizer add its BOS/EOS template.
            skip_special_tokens: Student special tokens spell no text (span ``(0, 0)``; a
                leading BOS still pairs with the teacher's BOS), as in
                ``tokenizer.decode(..., skip_special_tokens=True)``. False: they spell their
                content, which the teacher then encodes as text.

        Returns:
            The encodings (student side: the given ids) and the alignment, on the CPU.

        Raises:
            TypeError: The ids are not a 2-D integer tensor.
            ValueError: A shape does not match, an id is outside the student vocabulary, or the
                student tokenizer is WordPiece (its tokens do not spell the text).

        Example:
            >>> from kdistill.xtoken import byte_tokenizer, train_bpe
            >>> teacher = train_bpe(["the cat sat on the mat"] * 10, vocab_size=300)
            >>> aligner = TokenAligner(teacher, byte_tokenizer())
            >>> ids = torch.tensor([list(b"the mat")])
            >>> alignment = aligner.align_student_ids(ids).alignment
            >>> alignment.teacher_positions.tolist(), alignment.student_positions.tolist()
            ([[0, 1]], [[2, 6]])
        """
        if (
            not isinstance(student_input_ids, Tensor)
            or student_input_ids.ndim != 2
            or student_input_ids.dtype.is_floating_point
            or student_input_ids.dtype == torch.bool
        ):
            raise TypeError(
                "`student_input_ids` must be a 2-D integer tensor [B, T_s], got "
                f"{getattr(student_input_ids, 'dtype', type(student_input_ids).__name__)} of shape "
                f"{tuple(getattr(student_input_ids, 'shape', ()))}."
            )
        if student_attention_mask is None:
            mask = torch.ones(student_input_ids.shape, dtype=torch.bool)
        elif student_attention_mask.shape != student_input_ids.shape:
            raise ValueError(
                f"`student_attention_mask` must have shape {tuple(student_input_ids.shape)}, got "
                f"{tuple(student_attention_mask.shape)}."
            )
        else:
            mask = student_attention_mask.detach().cpu().bool()
        if student_input_ids.shape[0] == 0:
            raise ValueError("`student_input_ids` holds no sequence: give at least one row.")
        if teacher_max_length is not None:
            teacher_max_length = check_int("teacher_max_length", teacher_max_length, min_value=1)
        add_special_tokens = check_bool("add_special_tokens", add_special_tokens)
        skip_special_tokens = check_bool("skip_special_tokens", skip_special_tokens)
        ids = student_input_ids.detach().cpu()
        offsets = torch.zeros((*ids.shape, 2), dtype=torch.int64)
        texts = []
        for row, (row_ids, row_mask) in enumerate(zip(ids.tolist(), mask.tolist(), strict=True)):
            real = [p for p, keep in enumerate(row_mask) if keep]
            text, spans = self._student.spans_of_ids(
                [row_ids[p] for p in real], skip_special_tokens
            )
            texts.append(text)
            if real:
                offsets[row, real] = torch.tensor(spans, dtype=torch.int64).reshape(-1, 2)
        teacher = self._teacher.encode(texts, teacher_max_length, add_special_tokens)
        return AlignedBatch(
            teacher_input_ids=teacher.input_ids,
            teacher_attention_mask=teacher.attention_mask,
            teacher_offsets=teacher.offsets,
            student_input_ids=ids,
            student_attention_mask=mask.long(),
            student_offsets=offsets,
            alignment=match_prefix_ends(teacher.prefix_ends, prefix_ends(offsets, mask)),
        )
