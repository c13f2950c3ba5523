"""Sampling: exact filtering, empirical frequencies, reproducibility, modes, EOS and padding."""

import math

import pytest
import torch
from torch import nn

from kdistill.onpolicy import SamplingConfig, filter_logits, sample_completions

PROBS = [0.1, 0.4, 0.2, 0.3]


def dist(scores):
    return scores.softmax(-1).double()


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, PROBS),
        ({"top_k": 2}, [0, 4 / 7, 0, 3 / 7]),
        ({"top_p": 0.6}, [0, 4 / 7, 0, 3 / 7]),  # cumulative (ascending) 0.1, 0.3 <= 0.4 removed
        ({"top_p": 0.75}, [0, 4 / 9, 2 / 9, 3 / 9]),
        ({"top_p": 0.01}, [0, 1, 0, 0]),  # the most likely token always stays
        ({"temperature": 2.0}, [math.sqrt(p) for p in PROBS]),
        # T = 0.5 squares the probabilities, top-k = 3 drops 0.01, top-p = 0.8 drops 4/29
        ({"temperature": 0.5, "top_k": 3, "top_p": 0.8}, [0, 16 / 25, 0, 9 / 25]),
    ],
    ids=["plain", "top_k", "top_p", "top_p_wide", "top_p_tiny", "temperature", "all_three"],
)
def test_filter_logits_gives_the_hand_computed_distribution(kwargs, expected):
    expected = torch.tensor(expected, dtype=torch.float64)
    expected = expected / expected.sum()
    scores = filter_logits(torch.tensor(PROBS).log() + 3.0, **kwargs)  # shift: logits, not logs
    torch.testing.assert_close(dist(scores), expected, atol=1e-6, rtol=0)
    assert torch.isneginf(scores[expected == 0]).all()


def test_top_k_keeps_ties_with_the_kth_value():
    scores = filter_logits(torch.tensor([[1.0, 1.0, 1.0, 0.0]]), top_k=2)
    assert torch.isfinite(scores[0, :3]).all() and torch.isneginf(scores[0, 3])


class FixedNext(nn.Module):
    """Same next-token logits at every position, whatever the input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, input_ids, attention_mask=None):
        return self.logits.expand(*input_ids.shape, -1)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"top_k": 2}, {"top_p": 0.75}, {"temperature": 0.5, "top_k": 3, "top_p": 0.8}],
    ids=["plain", "top_k", "top_p", "all_three"],
)
def test_empirical_frequencies_match_the_filtered_distribution(kwargs):
    n = 20_000
    logits = torch.tensor(PROBS).log()
    model = FixedNext(logits)
    batch = sample_completions(
        model,
        torch.zeros(n, 1, dtype=torch.long),
        config=SamplingConfig(max_new_tokens=1, **kwargs),
        generator=torch.Generator().manual_seed(0),
    )
    counts = torch.bincount(batch.completion_ids[:, 0], minlength=4).double()
    expected = dist(filter_logits(logits, **kwargs))
    assert (counts[expected == 0] == 0).all(), "a filtered token was sampled"
    sigma = (expected * (1 - expected) / n).sqrt()
    assert ((counts / n - expected).abs() <= 5 * sigma + 1e-9).all(), (counts / n, expected)


def test_greedy_picks_the_argmax():
    model = FixedNext(torch.tensor(PROBS).log())
    batch = sample_completions(
        model, torch.zeros(3, 2).long(), config=SamplingConfig(max_new_tokens=2, do_sample=False)
    )
    assert batch.completion_ids.tolist() == [[1, 1]] * 3


def prompts():
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 0, 0], [0, 9, 10, 11]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 1, 1, 1]])
    return ids, mask


def test_seeded_generator_reproduces_the_samples_and_leaves_the_global_rng(tiny_lm):
    model = tiny_lm()
    config = SamplingConfig(max_new_tokens=6, top_k=8)
    state = torch.get_rng_state()
    first = sample_completions(
        model, *prompts(), config, generator=torch.Generator().manual_seed(3)
    )
    again = sample_completions(
        model, *prompts(), config, generator=torch.Generator().manual_seed(3)
    )
    other = sample_completions(
        model, *prompts(), config, generator=torch.Generator().manual_seed(4)
    )
    assert torch.equal(torch.get_rng_state(), state), "the global RNG was used"
    assert torch.equal(first.input_ids, again.input_ids)
    assert torch.equal(first.completion_mask, again.completion_mask)
    assert not torch.equal(first.input_ids, other.input_ids)


def test_without_a_generator_the_global_rng_is_used(tiny_lm):
    model = tiny_lm()
    config = SamplingConfig(max_new_tokens=6)
    torch.manual_seed(11)
    first = sample_completions(model, *prompts(), config)
    torch.manual_seed(11)
    assert torch.equal(sample_completions(model, *prompts(), config).input_ids, first.input_ids)


def test_model_is_in_eval_mode_while_sampling_and_modes_are_restored(tiny_lm):
    model = tiny_lm(dropout=0.5)
    model.train()
    model.norm.eval()  # a submodule the user keeps in eval: must stay so
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append((m.training, m.dropout.training)))
    sample_completions(model, *prompts(), SamplingConfig(max_new_tokens=3))
    assert seen and all(flags == (False, False) for flags in seen)
    assert model.training and model.dropout.training and not model.norm.training
    model.eval()
    sample_completions(model, *prompts(), SamplingConfig(max_new_tokens=1))
    assert not model.training


def test_sampling_does_not_build_a_graph(tiny_lm):
    model = tiny_lm()
    model.register_forward_hook(lambda m, args, out: seen.append(torch.is_grad_enabled()))
    seen = []
    sample_completions(model, *prompts(), SamplingConfig(max_new_tokens=2))
    assert seen == [False, False]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_padded_batch_samples_like_each_prompt_alone(tiny_lm, batch_size):
    # greedy decoding is deterministic: a batched, padded prompt must give its own continuation
    model = tiny_lm(hidden=32)
    config = SamplingConfig(max_new_tokens=5, do_sample=False)
    ids, mask = prompts()
    batch = sample_completions(model, ids[:batch_size], mask[:batch_size], config)
    for row in range(batch_size):
        alone = sample_completions(model, ids[row][mask[row].bool()][None], None, config)
        assert batch.completion_ids[row].tolist() == alone.completion_ids[0].tolist()


class Counter(nn.Module):
    """Greedy-deterministic: the next token is (last token + 1) mod V."""

    def __init__(self, vocab: int = 16) -> None:
        super().__init__()
        self.vocab = vocab
        self.calls = 0

    def forward(self, input_ids, attention_mask=None):
        self.calls += 1
        return nn.functional.one_hot((input_ids + 1) % self.vocab, self.vocab).float() * 10


def test_eos_ends_a_completion_and_padding_follows():
    model = Counter()
    batch = sample_completions(
        model,
        torch.tensor([[1, 2], [0, 4]]),
        torch.tensor([[1, 1], [0, 1]]),
        SamplingConfig(max_new_tokens=6, do_sample=False, eos_token_id=6, pad_token_id=15),
    )
    assert batch.completion_ids.tolist() == [[3, 4, 5, 6], [5, 6, 15, 15]]
    assert batch.lengths.tolist() == [4, 2] and batch.ended.tolist() == [True, True]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]]
    assert model.calls == 4, "sampling must stop once every completion has ended"


def test_length_limit_ends_a_completion_without_eos():
    batch = sample_completions(
        Counter(),
        torch.tensor([[1], [9]]),
        config=SamplingConfig(max_new_tokens=3, do_sample=False, eos_token_id=[4, 12]),
    )
    assert batch.completion_ids.tolist() == [[2, 3, 4], [10, 11, 12]]
    assert batch.ended.tolist() == [True, True]
    cut = sample_completions(
        Counter(), torch.tensor([[1]]), config=SamplingConfig(max_new_tokens=2, eos_token_id=9)
    )
    assert cut.lengths.tolist() == [2] and cut.ended.tolist() == [False]


class NoMask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(8, 8)

    def forward(self, ids):
        return self.embed(ids)


def test_padded_prompts_need_a_model_with_attention_mask():
    with pytest.raises(ValueError, match="takes no `attention_mask`"):
        sample_completions(NoMask(), torch.tensor([[1, 2], [0, 3]]), torch.tensor([[1, 1], [0, 1]]))
    batch = sample_completions(
        NoMask(), torch.tensor([[1, 2]]), None, SamplingConfig(max_new_tokens=2)
    )
    assert batch.lengths.tolist() == [2]


def test_input_errors():
    with pytest.raises(ValueError, match="at least one real token"):
        sample_completions(NoMask(), torch.tensor([[1, 2]]), torch.tensor([[0, 0]]))
    with pytest.raises(ValueError, match="can generate"):
        sample_completions(NoMask(), torch.tensor([[1]]), config=SamplingConfig(backend="generate"))
    with pytest.raises(TypeError, match="SamplingConfig"):
        sample_completions(NoMask(), torch.tensor([[1]]), config={"max_new_tokens": 2})


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens"),
        ({"max_new_tokens": True}, TypeError, "max_new_tokens"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"top_k": -1}, ValueError, "top_k"),
        ({"top_p": 0.0}, ValueError, "top_p"),
        ({"top_p": 1.5}, ValueError, "top_p"),
        ({"do_sample": 1}, TypeError, "do_sample"),
        ({"eos_token_id": [2, "3"]}, TypeError, r"eos_token_id\[1\]"),
        ({"eos_token_id": -1}, ValueError, "eos_token_id"),
        ({"pad_token_id": 1.0}, TypeError, "pad_token_id"),
        ({"backend": "vllm"}, ValueError, "backend"),
    ],
    ids=lambda v: str(v) if not isinstance(v, dict) else "-".join(map(str, v.items())),
)
def test_sampling_config_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        SamplingConfig(**kwargs)


def test_sampling_config_normalizes_ids():
    config = SamplingConfig(eos_token_id=[5, 6])
    assert config.eos_token_id == (5, 6) and config.eos_ids == (5, 6) and config.pad_id == 5
    assert SamplingConfig(eos_token_id=[]).eos_token_id is None
    assert SamplingConfig(pad_token_id=3, eos_token_id=1).pad_id == 3
    assert SamplingConfig().pad_id == 0 and SamplingConfig().eos_ids == ()
