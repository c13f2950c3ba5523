"""DistillationModel behaviour: teacher handling, compute_kd_loss, contexts, state dicts."""

import copy
import gc
import warnings
import weakref

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
    assert model.kd_pairs[2].loss.kwargs.keys() == {"labels"}


def test_unknown_kwarg_raises():
    model = convert()
    model(torch.randn(2, 16))
    with pytest.raises(TypeError, match=r"\['labls'\] that no loss accepts"):
        model.compute_kd_loss(labls=torch.zeros(2))


def test_nothing_captured_raises_and_captures_are_released():
    model = convert(criterion={("fc1", "fc1"): nn.MSELoss()})
    with pytest.raises(RuntimeError, match="Run a forward pass"):
        model.compute_kd_loss()
    outputs = []
    model.fc1.register_forward_hook(lambda m, i, o: outputs.append(weakref.ref(o)))
    model.teacher_model.fc1.register_forward_hook(lambda m, i, o: outputs.append(weakref.ref(o)))
    model(torch.randn(2, 16))
    model.compute_kd_loss()
    gc.collect()
    assert len(outputs) == 2 and all(ref() is None for ref in outputs), "captures kept alive"
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
    teacher_runs = []
    model.teacher_model.register_forward_hook(lambda *_: teacher_runs.append(1))
    x = torch.randn(2, 16)
    with model.only_student_forward():
        with model.only_student_forward(enable=False):
            model(x)  # the outer context still holds
        assert teacher_runs == []
        with pytest.raises(ValueError, match="inside"), model.only_teacher_forward():
            raise ValueError("inside")
        model(x)  # only_teacher_forward ended with the exception: the student runs, alone
        assert teacher_runs == []
    model(x)
    assert teacher_runs == [1]


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


# ----------------------------------------------------------------------------- failed forwards
def _fail_when(flag: list[bool]):
    def hook(module, args):
        if flag[0]:
            raise RuntimeError("simulated out of memory")

    return hook


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_failed_forward_clears_every_capture(side):
    model = convert(
        criterion={("fc1", "fc1"): nn.MSELoss(), ("", ""): nn.MSELoss()},
        loss_balancer=mtd.StaticLossBalancer([0.5, 0.5]),
    )
    failing = model.fc2 if side == "student" else model.teacher_model.fc2
    flag = [False]
    failing.register_forward_pre_hook(_fail_when(flag))
    captured = []
    model.fc1.register_forward_hook(lambda m, i, o: captured.append(weakref.ref(o)))
    model(torch.randn(2, 16))  # a complete forward whose outputs are not consumed
    flag[0] = True
    with pytest.raises(RuntimeError, match="simulated out of memory"):
        model(torch.randn(2, 16))
    gc.collect()
    assert all(ref() is None for ref in captured), "a failed forward must free the captures"
    with pytest.raises(RuntimeError, match="No captured output"):
        model.compute_kd_loss()  # never student(x1) against teacher(x2)
    flag[0] = False
    x = torch.randn(3, 16)
    out = model(x)
    expected = 0.5 * F.mse_loss(model.fc1(x), model.teacher_model.fc1(x)) + 0.5 * F.mse_loss(
        out, model.teacher_model(x)
    )
    torch.testing.assert_close(model.compute_kd_loss(), expected)


# ----------------------------------------------------------------------------- warnings
def test_overwritten_capture_warns_once_per_hooked_module_in_training_only():
    model = convert(
        criterion={
            ("", ""): nn.MSELoss(),
            ("fc1", "fc1"): nn.MSELoss(),
            ("fc1", "fc2"): nn.MSELoss(),
        },
        loss_balancer=mtd.StaticLossBalancer([0.3, 0.3, 0.4]),
    )
    x = torch.randn(2, 16)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)
        model(x)  # evaluation loops need no compute_kd_loss: silent
    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            model(x)
    messages = sorted(str(w.message).split(":")[0] for w in caught)
    # one per hooked module and side: student '' and fc1, teacher '', fc1 and fc2
    assert messages == [
        "Student layer '' (the model's output)",
        "Student layer 'fc1'",
        "Teacher layer '' (the model's output)",
        "Teacher layer 'fc1'",
        "Teacher layer 'fc2'",
    ]
    model.compute_kd_loss()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)
        model.compute_kd_loss()


def test_layerwise_without_teacher_inputs_warns_in_training():
    model = mtd.convert(
        TinyMLP(),
        mode=[
            (
                "layerwise_kd",
                {"teacher_model": TinyMLP(), "criterion": {("fc2", "fc2"): nn.MSELoss()}},
            )
        ],
    )
    x = torch.randn(2, 16)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with model.only_student_forward():
            model(x)  # evaluating the student alone is legitimate
    model.train()
    with (
        pytest.warns(UserWarning, match="'fc2' has no intermediate input stored for student layer"),
        model.only_student_forward(),
    ):
        out = model(x)
    torch.testing.assert_close(out, TinyMLP.forward(model, x))  # ran on its own inputs


# ----------------------------------------------------------------------------- shared modules
class SharesFirstLayer(nn.Module):
    def __init__(self, shared: nn.Linear) -> None:
        super().__init__()
        self.embed = shared
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        return self.out(self.drop(torch.relu(self.embed(x))))


def test_shared_modules_warn_and_stay_trainable_also_after_export():
    student = TinyMLP()
    teacher = SharesFirstLayer(student.fc1)
    with pytest.warns(UserWarning, match=r"shares modules/parameters 'embed'"):
        model = convert(student, teacher_model=teacher, loss_balancer=mtd.StaticLossBalancer(0.5))
    assert all(p.requires_grad for p in student.fc1.parameters()), "the student's own layer"
    assert not any(p.requires_grad for p in teacher.out.parameters())
    model.train()
    assert student.fc1.training and not teacher.out.training and not teacher.drop.training
    x, y = torch.randn(4, 16), torch.randint(0, 10, (4,))
    out = model(x)
    model.compute_kd_loss(student_loss=F.cross_entropy(out, y)).backward()
    assert student.fc1.weight.grad is not None and teacher.out.weight.grad is None
    mtd.export(model)
    assert all(p.requires_grad for p in student.parameters())
    assert all(p.requires_grad for p in teacher.parameters()), "export restores the teacher"
    assert teacher.training and teacher.out.training  # as before convert


def test_user_frozen_shared_module_stays_frozen():
    student = TinyMLP()
    student.fc1.requires_grad_(False)
    teacher = SharesFirstLayer(student.fc1)
    with pytest.warns(UserWarning, match="shares"):
        model = convert(student, teacher_model=teacher)
    assert not any(p.requires_grad for p in student.fc1.parameters())
    mtd.export(model)
    assert not any(p.requires_grad for p in student.fc1.parameters())


def test_export_restores_teacher_flags_convert_changed():
    teacher = TinyMLP()
    teacher.head.requires_grad_(False)  # the user's own choice survives
    teacher.fc2.eval()
    flags = (
        {n: p.requires_grad for n, p in teacher.named_parameters()},
        {n: m.training for n, m in teacher.named_modules()},
    )
    model = convert(teacher_model=teacher)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    mtd.export(model)
    assert (
        {n: p.requires_grad for n, p in teacher.named_parameters()},
        {n: m.training for n, m in teacher.named_modules()},
    ) == flags


# ----------------------------------------------------------------------------- inner API
def test_inner_api_for_integrations():
    student = TinyMLP()
    criterion = {("fc1", "fc1"): nn.MSELoss(), ("", ""): LabelledLoss()}
    model = convert(student, criterion=criterion, loss_balancer=mtd.StaticLossBalancer([0.5, 0.5]))
    assert model.original_cls is TinyMLP and type(model).original_cls is TinyMLP
    assert [(p.student_layer, p.teacher_layer, p.key) for p in model.kd_pairs] == [
        ("fc1", "fc1", "MSELoss_0"),
        ("", "", "LabelledLoss_1"),
    ]
    assert model.kd_pairs[1].loss is criterion[("", "")]
    assert model.accepted_loss_kwargs({"labels": 1, "mask": 2}) == {"labels": 1}
    assert [name for name, _ in model.kd_modes] == ["kd_loss"]
    assert model.expose_minimal_state_dict is True
    with model.as_student() as plain:
        assert type(plain) is TinyMLP and plain is model
        assert set(plain.state_dict()) == set(TinyMLP().state_dict())
    assert isinstance(model, mtd.DistillationModel) and "_teacher_model" in model._modules
    model.double()
    model.teacher_model.float()
    model.align_teacher_()
    assert model.teacher_model.fc1.weight.dtype == torch.float64


def test_generated_classes_are_cached_weakly():
    def make():
        class Local(TinyMLP):
            pass

        return Local

    cls = make()
    a, b = convert(cls()), convert(cls())
    assert type(a) is type(b)
    ref = weakref.ref(cls)
    mtd.export(a), mtd.export(b)
    del a, b, cls
    gc.collect()
    assert ref() is None, "kdistill must not keep converted classes alive"


class RecordingTeacher(TinyMLP):
    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.calls: list = []
        self.fail = fail

    def set_kd_uses_(self, uses):
        if self.fail:
            raise ValueError("this teacher cannot serve these layers")
        self.calls.append(uses)


def test_teacher_protocol_receives_the_layers_read():
    teacher = RecordingTeacher()
    model = mtd.convert(
        TinyMLP(),
        mode=[
            (
                "layerwise_kd",
                {"teacher_model": teacher, "criterion": {("fc2", "fc2"): nn.MSELoss()}},
            )
        ],
    )
    assert teacher.calls == [{"fc2": frozenset({"output", "inputs"})}]
    mtd.export(model)
    model = convert(teacher_model=teacher)
    assert teacher.calls[1:] == [None, {"": frozenset({"output"})}]
    student = TinyMLP()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(ValueError, match="cannot serve"):
        convert(student, teacher_model=RecordingTeacher(fail=True))
    assert type(student) is TinyMLP and not any(m._forward_hooks for m in student.modules())
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
