"""The ``tokenizers.Tokenizer`` behind a Hugging Face fast tokenizer, and facts read from it."""

import json
from typing import Any

try:
    import tokenizers
except ModuleNotFoundError as err:  # only a missing tokenizers, never a bug inside it
    if err.name != "tokenizers":
        raise
    raise ImportError(
        "kdistill.xtoken needs the `tokenizers` library (installed with transformers): pip "
        'install "kdistill[hf]"'
    ) from err

__all__ = ["backend_of", "describe_backend", "pad_token_id"]


def backend_of(tokenizer: Any, name: str = "tokenizer") -> "tokenizers.Tokenizer":
    """The Rust tokenizer of a Hugging Face fast tokenizer, or ``tokenizer`` itself.

    Raises:
        TypeError: ``tokenizer`` is neither a ``tokenizers.Tokenizer`` nor a fast Hugging Face
            tokenizer (slow, Python tokenizers have no offset mappings).
    """
    if isinstance(tokenizer, tokenizers.Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, tokenizers.Tokenizer):
        return backend
    raise TypeError(
        f"`{name}` must be a Hugging Face fast tokenizer or a tokenizers.Tokenizer, "
        f"got {type(tokenizer).__name__}. Slow tokenizers have no offset mappings: load it "
        "with AutoTokenizer.from_pretrained(..., use_fast=True)."
    )


def pad_token_id(tokenizer: Any, backend: "tokenizers.Tokenizer") -> int:
    """The id used to pad input ids: ``pad_token_id``, else ``eos_token_id``, else 0.

    Padded positions are masked out by the attention mask, so any valid id works.
    """
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    padding = backend.padding
    if padding is not None and isinstance(padding.get("pad_id"), int):
        return padding["pad_id"]
    return 0


def _component_types(config: Any) -> list[dict[str, Any]]:
    """Every component (``{"type": ...}`` dict) of a decoder / pre-tokenizer config, flattened."""
    if not isinstance(config, dict):
        return []
    found = [config]
    for key in ("decoders", "pretokenizers"):
        for child in config.get(key) or []:
            found += _component_types(child)
    return found


def describe_backend(backend: "tokenizers.Tokenizer") -> dict[str, Any]:
    """How token strings of ``backend`` spell text, read from its decoder and pre-tokenizer.

    Returns:
        ``{"byte_level": bool, "space_marker": str | None, "byte_fallback": bool,
        "strip_leading": int, "word_piece": bool}``: byte-level BPE (GPT-2's byte alphabet, ``Ġ``
        for a space), the character that stands for a space (SentencePiece's ``▁``; from a
        ``Metaspace`` decoder or a ``Replace(▁ → " ")`` decoder), whether ``<0xNN>`` tokens stand
        for single bytes (``ByteFallback``), how many leading spaces decoding removes (the
        space SentencePiece prepends: a ``Metaspace`` decoder that prepends, or ``Strip``), and
        whether tokens are WordPiece pieces (``##`` continuation).
    """
    config = json.loads(backend.to_str())
    decoder_parts = _component_types(config.get("decoder"))
    parts = decoder_parts + _component_types(config.get("pre_tokenizer"))
    types = {part.get("type") for part in parts}
    strip_leading = 0
    for part in decoder_parts:
        if part.get("type") == "Metaspace" and part.get("prepend_scheme", "always") != "never":
            strip_leading = max(strip_leading, 1)
        if part.get("type") == "Strip" and part.get("content") == " ":
            start = part.get("start")
            strip_leading = max(strip_leading, start if isinstance(start, int) else 0)
    space_marker = None
    for part in parts:
        if part.get("type") == "Metaspace" and isinstance(part.get("replacement"), str):
            space_marker = part["replacement"]
        pattern = part.get("pattern")
        if (
            part.get("type") == "Replace"
            and isinstance(pattern, dict)
            and isinstance(pattern.get("String"), str)
            and part.get("content") == " "
        ):
            space_marker = pattern["String"]
    return {
        "byte_level": "ByteLevel" in types,
        "space_marker": space_marker,
        "byte_fallback": "ByteFallback" in types or bool(config["model"].get("byte_fallback")),
        "strip_leading": strip_leading,
        "word_piece": "WordPiece" in types or config["model"].get("type") == "WordPiece",
    }
