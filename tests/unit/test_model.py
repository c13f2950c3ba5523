"""DistillationModel behaviour: teacher handling, compute_kd_loss, contexts, state dicts."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdistill as mtd
from kdistill.testing import TinyCNN, TinyMLP


class ModeProbe(nn.Module):
    """Teacher recording whether it ran in training mode and with grad enabled."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 10)
        self.drop = nn.Dropout(0.5)
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, x):
        self.seen.append((self.training, torch.is_grad_enabled()))
        return self.drop(self.lin(x))


class LabelledLoss(nn.Module):
    """A loss that needs labels (like MFTLoss), to test keyword routing."""

    def forward(self, student, teacher, *, labels):
        return F.cross_entropy(student, labels) + 0 * teacher.sum()


class AnyKwargLoss(nn.Module):
    def forward(self, student, teacher, **kwargs):
        self.kwargs = kwargs
        return (student - teacher).pow(2).mean()


def convert(student=None, **config):
    config.setdefault("teacher_model", TinyMLP())
    config.setdefault("criterion", mtd.LogitsDistillationLoss(2.0))
    return mtd.convert(student or TinyMLP(), mode=[("kd_loss", config)])


def test_forward_runs_teacher_in_eval_without_grad_and_returns_student_output():
    teacher = ModeProbe()
    student = TinyMLP()
    reference = copy.deepcopy(student)
    model = convert(student, teacher_model=teacher)
    model.train()
    x = torch.randn(4, 16)
    out = model(x)
    torch.testing.assert_close(out, reference(x))
    assert teacher.seen == [(False, False)]
    teacher.train()  # even if someone flips it, KD runs the teacher in eval
    model(x)
    assert teacher.seen[-1] == (False, False)


def test_compute_kd_loss_matches_manual_hinton_loss():
    teacher = TinyMLP()
    model = convert(teacher_model=teacher, loss_balancer=mtd.StaticLossBalancer(0.7))
    x, y = torch.randn(6, 16), torch.randint(0, 10, (6,))
    out = model(x)
    ce = F.cross_entropy(out, y)
    total = model.compute_kd_loss(student_loss=ce)
    s = F.log_softmax(out.double() / 2, -1)
    p = F.softmax(teacher(x).double() / 2, -1)
    kd = 4 * (p * (p.log() - s)).sum(-1).mean()
    torch.testing.assert_close(total.double(), 0.7 * kd + 0.3 * ce.double(), rtol=1e-5, atol=1e-6)


def test_loss_dict_keys_follow_modelopt_format():
    model = convert(
        criterion={("fc2", "fc2"): nn.MSELoss(), ("", ""): mtd.LogitsDistillationLoss()},
        loss_balancer=mtd.StaticLossBalancer([0.25, 0.25]),
    )
    model(torch.randn(2, 16))
    losses = model.compute_kd_loss(student_loss=torch.tensor(1.0), skip_balancer=True)
    assert list(losses) == ["student_loss", "MSELoss_0", "LogitsDistillationLoss_1"]


def test_single_loss_without_balancer_is_returned_as_is():
    model = convert()
    x = torch.randn(3, 16)
    out = model(x)
    expected = mtd.LogitsDistillationLoss(2.0)(out, model.teacher_model(x))
    torch.testing.assert_close(model.compute_kd_loss(), expected)


def test_student_loss_without_balancer_raises():
    model = convert()
    model(torch.randn(2, 16))
    with pytest.raises(ValueError, match="no loss balancer"):
        model.compute_kd_loss(student_loss=torch.tensor(1.0))


def test_loss_reduction_fn_applied_to_each_kd_loss():
    model = convert(criterion=mtd.LogitsDistillationLoss(reduction="none"))
    x = torch.randn(5, 16)
    out = model(x)
    weights = torch.arange(5.0)
    loss = model.compute_kd_loss(loss_reduction_fn=lambda per: (per * weights).sum())
    per_sample = mtd.LogitsDistillationLoss(reduction="none")(out, model.teacher_model(x))
    torch.testing.assert_close(loss, (per_sample * weights).sum())


def test_kwargs_reach_only_losses_that_accept_them():
    model = convert(
        criterion={
            ("", ""): LabelledLoss(),
            ("fc2", "fc2"): nn.MSELoss(),
            ("fc1", "fc1"): AnyKwargLoss(),
        },
        loss_balancer=mtd.StaticLossBalancer([0.3, 0.3, 0.4]),
    )
    x, y = torch.randn(4, 16), torch.randint(0, 10, (4,))
    out = model(x)
    losses = model.compute_kd_loss(labels=y, skip_balancer=True)
    torch.testing.assert_close(losses["LabelledLoss_0"], F.cross_entropy(out, y))
    assert model._kd_pairs[2].loss.kwargs.keys() == {"labels"}


def test_unknown_kwarg_raises():
    model = convert()
    model(torch.randn(2, 16))
    with pytest.raises(TypeError, match=r"\['labls'\] that no loss accepts"):
        model.compute_kd_loss(labls=torch.zeros(2))


def test_nothing_captured_raises_and_captures_are_released():
    model = convert()
    with pytest.raises(RuntimeError, match="Run a forward pass"):
        model.compute_kd_loss()
    model(torch.randn(2, 16))
    model.compute_kd_loss()
    pair = model._kd_pairs[0]
    assert pair.student_capture.output is None and pair.teacher_capture.output is None
    with pytest.raises(RuntimeError, match="Run a forward pass"):
        model.compute_kd_loss()


def test_train_eval_switch_clears_captures():
    model = convert()
    model(torch.randn(2, 16))
    model.eval()
    with pytest.raises(RuntimeError, match="student and teacher"):
        model.compute_kd_loss()
    assert not model.teacher_model.training
    model.train()
    assert model.training and model.fc1.training and not model.teacher_model.training


def test_only_student_and_only_teacher_forward():
    teacher = ModeProbe()
    model = convert(teacher_model=teacher)
    x = torch.randn(3, 16)
    with model.only_student_forward():
        student_out = model(x)
    assert teacher.seen == []
    with pytest.raises(RuntimeError, match="teacher"):
        model.compute_kd_loss()
    with model.only_teacher_forward():
        teacher_out = model(x)
    torch.testing.assert_close(teacher_out, teacher(x))
    assert not torch.allclose(student_out, teacher_out)


def test_context_managers_are_reentrant_and_exception_safe():
    model = convert()
    keys = list(model._modules)
    with model.hide_teacher_model(), model.hide_teacher_model():
        assert "_teacher_model" not in model._modules
        with model.hide_loss_modules():
            assert "_loss_modules" not in model._modules
    assert list(model._modules) == keys
    with pytest.raises(KeyError), model.hide_teacher_model():
        raise KeyError("boom")
    assert list(model._modules) == keys
    with model.only_student_forward():
        with model.only_student_forward(enable=False):
            assert model._kd_only_student
        with pytest.raises(ValueError, match="inside"), model.only_teacher_forward():
            raise ValueError("inside")
        assert not model._kd_only_teacher
    assert not model._kd_only_student


def test_state_dict_hides_teacher_and_keeps_loss_modules():
    student = TinyCNN(1, 4)
    model = mtd.convert(
        student,
        mode=[
            (
                "kd_loss",
                {
                    "teacher_model": TinyCNN(1, 6),
                    "criterion": {
                        ("conv2", "conv2"): mtd.MGDLoss(4, 6),
                        ("", ""): mtd.LogitsDistillationLoss(),
                    },
                    "loss_balancer": mtd.StaticLossBalancer([0.5, 0.5]),
                },
            )
        ],
    )
    keys = set(model.state_dict())
    student_keys = {k for k in keys if not k.startswith("_loss_modules.")}
    assert student_keys == set(TinyCNN(1, 4).state_dict())
    assert {k.split(".")[1] for k in keys - student_keys} == {"0"}
    assert not any(k.startswith("_teacher_model") for k in keys)
    assert len(model.loss_modules) == 1 and isinstance(model.loss_modules[0], mtd.MGDLoss)


def test_state_dict_with_teacher_when_not_minimal():
    model = convert(expose_minimal_state_dict=False)
    assert any(k.startswith("_teacher_model.") for k in model.state_dict())


def test_load_state_dict_accepts_plain_student_and_own_state():
    source = TinyMLP()
    model = convert()
    model.load_state_dict(source.state_dict())
    x = torch.randn(2, 16)
    torch.testing.assert_close(model(x), source(x))
    other = convert()
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(other(x), source(x))


def test_loss_modules_in_criterion_order():
    losses = [mtd.MGDLoss(8, 8), mtd.LogitsDistillationLoss(), mtd.MGDLoss(8, 8, alpha_mgd=2.0)]
    model = mtd.convert(
        TinyCNN(),
        mode=[
            (
                "kd_loss",
                {
                    "teacher_model": TinyCNN(),
                    "criterion": {
                        ("conv1", "conv1"): losses[0],
                        ("", ""): losses[1],
                        ("conv2", "conv2"): losses[2],
                    },
                    "loss_balancer": mtd.StaticLossBalancer([0.3, 0.3, 0.3]),
                },
            )
        ],
    )
    assert list(model.loss_modules) == [losses[0], losses[2]]


def test_training_updates_student_only_and_every_student_param_gets_grad():
    torch.manual_seed(0)
    teacher = TinyMLP()
    teacher_before = copy.deepcopy(teacher.state_dict())
    model = convert(teacher_model=teacher, loss_balancer=mtd.StaticLossBalancer(0.5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    for _ in range(3):
        x, y = torch.randn(8, 16), torch.randint(0, 10, (8,))
        out = model(x)
        loss = model.compute_kd_loss(student_loss=F.cross_entropy(out, y))
        opt.zero_grad()
        loss.backward()
        student_params = [p for n, p in model.named_parameters() if not n.startswith("_teacher")]
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student_params)
        assert all(p.grad is None for p in teacher.parameters())
        opt.step()
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k])
    assert all(not p.requires_grad for p in teacher.parameters())


def test_layerwise_feeds_teacher_inputs_and_trains_only_paired_layers():
    teacher = TinyMLP(16, 32, 10)
    student = TinyMLP(16, 32, 10)
    model = mtd.convert(
        student,
        mode=[
            (
                "layerwise_kd",
                {"teacher_model": teacher, "criterion": {("fc2", "fc2"): nn.MSELoss()}},
            )
        ],
    )
    x = torch.randn(4, 16)
    model(x)
    teacher_fc2_input = torch.relu(teacher.fc1(x))
    expected = F.mse_loss(student.fc2(teacher_fc2_input), teacher.fc2(teacher_fc2_input))
    loss = model.compute_kd_loss()
    torch.testing.assert_close(loss, expected)
    before = copy.deepcopy(student.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    out = model(x)
    (model.compute_kd_loss() + out.sum()).backward()  # task loss too: still only fc2 may move
    opt.step()
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"fc2.weight", "fc2.bias"}
    mtd.export(model)
    assert all(p.requires_grad for p in student.parameters())
