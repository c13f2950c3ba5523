"""LMHeadDistillationLoss against the plain (unchunked) computation in float64."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdistill as mtd
from kdistill._serialization import build_object, describe_object
from kdistill.losses import LogitDivergenceLoss
from kdistill.losses._registry import LOSSES
from kdistill.losses.lm_head import DIVERGENCE_ALIASES

B, T, D_S, D_T, V = 2, 7, 6, 10, 23
DIVERGENCES = ["forward_kl", "reverse_kl", "generalized_jsd", "total_variation", "topk_forward_kl"]
EXTRA = {"generalized_jsd": {"beta": 0.3}, "topk_forward_kl": {"k": 4}}


# ---------------------------------------------------------------- float64 references (by hand)
def divergence_reference(name: str, s_log: torch.Tensor, t_log: torch.Tensor) -> torch.Tensor:
    """Per-position divergence from log-probabilities [..., V], written from the definitions."""
    p_s, p_t = s_log.exp(), t_log.exp()
    if name == "forward_kl":
        return (p_t * (t_log - s_log)).sum(-1)
    if name == "reverse_kl":
        return (p_s * (s_log - t_log)).sum(-1)
    if name == "generalized_jsd":
        beta = EXTRA[name]["beta"]
        m_log = (beta * p_t + (1 - beta) * p_s).log()
        return beta * (p_t * (t_log - m_log)).sum(-1) + (1 - beta) * (p_s * (s_log - m_log)).sum(-1)
    if name == "total_variation":
        return 0.5 * (p_t - p_s).abs().sum(-1)
    # top-k forward KL: the teacher's k classes plus one bucket for the rest, on both sides
    idx = t_log.topk(EXTRA[name]["k"], dim=-1).indices
    top_t, top_s = p_t.gather(-1, idx), p_s.gather(-1, idx)
    buckets_t = torch.cat([top_t, 1 - top_t.sum(-1, keepdim=True)], -1)
    buckets_s = torch.cat([top_s, 1 - top_s.sum(-1, keepdim=True)], -1)
    return (buckets_t * (buckets_t.log() - buckets_s.log())).sum(-1)


def plain_loss(
    divergence: str,
    hidden_s: torch.Tensor,
    head_s: nn.Linear,
    hidden_t: torch.Tensor,
    head_t: nn.Linear,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    denominator: float | None = None,
    vocab: int | None = None,
) -> torch.Tensor:
    """Full [B, T, V] logits in float64, shift, mask, T² · mean over kept tokens."""
    bias_s = None if head_s.bias is None else head_s.bias.double()
    logits_s = F.linear(hidden_s.double(), head_s.weight.double(), bias_s)[..., :vocab]
    with torch.no_grad():
        logits_t = F.linear(hidden_t.double(), head_t.weight.double(), head_t.bias.double())
        logits_t = logits_t[..., :vocab]
    keep = torch.ones(logits_s.shape[:-1], dtype=torch.bool)
    if mask is not None:
        keep &= mask
    if labels is not None:
        logits_s, logits_t, keep = logits_s[:, :-1], logits_t[:, :-1], keep[:, :-1]
        keep &= labels[:, 1:] != -100
    s_log = torch.log_softmax(logits_s / temperature, -1)
    t_log = torch.log_softmax(logits_t / temperature, -1)
    per_token = temperature**2 * divergence_reference(divergence, s_log, t_log)
    total = torch.where(keep, per_token, 0.0).sum()
    return total / (keep.sum().clamp(min=1) if denominator is None else denominator)


def make_case(bias: bool = True, dtype: torch.dtype = torch.float32):
    head_s = nn.Linear(D_S, V, bias=bias).to(dtype)
    head_t = nn.Linear(D_T, V).to(dtype)
    hidden_s = (2 * torch.randn(B, T, D_S)).to(dtype).requires_grad_(True)
    hidden_t = (2 * torch.randn(B, T, D_T)).to(dtype)
    labels = torch.randint(0, V, (B, T))
    labels[0, 2:4] = -100
    labels[1, -1] = -100
    return head_s, head_t, hidden_s, hidden_t, labels


def grads(loss: torch.Tensor, hidden: torch.Tensor, head: nn.Linear) -> list[torch.Tensor]:
    params = [hidden, head.weight] + ([head.bias] if head.bias is not None else [])
    return list(torch.autograd.grad(loss, params))


# ---------------------------------------------------------------- equality with plain
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("chunk_size", [1, 5, 64], ids=["chunk1", "chunk5_odd", "one_chunk"])
def test_matches_plain_loss_and_grads(divergence, chunk_size):
    head_s, head_t, hidden_s, hidden_t, labels = make_case()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 1] = False
    loss_fn = mtd.LMHeadDistillationLoss(
        head_s,
        head_t,
        divergence,
        temperature=2.0,
        chunk_size=chunk_size,
        **EXTRA.get(divergence, {}),
    )
    got = loss_fn(hidden_s, hidden_t, labels=labels, mask=mask)
    expected = plain_loss(divergence, hidden_s, head_s, hidden_t, head_t, 2.0, labels, mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected.float())
    for g, e in zip(grads(got, hidden_s, head_s), grads(expected, hidden_s, head_s), strict=True):
        torch.testing.assert_close(g, e.float())


def test_forward_kl_equals_logits_distillation_loss():
    head_s, head_t, hidden_s, hidden_t, labels = make_case()
    got = mtd.LMHeadDistillationLoss(head_s, head_t, temperature=3.0, chunk_size=4)(
        hidden_s, hidden_t, labels=labels
    )
    logits_s, logits_t = head_s(hidden_s)[:, :-1], head_t(hidden_t)[:, :-1]
    expected = mtd.LogitsDistillationLoss(3.0, ignore_index=-100)(
        logits_s, logits_t, labels=labels[:, 1:]
    )
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(("beta", "same_as"), [(0.0, "forward_kl"), (1.0, "reverse_kl")])
def test_jsd_endpoints_are_the_kls(beta, same_as):
    head_s, head_t, hidden_s, hidden_t, _ = make_case()
    jsd = mtd.LMHeadDistillationLoss(head_s, head_t, "generalized_jsd", beta=beta)
    kl = mtd.LMHeadDistillationLoss(head_s, head_t, same_as)
    torch.testing.assert_close(jsd(hidden_s, hidden_t), kl(hidden_s, hidden_t))


def test_without_labels_every_position_counts_and_mask_applies():
    head_s, head_t, hidden_s, hidden_t, _ = make_case(bias=False)
    mask = torch.rand(B, T) > 0.3
    got = mtd.LMHeadDistillationLoss(head_s, head_t, chunk_size=3)(hidden_s, hidden_t, mask=mask)
    expected = plain_loss("forward_kl", hidden_s, head_s, hidden_t, head_t, mask=mask)
    torch.testing.assert_close(got, expected.float())
    for g, e in zip(grads(got, hidden_s, head_s), grads(expected, hidden_s, head_s), strict=True):
        torch.testing.assert_close(g, e.float())


def test_shift_labels_false_uses_labels_as_given():
    head_s, head_t, hidden_s, hidden_t, labels = make_case()
    shifted = mtd.LMHeadDistillationLoss(head_s, head_t)(hidden_s, hidden_t, labels=labels)
    # pre-shifted inputs and labels give the same value without shifting
    unshifted = mtd.LMHeadDistillationLoss(head_s, head_t, shift_labels=False)(
        hidden_s[:, :-1], hidden_t[:, :-1], labels=labels[:, 1:]
    )
    torch.testing.assert_close(unshifted, shifted)


def test_masked_positions_do_not_matter():
    head_s, head_t, hidden_s, hidden_t, labels = make_case()
    loss_fn = mtd.LMHeadDistillationLoss(head_s, head_t, chunk_size=3)
    garbage_s, garbage_t = hidden_s.detach().clone(), hidden_t.clone()
    garbage_s[0, 1:3], garbage_t[0, 1:3] = 1e4, -1e4  # positions 1, 2 predict labels 2, 3 (-100)
    torch.testing.assert_close(
        loss_fn(garbage_s, garbage_t, labels=labels), loss_fn(hidden_s, hidden_t, labels=labels)
    )


def test_all_masked_is_zero_with_zero_grads():
    head_s, head_t, hidden_s, hidden_t, _ = make_case()
    labels = torch.full((B, T), -100)
    loss = mtd.LMHeadDistillationLoss(head_s, head_t)(hidden_s, hidden_t, labels=labels)
    assert loss.item() == 0.0
    loss.backward()
    assert hidden_s.grad.abs().sum() == 0 and head_s.weight.grad.abs().sum() == 0


def test_num_items_in_batch_matches_one_big_batch_under_accumulation():
    head_s, head_t, hidden_s, hidden_t, labels = make_case()
    loss_fn = mtd.LMHeadDistillationLoss(head_s, head_t, chunk_size=4)
    full = loss_fn(hidden_s, hidden_t, labels=labels)
    full_grads = grads(full, hidden_s, head_s)
    total = int((labels[:, 1:] != -100).sum())
    micro = [
        loss_fn(
            hidden_s[i : i + 1],
            hidden_t[i : i + 1],
            labels=labels[i : i + 1],
            num_items_in_batch=torch.tensor(total) if i else total,
        )
        for i in range(B)
    ]
    accumulated = grads(sum(micro), hidden_s, head_s)
    torch.testing.assert_close(sum(micro), full)
    for g, e in zip(accumulated, full_grads, strict=True):
        torch.testing.assert_close(g, e)
    # and it is the plain sum divided by the given count
    expected = plain_loss(
        "forward_kl", hidden_s, head_s, hidden_t, head_t, labels=labels, denominator=10.0
    )
    torch.testing.assert_close(
        loss_fn(hidden_s, hidden_t, labels=labels, num_items_in_batch=10), expected.float()
    )


def test_upstream_gradient_scales():
    head_s, head_t, hidden_s, hidden_t, labels = make_case()
    loss_fn = mtd.LMHeadDistillationLoss(head_s, head_t, chunk_size=3)
    once = grads(loss_fn(hidden_s, hidden_t, labels=labels), hidden_s, head_s)
    thrice = grads(3.0 * loss_fn(hidden_s, hidden_t, labels=labels), hidden_s, head_s)
    for g3, g1 in zip(thrice, once, strict=True):
        torch.testing.assert_close(g3, 3.0 * g1)


def test_second_backward_raises_when_the_weight_gradient_was_handed_over():
    head_s, head_t, hidden_s, hidden_t, _ = make_case()
    loss = mtd.LMHeadDistillationLoss(head_s, head_t)(hidden_s, hidden_t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot back-propagate twice"):
        loss.backward()
    # with a frozen student head only the hidden-state gradient is kept: backward may repeat
    head_s.requires_grad_(False)
    loss = mtd.LMHeadDistillationLoss(head_s, head_t)(hidden_s, hidden_t)
    (g1,) = torch.autograd.grad(loss, hidden_s, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, hidden_s)
    torch.testing.assert_close(g1, g2)


def test_gradcheck_float64_hidden_states():
    # weight and bias gradients are checked against float64 autograd in the tests above; gradcheck
    # needs repeated backward passes, which a trainable head's handed-over gradient does not allow
    head_s, head_t, _, _, labels = make_case()
    head_s, head_t = head_s.double().requires_grad_(False), head_t.double()
    hidden_t = torch.randn(B, T, D_T, dtype=torch.float64)
    loss_fn = mtd.LMHeadDistillationLoss(
        head_s, head_t, "generalized_jsd", temperature=2.0, beta=0.3, chunk_size=3
    )
    hidden_s = torch.randn(B, T, D_S, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda h: loss_fn(h, hidden_t, labels=labels), (hidden_s,), fast_mode=True
    )


def test_bf16_inputs_close_to_float64_reference():
    head_s, head_t, hidden_s, hidden_t, labels = make_case(dtype=torch.bfloat16)
    got = mtd.LMHeadDistillationLoss(head_s, head_t, chunk_size=5)(
        hidden_s, hidden_t, labels=labels
    )
    assert got.dtype == torch.float32
    got_grads = grads(got, hidden_s, head_s)
    expected = plain_loss("forward_kl", hidden_s, head_s, hidden_t, head_t, labels=labels)
    expected_grads = grads(expected, hidden_s, head_s)
    # bf16 logits carry ~3 significant digits (8-bit mantissa): compare at that precision
    torch.testing.assert_close(got, expected.float(), rtol=2e-2, atol=2e-2)
    for g, e in zip(got_grads, expected_grads, strict=True):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), e.float(), rtol=5e-2, atol=5e-3)


# ---------------------------------------------------------------- student loss from the same pass
def test_student_cross_entropy_from_the_same_chunks():
    head_s, head_t, hidden_s, hidden_t, labels = make_case()
    loss_fn = mtd.LMHeadDistillationLoss(head_s, head_t, chunk_size=3, compute_student_loss=True)
    kd, ce = loss_fn(hidden_s, hidden_t, labels=labels, return_student_loss=True)
    logits = head_s(hidden_s)[:, :-1]
    expected_ce = F.cross_entropy(logits.reshape(-1, V), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(ce, expected_ce)
    expected_kd = plain_loss("forward_kl", hidden_s, head_s, hidden_t, head_t, labels=labels)
    total, expected_total = 0.7 * kd + 0.3 * ce, 0.7 * expected_kd + 0.3 * expected_ce.double()
    for g, e in zip(
        grads(total, hidden_s, head_s), grads(expected_total, hidden_s, head_s), strict=True
    ):
        torch.testing.assert_close(g, e.float())
    # as a plain criterion the same loss returns the KD scalar alone, equal to the pair's
    alone = loss_fn(hidden_s, hidden_t, labels=labels)
    assert isinstance(alone, torch.Tensor) and alone.dim() == 0
    torch.testing.assert_close(alone, kd)
    with pytest.raises(ValueError, match=r"needs `labels` for `return_student_loss=True`"):
        loss_fn(hidden_s, hidden_t, return_student_loss=True)
    with pytest.raises(TypeError, match="`return_student_loss` must be True or False"):
        loss_fn(hidden_s, hidden_t, labels=labels, return_student_loss=1)


# ---------------------------------------------------------------- teacher, heads, frozen parts
def test_teacher_gets_no_grad_and_frozen_student_head_gets_none():
    head_s, head_t, hidden_s, hidden_t, labels = make_case()
    head_s.requires_grad_(False)
    hidden_t.requires_grad_(True)
    loss = mtd.LMHeadDistillationLoss(head_s, head_t)(hidden_s, hidden_t, labels=labels)
    loss.backward()
    assert head_t.weight.grad is None and head_t.bias.grad is None and hidden_t.grad is None
    assert head_s.weight.grad is None and hidden_s.grad is not None


def test_heads_are_not_parameters_or_state():
    head_s, head_t, *_ = make_case()
    loss_fn = mtd.LMHeadDistillationLoss(head_s, head_t)
    assert list(loss_fn.parameters()) == [] and loss_fn.state_dict() == {}
    assert list(loss_fn.children()) == []
    assert loss_fn.student_lm_head is head_s and loss_fn.teacher_lm_head is head_t


def test_config_round_trip_rebuilds_a_logits_mode_loss():
    head_s, head_t, hidden_s, hidden_t, labels = make_case()
    loss_fn = mtd.LMHeadDistillationLoss(head_s, head_t, "generalized_jsd", 2.0, 3, beta=0.2)
    record = json.loads(json.dumps(describe_object(loss_fn, LOSSES)))
    assert record["name"] == "lm_head_distillation"
    rebuilt = build_object(record, LOSSES)
    assert rebuilt.get_config() == loss_fn.get_config() and rebuilt.student_lm_head is None
    # unbound, the inputs are logits: same value as the bound loss on hidden states
    logits_s, logits_t = head_s(hidden_s), head_t(hidden_t)
    torch.testing.assert_close(
        rebuilt(logits_s, logits_t, labels=labels), loss_fn(hidden_s, hidden_t, labels=labels)
    )
    rebuilt.bind_lm_heads_(head_s, head_t)
    torch.testing.assert_close(
        rebuilt(hidden_s, hidden_t, labels=labels), loss_fn(hidden_s, hidden_t, labels=labels)
    )


# ---------------------------------------------------------------- vocabulary alignment
def test_vocab_mismatch_errors_by_default_naming_both_sizes():
    with pytest.raises(ValueError, match=r"student V=23, teacher V=25.*vocab_alignment='truncate'"):
        mtd.LMHeadDistillationLoss(nn.Linear(D_S, 23), nn.Linear(D_T, 25))
    with pytest.raises(ValueError, match=r"student V=5, teacher V=4"):
        mtd.LMHeadDistillationLoss()(torch.randn(3, 5), torch.randn(3, 4))


@pytest.mark.parametrize("student_vocab", [V - 2, V + 3], ids=["teacher_larger", "student_larger"])
def test_truncate_compares_the_common_classes(student_vocab):
    head_s, head_t = nn.Linear(D_S, student_vocab), nn.Linear(D_T, V)
    hidden_s = torch.randn(B, T, D_S, requires_grad=True)
    hidden_t = torch.randn(B, T, D_T)
    common = min(student_vocab, V)
    got = mtd.LMHeadDistillationLoss(head_s, head_t, vocab_alignment="truncate", chunk_size=4)(
        hidden_s, hidden_t
    )
    expected = plain_loss("forward_kl", hidden_s, head_s, hidden_t, head_t, vocab=common)
    torch.testing.assert_close(got, expected.float())
    got_grads = grads(got, hidden_s, head_s)
    for g, e in zip(got_grads, grads(expected, hidden_s, head_s), strict=True):
        torch.testing.assert_close(g, e.float())
    assert got_grads[1][common:].abs().sum() == 0  # extra student rows get no gradient


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"divergence": "fkl"}, ValueError, "Unknown `divergence` 'fkl'.*forward_kl"),
        ({"divergence": "lm_head_distillation"}, ValueError, "Unknown `divergence`"),
        ({"divergence": 3}, ValueError, "Unknown `divergence` '3'"),
        (
            {"beta": 0.5},
            ValueError,
            r"`beta` is not an argument of divergence 'logits_distillation'.*\['dkd', 'jsd'\]",
        ),
        ({"k": 3}, ValueError, r"`k` is not an argument of divergence.*\['topk_kl'\]"),
        ({"divergence": "jsd", "alpha": 0.1}, ValueError, "`alpha` is not an argument"),
        ({"divergence": "generalized_jsd", "beta": 1.5}, ValueError, r"`beta` must be .*\[0, 1\]"),
        ({"divergence": "skew_kl", "alpha": float("nan")}, ValueError, "`alpha` must be a finite"),
        ({"divergence": "topk_forward_kl", "k": 0}, ValueError, "`k` must be an integer >= 1"),
        ({"divergence": "topk_kl", "k": True}, TypeError, "`k` must be an integer"),
        ({"temperature": 0}, ValueError, "`temperature` must be a finite number > 0"),
        ({"temperature": float("inf")}, ValueError, "`temperature` must be a finite number"),
        ({"temperature": 1e200}, ValueError, r"`temperature` must be .* at most 1e\+06"),
        ({"temperature": True}, TypeError, "`temperature` must be a number"),
        ({"chunk_size": 0}, ValueError, "`chunk_size` must be an integer >= 1"),
        ({"shift_labels": "no"}, TypeError, "`shift_labels` must be True or False"),
        ({"compute_student_loss": 1}, TypeError, "`compute_student_loss` must be True or False"),
        ({"vocab_alignment": "pad"}, ValueError, "`vocab_alignment` must be one of"),
        ({"ignore_index": "x"}, TypeError, "`ignore_index` must be an int"),
        ({"student_lm_head": nn.Linear(2, 3)}, ValueError, "Give both"),
        (
            {"student_lm_head": nn.ReLU(), "teacher_lm_head": nn.Linear(2, 3)},
            TypeError,
            "`student_lm_head` must be an nn.Module with a 2-D `weight`",
        ),
    ],
)
def test_constructor_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        mtd.LMHeadDistillationLoss(**kwargs)


def test_forward_validation():
    head_s, head_t, hidden_s, hidden_t, labels = make_case()
    loss_fn = mtd.LMHeadDistillationLoss(head_s, head_t)
    with pytest.raises(ValueError, match=r"do not fit the student lm_head weight \(23, 6\)"):
        loss_fn(torch.randn(B, T, V), hidden_t)
    with pytest.raises(ValueError, match="differ in their leading"):
        loss_fn(hidden_s, hidden_t[:, :-1])
    with pytest.raises(ValueError, match="Shifting `labels` needs inputs"):
        loss_fn(hidden_s[0], hidden_t[0], labels=labels[0])
    for bad in (0, -3, torch.tensor(0), torch.tensor(-2.0)):
        with pytest.raises(ValueError, match="`num_items_in_batch` must be a finite number > 0"):
            loss_fn(hidden_s, hidden_t, num_items_in_batch=bad)
    for bad in (float("inf"), float("nan"), torch.tensor(float("nan")), torch.tensor(math.inf)):
        with pytest.raises(ValueError, match="`num_items_in_batch` must be a finite number"):
            loss_fn(hidden_s, hidden_t, num_items_in_batch=bad)
    for bad in ("4", True, torch.tensor([3, 4]), torch.tensor(True)):
        with pytest.raises(TypeError, match="`num_items_in_batch` must be a number"):
            loss_fn(hidden_s, hidden_t, num_items_in_batch=bad)
    with pytest.raises(ValueError, match="at least one token axis"):
        mtd.LMHeadDistillationLoss()(torch.randn(5), torch.randn(5))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_sub_chunks_match_plain(monkeypatch, divergence):
    # the divergence runs on sub-chunks of the matmul chunks; force 2-row sub-chunks of 5-row chunks
    from kdistill.losses import lm_head

    monkeypatch.setattr(lm_head, "_MIN_SUB_CHUNK_TOKENS", 2)
    monkeypatch.setattr(lm_head, "_LOGITS_PER_SUB_CHUNK", 1)
    head_s, head_t, hidden_s, hidden_t, labels = make_case()
    loss_fn = mtd.LMHeadDistillationLoss(
        head_s,
        head_t,
        divergence,
        chunk_size=5,
        compute_student_loss=True,
        **EXTRA.get(divergence, {}),
    )
    kd, ce = loss_fn(hidden_s, hidden_t, labels=labels, return_student_loss=True)
    expected_kd = plain_loss(divergence, hidden_s, head_s, hidden_t, head_t, labels=labels)
    expected_ce = F.cross_entropy(
        head_s(hidden_s)[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1)
    )
    torch.testing.assert_close(kd, expected_kd.float())
    torch.testing.assert_close(ce, expected_ce)
    got = grads(kd + ce, hidden_s, head_s)
    expected = grads(expected_kd + expected_ce.double(), hidden_s, head_s)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e.float())


# ---------------------------------------------------------------- one vocabulary with the zoo
# hyperparameters the chunked loss passes on, per registered divergence (others use defaults)
ZOO_ARGS = {
    "jsd": {"beta": 0.3},
    "skew_kl": {"alpha": 0.2},
    "skew_reverse_kl": {"alpha": 0.3},
    "topk_kl": {"k": 4},
    "dkd": {"alpha": 0.5, "beta": 2.0},
    "mft": {"threshold": 0.3},
}


def test_every_logit_loss_of_the_zoo_is_a_divergence():
    names = set(mtd.LMHeadDistillationLoss.available_divergences())
    expected = {"logits_distillation", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"}
    assert expected | {"topk_kl", "dkd", "mft"} <= names
    assert not names & {"lm_head_distillation", "mgd", "hint", "cosine"}


@pytest.mark.parametrize("name", sorted(mtd.LMHeadDistillationLoss.available_divergences()))
def test_chunked_equals_the_registered_plain_loss(name):
    # the same divergence by name: chunked on hidden states == the plain loss on full logits
    head_s, head_t, hidden_s, hidden_t, labels = make_case(dtype=torch.float64)
    kwargs = ZOO_ARGS.get(name, {})
    chunked = mtd.LMHeadDistillationLoss(
        head_s, head_t, name, temperature=2.0, chunk_size=3, **kwargs
    )
    plain = mtd.get_loss(name)(temperature=2.0, ignore_index=-100, **kwargs)
    got = chunked(hidden_s, hidden_t, labels=labels)
    logits_s, logits_t = head_s(hidden_s)[:, :-1], head_t(hidden_t)[:, :-1]
    expected = plain(logits_s, logits_t, labels=labels[:, 1:])
    if not plain.temperature_squared:  # the chunked loss always multiplies by T² (documented)
        expected = expected * 4.0
    torch.testing.assert_close(got, expected)
    for g, e in zip(grads(got, hidden_s, head_s), grads(expected, hidden_s, head_s), strict=True):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize(("alias", "name"), sorted(DIVERGENCE_ALIASES.items()))
def test_old_divergence_spellings_map_to_registry_names(alias, name):
    head_s, head_t, hidden_s, hidden_t, labels = make_case()
    kwargs = {"k": 4} if name == "topk_kl" else {}
    old = mtd.LMHeadDistillationLoss(head_s, head_t, alias, **kwargs)
    new = mtd.LMHeadDistillationLoss(head_s, head_t, name, **kwargs)
    assert old.divergence == name and old.get_config() == new.get_config()
    torch.testing.assert_close(
        old(hidden_s, hidden_t, labels=labels), new(hidden_s, hidden_t, labels=labels)
    )
    # a record written with the old spelling (an older checkpoint) still rebuilds
    record = {"name": "lm_head_distillation", "args": {**new.get_config(), "divergence": alias}}
    assert build_object(record, LOSSES).divergence == name


def test_label_divergences_need_labels():
    head_s, head_t, hidden_s, hidden_t, _ = make_case()
    for name in ("dkd", "mft"):
        loss_fn = mtd.LMHeadDistillationLoss(head_s, head_t, name)
        with pytest.raises(ValueError, match=f"needs `labels` for divergence '{name}'"):
            loss_fn(hidden_s, hidden_t)


def test_a_cross_vocabulary_divergence_plugs_into_the_chunked_loss(monkeypatch):
    # a LogitDivergenceLoss with same_classes=False (the shape of ULD-style losses) compares
    # vocabularies of different sizes, chunked like every other divergence
    from kdistill.losses import _registry

    class SortedL1Loss(LogitDivergenceLoss):
        same_classes = False

        def divergence(self, student_log_probs, teacher, labels):
            k = min(student_log_probs.shape[-1], teacher.shape[-1])
            s = student_log_probs.exp().sort(-1, descending=True).values[..., :k]
            t = teacher.exp().sort(-1, descending=True).values[..., :k]
            return (s - t).abs().sum(-1)

    monkeypatch.setattr(_registry.LOSSES, "_by_name", dict(_registry.LOSSES._by_name))
    mtd.register_loss("sorted_l1_test", SortedL1Loss)
    head_s, head_t = nn.Linear(D_S, 11).double(), nn.Linear(D_T, 17).double()
    hidden_s = torch.randn(B, T, D_S, dtype=torch.float64, requires_grad=True)
    hidden_t = torch.randn(B, T, D_T, dtype=torch.float64)
    chunked = mtd.LMHeadDistillationLoss(head_s, head_t, "sorted_l1_test", chunk_size=4)
    got = chunked(hidden_s, hidden_t)
    expected = SortedL1Loss()(head_s(hidden_s), head_t(hidden_t))
    torch.testing.assert_close(got, expected)
    for g, e in zip(grads(got, hidden_s, head_s), grads(expected, hidden_s, head_s), strict=True):
        torch.testing.assert_close(g, e)
