"""The logit-loss zoo against float64 implementations of each paper's formula."""

import pytest
import torch
import torch.nn.functional as F

import kdistill as mtd
from kdistill.testing import tiny_mlp


def _probs(logits, temperature):
    return torch.softmax(logits.double() / temperature, dim=-1)


def _kl(p, q):
    """Σ p (log p − log q) over the last axis, float64, with 0·log 0 = 0."""
    return torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p)).sum(-1)


def _reduce(per_position, reduction, num_classes):
    if reduction == "none":
        return per_position
    if reduction == "sum":
        return per_position.sum()
    if reduction == "batchmean":
        return per_position.mean()
    return per_position.sum() / (per_position.numel() * num_classes)


def reference(name, student, teacher, temperature, **kw):
    """Per-position float64 reference of each paper's formula (T² where the loss applies it)."""
    p, q = _probs(teacher, temperature), _probs(student, temperature)
    t2 = temperature**2
    if name == "reverse_kl":
        return t2 * _kl(q, p)
    if name == "jsd":
        b = kw["beta"]
        m = b * p + (1 - b) * q
        return t2 * (b * _kl(p, m) + (1 - b) * _kl(q, m))
    if name == "skew_kl":
        return t2 * _kl(p, kw["alpha"] * p + (1 - kw["alpha"]) * q)
    if name == "skew_reverse_kl":
        return t2 * _kl(q, (1 - kw["alpha"]) * p + kw["alpha"] * q)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise AssertionError(name)


CASES = [
    ("reverse_kl", mtd.ReverseKLLoss, {}),
    ("jsd", mtd.JSDLoss, {"beta": 0.5}),
    ("jsd", mtd.JSDLoss, {"beta": 0.2}),
    ("skew_kl", mtd.SkewKLLoss, {"alpha": 0.1}),
    ("skew_reverse_kl", mtd.SkewReverseKLLoss, {"alpha": 0.3}),
    ("tvd", mtd.TVDLoss, {}),
]


@pytest.mark.parametrize(("name", "cls", "kw"), CASES, ids=[f"{c[0]}{c[2]}" for c in CASES])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_divergence_losses_match_float64_formula(name, cls, kw, reduction, temperature):
    student, teacher = torch.randn(2, 3, 7) * 3, torch.randn(2, 3, 7) * 3
    loss = cls(temperature=temperature, reduction=reduction, **kw)(student, teacher)
    expected = _reduce(reference(name, student, teacher, temperature, **kw), reduction, 7)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected.float())


def test_jsd_loss_endpoints_and_limits():
    student, teacher = (
        torch.randn(4, 9, dtype=torch.float64),
        torch.randn(4, 9, dtype=torch.float64),
    )
    forward = mtd.LogitsDistillationLoss(reduction="none")(student, teacher)
    reverse = mtd.ReverseKLLoss(reduction="none")(student, teacher)
    jsd = lambda beta: mtd.JSDLoss(beta, reduction="none")(student, teacher)  # noqa: E731
    torch.testing.assert_close(jsd(0.0), forward)
    torch.testing.assert_close(jsd(1.0), reverse)
    beta = 1e-5
    torch.testing.assert_close(jsd(beta) / beta, forward, rtol=1e-3, atol=0)  # error O(β)
    torch.testing.assert_close(jsd(1 - beta) / beta, reverse, rtol=1e-3, atol=0)


def test_symmetric_jsd_is_bounded_by_log2():
    student, teacher = torch.randn(5, 6) * 50, torch.randn(5, 6) * 50
    values = mtd.JSDLoss(0.5, reduction="none")(student, teacher)
    assert (values <= torch.log(torch.tensor(2.0)) + 1e-6).all()


def test_skew_losses_limits():
    student, teacher = torch.randn(3, 8), torch.randn(3, 8)
    torch.testing.assert_close(
        mtd.SkewKLLoss(alpha=0.0)(student, teacher), mtd.LogitsDistillationLoss()(student, teacher)
    )
    torch.testing.assert_close(
        mtd.SkewReverseKLLoss(alpha=0.0)(student, teacher), mtd.ReverseKLLoss()(student, teacher)
    )
    assert mtd.SkewKLLoss(alpha=1.0)(student, teacher).item() == 0.0


def _dkd_reference(student, teacher, labels, alpha, beta, temperature):
    """DKD as written in the paper / mdistiller: binary TCKD plus NCKD over non-target classes."""
    gt = F.one_hot(labels, student.shape[-1]).bool()
    p_s, p_t = _probs(student, temperature), _probs(teacher, temperature)
    b_s = torch.stack([(p_s * gt).sum(-1), (p_s * ~gt).sum(-1)], dim=-1)
    b_t = torch.stack([(p_t * gt).sum(-1), (p_t * ~gt).sum(-1)], dim=-1)
    tckd = _kl(b_t, b_s)
    # non-target distributions: subtract a large constant from the target logit (mdistiller)
    nt_s = torch.softmax(student.double() / temperature - 1000.0 * gt, dim=-1)
    nt_t = torch.softmax(teacher.double() / temperature - 1000.0 * gt, dim=-1)
    nckd = _kl(nt_t, nt_s)
    return (alpha * tckd + beta * nckd) * temperature**2


@pytest.mark.parametrize("shape", [(6, 10), (2, 3, 10)])
def test_dkd_matches_float64_formula(shape):
    student, teacher = torch.randn(*shape) * 2, torch.randn(*shape) * 2
    labels = torch.randint(0, 10, shape[:-1])
    loss = mtd.DKDLoss(alpha=1.0, beta=8.0, temperature=4.0)(student, teacher, labels=labels)
    expected = _dkd_reference(student, teacher, labels, 1.0, 8.0, 4.0).mean()
    torch.testing.assert_close(loss, expected.float())


def test_dkd_decomposes_classical_kd():
    # the paper's identity: KD = TCKD + (1 − p_t^teacher) · NCKD, per sample
    student, teacher = (
        torch.randn(5, 7, dtype=torch.float64),
        torch.randn(5, 7, dtype=torch.float64),
    )
    labels = torch.randint(0, 7, (5,))
    kd = mtd.LogitsDistillationLoss(temperature=3.0, reduction="none")(student, teacher)
    tckd = mtd.DKDLoss(1.0, 0.0, 3.0, reduction="none")(student, teacher, labels=labels)
    nckd = mtd.DKDLoss(0.0, 1.0, 3.0, reduction="none")(student, teacher, labels=labels)
    p_target = _probs(teacher, 3.0).gather(1, labels[:, None]).squeeze(1)
    torch.testing.assert_close(kd, tckd + (1 - p_target) * nckd)


def test_dkd_ignore_index_drops_positions():
    student, teacher = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    labels = torch.randint(0, 6, (2, 4))
    labels[0, 1] = labels[1, 3] = -100
    keep = labels != -100
    loss = mtd.DKDLoss()(student, teacher, labels=labels)
    subset = mtd.DKDLoss()(student[keep], teacher[keep], labels=labels[keep])
    torch.testing.assert_close(loss, subset)


def test_dkd_validation():
    with pytest.raises(ValueError, match="DKDLoss needs `labels`"):
        mtd.DKDLoss()(torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="at least 2 classes"):
        mtd.DKDLoss()(torch.randn(2, 1), torch.randn(2, 1), labels=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="`beta` must be a finite number >= 0"):
        mtd.DKDLoss(beta=-1.0)


@pytest.mark.parametrize("k", [1, 4, 12])
def test_topk_kl_matches_bucket_formula(k):
    student, teacher = torch.randn(3, 12), torch.randn(3, 12) * 2
    p, q = _probs(teacher, 2.0), _probs(student, 2.0)
    top = p.topk(k, dim=-1).indices
    in_top = torch.zeros_like(p, dtype=torch.bool).scatter(-1, top, True)
    p_b = torch.cat([p.gather(-1, top), (p * ~in_top).sum(-1, keepdim=True)], -1)
    q_b = torch.cat([q.gather(-1, top), (q * ~in_top).sum(-1, keepdim=True)], -1)
    expected = (4.0 * _kl(p_b, q_b)).mean()
    loss = mtd.TopKLogitsKLLoss(k=k, temperature=2.0)(student, teacher)
    torch.testing.assert_close(loss, expected.float())


def test_topk_with_every_class_is_hinton_kd():
    student, teacher = torch.randn(4, 5, 9), torch.randn(4, 5, 9)
    torch.testing.assert_close(
        mtd.TopKLogitsKLLoss(k=9, temperature=2.0)(student, teacher),
        mtd.LogitsDistillationLoss(temperature=2.0)(student, teacher),
    )


def test_topk_sparse_teacher_equals_dense_teacher_and_gradients():
    student = torch.randn(2, 3, 20, requires_grad=True)
    teacher = torch.randn(2, 3, 20)
    loss = mtd.TopKLogitsKLLoss(k=5, temperature=2.0)
    dense = loss(student, teacher)
    (grad_dense,) = torch.autograd.grad(dense, student)
    sparse_teacher = mtd.TopKTeacher.from_logits(teacher, k=5, temperature=2.0)
    sparse = loss(student, sparse_teacher)
    (grad_sparse,) = torch.autograd.grad(sparse, student)
    torch.testing.assert_close(sparse, dense)
    torch.testing.assert_close(grad_sparse, grad_dense)
    # a cache may store only log-probs (tail = 1 − Σ exp) or round them to float16
    no_tail = mtd.TopKTeacher(sparse_teacher.log_probs, sparse_teacher.indices, temperature=2.0)
    torch.testing.assert_close(loss(student, no_tail), dense)
    half = mtd.TopKTeacher(
        sparse_teacher.log_probs.half(),
        sparse_teacher.indices,
        sparse_teacher.log_tail_mass.half(),
        temperature=2.0,
    )
    torch.testing.assert_close(loss(student, half), dense, rtol=1e-2, atol=1e-3)  # fp16 storage


def test_topk_teacher_validation():
    values, indices = torch.randn(2, 3).log_softmax(-1), torch.tensor([[0, 1, 2], [2, 1, 0]])
    with pytest.raises(TypeError, match="must be int64"):
        mtd.TopKTeacher(values, indices.int())
    with pytest.raises(ValueError, match="must have the same shape"):
        mtd.TopKTeacher(values, indices[:, :2])
    with pytest.raises(ValueError, match="`log_tail_mass` must have shape"):
        mtd.TopKTeacher(values, indices, torch.zeros(3))
    with pytest.raises(ValueError, match="exceeds the 4 classes"):
        mtd.TopKTeacher.from_logits(torch.randn(2, 4), k=5)
    loss = mtd.TopKLogitsKLLoss(k=3)
    student = torch.randn(2, 4)
    with pytest.raises(ValueError, match="build the loss with k=2"):
        loss(student, mtd.TopKTeacher.from_logits(torch.randn(2, 4), k=2))
    with pytest.raises(ValueError, match="cannot be re-tempered"):
        loss(student, mtd.TopKTeacher.from_logits(torch.randn(2, 4), k=3, temperature=2.0))
    with pytest.raises(ValueError, match="leading dimensions differ"):
        loss(torch.randn(3, 4), mtd.TopKTeacher.from_logits(torch.randn(2, 4), k=3))
    with pytest.raises(ValueError, match="`k` must be an integer >= 1"):
        mtd.TopKLogitsKLLoss(k=0)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: mtd.JSDLoss(beta=1.5), "`beta` must be in \\[0, 1\\]"),
        (lambda: mtd.SkewKLLoss(alpha=-0.1), "`alpha` must be in \\[0, 1\\]"),
        (lambda: mtd.SkewReverseKLLoss(alpha=2), "`alpha` must be in \\[0, 1\\]"),
        (lambda: mtd.ReverseKLLoss(temperature=0), "`temperature` must be a finite number > 0"),
        (lambda: mtd.TVDLoss(reduction="avg"), "`reduction` must be one of"),
    ],
)
def test_constructor_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_class_mismatch_names_both_shapes():
    with pytest.raises(
        ValueError, match=r"student has 5 classes \(shape \(2, 5\)\), teacher has 6"
    ):
        mtd.JSDLoss()(torch.randn(2, 5), torch.randn(2, 6))


def test_zoo_loss_trains_inside_a_distillation_model():
    # DKD needs labels: compute_kd_loss routes `labels=` to it through its signature
    model = mtd.convert(
        tiny_mlp(),
        mode=[
            (
                "kd_loss",
                {
                    "teacher_model": tiny_mlp(),
                    "criterion": mtd.DKDLoss(),
                    "loss_balancer": mtd.StaticLossBalancer(0.5),
                },
            )
        ],
    )
    x, y = torch.randn(8, 16), torch.randint(0, 10, (8,))
    out = model(x)
    loss = model.compute_kd_loss(student_loss=F.cross_entropy(out, y), labels=y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.head.parameters())
