"""``kdistill.onpolicy`` on tiny Hugging Face Llama / GPT-2 models built from configs."""

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from kdistill import LMHeadDistillationLoss  # noqa: E402
from kdistill.onpolicy import (  # noqa: E402
    Completions,
    OnPolicyDistiller,
    SamplingConfig,
    completion_kd_loss,
    sample_completions,
)

pytestmark = pytest.mark.integration

VOCAB = 48
PROMPTS = torch.tensor([[3, 4, 5, 6, 7], [0, 0, 8, 9, 10], [0, 11, 12, 13, 14]])
PROMPT_MASK = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])


def llama(hidden: int = 16) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config)


def gpt2(hidden: int = 16) -> torch.nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=hidden,
        n_layer=1,
        n_head=2,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config)


FILTERS = [{}, {"top_k": 5}, {"top_p": 0.8, "temperature": 0.7}, {"top_k": 10, "top_p": 0.9}]


@pytest.mark.parametrize("kwargs", FILTERS, ids=lambda k: "-".join(f"{a}{b}" for a, b in k.items()))
@pytest.mark.parametrize("build", [llama, gpt2])
def test_loop_samples_what_hf_generate_samples(build, kwargs):
    # peer check: our filters and draws equal Hugging Face's on the same seed
    torch.manual_seed(0)
    model = build()
    config = SamplingConfig(
        max_new_tokens=8, eos_token_id=[1, 2], pad_token_id=0, backend="loop", **kwargs
    )
    ours = sample_completions(
        model, PROMPTS, PROMPT_MASK, config, generator=torch.Generator().manual_seed(7)
    )
    torch.manual_seed(7)
    reference = model.generate(
        input_ids=PROMPTS,
        attention_mask=PROMPT_MASK,
        max_new_tokens=8,
        do_sample=True,
        eos_token_id=[1, 2],
        pad_token_id=0,
        top_k=kwargs.get("top_k", 0),
        top_p=kwargs.get("top_p", 1.0),
        temperature=kwargs.get("temperature", 1.0),
    )
    width = ours.input_ids.shape[1]
    assert torch.equal(ours.completion_ids, reference[:, PROMPTS.shape[1] : width])


@pytest.mark.parametrize("build", [llama, gpt2])
def test_generate_backend_is_reproducible_and_leaves_the_global_rng(build):
    model = build()
    config = SamplingConfig(max_new_tokens=6, eos_token_id=2, top_k=0)  # "auto": generate
    state = torch.get_rng_state()
    first = sample_completions(
        model, PROMPTS, PROMPT_MASK, config, generator=torch.Generator().manual_seed(1)
    )
    again = sample_completions(
        model, PROMPTS, PROMPT_MASK, config, generator=torch.Generator().manual_seed(1)
    )
    other = sample_completions(
        model, PROMPTS, PROMPT_MASK, config, generator=torch.Generator().manual_seed(2)
    )
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first.input_ids, again.input_ids)
    assert not torch.equal(first.input_ids, other.input_ids)


def test_generation_config_defaults_do_not_leak():
    # Hugging Face's default top_k=50 (and anything in generation_config) must not filter
    model = llama()
    model.generation_config.top_k = 1
    model.generation_config.repetition_penalty = 3.0
    config = dict(max_new_tokens=6, eos_token_id=2)
    via_generate = sample_completions(
        model,
        PROMPTS,
        PROMPT_MASK,
        SamplingConfig(**config, backend="generate"),
        generator=torch.Generator().manual_seed(3),
    )
    seed = int(torch.randint(0, 2**62, (), generator=torch.Generator().manual_seed(3)))
    via_loop = sample_completions(
        model,
        PROMPTS,
        PROMPT_MASK,
        SamplingConfig(**config, backend="loop"),
        generator=torch.Generator().manual_seed(seed),
    )
    assert torch.equal(via_generate.completion_ids, via_loop.completion_ids)


@pytest.mark.parametrize("build", [llama, gpt2])
def test_train_mode_is_restored_after_generate(build):
    model = build().train()
    sample_completions(model, PROMPTS, PROMPT_MASK, SamplingConfig(max_new_tokens=2))
    assert model.training and all(m.training for m in model.modules())


def reference_reverse_kl(student, teacher, batch):
    inputs = {"attention_mask": batch.attention_mask, "position_ids": batch.position_ids}
    with torch.no_grad():
        t_logits = teacher(batch.input_ids, **inputs).logits
    s_logits = student(batch.input_ids, **inputs).logits
    keep = torch.zeros_like(batch.completion_mask)
    keep[:, :-1] = batch.completion_mask[:, 1:]
    s_log = F.log_softmax(s_logits[keep].double(), -1)
    t_log = F.log_softmax(t_logits[keep].double(), -1)
    return (s_log.exp() * (s_log - t_log)).sum(-1).mean()


@pytest.mark.parametrize("build", [llama, gpt2], ids=["llama", "gpt2-tied"])
def test_scoring_equals_full_logits_in_float64(build):
    torch.manual_seed(0)
    student, teacher = build(16).double(), build(24).double()
    if build is gpt2:
        assert student.lm_head.weight is student.transformer.wte.weight  # tied
    batch = sample_completions(
        student,
        PROMPTS,
        PROMPT_MASK,
        SamplingConfig(max_new_tokens=6, eos_token_id=[1, 2, 3]),
        generator=torch.Generator().manual_seed(0),
    )
    loss_fn = LMHeadDistillationLoss(student.lm_head, teacher.lm_head, divergence="reverse_kl")
    loss = completion_kd_loss(student, teacher, batch, loss_fn)
    params = [p for p in student.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    expected = reference_reverse_kl(student, teacher, batch)
    expected_grads = torch.autograd.grad(expected, params)
    torch.testing.assert_close(loss, expected)
    for grad, ref in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, ref)


def test_distiller_trains_an_hf_student():
    torch.manual_seed(0)
    student, teacher = llama(16), llama(32)
    distiller = OnPolicyDistiller(
        student,
        teacher,
        sampling=SamplingConfig(max_new_tokens=6, eos_token_id=2),
        generator=torch.Generator().manual_seed(0),
    )
    assert distiller.chunked
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    eval_batch = Completions.from_parts(PROMPTS, PROMPT_MASK, torch.randint(3, VOCAB, (3, 6)), None)
    with torch.no_grad():
        before = distiller.loss(eval_batch)
    for _ in range(5):
        step = distiller.step(PROMPTS, PROMPT_MASK)
        step.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        after = distiller.loss(eval_batch)
    assert after < before
