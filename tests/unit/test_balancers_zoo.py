"""DynamicLossBalancer and ScheduledLossBalancer: formulas, gradients, validation, save/restore."""

import math

import pytest
import torch
import torch.nn.functional as F

import kdistill as mtd
from kdistill.testing import tiny_mlp


def _leaves(*values):
    return [torch.tensor(v, requires_grad=True) for v in values]


def test_dynamic_matches_formula_and_ratio_is_detached():
    student, kd0, kd1 = _leaves(2.0, 40.0, 0.5)
    balancer = mtd.DynamicLossBalancer(kd_loss_weight=[0.5, 3.0], student_loss_weight=1.0)
    total = balancer({"student_loss": student, "A_0": kd0, "B_1": kd1})
    # every KD term is brought to |student| = 2, then weighted
    assert total.item() == pytest.approx(0.5 * 2.0 + 3.0 * 2.0 + 1.0 * 2.0)
    total.backward()
    # the ratio carries no gradient: d total / d kd_i = w_i · |ref| / |kd_i|
    assert kd0.grad.item() == pytest.approx(0.5 * 2.0 / 40.0)
    assert kd1.grad.item() == pytest.approx(3.0 * 2.0 / 0.5)
    assert student.grad.item() == pytest.approx(1.0)


def test_dynamic_with_a_kd_reference_and_no_student_loss():
    kd0, kd1, kd2 = _leaves(4.0, 100.0, -2.0)
    balancer = mtd.DynamicLossBalancer(kd_loss_weight=1.0, student_loss_weight=0.0, reference=0)
    total = balancer({"L_0": kd0, "L_1": kd1, "L_2": kd2})
    # intermediates scaled to the magnitude of the logit loss (Megatron's balancer)
    assert total.item() == pytest.approx(4.0 + 4.0 + (-4.0))
    total.backward()
    assert kd0.grad.item() == 1.0


def test_dynamic_zero_term_stays_zero():
    student, kd = _leaves(3.0, 0.0)
    total = mtd.DynamicLossBalancer()({"student_loss": student, "A_0": kd})
    assert total.item() == pytest.approx(3.0)
    total.backward()
    assert torch.isfinite(kd.grad)


def test_dynamic_validation():
    kd = {"A_0": torch.tensor(1.0), "B_1": torch.tensor(2.0)}
    with pytest.raises(ValueError, match="needs the student loss"):
        mtd.DynamicLossBalancer()(kd)
    with pytest.raises(ValueError, match="has 3 weight\\(s\\) but got 2 KD loss"):
        mtd.DynamicLossBalancer([1.0, 1.0, 1.0], student_loss_weight=0.0, reference=0)(kd)
    with pytest.raises(ValueError, match="`reference`=5 but there are only 2"):
        mtd.DynamicLossBalancer(student_loss_weight=0.0, reference=5)(kd)
    with pytest.raises(ValueError, match="`reference` must be 'student_loss' or the index"):
        mtd.DynamicLossBalancer(reference="logits")
    with pytest.raises(ValueError, match=r"`kd_loss_weight\[1\]` must be a finite number >= 0"):
        mtd.DynamicLossBalancer(kd_loss_weight=[1.0, -1.0])
    with pytest.raises(TypeError, match="`student_loss_weight` must be a number"):
        mtd.DynamicLossBalancer(student_loss_weight=[1.0])
    with pytest.raises(ValueError, match="no KD loss"):
        mtd.DynamicLossBalancer()({"student_loss": torch.tensor(1.0)})


def _factor(schedule, step, warmup=0, total=None, start=0.0, final=0.0):
    """The documented schedule, written independently."""
    if schedule == "constant":
        return 1.0
    if step < warmup:
        return start + (1 - start) * step / warmup
    if schedule == "linear_warmup":
        return 1.0
    u = min(max((step - warmup) / (total - warmup), 0.0), 1.0)
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * u))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"schedule": "constant"},
        {"schedule": "linear_warmup", "warmup_steps": 4, "start_factor": 0.2},
        {"schedule": "cosine", "warmup_steps": 2, "total_steps": 10, "final_factor": 0.1},
        {"schedule": "cosine", "total_steps": 6},
    ],
    ids=lambda kw: kw["schedule"] + str(kw.get("warmup_steps", 0)),
)
def test_scheduled_weights_follow_the_schedule(kwargs):
    balancer = mtd.ScheduledLossBalancer([0.4, 0.2], **kwargs)
    losses = {"student_loss": torch.tensor(1.0), "A_0": torch.tensor(5.0), "B_1": torch.tensor(7.0)}
    for step in range(13):
        f = _factor(
            kwargs["schedule"],
            step,
            kwargs.get("warmup_steps", 0),
            kwargs.get("total_steps"),
            kwargs.get("start_factor", 0.0),
            kwargs.get("final_factor", 0.0),
        )
        expected = f * 0.4 * 5.0 + f * 0.2 * 7.0 + (1 - 0.6 * f) * 1.0
        assert balancer.factor == pytest.approx(f)
        assert balancer(losses).item() == pytest.approx(expected, rel=1e-6)
        balancer.step()
    assert balancer.current_step == 13


def test_constant_schedule_equals_static_balancer():
    losses = {"student_loss": torch.tensor(1.5), "A_0": torch.tensor(3.0)}
    assert mtd.ScheduledLossBalancer(0.3, schedule="constant")(losses) == mtd.StaticLossBalancer(
        0.3
    )(losses)


def test_scheduled_validation():
    with pytest.raises(ValueError, match="`schedule` must be one of"):
        mtd.ScheduledLossBalancer(schedule="exp")
    with pytest.raises(ValueError, match="needs `total_steps`"):
        mtd.ScheduledLossBalancer(schedule="cosine", warmup_steps=5, total_steps=5)
    with pytest.raises(ValueError, match="schedule='constant' has no warm-up"):
        mtd.ScheduledLossBalancer(schedule="constant", warmup_steps=3)
    with pytest.raises(ValueError, match="`current_step` must be an integer >= 0"):
        mtd.ScheduledLossBalancer(current_step=-1)
    with pytest.raises(ValueError, match="`start_factor` must be in \\[0, 1\\]"):
        mtd.ScheduledLossBalancer(start_factor=1.5)
    with pytest.raises(ValueError, match="must sum to at most 1"):
        mtd.ScheduledLossBalancer([0.8, 0.4])
    # at factor 0 everything weighs the student loss, which must then be given
    with pytest.raises(ValueError, match="ScheduledLossBalancer gives the student loss weight 1"):
        mtd.ScheduledLossBalancer(0.5, warmup_steps=2)({"A_0": torch.tensor(1.0)})


def _convert(balancer):
    return mtd.convert(
        tiny_mlp(),
        mode=[
            (
                "kd_loss",
                {
                    "teacher_model": tiny_mlp,
                    "criterion": {
                        ("head", "head"): mtd.LogitsDistillationLoss(),
                        ("fc2", "fc2"): mtd.CosineLoss(),
                    },
                    "loss_balancer": balancer,
                },
            )
        ],
    )


def test_scheduled_step_survives_save_and_restore(tmp_path):
    model = _convert(
        mtd.ScheduledLossBalancer([0.3, 0.2], schedule="cosine", warmup_steps=3, total_steps=20)
    )
    for _ in range(7):
        model.loss_balancer.step()
    mtd.save(model, tmp_path / "ckpt.pt")
    restored = mtd.restore(tiny_mlp(), tmp_path / "ckpt.pt", teacher_model=tiny_mlp)
    assert isinstance(restored.loss_balancer, mtd.ScheduledLossBalancer)
    assert restored.loss_balancer.current_step == 7
    assert restored.loss_balancer.factor == model.loss_balancer.factor
    x, y = torch.randn(4, 16), torch.randint(0, 10, (4,))
    totals = []
    for m in (model, restored):
        m.load_state_dict(model.state_dict())
        m.teacher_model.load_state_dict(model.teacher_model.state_dict())
        out = m(x)
        totals.append(m.compute_kd_loss(student_loss=F.cross_entropy(out, y)))
    torch.testing.assert_close(totals[1], totals[0])


def test_dynamic_balancer_in_a_model_round_trips(tmp_path):
    model = _convert(mtd.DynamicLossBalancer([1.0, 0.5], reference="student_loss"))
    mtd.save(model, tmp_path / "ckpt.pt")
    restored = mtd.restore(tiny_mlp(), tmp_path / "ckpt.pt", teacher_model=tiny_mlp)
    assert restored.loss_balancer.kd_loss_weight == [1.0, 0.5]
    out = restored(torch.randn(4, 16))
    loss = restored.compute_kd_loss(student_loss=out.pow(2).mean())
    loss.backward()
    assert torch.isfinite(loss)


def test_dynamic_weight_count_is_checked_at_convert():
    with pytest.raises(ValueError, match="has 3 weight\\(s\\) but `criterion` has 2"):
        _convert(mtd.DynamicLossBalancer([1.0, 1.0, 1.0]))
