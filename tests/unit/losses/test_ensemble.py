"""``EnsembleLogitsDistillationLoss`` against a float64 reference of the mixture formulas."""

import pytest
import torch

import kdistill as mtd
from kdistill.losses.ensemble import EnsembleLogitsDistillationLoss

COMBINES = ("probs", "losses")


def reference(
    student: torch.Tensor,
    teachers: list[torch.Tensor],
    temperature: float,
    weights: list[float] | None,
    combine: str,
    keep: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """The documented formulas, written out in float64: Σ p·(log p − log q), no kdistill code."""
    w = torch.tensor(weights or [1.0] * len(teachers), dtype=torch.float64)
    w = w / w.sum()
    q_log = torch.log_softmax(student.double() / temperature, dim=-1)
    ps = [torch.softmax(t.double() / temperature, dim=-1) for t in teachers]

    def kl(p: torch.Tensor) -> torch.Tensor:  # KL(p ‖ q) per position; p = 0 terms are 0
        return torch.where(p > 0, p * (p.log() - q_log), torch.zeros_like(p)).sum(-1)

    if combine == "probs":
        per_position = kl(sum(wk * p for wk, p in zip(w, ps, strict=True)))
    else:
        per_position = sum(wk * kl(p) for wk, p in zip(w, ps, strict=True))
    per_position = temperature**2 * per_position
    if keep is None:
        keep = torch.ones(per_position.shape, dtype=torch.bool)
    per_position = torch.where(keep, per_position, torch.zeros_like(per_position))
    count = keep.sum().clamp(min=1)
    if reduction == "none":
        return per_position
    if reduction == "sum":
        return per_position.sum()
    if reduction == "mean":
        return per_position.sum() / (count * student.shape[-1])
    return per_position.sum() / count


def logits(*shape: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.parametrize(
    ("weights", "temperature"),
    [(None, 1.0), ([0.7, 0.3], 2.0), ([3.0, 1.0, 0.0], 0.5), ([1, 2, 5], 4.0)],
    ids=["uniform-2", "weighted-2", "zero-weight-3", "int-weights-3"],
)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_matches_float64_mixture_reference(combine, weights, temperature, reduction):
    k = 2 if weights is None else len(weights)
    student = logits(3, 4, 7, seed=0)
    teachers = [logits(3, 4, 7, seed=1 + i) for i in range(k)]
    loss = EnsembleLogitsDistillationLoss(temperature, weights, combine, reduction)
    got = loss(student, tuple(teachers))
    assert got.dtype == torch.float32
    expected = reference(student, teachers, temperature, weights, combine, reduction=reduction)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("combine", COMBINES)
def test_masks_and_ignore_index_drop_positions(combine):
    student = logits(2, 5, 6, seed=3)
    teachers = [logits(2, 5, 6, seed=4), logits(2, 5, 6, seed=5)]
    mask = torch.rand(2, 5, generator=torch.Generator().manual_seed(6)) > 0.4
    labels = torch.randint(0, 6, (2, 5), generator=torch.Generator().manual_seed(7))
    labels[0, 1] = labels[1, 3] = -100
    keep = mask & (labels != -100)
    loss = EnsembleLogitsDistillationLoss(2.0, [0.4, 0.6], combine, ignore_index=-100)
    got = loss(student, teachers, labels=labels, mask=mask)
    expected = reference(student, teachers, 2.0, [0.4, 0.6], combine, keep)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    # equals the loss over the kept positions alone; garbage at masked positions changes nothing
    subset = loss(student[keep], [t[keep] for t in teachers])
    torch.testing.assert_close(got, subset)
    garbage = student.masked_fill(~keep[..., None], 1e4)
    torch.testing.assert_close(loss(garbage, teachers, labels=labels, mask=mask), got)


@pytest.mark.parametrize("combine", COMBINES)
def test_all_masked_is_zero_with_zero_gradient(combine):
    student = logits(2, 3, 4, seed=8).requires_grad_(True)
    teachers = (logits(2, 3, 4, seed=9), logits(2, 3, 4, seed=10))
    value = EnsembleLogitsDistillationLoss(combine=combine)(
        student, teachers, mask=torch.zeros(2, 3, dtype=torch.bool)
    )
    assert value.item() == 0.0
    value.backward()
    assert student.grad is not None and student.grad.abs().sum() == 0


@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.parametrize("weights", [None, [0.2, 0.5, 0.3]], ids=["uniform", "weighted"])
def test_gradcheck_float64(combine, weights):
    teachers = tuple(logits(2, 3, 5, seed=20 + i).double() for i in range(3))
    loss = EnsembleLogitsDistillationLoss(1.5, weights, combine)
    student = logits(2, 3, 5, seed=11).double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: loss(s, teachers), (student,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("combine", COMBINES)
def test_teachers_are_detached(combine):
    student = logits(4, 6, seed=12).requires_grad_(True)
    teachers = [logits(4, 6, seed=13).requires_grad_(True), logits(4, 6, seed=14)]
    teachers[1].requires_grad_(True)
    EnsembleLogitsDistillationLoss(2.0, combine=combine)(student, teachers).backward()
    assert all(t.grad is None for t in teachers)
    assert student.grad is not None and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("combine", COMBINES)
def test_one_teacher_is_bitwise_logits_distillation(combine):
    student, teacher = logits(3, 4, 9, seed=15), logits(3, 4, 9, seed=16)
    expected = mtd.LogitsDistillationLoss(temperature=3.0)(student, teacher)
    ensemble = EnsembleLogitsDistillationLoss(3.0, combine=combine)
    for teacher_arg in (teacher, (teacher,), [teacher]):
        assert torch.equal(ensemble(student, teacher_arg), expected)


def test_mixture_is_never_above_mean_of_losses_and_equal_teachers_agree():
    """KL is convex in its first argument: KL(Σ w p_k ‖ q) <= Σ w KL(p_k ‖ q)."""
    for seed in range(5):
        student = logits(8, 10, seed=100 + seed)
        teachers = (logits(8, 10, seed=200 + seed), logits(8, 10, seed=300 + seed))
        probs = EnsembleLogitsDistillationLoss(2.0, [0.3, 0.7], "probs")(student, teachers)
        losses = EnsembleLogitsDistillationLoss(2.0, [0.3, 0.7], "losses")(student, teachers)
        assert probs <= losses + 1e-6
    same = (teachers[0], teachers[0].clone())
    torch.testing.assert_close(
        EnsembleLogitsDistillationLoss(combine="probs")(student, same),
        EnsembleLogitsDistillationLoss(combine="losses")(student, same),
    )


def test_half_precision_inputs_are_computed_in_float32():
    student = logits(4, 5, 11, seed=17)
    teachers = (logits(4, 5, 11, seed=18), logits(4, 5, 11, seed=19))
    loss = EnsembleLogitsDistillationLoss(2.0, [0.5, 0.5])
    half = loss(student.bfloat16(), tuple(t.half() for t in teachers))
    assert half.dtype == torch.float32
    expected = loss(student.bfloat16().float(), tuple(t.half().float() for t in teachers))
    torch.testing.assert_close(half, expected)


def test_model_outputs_are_unwrapped():
    student = logits(3, 7, seed=21)
    teachers = (logits(3, 7, seed=22), logits(3, 7, seed=23))
    loss = EnsembleLogitsDistillationLoss(combine="losses")
    wrapped = ({"logits": teachers[0]}, (teachers[1], "hidden"))
    assert torch.equal(loss({"logits": student}, wrapped), loss(student, teachers))


@pytest.mark.parametrize(
    ("teachers", "match"),
    [
        (
            (logits(2, 5, seed=0), logits(2, 7, seed=1)),
            r"Teacher output 1 of 2: .*student has 5 classes.*teacher has 7",
        ),
        ((logits(3, 5, seed=0),), r"Teacher output 0 of 1: .*differ in their leading"),
        ((), r"empty tuple of teacher outputs"),
    ],
    ids=["class-count", "batch", "empty"],
)
def test_shape_errors_name_the_teacher_and_sizes(teachers, match):
    with pytest.raises(ValueError, match=match):
        EnsembleLogitsDistillationLoss()(logits(2, 5, seed=2), teachers)


def test_weight_count_must_match_teacher_count():
    loss = EnsembleLogitsDistillationLoss(weights=[0.5, 0.5])
    with pytest.raises(ValueError, match=r"has 2 weight\(s\) but got 3 teacher output\(s\)"):
        loss(logits(2, 4, seed=0), tuple(logits(2, 4, seed=i) for i in range(3)))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"weights": [0.5, -0.1]}, ValueError, r"`weights\[1\]` must be a finite number >= 0"),
        ({"weights": [0.5, float("nan")]}, ValueError, r"`weights\[1\]` must be a finite"),
        ({"weights": [float("inf"), 1.0]}, ValueError, r"`weights\[0\]` must be a finite"),
        ({"weights": [0.0, 0.0]}, ValueError, r"`weights` must have a sum > 0"),
        ({"weights": []}, ValueError, r"`weights` must hold between 1 and"),
        ({"weights": [True, 1.0]}, TypeError, r"`weights\[0\]` must be a number"),
        ({"weights": "0.5"}, TypeError, r"`weights` must be a list of numbers"),
        ({"temperature": 0.0}, ValueError, r"`temperature` must be a finite number > 0"),
        ({"temperature": float("nan")}, ValueError, r"`temperature` must be a finite"),
        ({"combine": "logits"}, ValueError, r"`combine` must be one of \['losses', 'probs'\]"),
        ({"reduction": "avg"}, ValueError, r"`reduction` must be one of"),
        ({"ignore_index": 1.5}, TypeError, r"`ignore_index` must be an integer"),
    ],
    ids=lambda v: str(v)[:40] if not isinstance(v, type) else v.__name__,
)
def test_constructor_validates_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        EnsembleLogitsDistillationLoss(**kwargs)


def test_registered_and_recorded_by_constructor_arguments():
    from kdistill._serialization import build_object, describe_object
    from kdistill.losses._registry import LOSSES

    assert mtd.get_loss("ensemble_logits_distillation") is EnsembleLogitsDistillationLoss
    loss = EnsembleLogitsDistillationLoss(2.0, [0.7, 0.3], "losses", "sum", -100)
    record = describe_object(loss, LOSSES)
    assert record == {
        "name": "ensemble_logits_distillation",
        "args": {
            "temperature": 2.0,
            "weights": [0.7, 0.3],
            "combine": "losses",
            "reduction": "sum",
            "ignore_index": -100,
        },
    }
    rebuilt = build_object(record, LOSSES)
    student, teachers = logits(3, 5, seed=0), (logits(3, 5, seed=1), logits(3, 5, seed=2))
    assert torch.equal(rebuilt(student, teachers), loss(student, teachers))
