"""Scoring: loss and gradients equal an independent float64 GKD objective over completion tokens."""

import pytest
import torch
import torch.nn.functional as F

from kdistill import LMHeadDistillationLoss
from kdistill.onpolicy import Completions, SamplingConfig, completion_kd_loss, sample_completions


def kl(p_log, q_log):
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def reference_divergence(name, s_log, t_log, beta=None, k=None):
    """The per-token divergences written out independently of kdistill (float64)."""
    if name == "forward_kl":
        return kl(t_log, s_log)
    if name == "reverse_kl":
        return kl(s_log, t_log)
    if name == "generalized_jsd":
        m_log = (beta * t_log.exp() + (1 - beta) * s_log.exp()).log()
        return beta * kl(t_log, m_log) + (1 - beta) * kl(s_log, m_log)
    if name == "total_variation":
        return 0.5 * (t_log.exp() - s_log.exp()).abs().sum(-1)
    if name == "topk_forward_kl":
        idx = t_log.topk(k, dim=-1).indices
        p_top, q_top = t_log.exp().gather(-1, idx), s_log.exp().gather(-1, idx)
        p = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
        q = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
        return (p * (p.log() - q.log())).sum(-1)
    raise AssertionError(name)


def reference_loss(student, teacher, batch, name, temperature, **kwargs):
    """GKD objective: mean over completion tokens of T² · D(p_T, p_S), from full logits."""
    inputs = {"attention_mask": batch.attention_mask, "position_ids": batch.position_ids}
    with torch.no_grad():
        t_logits = teacher(batch.input_ids, **inputs)
    s_logits = student(batch.input_ids, **inputs)
    # position t predicts token t + 1: keep the positions whose next token is a completion token
    keep = torch.zeros_like(batch.completion_mask)
    keep[:, :-1] = batch.completion_mask[:, 1:]
    s_log = F.log_softmax(s_logits[keep].double() / temperature, -1)
    t_log = F.log_softmax(t_logits[keep].double() / temperature, -1)
    return temperature**2 * reference_divergence(name, s_log, t_log, **kwargs).mean()


DIVERGENCES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("generalized_jsd", {"beta": 0.1}),
    ("generalized_jsd", {"beta": 0.5}),
    ("generalized_jsd", {"beta": 0.9}),
    ("total_variation", {}),
    ("topk_forward_kl", {"k": 5}),
]


@pytest.fixture
def models(tiny_lm):
    torch.manual_seed(0)
    student, teacher = (
        tiny_lm(hidden=8, dtype=torch.float64),
        tiny_lm(hidden=12, dtype=torch.float64),
    )
    teacher.requires_grad_(False)
    return student, teacher


def sampled_batch(student):
    """Fixed, ragged completions after left- and right-padded prompts (the student's own samples
    in ``test_sampled_completions``)."""
    gen = torch.Generator().manual_seed(1)
    return Completions.from_parts(
        torch.tensor([[3, 4, 5, 6], [7, 8, 0, 0], [0, 9, 10, 11]]),
        torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 1, 1, 1]]),
        torch.randint(3, 32, (3, 6), generator=gen),
        torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]]),
    )


def test_sampled_completions(models):
    # the same objective on the student's own samples (ragged: EOS ends some early)
    student, teacher = models
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 0, 0], [0, 9, 10, 11]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 1, 1, 1]])
    config = SamplingConfig(max_new_tokens=7, eos_token_id=list(range(10)), pad_token_id=0)
    batch = sample_completions(
        student, ids, mask, config, generator=torch.Generator().manual_seed(1)
    )
    assert batch.lengths.unique().numel() > 1, "want ragged completions"
    loss_fn = LMHeadDistillationLoss(student.lm_head, teacher.lm_head, divergence="reverse_kl")
    loss = completion_kd_loss(student, teacher, batch, loss_fn)
    torch.testing.assert_close(loss, reference_loss(student, teacher, batch, "reverse_kl", 1.0))


@pytest.mark.parametrize("temperature", [1.0, 2.0], ids=["T1", "T2"])
@pytest.mark.parametrize(("name", "kwargs"), DIVERGENCES, ids=lambda v: str(v))
@pytest.mark.parametrize("path", ["chunked", "logits"])
def test_loss_and_gradients_equal_the_float64_gkd_objective(
    models, name, kwargs, temperature, path
):
    student, teacher = models
    batch = sampled_batch(student)
    if path == "chunked":  # through the lm_heads, three tokens per chunk
        loss_fn = LMHeadDistillationLoss(
            student.lm_head,
            teacher.lm_head,
            divergence=name,
            temperature=temperature,
            chunk_size=3,
            **kwargs,
        )
    else:  # unbound: the models' own logits
        loss_fn = LMHeadDistillationLoss(divergence=name, temperature=temperature, **kwargs)
    loss = completion_kd_loss(student, teacher, batch, loss_fn)
    grads = torch.autograd.grad(loss, list(student.parameters()))
    expected = reference_loss(student, teacher, batch, name, temperature, **kwargs)
    expected_grads = torch.autograd.grad(expected, list(student.parameters()))
    torch.testing.assert_close(loss, expected)
    for (param_name, _), grad, ref in zip(
        student.named_parameters(), grads, expected_grads, strict=True
    ):
        torch.testing.assert_close(grad, ref, msg=lambda m, n=param_name: f"{n}: {m}")


def test_tied_lm_head_gets_both_gradients(tiny_lm):
    # the lm_head weight is the embedding: its gradient sums the head part and the input part
    student, teacher = (
        tiny_lm(hidden=8, tied=True, dtype=torch.float64),
        tiny_lm(dtype=torch.float64),
    )
    assert student.lm_head.weight is student.embed.weight
    batch = sampled_batch(student)
    loss_fn = LMHeadDistillationLoss(student.lm_head, teacher.lm_head, divergence="reverse_kl")
    loss = completion_kd_loss(student, teacher, batch, loss_fn)
    (grad,) = torch.autograd.grad(loss, [student.embed.weight])
    expected = reference_loss(student, teacher, batch, "reverse_kl", 1.0)
    (expected_grad,) = torch.autograd.grad(expected, [student.embed.weight])
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)


def test_prompt_and_padding_tokens_never_contribute(positionwise_lm):
    # Position-wise models: a token's logits depend on that token only. Changing any prompt token
    # but the last (which predicts the first completion token) or any padding id must not change
    # the loss or its gradient.
    torch.manual_seed(0)
    student, teacher = positionwise_lm(), positionwise_lm(hidden=12)
    loss_fn = LMHeadDistillationLoss(student.lm_head, teacher.lm_head, divergence="reverse_kl")
    batch = Completions.from_parts(
        torch.tensor([[0, 3, 4, 5], [6, 7, 8, 9]]),
        torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]),
        torch.tensor([[10, 11, 0], [12, 0, 0]]),
        torch.tensor([[1, 1, 0], [1, 0, 0]]),
    )
    changed_ids = batch.input_ids.clone()
    changed_ids[:, :3] = torch.tensor([[31, 30, 29], [28, 27, 26]])  # pads and early prompt
    changed_ids[1, 5] = 25  # padding after a completion
    changed = Completions(changed_ids, batch.attention_mask, batch.completion_mask, 4, batch.ended)
    losses, grads = [], []
    for b in (batch, changed):
        loss = completion_kd_loss(student, teacher, b, loss_fn)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, [student.lm_head.weight])[0])
    assert losses[0] == losses[1] and torch.equal(grads[0], grads[1])
    # and the last prompt token does count
    changed_ids[0, 3] = 30
    last = Completions(changed_ids, batch.attention_mask, batch.completion_mask, 4, batch.ended)
    assert completion_kd_loss(student, teacher, last, loss_fn) != losses[0]


def test_no_vocabulary_logits_and_models_unchanged(models):
    student, teacher = models
    batch = sampled_batch(student)
    calls = []
    for model in (student, teacher):
        model.lm_head.register_forward_hook(lambda m, a, o: calls.append(o.shape))
    heads = student.lm_head, teacher.lm_head
    student.train()
    teacher.train()
    loss_fn = LMHeadDistillationLoss(*heads, divergence="reverse_kl")
    completion_kd_loss(student, teacher, batch, loss_fn).backward()
    assert calls == [], "an lm_head computed [B, T, V] logits"
    assert (student.lm_head, teacher.lm_head) == heads
    assert student.training and teacher.training  # modes as they were
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    student(batch.input_ids)
    assert calls, "the lm_head must be back in place"


def test_lm_head_is_restored_when_the_forward_raises(models):
    student, teacher = models
    head = student.lm_head
    loss_fn = LMHeadDistillationLoss(student.lm_head, teacher.lm_head)
    batch = sampled_batch(student)
    student.pos = torch.nn.Embedding(2, 8).double()  # positions out of range: forward raises
    with pytest.raises(IndexError):
        completion_kd_loss(student, teacher, batch, loss_fn)
    assert student.lm_head is head


def test_teacher_runs_in_eval_mode(tiny_lm):
    student, teacher = tiny_lm(dtype=torch.float64), tiny_lm(dtype=torch.float64, dropout=0.5)
    teacher.train()
    loss_fn = LMHeadDistillationLoss(student.lm_head, teacher.lm_head)
    batch = sampled_batch(student)
    first = completion_kd_loss(student, teacher, batch, loss_fn)
    second = completion_kd_loss(student, teacher, batch, loss_fn)
    assert first == second and teacher.training and teacher.dropout.training


def test_num_items_in_batch_replaces_the_token_count(models):
    student, teacher = models
    batch = sampled_batch(student)
    loss_fn = LMHeadDistillationLoss(student.lm_head, teacher.lm_head)
    mean = completion_kd_loss(student, teacher, batch, loss_fn)
    summed = completion_kd_loss(student, teacher, batch, loss_fn, num_items_in_batch=100)
    torch.testing.assert_close(summed, mean * batch.num_tokens / 100)


def test_errors(models, positionwise_lm):
    student, teacher = models
    batch = sampled_batch(student)
    with pytest.raises(TypeError, match="LMHeadDistillationLoss"):
        completion_kd_loss(student, teacher, batch, torch.nn.KLDivLoss())
    foreign = LMHeadDistillationLoss(torch.nn.Linear(8, 32), teacher.lm_head)
    with pytest.raises(ValueError, match="not a submodule"):
        completion_kd_loss(student, teacher, batch, foreign)

    class NoMask(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = positionwise_lm()

        def forward(self, ids):
            return self.lm(ids)

    with pytest.raises(ValueError, match="takes no `attention_mask`"):
        completion_kd_loss(NoMask(), NoMask(), batch, LMHeadDistillationLoss())
