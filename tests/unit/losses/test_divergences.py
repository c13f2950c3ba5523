"""The per-position divergences of ``losses/_divergences.py`` against float64 hand formulas."""

import math

import pytest
import torch

from kdistill.losses import _divergences as div


def _log_probs(*shape, scale=2.0):
    return torch.log_softmax(torch.randn(*shape, dtype=torch.float64) * scale, dim=-1)


def _kl_loop(p, q):
    """Σ_c p_c (log p_c − log q_c) for 1-D probability vectors, as a Python sum."""
    return sum(
        float(pc) * (math.log(pc) - math.log(qc)) for pc, qc in zip(p, q, strict=True) if pc > 0
    )


@pytest.fixture
def pair():
    return _log_probs(3, 6), _log_probs(3, 6)  # student, teacher


def test_forward_and_reverse_kl_match_loops(pair):
    s, t = pair
    for i in range(3):
        p, q = t[i].exp().tolist(), s[i].exp().tolist()
        assert div.forward_kl(s, t)[i].item() == pytest.approx(_kl_loop(p, q), rel=1e-12)
        assert div.reverse_kl(s, t)[i].item() == pytest.approx(_kl_loop(q, p), rel=1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_generalized_jsd_matches_mixture_formula(pair, beta):
    s, t = pair
    for i in range(3):
        p, q = t[i].exp().tolist(), s[i].exp().tolist()
        m = [beta * a + (1 - beta) * b for a, b in zip(p, q, strict=True)]
        expected = beta * _kl_loop(p, m) + (1 - beta) * _kl_loop(q, m)
        assert div.generalized_jsd(s, t, beta)[i].item() == pytest.approx(expected, rel=1e-10)


def test_jsd_endpoints_are_forward_and_reverse_kl(pair):
    s, t = pair
    torch.testing.assert_close(div.generalized_jsd(s, t, 0.0), div.forward_kl(s, t))
    torch.testing.assert_close(div.generalized_jsd(s, t, 1.0), div.reverse_kl(s, t))


@pytest.mark.parametrize("eps", [1e-3, 1e-5])
def test_jsd_limits_tend_to_forward_and_reverse_kl(pair, eps):
    # JSD_β / β → KL(T‖S) as β → 0 and JSD_β / (1 − β) → KL(S‖T) as β → 1, error O(β)
    s, t = pair
    forward, reverse = div.forward_kl(s, t), div.reverse_kl(s, t)
    near_zero = div.generalized_jsd(s, t, eps) / eps
    near_one = div.generalized_jsd(s, t, 1 - eps) / eps
    assert ((near_zero - forward).abs() / forward).max() < 50 * eps
    assert ((near_one - reverse).abs() / reverse).max() < 50 * eps


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.7])
def test_skew_kls_match_formulas(pair, alpha):
    s, t = pair
    for i in range(3):
        p, q = t[i].exp().tolist(), s[i].exp().tolist()
        forward_mix = [alpha * a + (1 - alpha) * b for a, b in zip(p, q, strict=True)]
        reverse_mix = [(1 - alpha) * a + alpha * b for a, b in zip(p, q, strict=True)]
        assert div.skew_forward_kl(s, t, alpha)[i].item() == pytest.approx(
            _kl_loop(p, forward_mix), rel=1e-10
        )
        assert div.skew_reverse_kl(s, t, alpha)[i].item() == pytest.approx(
            _kl_loop(q, reverse_mix), rel=1e-10
        )


def test_skew_kl_limits(pair):
    s, t = pair
    torch.testing.assert_close(div.skew_forward_kl(s, t, 0.0), div.forward_kl(s, t))
    torch.testing.assert_close(div.skew_reverse_kl(s, t, 0.0), div.reverse_kl(s, t))
    torch.testing.assert_close(div.skew_forward_kl(s, t, 1.0), torch.zeros(3, dtype=s.dtype))
    # the skewed student side is bounded below by α·p, so skew KL <= log(1/α)
    assert (div.skew_forward_kl(s, t, 0.1) <= math.log(10) + 1e-12).all()


def test_total_variation_matches_formula(pair):
    s, t = pair
    expected = 0.5 * (t.exp() - s.exp()).abs().sum(-1)
    torch.testing.assert_close(div.total_variation(s, t), expected)
    assert ((div.total_variation(s, t) >= 0) & (div.total_variation(s, t) <= 1)).all()


def _topk_reference(s_row, t_row, k):
    """Loop version: teacher top-k buckets plus one tail bucket, student on the same buckets."""
    p, q = t_row.exp().tolist(), s_row.exp().tolist()
    top = sorted(range(len(p)), key=lambda c: -p[c])[:k]
    rest = [c for c in range(len(p)) if c not in top]
    p_buckets = [p[c] for c in top] + [sum(p[c] for c in rest)]
    q_buckets = [q[c] for c in top] + [sum(q[c] for c in rest)]
    return _kl_loop(p_buckets, q_buckets)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_topk_forward_kl_matches_bucket_formula(pair, k):
    s, t = pair
    got = div.topk_forward_kl(s, t, k)
    for i in range(3):
        assert got[i].item() == pytest.approx(_topk_reference(s[i], t[i], k), rel=1e-9)


def test_topk_with_all_classes_is_forward_kl(pair):
    s, t = pair
    torch.testing.assert_close(div.topk_forward_kl(s, t, 6), div.forward_kl(s, t))
    # and the gradient stays finite when the tail is empty
    s = s.clone().requires_grad_(True)
    div.topk_forward_kl(s, t, 6).sum().backward()
    assert torch.isfinite(s.grad).all()


def test_topk_sparse_without_tail_recovers_it(pair):
    s, t = pair
    values, indices = t.topk(3, dim=-1)
    torch.testing.assert_close(
        div.topk_forward_kl_sparse(s, values, indices),
        div.topk_forward_kl_sparse(s, values, indices, div.topk_log_tail_mass(t, indices)),
    )


def test_topk_log_tail_mass_is_exact_when_tail_is_tiny():
    # 1 − Σ top-k would cancel catastrophically in float32; the log-sum of the rest does not
    logits = torch.tensor([[30.0, 0.0, -1.0, -2.0]])
    log_probs = torch.log_softmax(logits, dim=-1)
    tail = div.topk_log_tail_mass(log_probs, torch.tensor([[0]]))
    expected = torch.log_softmax(logits.double(), dim=-1)[0, 1:].logsumexp(0)
    torch.testing.assert_close(tail[0].double(), expected, rtol=1e-6, atol=0)


def test_upcast_keeps_float64_and_promotes_half():
    assert div.upcast(torch.zeros(1, dtype=torch.float64)).dtype == torch.float64
    assert div.upcast(torch.zeros(1, dtype=torch.bfloat16)).dtype == torch.float32
    assert div.upcast(torch.zeros(1, dtype=torch.float16)).dtype == torch.float32
