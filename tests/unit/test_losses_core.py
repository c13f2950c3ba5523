"""LogitsDistillationLoss, MFTLoss and MGDLoss against independent float64 references."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import kdistill as mtd


def kl_reference(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hand-written T² · Σ p (log p − log q) per position, in float64."""
    s = student.double() / temperature
    t = teacher.double() / temperature
    log_q = s - s.exp().sum(-1, keepdim=True).log()
    log_p = t - t.exp().sum(-1, keepdim=True).log()
    return temperature**2 * (log_p.exp() * (log_p - log_q)).sum(-1)


@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 7)], ids=["BC", "BTV"])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_logits_loss_matches_float64_formula(shape, temperature, reduction):
    student, teacher = torch.randn(shape), torch.randn(shape)
    per_position = kl_reference(student, teacher, temperature)
    expected = {
        "batchmean": per_position.mean(),
        "sum": per_position.sum(),
        "mean": per_position.sum() / student.numel(),
        "none": per_position,
    }[reduction]
    loss = mtd.LogitsDistillationLoss(temperature, reduction=reduction)(student, teacher)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected.float())


def test_batchmean_equals_torch_batchmean_for_2d():
    student, teacher = torch.randn(8, 10), torch.randn(8, 10)
    expected = 4.0 * F.kl_div(
        F.log_softmax(student / 2, -1), F.softmax(teacher / 2, -1), reduction="batchmean"
    )
    torch.testing.assert_close(mtd.LogitsDistillationLoss(2.0)(student, teacher), expected)


def test_default_reduction_is_batchmean():
    assert mtd.LogitsDistillationLoss().reduction == "batchmean"


def test_kl_properties_zero_on_equal_and_shift_invariant():
    logits = torch.randn(4, 9)
    loss = mtd.LogitsDistillationLoss(2.0)
    assert loss(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    student = torch.randn(4, 9)
    torch.testing.assert_close(loss(student + 5.0, logits - 3.0), loss(student, logits))
    assert loss(student, logits).item() >= 0


def test_teacher_is_detached_and_gradcheck():
    student = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    loss = mtd.LogitsDistillationLoss(2.0)
    loss(student, teacher).backward()
    assert teacher.grad is None
    # float32 inside the loss: check the gradient against the float64 reference instead
    student.grad = None
    ref_student = student.detach().clone().requires_grad_(True)
    kl_reference(ref_student, teacher.detach(), 2.0).mean().backward()
    s32 = student.detach().float().requires_grad_(True)
    loss(s32, teacher.detach().float()).backward()
    torch.testing.assert_close(s32.grad.double(), ref_student.grad, rtol=1e-4, atol=1e-6)


def test_mask_and_ignore_index_drop_positions():
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    per_position = kl_reference(student, teacher, 1.0)
    expected = per_position[mask].mean()
    torch.testing.assert_close(
        mtd.LogitsDistillationLoss()(student, teacher, mask=mask), expected.float()
    )
    labels = torch.where(mask, torch.ones(2, 5, dtype=torch.long), torch.full((2, 5), -100))
    loss = mtd.LogitsDistillationLoss(ignore_index=-100)(student, teacher, labels=labels)
    torch.testing.assert_close(loss, expected.float())


def test_all_masked_gives_zero_and_backward_works():
    student = torch.randn(2, 3, 4, requires_grad=True)
    loss = mtd.LogitsDistillationLoss()(student, torch.randn(2, 3, 4), mask=torch.zeros(2, 3))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


@pytest.mark.parametrize(
    "wrap",
    [
        lambda t: (t, "extra"),
        lambda t: [t],
        lambda t: {"logits": t},
        lambda t: SimpleNamespace(logits=t),
    ],
    ids=["tuple", "list", "mapping", "attribute"],
)
def test_accepts_model_outputs(wrap):
    student, teacher = torch.randn(3, 4), torch.randn(3, 4)
    loss = mtd.LogitsDistillationLoss()
    torch.testing.assert_close(loss(wrap(student), wrap(teacher)), loss(student, teacher))


def test_class_mismatch_names_both_sizes():
    with pytest.raises(ValueError, match=r"student has 5 classes.*teacher has 7"):
        mtd.LogitsDistillationLoss()(torch.randn(2, 5), torch.randn(2, 7))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"temperature": 0}, "temperature"), ({"reduction": "avg"}, "reduction")],
    ids=["temperature", "reduction"],
)
def test_logits_loss_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mtd.LogitsDistillationLoss(**kwargs)


def mft_reference(student, teacher, labels, temperature, threshold):
    """Row-by-row float64 minifinetuning: correct the teacher, then T² · KL per row."""
    rows = []
    for s_row, t_row, y in zip(student.double(), teacher.double(), labels.tolist(), strict=True):
        p = torch.softmax(t_row / temperature, -1)
        a = int(p.argmax())
        if a != y:
            m = (p[a] - p[y] + threshold) / (1 + p[a] - p[y])
        else:
            target = 1.0 if p[y] > 1 - threshold else float(p[y]) + threshold
            m = (target - p[y]) / (1 - p[y])
        corrected = (1 - m) * p
        corrected[y] += m
        log_q = torch.log_softmax(s_row / temperature, -1)
        rows.append(temperature**2 * (corrected * (corrected.log() - log_q)).sum())
    return torch.stack(rows)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_mft_matches_row_by_row_reference(temperature):
    student, teacher = torch.randn(12, 6), torch.randn(12, 6) * 2
    labels = torch.randint(0, 6, (12,))
    expected = mft_reference(student, teacher, labels, temperature, 0.2).mean()
    loss = mtd.MFTLoss(temperature=temperature)(student, teacher, labels=labels)
    torch.testing.assert_close(loss, expected.float())


def test_mft_correction_puts_label_threshold_ahead():
    # teacher argmax (class 0) is wrong: after correction label 2 leads class 0 by exactly θ
    teacher = torch.tensor([[3.0, 1.0, 0.0, -1.0]])
    labels = torch.tensor([2])
    from kdistill.losses.mft import _mft_corrected_probs

    corrected = _mft_corrected_probs(torch.softmax(teacher, -1), labels, 0.3)
    assert corrected[0, 2] - corrected[0, 0] == pytest.approx(0.3, abs=1e-6)
    assert corrected.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_mft_token_level_ignore_index():
    student, teacher = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    labels = torch.randint(0, 5, (2, 4))
    labels[0, 1] = labels[1, 3] = -100
    keep = labels != -100
    expected = mft_reference(student[keep], teacher[keep], labels[keep], 1.0, 0.2).mean()
    loss = mtd.MFTLoss()(student, teacher, labels=labels)
    torch.testing.assert_close(loss, expected.float())


def test_mft_takes_labels_positionally_like_modelopt():
    """``MFTLoss()(s, t, labels)`` (ModelOpt's call) on [B, T, V] equals the row reference."""
    student, teacher = torch.randn(2, 8, 5), torch.randn(2, 8, 5)
    labels = torch.randint(0, 5, (2, 8))
    expected = mft_reference(
        student.reshape(-1, 5), teacher.reshape(-1, 5), labels.reshape(-1), 1.0, 0.2
    ).mean()
    torch.testing.assert_close(mtd.MFTLoss()(student, teacher, labels), expected.float())
    with pytest.raises(TypeError):
        mtd.MFTLoss()(student, teacher, labels, labels != 0)  # mask stays keyword-only


def test_mft_requires_labels():
    with pytest.raises(ValueError, match="needs `labels`"):
        mtd.MFTLoss()(torch.randn(2, 3), torch.randn(2, 3))


def test_mgd_matches_manual_computation_with_generator():
    loss = mtd.MGDLoss(
        3, 4, alpha_mgd=2.0, lambda_mgd=0.5, generator=torch.Generator().manual_seed(7)
    )
    student, teacher = torch.randn(2, 3, 5, 5), torch.randn(2, 4, 5, 5)
    value = loss(student, teacher)
    keep = (torch.rand((2, 1, 5, 5), generator=torch.Generator().manual_seed(7)) <= 0.5).float()
    generated = loss.generation(loss.align(student) * keep)
    expected = 2.0 * ((generated - teacher) ** 2).mean()
    torch.testing.assert_close(value, expected)


def test_mgd_has_parameters_and_detaches_teacher():
    loss = mtd.MGDLoss(4, 4)
    assert isinstance(loss.align, torch.nn.Identity)
    student = torch.randn(2, 4, 3, 3, requires_grad=True)
    teacher = torch.randn(2, 4, 3, 3, requires_grad=True)
    loss(student, teacher).backward()
    assert teacher.grad is None and student.grad is not None
    assert all(p.grad is not None for p in loss.parameters())


def test_mgd_lambda_one_masks_everything():
    loss = mtd.MGDLoss(2, 2, lambda_mgd=1.0)
    keep = loss.keep_mask(3, 4, 4, torch.device("cpu"))
    assert not keep.any()


@pytest.mark.parametrize(
    ("student_shape", "teacher_shape", "match"),
    [
        ((2, 3, 4, 4), (2, 4, 5, 5), "spatial"),
        ((2, 5, 4, 4), (2, 4, 4, 4), "3 student channels"),
        ((2, 3, 4), (2, 4, 4, 4), r"\[B, C, H, W\]"),
    ],
    ids=["spatial", "channels", "rank"],
)
def test_mgd_shape_errors(student_shape, teacher_shape, match):
    with pytest.raises(ValueError, match=match):
        mtd.MGDLoss(3, 4)(torch.randn(student_shape), torch.randn(teacher_shape))


def test_registry_lists_core_losses_and_rejects_duplicates():
    assert {"logits_distillation", "mft", "mgd"} <= set(mtd.list_losses())
    assert mtd.get_loss("mgd") is mtd.MGDLoss
    with pytest.raises(ValueError, match="already registered"):
        mtd.register_loss("mgd", mtd.MGDLoss)
    with pytest.raises(ValueError, match="Did you mean 'mgd'"):
        mtd.get_loss("mgdd")
    with pytest.raises(TypeError, match=r"nn\.Module subclass"):
        mtd.register_loss("not_a_module", int)


def test_temperature_scaling_matches_formula():
    # T² · KL at temperature T equals the T=1 formula applied to logits / T, times T²
    student, teacher = torch.randn(5, 6), torch.randn(5, 6)
    t = 4.0
    at_t = mtd.LogitsDistillationLoss(t)(student, teacher)
    at_one = mtd.LogitsDistillationLoss(1.0)(student / t, teacher / t)
    torch.testing.assert_close(at_t, t * t * at_one)
    assert math.isfinite(mtd.LogitsDistillationLoss(1.0)(student * 1e4, teacher * 1e4).item())


def test_forward_kl_with_impossible_classes():
    from kdistill.losses._divergences import forward_kl

    inf = float("inf")
    lowest = torch.finfo(torch.float32).min
    # class 2 is impossible for both (teacher p = 0, student log q finite but lowest): it
    # contributes exactly 0 and its gradient is 0
    student = torch.tensor([[math.log(0.5), math.log(0.5), lowest]], requires_grad=True)
    teacher = torch.tensor([[0.25, 0.75, 0.0]]).log()
    value = forward_kl(student, teacher)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    value.sum().backward()
    torch.testing.assert_close(student.grad, torch.tensor([[-0.25, -0.75, 0.0]]))
    # the teacher puts mass where the student has none: infinite divergence
    assert forward_kl(torch.tensor([[0.0, -inf]]), torch.tensor([[-0.7, -0.7]])).item() == inf
