"""LMHeadCrossTokenizerLoss: chunked equals plain (values and gradients), memory stays chunked."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from kdistill.losses import lm_head_cross_tokenizer
from kdistill.losses.cross_tokenizer import HybridULDLoss, ULDLoss
from kdistill.losses.lm_head_cross_tokenizer import LMHeadCrossTokenizerLoss
from kdistill.xtoken.alignment import align_offsets

D_S, D_T, V_S, V_T = 6, 10, 37, 53
TEACHER_IDS = list(range(0, 40, 2))
STUDENT_IDS = list(range(20))


def random_alignment(generator, batch=3, t_len=9, s_len=7):
    """Random tokenizations of random-length texts: offsets -> alignment (some padding)."""
    t_offsets = torch.zeros(batch, t_len, 2, dtype=torch.long)
    s_offsets = torch.zeros(batch, s_len, 2, dtype=torch.long)
    t_mask = torch.zeros(batch, t_len, dtype=torch.bool)
    s_mask = torch.zeros(batch, s_len, dtype=torch.bool)
    for b in range(batch):
        for offsets, mask, n in ((t_offsets, t_mask, t_len - b), (s_offsets, s_mask, s_len - b)):
            lengths = torch.randint(1, 4, (n,), generator=generator)
            ends = lengths.cumsum(0)
            offsets[b, :n, 0], offsets[b, :n, 1] = ends - lengths, ends
            mask[b, :n] = True
        # make both texts equally long: the last real tokens end at the same character
        t_end, s_end = t_offsets[b, t_len - b - 1, 1], s_offsets[b, s_len - b - 1, 1]
        longest = max(t_end, s_end)
        t_offsets[b, t_len - b - 1, 1] = longest
        s_offsets[b, s_len - b - 1, 1] = longest
    return align_offsets(t_offsets, s_offsets, t_mask, s_mask)


def setup(dtype=torch.float32, bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student_head = nn.Linear(D_S, V_S, bias=bias).to(dtype)
    teacher_head = nn.Linear(D_T, V_T).to(dtype)
    with torch.no_grad():
        for p in [*student_head.parameters(), *teacher_head.parameters()]:
            p.copy_(torch.randn(p.shape, generator=generator, dtype=dtype))
    hidden_s = torch.randn(3, 7, D_S, generator=generator, dtype=dtype)
    hidden_t = torch.randn(3, 9, D_T, generator=generator, dtype=dtype)
    return student_head, teacher_head, hidden_s, hidden_t, random_alignment(generator)


def plain_loss(divergence):
    if divergence == "uld":
        return ULDLoss(temperature=1.5)
    return HybridULDLoss(TEACHER_IDS, STUDENT_IDS, temperature=1.5, kl_weight=0.8, uld_weight=1.2)


def chunked_loss(divergence, student_head, teacher_head, chunk_size):
    extra = {}
    if divergence == "hybrid_uld":
        extra = {
            "teacher_ids": TEACHER_IDS,
            "student_ids": STUDENT_IDS,
            "kl_weight": 0.8,
            "uld_weight": 1.2,
        }
    return LMHeadCrossTokenizerLoss(
        student_head, teacher_head, divergence, temperature=1.5, chunk_size=chunk_size, **extra
    )


@pytest.mark.parametrize("divergence", ["uld", "hybrid_uld"])
@pytest.mark.parametrize("chunk_size", [1, 4, 1000], ids=["chunk1", "chunk4", "one-chunk"])
def test_chunked_equals_plain_with_gradients(divergence, chunk_size, monkeypatch):
    monkeypatch.setattr(lm_head_cross_tokenizer, "_LOGITS_PER_SUB_CHUNK", 2 * V_T)  # sub-chunks
    monkeypatch.setattr(lm_head_cross_tokenizer, "_MIN_SUB_CHUNK", 2)
    student_head, teacher_head, hidden_s, hidden_t, alignment = setup()
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 1] = False

    def gradients(compute):
        student_head.zero_grad()
        hs = hidden_s.clone().requires_grad_(True)
        value = compute(hs)
        value.backward()
        return value, hs.grad, student_head.weight.grad.clone(), student_head.bias.grad.clone()

    expected = gradients(
        lambda hs: plain_loss(divergence)(
            student_head(hs), teacher_head(hidden_t), alignment=alignment, mask=mask
        )
    )
    chunked = chunked_loss(divergence, student_head, teacher_head, chunk_size)
    got = gradients(lambda hs: chunked(hs, hidden_t, alignment=alignment, mask=mask))
    for g, e, what in zip(got, expected, ("value", "hidden", "weight", "bias"), strict=True):
        torch.testing.assert_close(g, e, msg=what)
    assert teacher_head.weight.grad is None


@pytest.mark.parametrize("divergence", ["uld", "hybrid_uld"])
def test_gradcheck_float64_through_the_heads(divergence):
    student_head, teacher_head, hidden_s, hidden_t, alignment = setup(torch.float64)

    class Head(nn.Module):
        def __init__(self, weight, bias):
            super().__init__()
            self.weight, self.bias = weight, bias

    def fn(hidden, weight, bias):
        loss = chunked_loss(divergence, Head(weight, bias), teacher_head, chunk_size=3)
        return loss(hidden, hidden_t, alignment=alignment)

    inputs = tuple(
        t.detach().clone().requires_grad_(True)
        for t in (hidden_s, student_head.weight, student_head.bias)
    )
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


def test_labels_are_shifted_like_a_causal_lm():
    student_head, teacher_head, hidden_s, hidden_t, alignment = setup()
    labels = torch.randint(0, V_S, (3, 7))
    labels[0, 3] = -100  # drops student position 2
    labels[1, :2] = -100  # drops student positions 0 (and the label at 0 decides nothing)
    keep = torch.ones(3, 7, dtype=torch.bool)
    keep[0, 2] = False
    keep[1, 0] = False
    keep[:, -1] = False  # the last position predicts nothing
    chunked = chunked_loss("uld", student_head, teacher_head, chunk_size=5)
    got = chunked(hidden_s, hidden_t, alignment=alignment, labels=labels)
    expected = plain_loss("uld")(
        student_head(hidden_s), teacher_head(hidden_t), alignment=alignment, mask=keep
    )
    torch.testing.assert_close(got, expected)
    unshifted = LMHeadCrossTokenizerLoss(
        student_head, teacher_head, temperature=1.5, shift_labels=False
    )
    expected = plain_loss("uld")(
        student_head(hidden_s),
        teacher_head(hidden_t),
        alignment=alignment,
        mask=labels != -100,
    )
    torch.testing.assert_close(
        unshifted(hidden_s, hidden_t, alignment=alignment, labels=labels), expected
    )


def test_num_items_in_batch_divides_the_sum():
    student_head, teacher_head, hidden_s, hidden_t, alignment = setup()
    chunked = chunked_loss("hybrid_uld", student_head, teacher_head, chunk_size=4)
    total = plain_loss("hybrid_uld").__class__(
        TEACHER_IDS, STUDENT_IDS, temperature=1.5, kl_weight=0.8, uld_weight=1.2, reduction="sum"
    )(student_head(hidden_s), teacher_head(hidden_t), alignment=alignment)
    for count in (7, torch.tensor(7)):
        got = chunked(hidden_s, hidden_t, alignment=alignment, num_items_in_batch=count)
        torch.testing.assert_close(got, total / 7)


def test_without_heads_the_inputs_are_logits():
    student_head, teacher_head, hidden_s, hidden_t, alignment = setup()
    logits_s, logits_t = student_head(hidden_s).detach(), teacher_head(hidden_t).detach()
    chunked = LMHeadCrossTokenizerLoss(temperature=1.5, chunk_size=2)
    torch.testing.assert_close(
        chunked(logits_s, logits_t, alignment=alignment),
        plain_loss("uld")(logits_s, logits_t, alignment=alignment),
    )
    # and without an alignment: positions pair one to one
    torch.testing.assert_close(
        chunked(logits_s, logits_t[:, :7, :V_S]), plain_loss("uld")(logits_s, logits_t[:, :7, :V_S])
    )


def test_loss_holds_no_parameters_or_state():
    student_head, teacher_head, *_ = setup()
    loss = chunked_loss("hybrid_uld", student_head, teacher_head, chunk_size=4)
    assert list(loss.parameters()) == []
    assert loss.state_dict() == {}
    assert loss.student_lm_head is student_head and loss.teacher_lm_head is teacher_head
    config = loss.get_config()
    assert config["teacher_ids"] == TEACHER_IDS and config["divergence"] == "hybrid_uld"
    rebuilt = LMHeadCrossTokenizerLoss(**config)
    assert rebuilt.get_config() == config


def test_backward_twice_with_retain_graph_accumulates():
    student_head, teacher_head, hidden_s, hidden_t, alignment = setup()
    loss = chunked_loss("uld", student_head, teacher_head, chunk_size=4)
    value = loss(hidden_s, hidden_t, alignment=alignment)
    value.backward(retain_graph=True)
    once = student_head.weight.grad.clone()
    value.backward()
    torch.testing.assert_close(student_head.weight.grad, 2 * once)


class _LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("divergence", ["uld", "hybrid_uld"])
def test_no_full_logits_are_materialized(divergence):
    generator = torch.Generator().manual_seed(0)
    student_head, teacher_head = nn.Linear(D_S, V_S), nn.Linear(D_T, V_T)
    n = 64  # one long sequence aligned one to one
    hidden_s = torch.randn(1, n, D_S, generator=generator, requires_grad=True)
    hidden_t = torch.randn(1, n, D_T, generator=generator)
    loss = chunked_loss(divergence, student_head, teacher_head, chunk_size=4)
    with _LargestOutput() as tracker:
        loss(hidden_s, hidden_t).backward()
    # chunks of 4 pairs: [4, V] logits; the [V_s, D_s] weight gradient; never [64, V]
    assert tracker.largest <= max(4 * V_T, V_S * D_S, n * D_T), tracker.largest
    assert tracker.largest < n * V_S


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda h: LMHeadCrossTokenizerLoss(h), ValueError, "both"),
        (lambda h: LMHeadCrossTokenizerLoss(divergence="kl"), ValueError, "divergence"),
        (lambda h: LMHeadCrossTokenizerLoss(uld_weight=2.0), ValueError, "only used by"),
        (lambda h: LMHeadCrossTokenizerLoss(h, object()), TypeError, "teacher_lm_head"),
        (lambda h: LMHeadCrossTokenizerLoss(chunk_size=0), ValueError, "chunk_size"),
        (lambda h: LMHeadCrossTokenizerLoss(shift_labels=1), TypeError, "shift_labels"),
        (
            lambda h: LMHeadCrossTokenizerLoss(h, nn.Linear(D_T, V_T))(
                torch.randn(1, 3, D_S + 1), torch.randn(1, 3, D_T)
            ),
            ValueError,
            "final hidden states",
        ),
        (
            lambda h: LMHeadCrossTokenizerLoss()(
                torch.randn(3, 5), torch.randn(3, 5), labels=torch.zeros(3, dtype=torch.long)
            ),
            ValueError,
            "shift_labels=False",
        ),
        (
            lambda h: LMHeadCrossTokenizerLoss()(
                torch.randn(1, 3, 5), torch.randn(1, 3, 5), num_items_in_batch=0
            ),
            ValueError,
            "num_items_in_batch",
        ),
    ],
    ids=[
        "one-head",
        "divergence",
        "hybrid-arg",
        "bad-head",
        "chunk",
        "bool",
        "hidden-size",
        "shift-2d",
        "num-items",
    ],
)
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(nn.Linear(D_S, V_S))


def test_num_items_in_batch_is_checked_like_the_chunked_kd_loss():
    # one validation for both chunked losses: a real number or one-element tensor, > 0
    student_head, teacher_head, hidden_s, hidden_t, alignment = setup()
    chunked = chunked_loss("uld", student_head, teacher_head, chunk_size=4)
    by_int = chunked(hidden_s, hidden_t, alignment=alignment, num_items_in_batch=6)
    by_float = chunked(hidden_s, hidden_t, alignment=alignment, num_items_in_batch=6.0)
    torch.testing.assert_close(by_float, by_int)
    with pytest.raises(ValueError, match="`num_items_in_batch` must be a finite number > 0"):
        chunked(hidden_s, hidden_t, alignment=alignment, num_items_in_batch=torch.tensor(0))
    with pytest.raises(TypeError, match="`num_items_in_batch` must be a number"):
        chunked(hidden_s, hidden_t, alignment=alignment, num_items_in_batch=True)
