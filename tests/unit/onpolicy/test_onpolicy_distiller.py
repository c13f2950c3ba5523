"""``OnPolicyDistiller``: GKD's mixing, seq-KD, and λ = 0 equal to the off-policy recipe."""

import copy
import math

import pytest
import torch

from kdistill import LMHeadDistillationLoss
from kdistill.llm import compute_causal_lm_loss, convert_causal_lm
from kdistill.onpolicy import Completions, OnPolicyDistiller, SamplingConfig, sample_completions

PROMPTS = torch.tensor([[3, 4, 5, 6], [7, 8, 0, 0], [0, 9, 10, 11]])
PROMPT_MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 1, 1, 1]])
COMPLETIONS = torch.tensor([[12, 13, 14, 2], [15, 2, 0, 0], [16, 17, 18, 19]])
COMPLETION_MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]])
SAMPLING = SamplingConfig(max_new_tokens=5, eos_token_id=2, pad_token_id=0)


@pytest.fixture
def pair(tiny_lm):
    torch.manual_seed(0)
    return tiny_lm(hidden=8), tiny_lm(hidden=12)


@pytest.mark.parametrize("lmbda", [0.0, 0.3, 1.0])
def test_on_policy_share_is_lmbda(pair, lmbda):
    n = 4000
    distiller = OnPolicyDistiller(*pair, lmbda=lmbda, generator=torch.Generator().manual_seed(0))
    sources = [distiller.choose_source() for _ in range(n)]
    share = sources.count("student") / n
    assert set(sources) <= {"student", "dataset"}
    if lmbda in (0.0, 1.0):
        assert share == lmbda
    else:
        assert abs(share - lmbda) <= 5 * math.sqrt(lmbda * (1 - lmbda) / n)


def test_seq_kd_uses_teacher_samples(pair):
    student, teacher = pair
    distiller = OnPolicyDistiller(
        student,
        teacher,
        lmbda=0.0,
        seq_kd=True,
        sampling=SAMPLING,
        generator=torch.Generator().manual_seed(5),
    )
    step = distiller.step(PROMPTS, PROMPT_MASK)
    assert step.source == "teacher"
    replay = torch.Generator().manual_seed(5)
    torch.rand((), generator=replay)  # the λ draw
    expected = sample_completions(teacher, PROMPTS, PROMPT_MASK, SAMPLING, generator=replay)
    assert torch.equal(step.completions.input_ids, expected.input_ids)
    assert torch.equal(step.completions.completion_mask, expected.completion_mask)


def test_on_policy_step_scores_the_students_own_samples(pair):
    student, teacher = pair
    distiller = OnPolicyDistiller(
        student, teacher, sampling=SAMPLING, generator=torch.Generator().manual_seed(2)
    )
    step = distiller.step(PROMPTS, PROMPT_MASK)
    assert step.source == "student"
    replay = torch.Generator().manual_seed(2)
    torch.rand((), generator=replay)
    expected = sample_completions(student, PROMPTS, PROMPT_MASK, SAMPLING, generator=replay)
    assert torch.equal(step.completions.input_ids, expected.input_ids)
    assert step.loss == distiller.loss(expected)
    again = OnPolicyDistiller(
        student, teacher, sampling=SAMPLING, generator=torch.Generator().manual_seed(2)
    ).step(PROMPTS, PROMPT_MASK)
    assert again.loss == step.loss  # reproducible with a seeded generator


@pytest.mark.parametrize(
    ("divergence", "kwargs"),
    [("forward_kl", {}), ("reverse_kl", {}), ("generalized_jsd", {"beta": 0.5})],
)
def test_lmbda_zero_equals_off_policy_kd(pair, divergence, kwargs):
    student, teacher = pair
    make_loss = lambda: LMHeadDistillationLoss(divergence=divergence, temperature=2.0, **kwargs)  # noqa: E731
    distiller = OnPolicyDistiller(
        student,
        teacher,
        make_loss(),
        lmbda=0.0,
        sampling=SAMPLING,
        generator=torch.Generator().manual_seed(0),
    )
    step = distiller.step(PROMPTS, PROMPT_MASK, COMPLETIONS, COMPLETION_MASK)
    assert step.source == "dataset"
    grads = torch.autograd.grad(step.loss, list(student.parameters()))

    # today's off-policy path: the lm_head recipe with the completion tokens as labels
    batch = Completions.from_parts(PROMPTS, PROMPT_MASK, COMPLETIONS, COMPLETION_MASK)
    assert torch.equal(batch.input_ids, step.completions.input_ids)
    reference = convert_causal_lm(copy.deepcopy(student), copy.deepcopy(teacher), make_loss())
    reference(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    expected = compute_causal_lm_loss(reference, labels=batch.labels())
    with reference.hide_teacher_model():
        expected_grads = torch.autograd.grad(expected, list(reference.parameters()))
    torch.testing.assert_close(step.loss, expected)
    for grad, ref in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, ref)


def test_default_loss_is_reverse_kl_bound_to_the_lm_heads(pair):
    student, teacher = pair
    distiller = OnPolicyDistiller(student, teacher)
    assert distiller.loss_fn.divergence in ("reverse_kl",)
    assert distiller.chunked and distiller.full_logits_reason == ""
    assert distiller.loss_fn.student_lm_head is student.lm_head
    assert distiller.loss_fn.teacher_lm_head is teacher.lm_head


def test_models_without_lm_head_use_their_logits(positionwise_lm):
    class Renamed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = positionwise_lm()

        def forward(self, input_ids, attention_mask=None):
            return self.body(input_ids)

    student, teacher = Renamed(), Renamed()
    distiller = OnPolicyDistiller(student, teacher, lmbda=0.0)
    assert not distiller.chunked and "no submodule 'lm_head'" in distiller.full_logits_reason
    step = distiller.step(PROMPTS, PROMPT_MASK, COMPLETIONS, COMPLETION_MASK)
    renamed = OnPolicyDistiller(student, teacher, lm_head_name="body.lm_head", lmbda=0.0)
    assert renamed.chunked
    torch.testing.assert_close(
        renamed.step(PROMPTS, PROMPT_MASK, COMPLETIONS, COMPLETION_MASK).loss, step.loss
    )


def test_errors(pair):
    student, teacher = pair
    distiller = OnPolicyDistiller(student, teacher, lmbda=0.0)
    with pytest.raises(ValueError, match="completion_ids"):
        distiller.step(PROMPTS, PROMPT_MASK)
    with pytest.raises(ValueError, match="source"):
        distiller.completions(PROMPTS, source="vllm")
    with pytest.raises(ValueError, match="lmbda"):
        OnPolicyDistiller(student, teacher, lmbda=1.5)
    with pytest.raises(TypeError, match="seq_kd"):
        OnPolicyDistiller(student, teacher, seq_kd=1)
    with pytest.raises(TypeError, match="LMHeadDistillationLoss"):
        OnPolicyDistiller(student, teacher, torch.nn.KLDivLoss())
    with pytest.raises(TypeError, match="SamplingConfig"):
        OnPolicyDistiller(student, teacher, sampling={"max_new_tokens": 3})
    with pytest.raises(TypeError, match="teacher"):
        OnPolicyDistiller(student, "gpt2")
