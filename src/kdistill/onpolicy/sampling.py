"""Sampling completions from a causal LM for a batch of prompts.

``sample_completions(model, prompt_ids, prompt_mask, SamplingConfig(...), generator=g)`` returns a
``Completions`` batch. Two backends draw the tokens:

- ``"generate"``: the model's own ``generate`` (every Hugging Face ``*ForCausalLM``; KV cache,
  left-padded prompts, EOS handling), called with every sampling argument explicit so that the
  model's ``generation_config`` changes nothing (its ``top_k=50`` default included);
- ``"loop"``: a KV-free loop for any causal LM that returns logits ``[B, T, V]`` (a tensor, a
  tuple whose first element they are, or an output with ``logits``), re-running the model on the
  whole sequence at each step. It passes ``attention_mask``/``position_ids``/``logits_to_keep``
  when the model's ``forward`` takes them.

Both apply the same filters in the same order (temperature, then top-k, then top-p: Hugging
Face's order and semantics, see ``filter_logits``) and draw with ``torch.multinomial`` on the
softmax, so for the same seed they sample the same tokens. Randomness comes from the
``torch.Generator`` given (the loop draws from it directly; ``generate``, which has no generator
argument, runs under ``torch.random.fork_rng`` seeded from it), so the global RNG is untouched
and a seeded generator reproduces the samples.

The model is put in eval mode while sampling (dropout off) and every submodule's train/eval mode
is restored afterwards; sampling runs under ``torch.no_grad``.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .._validation import check_bool, check_choice, check_int, check_positive, check_unit_interval
from ..losses._utils import extract_logits
from ._model_utils import eval_mode, forward_parameters, takes
from .completions import Completions, check_token_batch, pack_tokens

__all__ = ["BACKENDS", "SamplingConfig", "filter_logits", "sample_completions"]

BACKENDS: tuple[str, ...] = ("auto", "generate", "loop")


@dataclass(frozen=True)
class SamplingConfig:
    """How completions are sampled (validated at construction).

    Attributes:
        max_new_tokens: Most tokens generated per prompt (an int >= 1).
        temperature: Softmax temperature of the sampling distribution (> 0).
        top_k: Keep only the ``k`` most likely tokens (ties with the k-th kept); 0 disables.
        top_p: Nucleus sampling: keep the most likely tokens whose probabilities sum to at least
            ``top_p`` (always at least one), in (0, 1]; 1 disables.
        do_sample: False picks the most likely token (greedy; temperature/top-k/top-p unused).
        eos_token_id: Token id(s) that end a completion (kept as its last token); None: only
            ``max_new_tokens`` ends it.
        pad_token_id: Id written after a completion ended and in the prompts' left padding
            (masked everywhere); None uses the first EOS id, else 0.
        backend: ``"generate"``, ``"loop"`` or ``"auto"`` (``generate`` for models that can
            generate, i.e. whose ``can_generate()`` is True, else the loop).
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    do_sample: bool = True
    eos_token_id: int | Sequence[int] | None = None
    pad_token_id: int | None = None
    backend: Literal["auto", "generate", "loop"] = "auto"
    _eos: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_int("max_new_tokens", self.max_new_tokens, min_value=1)
        object.__setattr__(self, "temperature", check_positive("temperature", self.temperature))
        check_int("top_k", self.top_k, min_value=0)
        top_p = check_unit_interval("top_p", self.top_p, open_low=True)
        object.__setattr__(self, "top_p", top_p)
        check_bool("do_sample", self.do_sample)
        check_choice("backend", self.backend, BACKENDS)
        eos = self.eos_token_id
        if eos is None:
            ids: tuple[int, ...] = ()
        elif isinstance(eos, Sequence) and not isinstance(eos, str):
            ids = tuple(check_int(f"eos_token_id[{i}]", v, min_value=0) for i, v in enumerate(eos))
            object.__setattr__(self, "eos_token_id", ids or None)
        else:
            ids = (check_int("eos_token_id", eos, min_value=0),)
        object.__setattr__(self, "_eos", ids)
        if self.pad_token_id is not None:
            check_int("pad_token_id", self.pad_token_id, min_value=0)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The EOS ids as a tuple (empty when there is none)."""
        return self._eos

    @property
    def pad_id(self) -> int:
        """The pad id used: ``pad_token_id``, else the first EOS id, else 0."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self._eos[0] if self._eos else 0


def filter_logits(
    logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> Tensor:
    """The sampling scores of next-token logits: temperature, then top-k, then top-p.

    Hugging Face's warpers, in their order and with their semantics: ``logits / temperature``;
    top-k keeps every token whose score is at least the k-th largest (ties included); top-p
    sorts the scores ascending and removes the tokens whose cumulative probability is at most
    ``1 - top_p``, always keeping the most likely one. Removed tokens get ``-inf``, so
    ``softmax`` of the result is the sampling distribution.

    Args:
        logits: ``[..., V]`` next-token logits (any float dtype; computed in float32).
        temperature: > 0.
        top_k: 0 disables.
        top_p: In (0, 1]; 1 disables.

    Returns:
        ``[..., V]`` float32 scores.

    Example:
        >>> scores = filter_logits(torch.tensor([1.0, 3.0, 2.0, 0.0]).log(), top_k=2)
        >>> [round(p, 4) for p in scores.softmax(-1).tolist()]
        [0.0, 0.6, 0.4, 0.0]
    """
    scores = logits.float()
    if temperature != 1.0:
        scores = scores / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= 1 - top_p
        remove_sorted[..., -1:] = False  # the most likely token always stays
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        scores = scores.masked_fill(remove, -float("inf"))
    return scores


def _next_tokens(scores: Tensor, do_sample: bool, generator: torch.Generator | None) -> Tensor:
    """``[B]`` tokens drawn from ``softmax(scores)`` (or its argmax)."""
    if not do_sample:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def _can_generate(model: nn.Module) -> bool:
    can_generate = getattr(model, "can_generate", None)
    generate = getattr(model, "generate", None)
    return callable(can_generate) and bool(can_generate()) and callable(generate)


def _sample_loop(
    model: nn.Module,
    ids: Tensor,
    mask: Tensor,
    config: SamplingConfig,
    generator: torch.Generator | None,
) -> Tensor:
    """The KV-free loop: ``[B, P + C]`` ids, pad after an EOS, stopped when all rows ended."""
    params = forward_parameters(model)
    if not bool(mask.all()) and not takes(params, "attention_mask"):
        raise ValueError(
            f"The prompts are padded but {type(model).__name__}.forward takes no "
            "`attention_mask`, so the padding would be read as text. Give prompts of equal "
            "length, or a model whose forward takes `attention_mask`."
        )
    eos = torch.tensor(config.eos_ids, dtype=torch.long, device=ids.device)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    mask = mask.long()
    for _ in range(config.max_new_tokens):
        kwargs: dict[str, Any] = {}
        if takes(params, "attention_mask"):
            kwargs["attention_mask"] = mask
        if takes(params, "position_ids"):
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        if params is not None and "logits_to_keep" in params:
            kwargs["logits_to_keep"] = 1
        if params is not None and "use_cache" in params:
            kwargs["use_cache"] = False
        logits = extract_logits(model(ids, **kwargs), "model")[:, -1]  # [B, V]
        scores = filter_logits(logits, config.temperature, config.top_k, config.top_p)
        tokens = _next_tokens(scores, config.do_sample, generator)
        tokens = tokens.masked_fill(finished, config.pad_id)
        ids = torch.cat([ids, tokens[:, None]], dim=1)
        mask = torch.cat([mask, (~finished).long()[:, None]], dim=1)
        if eos.numel():
            finished = finished | torch.isin(tokens, eos)
            if bool(finished.all()):
                break
    return ids


def _sample_generate(
    model: nn.Module,
    ids: Tensor,
    mask: Tensor,
    config: SamplingConfig,
    generator: torch.Generator | None,
) -> Tensor:
    """``model.generate`` with every argument that shapes the distribution given explicitly."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": config.max_new_tokens,
        "do_sample": config.do_sample,
        "num_beams": 1,
        "num_return_sequences": 1,
        "pad_token_id": config.pad_id,
        "eos_token_id": list(config.eos_ids) or None,
        "use_cache": True,
        # the model's generation_config must not reshape the distribution
        "repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "min_length": 0,
        "min_new_tokens": None,
        "min_p": None,
        "typical_p": 1.0,
        "bad_words_ids": None,
        "suppress_tokens": None,
        "begin_suppress_tokens": None,
        "forced_bos_token_id": None,
        "forced_eos_token_id": None,
    }
    if config.do_sample:
        kwargs.update(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p)
    generate = getattr(model, "generate")  # noqa: B009 (a method, not a submodule: for mypy)
    if generator is None:
        return generate(input_ids=ids, attention_mask=mask.long(), **kwargs)
    # generate has no generator argument: run it on the global RNG, seeded from `generator`,
    # inside fork_rng so the caller's global RNG state is left as it was
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    devices = [ids.device] if ids.device.type != "cpu" else []
    with torch.random.fork_rng(devices=devices, device_type=ids.device.type):
        torch.manual_seed(seed)
        return generate(input_ids=ids, attention_mask=mask.long(), **kwargs)


def sample_completions(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor | None = None,
    config: SamplingConfig | None = None,
    *,
    generator: torch.Generator | None = None,
) -> Completions:
    """Sample one completion per prompt from ``model`` (see the module docstring).

    Args:
        model: A causal LM: a Hugging Face model with ``generate``, or any module whose forward
            takes ``[B, T]`` ids and returns logits ``[B, T, V]``.
        prompt_ids: ``[B, P]`` prompt token ids, padded on either side (moved to the model's
            device).
        prompt_mask: ``[B, P]``, True/1 on real prompt tokens (None: no padding). Every prompt
            needs at least one real token. Prompts are left-padded before sampling.
        config: The sampling settings; None means ``SamplingConfig()``.
        generator: The source of randomness, on the model's device; None uses the global RNG.

    Returns:
        The ``Completions``: each completion ends at its first EOS (included) or after
        ``max_new_tokens``; ``ended`` tells which.

    Raises:
        ValueError: Bad shapes, an empty prompt, ``backend="generate"`` for a model that cannot
            generate, or padded prompts for a loop model without ``attention_mask``.

    Example:
        >>> class Bigram(torch.nn.Module):  # next-token logits from the current token only
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.table = torch.nn.Embedding(5, 5)
        ...     def forward(self, ids, attention_mask=None):
        ...         return self.table(ids)  # [B, T, V]
        >>> batch = sample_completions(
        ...     Bigram(), torch.tensor([[1, 2], [3, 0]]), torch.tensor([[1, 1], [1, 0]]),
        ...     SamplingConfig(max_new_tokens=4, eos_token_id=4),
        ...     generator=torch.Generator().manual_seed(0))
        >>> batch.prompt_length, batch.input_ids[:, :2].tolist()  # prompts left-padded (pad 4)
        (2, [[1, 2], [4, 3]])
        >>> bool((batch.lengths <= 4).all()), batch.completion_mask[:, :2].any().item()
        (True, False)
    """
    config = SamplingConfig() if config is None else config
    if not isinstance(config, SamplingConfig):
        raise TypeError(f"`config` must be a SamplingConfig, got {type(config).__name__}.")
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}.")
    mask = check_token_batch(prompt_ids, prompt_mask, "prompt")
    if prompt_ids.shape[1] == 0 or not bool(mask.any(1).all()):
        raise ValueError("Every prompt needs at least one real token (a row of `prompt_mask`).")
    backend = config.backend
    if backend == "auto":
        backend = "generate" if _can_generate(model) else "loop"
    elif backend == "generate" and not _can_generate(model):
        raise ValueError(
            f"backend='generate' needs a model that can generate (Hugging Face "
            f"`can_generate()`), got {type(model).__name__}. Use backend='loop' or 'auto'."
        )
    param = next(model.parameters(), None)
    device = prompt_ids.device if param is None else param.device
    ids, mask = pack_tokens(prompt_ids.to(device), mask.to(device), "left", config.pad_id)
    with torch.no_grad(), eval_mode(model):
        sample = _sample_generate if backend == "generate" else _sample_loop
        sequences = sample(model, ids, mask, config, generator)
    prompt_length = ids.shape[1]
    completion_ids = sequences[:, prompt_length:]
    return Completions.from_parts(
        ids,
        mask,
        completion_ids,
        None,
        pad_token_id=config.pad_id,
        eos_token_id=config.eos_ids or None,
        cut_at_eos=True,
    )
