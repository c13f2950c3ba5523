"""The shared-token map: spellings per scheme, one-to-one pairs, special tokens."""

import pytest
import torch

tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

from tokenizers import pre_tokenizers  # noqa: E402
from xtoken_helpers import (  # noqa: E402
    byte_level_bpe,
    gpt2_bytes_to_unicode,
    sentencepiece_bpe,
    smollm2_or_skip,
)

from kdistill.xtoken import (  # noqa: E402
    byte_tokenizer,
    shared_vocabulary,
    token_spellings,
    train_bpe,
)
from kdistill.xtoken.vocab import gpt2_byte_alphabet  # noqa: E402


def as_dict(shared):
    return dict(zip(shared.teacher_ids.tolist(), shared.student_ids.tolist(), strict=True))


def test_byte_alphabet_is_gpt2s():
    reference = {char: byte for byte, char in gpt2_bytes_to_unicode().items()}
    assert gpt2_byte_alphabet() == reference
    assert set(gpt2_byte_alphabet()) == set(pre_tokenizers.ByteLevel.alphabet())


def test_space_markers_match_across_schemes():
    gpt2 = byte_level_bpe([("t", "h"), ("th", "e"), ("Ġ", "the"), ("Ġ", "a")])
    sp = sentencepiece_bpe([("t", "h"), ("th", "e"), ("▁", "the"), ("▁", "b")])
    shared = as_dict(shared_vocabulary(gpt2, sp))
    for teacher_token, student_token in [("Ġthe", "▁the"), ("the", "the"), ("t", "t"), ("Ġ", "▁")]:
        assert shared[gpt2.token_to_id(teacher_token)] == sp.token_to_id(student_token)
    assert gpt2.token_to_id("Ġa") not in shared  # the student has no "▁a"
    # byte fallback: "<0x0A>" spells the newline byte, GPT-2's "Ċ"
    assert shared[gpt2.token_to_id("Ċ")] == sp.token_to_id("<0x0A>")


def test_duplicate_spellings_prefer_regular_tokens_then_the_smallest_id():
    sp = sentencepiece_bpe([("▁", "a")])
    sp.add_tokens([" a"])  # an added (non-special) token spelling b" a", like "▁a"
    spellings = token_spellings(sp)
    # "<0x41>" (id 65) and "A" (a larger id) both spell b"A": the regular token represents it
    assert spellings[sp.token_to_id("<0x41>")] == spellings[sp.token_to_id("A")] == ("text", b"A")
    gpt2 = byte_level_bpe([("Ġ", "a")])
    shared = shared_vocabulary(gpt2, sp)
    pairs = as_dict(shared)
    assert pairs[gpt2.token_to_id("A")] == sp.token_to_id("A")
    assert sp.token_to_id("<0x41>") not in shared.student_ids.tolist()
    # a byte with no regular token keeps its byte-fallback token
    assert pairs[gpt2.token_to_id("Ċ")] == sp.token_to_id("<0x0A>")
    # two regular tokens with one spelling: the smallest id
    assert token_spellings(sp)[sp.token_to_id(" a")] == ("text", b" a")
    assert sp.token_to_id("▁a") < sp.token_to_id(" a")
    assert pairs[gpt2.token_to_id("Ġa")] == sp.token_to_id("▁a")
    # one to one
    assert len(set(shared.teacher_ids.tolist())) == len(shared)
    assert len(set(shared.student_ids.tolist())) == len(shared)


def test_special_tokens_match_only_special_tokens_with_the_same_content():
    teacher = byte_level_bpe([], specials=["<|endoftext|>", "<s>"])
    student = byte_level_bpe([], specials=["<|endoftext|>"])
    student.add_tokens(["<s>"])  # a normal added token: spells the text "<s>"
    pairs = as_dict(shared_vocabulary(teacher, student))
    assert pairs[teacher.token_to_id("<|endoftext|>")] == student.token_to_id("<|endoftext|>")
    assert teacher.token_to_id("<s>") not in pairs
    assert token_spellings(student)[student.token_to_id("<s>")] == ("text", b"<s>")


def test_identical_tokenizers_share_every_id():
    tok = train_bpe(["the cat sat on the mat"] * 10, vocab_size=300)
    shared = shared_vocabulary(tok, tok)
    assert len(shared) == shared.teacher_size == shared.student_size == len(tok)
    assert torch.equal(shared.teacher_ids, torch.arange(len(tok)))
    assert torch.equal(shared.student_ids, shared.teacher_ids)
    assert torch.equal(shared.teacher_to_student(), torch.arange(len(tok)))


def test_teacher_to_student_table():
    teacher = train_bpe(["the cat sat on the mat"] * 10, vocab_size=300)
    student = byte_tokenizer()
    shared = shared_vocabulary(teacher, student)
    table = shared.teacher_to_student()
    assert table.shape == (len(teacher),)
    # every single-byte token and the shared EOS are shared; merged tokens are not
    assert int((table >= 0).sum()) == 257
    assert table[teacher.convert_tokens_to_ids("Ġmat")] == -1
    assert table[teacher.convert_tokens_to_ids("Ġ")] == 32
    assert table[teacher.eos_token_id] == student.eos_token_id


def test_smollm2_shares_the_common_words_of_a_trained_bpe():
    teacher = smollm2_or_skip()
    student = train_bpe(["In the beginning God created the heaven and the earth."] * 20, 300)
    pairs = as_dict(shared_vocabulary(teacher, student))
    for token in ("Ġthe", "ĠGod", "In", "<|endoftext|>"):
        assert pairs[teacher.convert_tokens_to_ids(token)] == student.convert_tokens_to_ids(token)
    # all 256 bytes, the EOS, and the merged words are shared
    assert len(pairs) > 257


def test_not_a_fast_tokenizer():
    with pytest.raises(TypeError, match="fast tokenizer"):
        shared_vocabulary(object(), byte_tokenizer())
