"""The tokens two vocabularies share: id pairs of tokens that spell the same text.

Token strings are compared after undoing each tokenizer's spelling of text, so GPT-2's ``Ġthe``
and SentencePiece's ``▁the`` (both " the") match. The rule, per token of each vocabulary:

- *byte-level* tokenizers (a ``ByteLevel`` decoder or pre-tokenizer: GPT-2, Llama 3, Qwen,
  SmolLM2): each character of the token is one byte of GPT-2's byte alphabet (``Ġ`` = 0x20);
  the token spells those bytes;
- tokenizers with a *space marker* (a ``Metaspace`` decoder, or a ``Replace(▁ → " ")`` decoder as
  in Llama 2 / Mistral): the marker becomes a space; with byte fallback, ``<0x41>`` spells the
  single byte 0x41;
- any other tokenizer (WordPiece, character-level, ...): the token string itself, as UTF-8
  (so WordPiece's ``##ing`` never matches another scheme's ``ing``).

Two tokens are shared when they spell the same bytes. Added tokens: a *special* one (BOS, EOS,
chat markers) matches only a special token of the other tokenizer with the same content; a
non-special added token spells its content. When several ids of one vocabulary spell the same
bytes, one represents them and the others count as not shared, so the map is one to one: a
regular token before a byte-fallback one (SentencePiece spells a space ``▁``, not ``<0x20>``),
then the smallest id.
"""

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._backend import backend_of, describe_backend

__all__ = ["SharedVocabulary", "gpt2_byte_alphabet", "shared_vocabulary", "token_spellings"]

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def gpt2_byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte value.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, ...) map
    in order to U+0100 onwards (so 0x20, the space, is ``Ġ`` U+0120).

    Example:
        >>> alphabet = gpt2_byte_alphabet()
        >>> alphabet["Ġ"], alphabet["A"], len(alphabet)
        (32, 65, 256)
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in chars:
            chars[byte] = chr(256 + extra)
            extra += 1
    return {char: byte for byte, char in chars.items()}


def token_spellings(tokenizer: Any) -> dict[int, tuple[str, bytes]]:
    """What each token id of ``tokenizer`` spells, under the module's rule.

    Args:
        tokenizer: A Hugging Face fast tokenizer or a ``tokenizers.Tokenizer``.

    Returns:
        ``{id: (kind, value)}`` with kind ``"text"`` (value: the bytes spelled) or
        ``"special"`` (value: the special token's content as UTF-8).

    Example:
        >>> from kdistill.xtoken import byte_tokenizer
        >>> spellings = token_spellings(byte_tokenizer())
        >>> spellings[32], spellings[256]
        (('text', b' '), ('special', b'<|endoftext|>'))
    """
    return _spellings(backend_of(tokenizer))[0]


def _spellings(backend: Any) -> tuple[dict[int, tuple[str, bytes]], set[int]]:
    """``token_spellings`` of a backend, and the ids of its byte-fallback tokens."""
    scheme = describe_backend(backend)
    alphabet = gpt2_byte_alphabet() if scheme["byte_level"] else None
    marker = scheme["space_marker"]
    added = backend.get_added_tokens_decoder()
    spellings: dict[int, tuple[str, bytes]] = {}
    fallback: set[int] = set()
    for token, index in backend.get_vocab(with_added_tokens=True).items():
        if index in added:
            kind = "special" if added[index].special else "text"
            spellings[index] = (kind, added[index].content.encode("utf-8"))
            continue
        if alphabet is not None and all(char in alphabet for char in token):
            spellings[index] = ("text", bytes(alphabet[char] for char in token))
            continue
        byte = _BYTE_TOKEN.fullmatch(token) if scheme["byte_fallback"] else None
        if byte is not None:
            spellings[index] = ("text", bytes([int(byte.group(1), 16)]))
            fallback.add(index)
            continue
        text = token.replace(marker, " ") if marker else token
        spellings[index] = ("text", text.encode("utf-8"))
    return spellings, fallback


@dataclass(frozen=True)
class SharedVocabulary:
    """Pairs of teacher and student token ids that spell the same text, sorted by teacher id.

    Attributes:
        teacher_ids: ``[K]`` int64 teacher token ids (distinct).
        student_ids: ``[K]`` int64 student token ids (distinct); ``student_ids[k]`` spells the
            same text as ``teacher_ids[k]``.
        teacher_size: Number of ids of the teacher tokenizer (added tokens included).
        student_size: Number of ids of the student tokenizer.
    """

    teacher_ids: Tensor
    student_ids: Tensor
    teacher_size: int
    student_size: int

    def __len__(self) -> int:
        return int(self.teacher_ids.numel())

    def teacher_to_student(self) -> Tensor:
        """``[teacher_size]`` int64: the student id of each teacher id, -1 where not shared."""
        table = torch.full((self.teacher_size,), -1, dtype=torch.int64)
        table[self.teacher_ids] = self.student_ids
        return table


def _representatives(backend: Any) -> tuple[dict[tuple[str, bytes], int], int]:
    """Spelling -> representative id (regular before byte fallback, then smallest), and V.

    V is the vocabulary size: the largest id + 1.
    """
    spellings, fallback = _spellings(backend)
    first: dict[tuple[str, bytes], int] = {}
    for index in sorted(spellings, key=lambda i: (i in fallback, i)):
        first.setdefault(spellings[index], index)
    return first, max(spellings, default=-1) + 1


def shared_vocabulary(teacher_tokenizer: Any, student_tokenizer: Any) -> SharedVocabulary:
    """The one-to-one map between the tokens of two vocabularies that spell the same text.

    Args:
        teacher_tokenizer: A Hugging Face fast tokenizer or a ``tokenizers.Tokenizer``.
        student_tokenizer: Likewise.

    Returns:
        The shared id pairs (see the module docstring for the matching rule).

    Example:
        >>> from kdistill.xtoken import byte_tokenizer
        >>> shared = shared_vocabulary(byte_tokenizer(), byte_tokenizer())
        >>> len(shared), bool((shared.teacher_ids == shared.student_ids).all())
        (257, True)
    """
    teacher, teacher_size = _representatives(backend_of(teacher_tokenizer, "teacher_tokenizer"))
    student, student_size = _representatives(backend_of(student_tokenizer, "student_tokenizer"))
    pairs = sorted((index, student[key]) for key, index in teacher.items() if key in student)
    ids = torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2)
    return SharedVocabulary(
        teacher_ids=ids[:, 0].contiguous(),
        student_ids=ids[:, 1].contiguous(),
        teacher_size=teacher_size,
        student_size=student_size,
    )
