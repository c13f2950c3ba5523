"""Prompt datasets in TRL's conventions, tokenized into the batches the on-policy core takes.

Rows are mappings with ``"prompt"`` and, optionally, ``"completion"`` (used by the off-policy
share of GKD). Each is text, or chat messages (a list of ``{"role", "content"}`` mappings)
rendered with the tokenizer's chat template: the prompt with ``add_generation_prompt=True``, a
completion as the tokens that rendering prompt + completion adds after the prompt's tokens (the
way TRL renders prompt-completion conversations). Text completions get the EOS token appended
(as TRL's SFT does), so the student also learns where to stop.

Only the tokenizer's own methods are called (``__call__``, ``apply_chat_template``,
``eos_token_id``, ``pad_token_id``): no ``transformers`` import.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .._validation import check_bool, check_int

__all__ = ["PromptCollator"]


def _is_chat(value: Any) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and all(isinstance(m, Mapping) and "role" in m for m in value)
    )


def _ids(encoded: Any) -> list[int]:
    """Token ids from a tokenizer result (a list, or a mapping with ``input_ids``)."""
    if isinstance(encoded, Mapping):
        encoded = encoded["input_ids"]
    if isinstance(encoded, Tensor):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):  # a batch of one
        (encoded,) = encoded
    return [int(i) for i in encoded]


def _pad(rows: list[list[int]], side: str, pad_id: int) -> tuple[Tensor, Tensor]:
    """``[B, L]`` ids and bool mask, ``L`` the longest row, padded on ``side``."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        if not row:
            continue
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = True
    return ids, mask


class PromptCollator:
    """Collate rows ``{"prompt": ..., "completion"?: ...}`` into left-padded prompt tensors.

    Returns ``{"prompt_input_ids": [B, P], "prompt_attention_mask": [B, P]}`` (prompts
    left-padded, the layout generation needs) and, when every row has a ``"completion"``,
    ``"completion_input_ids": [B, C]`` and ``"completion_attention_mask"`` (right-padded). Masks
    are long tensors (1 = real token), like a tokenizer's.

    Args:
        tokenizer: A Hugging Face tokenizer (a pad token is not required: the EOS, else 0, pads).
        max_prompt_length: Keep at most this many prompt tokens, the last ones (None: all).
        max_completion_length: Keep at most this many completion tokens, the first ones.
        add_eos: Append the EOS token to text completions that do not end with it.

    Raises:
        ValueError: A row without ``"prompt"``, some rows with a completion and others without,
            an empty prompt, or a chat completion whose rendering does not extend the prompt's.

    Example:
        >>> class Chars:  # a tokenizer stand-in: one id per character
        ...     eos_token_id, pad_token_id = 0, None
        ...     def __call__(self, text, add_special_tokens=True):
        ...         return {"input_ids": [ord(c) - 96 for c in text]}
        >>> rows = [{"prompt": "ab", "completion": "c"}, {"prompt": "d", "completion": "ef"}]
        >>> batch = PromptCollator(Chars())(rows)  # EOS (0) appended to the completions
        >>> batch["prompt_input_ids"].tolist(), batch["completion_input_ids"].tolist()
        ([[1, 2], [0, 4]], [[3, 0, 0], [5, 6, 0]])
        >>> batch["completion_attention_mask"].tolist()
        [[1, 1, 0], [1, 1, 1]]
    """

    def __init__(
        self,
        tokenizer: Any,
        max_prompt_length: int | None = None,
        max_completion_length: int | None = None,
        add_eos: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_prompt_length = (
            None
            if max_prompt_length is None
            else check_int("max_prompt_length", max_prompt_length, min_value=1)
        )
        self.max_completion_length = (
            None
            if max_completion_length is None
            else check_int("max_completion_length", max_completion_length, min_value=1)
        )
        self.add_eos = check_bool("add_eos", add_eos)
        self.eos_token_id = getattr(tokenizer, "eos_token_id", None)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = pad if pad is not None else (self.eos_token_id or 0)

    def _prompt_ids(self, prompt: Any) -> list[int]:
        if _is_chat(prompt):
            return _ids(
                self.tokenizer.apply_chat_template(
                    list(prompt), add_generation_prompt=True, tokenize=True
                )
            )
        if not isinstance(prompt, str):
            raise ValueError(
                f"A 'prompt' must be text or chat messages, got {type(prompt).__name__}."
            )
        return _ids(self.tokenizer(prompt))

    def _completion_ids(self, prompt: Any, prompt_ids: list[int], completion: Any) -> list[int]:
        if _is_chat(completion):
            if not _is_chat(prompt):
                raise ValueError("A chat 'completion' needs a chat 'prompt' (messages too).")
            full = _ids(
                self.tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=True)
            )
            if full[: len(prompt_ids)] != prompt_ids:
                raise ValueError(
                    "The chat template renders prompt + completion with a different beginning "
                    "than the prompt alone (with add_generation_prompt=True), so the completion's "
                    "tokens cannot be told apart. Give text prompts and completions instead."
                )
            return full[len(prompt_ids) :]
        if not isinstance(completion, str):
            raise ValueError(
                f"A 'completion' must be text or chat messages, got {type(completion).__name__}."
            )
        ids = _ids(self.tokenizer(completion, add_special_tokens=False))
        eos = self.eos_token_id
        if self.add_eos and eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        return ids

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        """Tokenize and pad a list of rows (see the class docstring)."""
        if any(not isinstance(row, Mapping) or "prompt" not in row for row in rows):
            raise ValueError(
                "Every row needs a 'prompt' (text or chat messages), as in TRL's prompt datasets."
            )
        with_completion = [row.get("completion") is not None for row in rows]
        if any(with_completion) and not all(with_completion):
            raise ValueError("Either every row of a batch has a 'completion', or none has.")
        prompts, completions = [], []
        for row in rows:
            ids = self._prompt_ids(row["prompt"])
            if not ids:
                raise ValueError(f"A prompt tokenized to no tokens: {row['prompt']!r}.")
            if all(with_completion):
                completion = self._completion_ids(row["prompt"], ids, row["completion"])
                completions.append(completion[: self.max_completion_length])
            if self.max_prompt_length is not None:
                ids = ids[-self.max_prompt_length :]
            prompts.append(ids)
        prompt_ids, prompt_mask = _pad(prompts, "left", self.pad_token_id)
        batch = {"prompt_input_ids": prompt_ids, "prompt_attention_mask": prompt_mask.long()}
        if completions:
            completion_ids, completion_mask = _pad(completions, "right", self.pad_token_id)
            batch["completion_input_ids"] = completion_ids
            batch["completion_attention_mask"] = completion_mask.long()
        return batch
