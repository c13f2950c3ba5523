"""TokenAligner on hand-built and offline tokenizers, against hand-made expectations and a
byte-exact reference that does not use offsets."""

import pytest
import torch

tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

from xtoken_helpers import (  # noqa: E402
    byte_level_bpe,
    reference_byte_ends,
    reference_pairs,
    sentencepiece_bpe,
    smollm2_or_skip,
    spell_byte_level,
)

from kdistill.xtoken import TokenAligner, byte_tokenizer, train_bpe  # noqa: E402

TRICKY_TEXTS = [
    "In the beginning God created the heaven and the earth.",
    "naïve café — ünïcödé  spaces\tand\ttabs\n\nnew lines",
    "emoji 🤗🙂 and flags 🇫🇷, CJK 漢字かな, combining e\u0301 a\u0308\u0301",
    "   leading and trailing spaces   ",
    "",
    "x",
]
CORPUS = [t for t in TRICKY_TEXTS if t] * 5 + ["the cat sat on the mat, and the dog sat too"] * 20


def pairs(tok_pair, batch, row=0):
    """Aligned (teacher position, teacher token, student position, student token) of one row."""
    teacher, student = tok_pair
    a = batch.alignment
    out = []
    for i, j, keep in zip(
        a.teacher_positions[row].tolist(),
        a.student_positions[row].tolist(),
        a.mask[row].tolist(),
        strict=True,
    ):
        if keep:
            t_id = int(batch.teacher_input_ids[row, i])
            s_id = int(batch.student_input_ids[row, j])
            out.append((i, teacher.id_to_token(t_id), j, student.id_to_token(s_id)))
    return out


def test_word_split_one_three_against_two_two():
    teacher = byte_level_bpe([("b", "c"), ("bc", "d"), ("Ġ", "a")])
    student = byte_level_bpe([("a", "b"), ("c", "d"), ("Ġ", "ab")])
    batch = TokenAligner(teacher, student)("abcd abcd")
    # teacher: a | bcd | Ġa | bcd; student: ab | cd | Ġab | cd: only the word ends align
    assert pairs((teacher, student), batch) == [(1, "bcd", 1, "cd"), (3, "bcd", 3, "cd")]


def test_gpt2_and_sentencepiece_leading_spaces_align():
    teacher = byte_level_bpe([("b", "c"), ("Ġ", "a")])
    student = sentencepiece_bpe([("▁", "a"), ("b", "c"), ("▁a", "bc")])
    batch = TokenAligner(teacher, student)("abc abc")
    # teacher: a | bc | Ġa | bc; student (prepended ▁): ▁abc | ▁abc
    assert pairs((teacher, student), batch) == [(1, "bc", 0, "▁abc"), (3, "bc", 1, "▁abc")]


def test_unicode_multibyte_emoji_and_combining_marks():
    teacher = byte_tokenizer().backend_tokenizer
    student = sentencepiece_bpe([])
    text = "é🤗e\u0301!"  # 2-byte char, 4-byte emoji, e + combining acute (2 bytes), "!"
    batch = TokenAligner(teacher, student)(text)
    got = [(i, j) for i, _, j, _ in pairs((teacher, student), batch)]
    # teacher bytes: é=0,1  🤗=2..5  e=6  U+0301=7,8  !=9
    # student: ▁=0  é=1,2  🤗=3..6  e=7  U+0301=8,9  !=10: one pair per character end
    assert got == [(1, 2), (5, 6), (6, 7), (8, 9), (9, 10)]


def test_whitespace_runs():
    teacher = byte_level_bpe([("Ċ", "Ċ"), ("Ġ", "c"), ("Ġ", "Ġ")])
    student = sentencepiece_bpe([("▁", "▁"), ("▁", "a"), ("▁▁", "b")])
    batch = TokenAligner(teacher, student)(["a  b\n\n c", "a   b"])
    # "a  b\n\n c": teacher a|Ġ|Ġ|b|ĊĊ|Ġc ends 1,2,3,4,6,8; student ▁a|▁▁b|\n|\n|▁|c ends
    # 1,4,5,6,7,8: common ends 1,4,6,8
    assert pairs((teacher, student), batch, 0) == [
        (0, "a", 0, "▁a"),
        (3, "b", 1, "▁▁b"),
        (4, "ĊĊ", 3, "<0x0A>"),
        (5, "Ġc", 5, "c"),
    ]
    # "a   b": a|ĠĠ|Ġ|b against ▁a|▁▁|▁|b: every end is common
    assert [(i, j) for i, _, j, _ in pairs((teacher, student), batch, 1)] == [
        (0, 0),
        (1, 1),
        (2, 2),
        (3, 3),
    ]


def test_bos_eos_special_tokens():
    teacher = byte_level_bpe([("a", "b")], specials=["<s>", "</s>"], template="<s> $A </s>")
    with_bos = sentencepiece_bpe([("a", "b"), ("▁", "ab")], specials=["<bos>"], template="<bos> $A")
    no_specials = byte_level_bpe([])
    text = "ab"
    batch = TokenAligner(teacher, with_bos)(text)
    # BOS pairs with BOS (empty prefix); EOS ends nothing
    assert pairs((teacher, with_bos), batch) == [(0, "<s>", 0, "<bos>"), (1, "ab", 1, "▁ab")]
    batch = TokenAligner(teacher, no_specials)(text)
    assert pairs((teacher, no_specials), batch) == [(1, "ab", 1, "b")]
    # without special tokens, no BOS/EOS is added
    batch = TokenAligner(teacher, with_bos)(text, add_special_tokens=False)
    assert batch.teacher_input_ids.tolist() == [[teacher.token_to_id("ab")]]


def test_special_token_written_in_the_text_aligns_by_its_span():
    teacher = byte_level_bpe([], specials=["<|endoftext|>"])
    student = byte_level_bpe([])  # spells "<|endoftext|>" with 13 byte tokens
    batch = TokenAligner(teacher, student)("a<|endoftext|>b")
    got = pairs((teacher, student), batch)
    assert (1, "<|endoftext|>", 13, ">") in got
    assert got[-1] == (2, "b", 14, "b")


def test_trimmed_offsets_do_not_create_wrong_pairs():
    trimmed = byte_level_bpe([("Ġ", "w")], trim_offsets=True)
    plain = byte_level_bpe([("Ġ", "w")])
    text = "hi  wo"
    batch = TokenAligner(trimmed, plain)(text)
    # trimmed: h|i|Ġ(empty span)|Ġw|o; the whitespace-only token pairs with nothing
    got = [(i, j) for i, _, j, _ in pairs((trimmed, plain), batch)]
    assert got == [(0, 0), (1, 1), (3, 3), (4, 4)]


def test_truncation_drops_pairs_past_the_cut_and_mid_character_ends():
    teacher = byte_level_bpe([("a", "b")])
    student = byte_tokenizer().backend_tokenizer
    aligner = TokenAligner(teacher, student)
    text = "ab🤗ab"
    full = aligner(text)
    assert [(i, j) for i, _, j, _ in pairs((teacher, student), full)] == [
        (0, 1),
        (4, 5),
        (5, 7),
    ]
    # student cut after 2 of the emoji's 4 bytes: nothing past "ab" pairs
    cut = aligner(text, student_max_length=4)
    assert cut.student_input_ids.shape == (1, 4)
    assert [(i, j) for i, _, j, _ in pairs((teacher, student), cut)] == [(0, 1)]
    # teacher cut inside the emoji (its 4 byte tokens are teacher positions 1-4)
    cut = aligner(text, teacher_max_length=3)
    assert [(i, j) for i, _, j, _ in pairs((teacher, student), cut)] == [(0, 1)]
    # a cut right after a character keeps its pair
    cut = aligner(text, max_length=5)
    assert [(i, j) for i, _, j, _ in pairs((teacher, student), cut)] == [(0, 1)]
    cut = aligner(text, teacher_max_length=5, student_max_length=6)
    assert [(i, j) for i, _, j, _ in pairs((teacher, student), cut)] == [(0, 1), (4, 5)]


def test_batch_with_padding_equals_one_text_at_a_time():
    teacher = train_bpe(CORPUS, vocab_size=400)
    student = byte_tokenizer()
    aligner = TokenAligner(teacher, student)
    batch = aligner(TRICKY_TEXTS)
    for row, text in enumerate(TRICKY_TEXTS):
        single = aligner(text)
        n_t = int(batch.teacher_attention_mask[row].sum())
        n_s = int(batch.student_attention_mask[row].sum())
        assert torch.equal(batch.teacher_input_ids[row, :n_t], single.teacher_input_ids[0])
        assert torch.equal(batch.student_input_ids[row, :n_s], single.student_input_ids[0])
        assert (batch.teacher_input_ids[row, n_t:] == teacher.pad_token_id).all()
        assert (batch.teacher_offsets[row, n_t:] == 0).all()
        assert pairs((teacher.backend_tokenizer, student.backend_tokenizer), batch, row) == (
            pairs((teacher.backend_tokenizer, student.backend_tokenizer), single)
        )


@pytest.mark.parametrize("vocab_size", [300, 600], ids=["few-merges", "more-merges"])
def test_byte_level_pairs_match_the_byte_exact_reference(vocab_size):
    teacher = train_bpe(CORPUS, vocab_size=vocab_size, bos_token="<s>")
    student = byte_tokenizer()
    aligner = TokenAligner(teacher, student)
    batch = aligner(TRICKY_TEXTS)
    for row, text in enumerate(TRICKY_TEXTS):
        ends = []
        for tok, ids, mask in (
            (teacher, batch.teacher_input_ids[row], batch.teacher_attention_mask[row]),
            (student, batch.student_input_ids[row], batch.student_attention_mask[row]),
        ):
            special = set(tok.all_special_ids)
            ids = ids[mask.bool()].tolist()
            ends.append(
                reference_byte_ends(tok.backend_tokenizer, text, ids, special, spell_byte_level)
            )
        expected = reference_pairs(*ends)
        got = [
            (i, j)
            for i, _, j, _ in pairs(
                (teacher.backend_tokenizer, student.backend_tokenizer), batch, row
            )
        ]
        assert got == expected, text


def test_identical_tokenizers_pair_every_text_position():
    tok = train_bpe(CORPUS, vocab_size=400)
    batch = TokenAligner(tok, tok)(TRICKY_TEXTS)
    assert torch.equal(batch.teacher_input_ids, batch.student_input_ids)
    a = batch.alignment
    assert torch.equal(a.teacher_positions, a.student_positions)
    # every token pairs except byte pieces inside a character
    for row in range(len(TRICKY_TEXTS)):
        ends = batch.teacher_offsets[row, :, 1]
        n = int(batch.teacher_attention_mask[row].sum())
        nxt_start = torch.cat([batch.teacher_offsets[row, 1:n, 0], torch.tensor([10**9])])
        expected = [p for p in range(n) if nxt_start[p] >= ends[p]]
        assert a.teacher_positions[row][a.mask[row]].tolist() == expected


def test_hugging_face_and_raw_tokenizers_give_the_same_batch():
    hf = train_bpe(CORPUS, vocab_size=400)
    student = byte_tokenizer()
    from_hf = TokenAligner(hf, student)(TRICKY_TEXTS)
    from_raw = TokenAligner(hf.backend_tokenizer, student.backend_tokenizer)(TRICKY_TEXTS)
    for side in ("teacher", "student"):
        mask = getattr(from_hf, f"{side}_attention_mask")
        assert torch.equal(mask, getattr(from_raw, f"{side}_attention_mask"))
        for name in ("input_ids", "offsets"):
            hf_values = getattr(from_hf, f"{side}_{name}")
            raw_values = getattr(from_raw, f"{side}_{name}")
            assert torch.equal(hf_values[mask.bool()], raw_values[mask.bool()]), name
    # padding uses the pad token of the Hugging Face tokenizer, 0 for a raw one
    assert (from_hf.student_input_ids[~from_hf.student_attention_mask.bool()] == 256).all()
    for name in ("teacher_positions", "student_positions", "mask"):
        assert torch.equal(getattr(from_hf.alignment, name), getattr(from_raw.alignment, name))


def test_users_tokenizers_keep_their_settings():
    teacher = train_bpe(CORPUS, vocab_size=400)
    teacher.backend_tokenizer.enable_truncation(3)
    before = teacher.backend_tokenizer.to_str()
    batch = TokenAligner(teacher, byte_tokenizer())("the cat sat on the mat")
    assert batch.teacher_input_ids.shape[1] > 3  # the aligner's copy does not truncate
    assert teacher.backend_tokenizer.to_str() == before
    assert teacher.backend_tokenizer.truncation["max_length"] == 3


def test_aligned_batch_inputs_and_to():
    batch = TokenAligner(byte_tokenizer(), byte_tokenizer())(["ab", "c"])
    assert set(batch.teacher_inputs) == {"input_ids", "attention_mask"}
    assert batch.student_inputs["attention_mask"].tolist() == [[1, 1], [1, 0]]
    moved = batch.to("cpu")
    assert torch.equal(moved.alignment.mask, batch.alignment.mask)


def test_smollm2_against_a_trained_bpe():
    teacher = smollm2_or_skip()
    student = train_bpe(CORPUS, vocab_size=600)
    batch = TokenAligner(teacher, student)(TRICKY_TEXTS)
    for row, text in enumerate(TRICKY_TEXTS):
        ends = []
        for tok, ids, mask in (
            (teacher, batch.teacher_input_ids[row], batch.teacher_attention_mask[row]),
            (student, batch.student_input_ids[row], batch.student_attention_mask[row]),
        ):
            ids = ids[mask.bool()].tolist()
            ends.append(
                reference_byte_ends(
                    tok.backend_tokenizer, text, ids, set(tok.all_special_ids), spell_byte_level
                )
            )
        got = [
            (i, j)
            for i, _, j, _ in pairs(
                (teacher.backend_tokenizer, student.backend_tokenizer), batch, row
            )
        ]
        assert got == reference_pairs(*ends), text
    # SmolLM2 as the student: its ids spell the text back exactly
    reverse = TokenAligner(student, teacher)
    encoded = reverse(TRICKY_TEXTS)
    _same_alignment(
        reverse.align_student_ids(encoded.student_input_ids, encoded.student_attention_mask),
        encoded,
    )


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda a: TokenAligner(object(), byte_tokenizer()), TypeError, "teacher_tokenizer"),
        (lambda a: a([]), ValueError, "empty"),
        (lambda a: a([1, 2]), TypeError, "sequence of strings"),
        (lambda a: a("x", max_length=0), ValueError, "max_length"),
        (lambda a: a("x", student_max_length=2.0), TypeError, "student_max_length"),
        (lambda a: a("x", add_special_tokens=1), TypeError, "add_special_tokens"),
    ],
    ids=["tokenizer", "empty", "not-strings", "max-length", "float-length", "bool"],
)
def test_errors(call, error, match):
    aligner = TokenAligner(byte_tokenizer(), byte_tokenizer())
    with pytest.raises(error, match=match):
        call(aligner)


def _same_alignment(a, b):
    for name in ("teacher_positions", "student_positions", "mask"):
        assert torch.equal(getattr(a.alignment, name), getattr(b.alignment, name)), name
    for name in ("teacher_input_ids", "teacher_attention_mask", "student_attention_mask"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    keep = a.student_attention_mask.bool()
    assert torch.equal(a.student_offsets[keep], b.student_offsets[keep])


@pytest.mark.parametrize("student", ["bytes", "bpe", "sentencepiece"])
def test_align_student_ids_of_canonical_ids_equals_encoding_the_text(student):
    teacher = train_bpe(CORPUS, vocab_size=400, bos_token="<s>")
    student = {
        "bytes": lambda: byte_tokenizer(bos_token="<bos>"),
        "bpe": lambda: train_bpe(CORPUS, vocab_size=300),
        "sentencepiece": lambda: sentencepiece_bpe([("▁", "a"), ("▁", "t"), ("h", "e")]),
    }[student]()
    aligner = TokenAligner(teacher, student)
    encoded = aligner(TRICKY_TEXTS)
    from_ids = aligner.align_student_ids(encoded.student_input_ids, encoded.student_attention_mask)
    _same_alignment(from_ids, encoded)
    assert torch.equal(from_ids.student_input_ids, encoded.student_input_ids)  # as given


def test_align_student_ids_keeps_a_non_canonical_tokenization():
    teacher = train_bpe(CORPUS, vocab_size=400)
    student = train_bpe(CORPUS, vocab_size=300)
    aligner = TokenAligner(teacher, student)
    text = "the cat sat"
    # spell "the" with single-byte tokens: not how the student tokenizer would encode it
    canonical = student(" cat sat").input_ids
    ids = torch.tensor([student.convert_tokens_to_ids(list("the")) + canonical])
    assert ids[0].tolist() != student(text).input_ids
    batch = aligner.align_student_ids(ids)
    assert torch.equal(batch.student_input_ids, ids)
    assert batch.teacher_input_ids.tolist() == [teacher(text).input_ids]
    ends = [
        reference_byte_ends(tok.backend_tokenizer, text, row, set(), spell_byte_level)
        for tok, row in ((teacher, teacher(text).input_ids), (student, ids[0].tolist()))
    ]
    got = [
        (i, j)
        for i, _, j, _ in pairs((teacher.backend_tokenizer, student.backend_tokenizer), batch)
    ]
    assert got == reference_pairs(*ends)


def test_align_student_ids_with_a_sequence_cut_inside_a_character():
    teacher = train_bpe(CORPUS, vocab_size=400)
    aligner = TokenAligner(teacher, byte_tokenizer())
    data = "ab🤗".encode()[:-2]  # the emoji loses its last two bytes
    batch = aligner.align_student_ids(torch.tensor([list(data)]))
    # the undecodable bytes reach the teacher as U+FFFD, one character per byte
    assert teacher.decode(batch.teacher_input_ids[0]) == "ab\ufffd\ufffd"
    assert batch.student_offsets[0].tolist() == [[0, 1], [1, 2], [2, 3], [3, 4]]
    assert batch.alignment.student_positions[batch.alignment.mask].tolist()[-2:] == [2, 3]


def test_align_student_ids_special_tokens_and_padding():
    teacher = byte_level_bpe([], specials=["<s>"], template="<s> $A")
    student = byte_tokenizer(bos_token="<bos>")
    aligner = TokenAligner(teacher, student)
    bos, eos = 257, 256
    ids = torch.tensor([[eos, eos, bos, 104, 105, eos], [bos, 104, eos, 105, eos, eos]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])  # left and right padding
    batch = aligner.align_student_ids(ids, mask)
    assert pairs((teacher, student.backend_tokenizer), batch, 0) == [
        (0, "<s>", 2, "<bos>"),
        (1, "h", 3, "h"),
        (2, "i", 4, "i"),
    ]
    # the EOS between "h" and "i" spells nothing and pairs with nothing
    assert [(i, j) for i, _, j, _ in pairs((teacher, student.backend_tokenizer), batch, 1)] == [
        (0, 0),
        (1, 1),
        (2, 3),
    ]
    spelled = aligner.align_student_ids(ids[1:, :4], skip_special_tokens=False)
    # "<bos>h<|endoftext|>i": the teacher reads the special tokens' text
    assert teacher.decode(spelled.teacher_input_ids[0].tolist()[1:]) == "<bos>h<|endoftext|>i"


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda a: a.align_student_ids(torch.zeros(3)), TypeError, "2-D integer"),
        (lambda a: a.align_student_ids(torch.zeros(1, 2)), TypeError, "2-D integer"),
        (
            lambda a: a.align_student_ids(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 3)),
            ValueError,
            "student_attention_mask",
        ),
        (lambda a: a.align_student_ids(torch.tensor([[999]])), ValueError, "not in the student"),
        (
            lambda a: a.align_student_ids(torch.zeros(0, 2, dtype=torch.long)),
            ValueError,
            "no sequence",
        ),
    ],
    ids=["1d", "float", "mask", "unknown-id", "empty"],
)
def test_align_student_ids_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(TokenAligner(byte_tokenizer(), byte_tokenizer()))


def test_align_student_ids_refuses_word_piece():
    from tokenizers import models, pre_tokenizers

    word_piece = tokenizers.Tokenizer(
        models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]")
    )
    word_piece.pre_tokenizer = pre_tokenizers.Whitespace()
    aligner = TokenAligner(byte_tokenizer(), word_piece)
    assert aligner("ab a").student_input_ids.tolist() == [[1, 2, 1]]  # texts still work
    with pytest.raises(ValueError, match="WordPiece"):
        aligner.align_student_ids(torch.tensor([[1, 2]]))
