"""convert / export: accepted mode forms, the generated class, validation and atomicity."""

import copy
import functools
import inspect
import pickle

import pytest
import torch
from torch import nn

import kdistill as mtd
from kdistill.testing import TinyMLP, tiny_mlp


class KeywordStudent(nn.Module):
    """A student whose forward has a distinctive signature."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 3)

    def forward(self, input_ids: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.proj(input_ids) * scale


def make_teacher() -> nn.Module:
    return TinyMLP(16, 64, 10)


def returns_int() -> int:
    return 3


def raising_factory() -> nn.Module:
    raise OSError("teacher weights not found at /nowhere")


def kd_config(**overrides):
    config = {"teacher_model": make_teacher(), "criterion": mtd.LogitsDistillationLoss()}
    config.update(overrides)
    return config


def snapshot(model: nn.Module):
    """Everything a failed convert must leave unchanged."""
    return (
        type(model),
        {k: v.clone() for k, v in model.state_dict().items()},
        {name: dict(m._forward_hooks) for name, m in model.named_modules()},
        {name: p.requires_grad for name, p in model.named_parameters()},
        {name: m.training for name, m in model.named_modules()},
        sorted(model.__dict__),
    )


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after[0] is before[0]
    assert after[1].keys() == before[1].keys()
    assert all(torch.equal(after[1][k], before[1][k]) for k in before[1])
    assert after[2:] == before[2:]


@pytest.mark.parametrize(
    "form",
    [
        lambda cfg: [("kd_loss", cfg)],
        lambda cfg: ("kd_loss", cfg),
        lambda cfg: {"kd_loss": cfg},
        lambda cfg: [("kd_loss", mtd.KDLossConfig(**cfg))],
    ],
    ids=["list", "tuple", "dict", "config_object"],
)
def test_accepted_mode_forms(form):
    student = TinyMLP()
    model = mtd.convert(student, mode=form(kd_config()))
    assert model is student
    assert isinstance(model, TinyMLP) and isinstance(model, mtd.DistillationModel)
    assert type(model) is not TinyMLP


def test_forward_signature_is_the_students_and_not_shared():
    model = mtd.convert(
        KeywordStudent(), mode=[("kd_loss", kd_config(teacher_model=KeywordStudent()))]
    )
    assert inspect.signature(type(model).forward) == inspect.signature(KeywordStudent.forward)
    assert list(inspect.signature(model.forward).parameters) == ["input_ids", "scale"]
    other = mtd.convert(TinyMLP(), mode=[("kd_loss", kd_config())])
    assert type(other).forward is not type(model).forward
    assert inspect.signature(mtd.DistillationModel.forward) != inspect.signature(
        KeywordStudent.forward
    )


def test_same_student_class_reuses_generated_class():
    a = mtd.convert(TinyMLP(), mode=[("kd_loss", kd_config())])
    b = mtd.convert(TinyMLP(), mode=[("kd_loss", kd_config())])
    assert type(a) is type(b)


@pytest.mark.parametrize(
    "copier", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))], ids=["deepcopy", "pickle"]
)
def test_pickle_and_deepcopy(copier):
    model = mtd.convert(TinyMLP(), mode=[("kd_loss", kd_config())])
    x = torch.randn(3, 16)
    model(x)  # captured tensors must not be copied along
    clone = copier(model)
    assert type(clone) is type(model) and clone is not model
    assert clone.teacher_model is not model.teacher_model
    torch.testing.assert_close(clone(x), model(x))
    assert clone.compute_kd_loss().item() == pytest.approx(model.compute_kd_loss().item())
    mtd.export(clone)
    assert type(clone) is TinyMLP
    assert all(not m._forward_hooks for m in clone.modules())


def test_sequential_student_forward_and_container_behaviour():
    student = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    teacher = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    reference = copy.deepcopy(student)
    model = mtd.convert(
        student,
        mode=[("kd_loss", {"teacher_model": teacher, "criterion": mtd.LogitsDistillationLoss()})],
    )
    x = torch.randn(5, 4)
    torch.testing.assert_close(model(x), reference(x))
    assert len(model) == 3 and isinstance(model[-1], nn.Linear) and len(list(model)) == 3
    expected = mtd.LogitsDistillationLoss()(reference(x), teacher(x))
    torch.testing.assert_close(model.compute_kd_loss(), expected)


def test_teacher_instance_used_as_is_and_factories():
    teacher = make_teacher()
    model = mtd.convert(TinyMLP(), mode=[("kd_loss", kd_config(teacher_model=teacher))])
    assert model.teacher_model is teacher
    for spec in [
        make_teacher,
        TinyMLP,
        (tiny_mlp,),
        (tiny_mlp, (16, 8)),
        (tiny_mlp, (), {"hidden": 8}),
    ]:
        model = mtd.convert(TinyMLP(), mode=[("kd_loss", kd_config(teacher_model=spec))])
        assert isinstance(model.teacher_model, TinyMLP)
    assert model.teacher_model.fc1.out_features == 8


def test_mode_name_alone_for_all_default_config():
    model = mtd.convert(TinyMLP(), mode=[("kd_loss", kd_config())])
    plain = mtd.convert(model, mode="export_student")
    assert type(plain) is TinyMLP


def test_export_returns_plain_student_without_extras():
    student = TinyMLP()
    before = set(student.__dict__)
    reference = copy.deepcopy(student)
    criterion = {("fc2", "fc2"): nn.MSELoss(), ("", ""): mtd.LogitsDistillationLoss()}
    model = mtd.convert(
        student,
        mode=[
            (
                "kd_loss",
                kd_config(
                    criterion=criterion,
                    loss_balancer=mtd.StaticLossBalancer([0.3, 0.3]),
                    teacher_model=TinyMLP(16, 32, 10),
                ),
            )
        ],
    )
    x = torch.randn(2, 16)
    model(x)
    exported = mtd.export(model)
    assert exported is student and type(exported) is TinyMLP
    assert set(exported.__dict__) == before
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in exported.modules())
    assert not any(k.startswith(("_teacher_model", "_loss_modules")) for k in exported.state_dict())
    torch.testing.assert_close(exported(x), reference(x))


def test_export_of_plain_model_raises():
    with pytest.raises(RuntimeError, match="export expects a DistillationModel"):
        mtd.export(TinyMLP())


def test_layer_pairs_capture_intermediate_outputs():
    teacher = TinyMLP(16, 32, 10)
    model = mtd.convert(
        TinyMLP(),
        mode=[
            ("kd_loss", kd_config(teacher_model=teacher, criterion={("fc1", "fc1"): nn.MSELoss()}))
        ],
    )
    x = torch.randn(4, 16)
    model(x)
    expected = nn.functional.mse_loss(model.fc1(x), teacher.fc1(x))
    torch.testing.assert_close(model.compute_kd_loss(), expected)


# ----------------------------------------------------------------------------- validation
VALIDATION_CASES = [
    ({"teacher_model": None}, ValueError, "missing required field `teacher_model`"),
    ({"criterion": None}, ValueError, "missing required field `criterion`"),
    ({"temperature": 2.0}, ValueError, "Unknown config key 'temperature'"),
    ({"teacher_model": 42}, TypeError, "`teacher_model` must be"),
    ({"teacher_model": returns_int}, TypeError, "returned int, expected an nn.Module"),
    ({"teacher_model": (make_teacher, 1, 2, 3)}, TypeError, "tuple must be"),
    ({"criterion": "kl"}, TypeError, "`criterion` must be an nn.Module"),
    ({"criterion": {("fc1", "fc1"): "mse"}}, TypeError, "must be an nn.Module loss, got str"),
    ({"criterion": {("fc1", "fc1"): nn.MSELoss}}, TypeError, "Instantiate it"),
    ({"criterion": {"fc1": nn.MSELoss()}}, TypeError, "tuple of strings"),
    ({"criterion": {}}, ValueError, "`criterion` is empty"),
    (
        {"criterion": {("fc3", "fc1"): nn.MSELoss()}},
        ValueError,
        "Unknown student layer 'fc3'.*'fc1'",
    ),
    ({"criterion": {("fc1", "fc9"): nn.MSELoss()}}, ValueError, "Unknown teacher layer 'fc9'"),
    ({"loss_balancer": "static"}, TypeError, "DistillationLossBalancer instance"),
    (
        {"criterion": {("fc1", "fc1"): nn.MSELoss(), ("", ""): nn.MSELoss()}},
        ValueError,
        "2 loss pairs but `loss_balancer` is None",
    ),
    (
        {
            "criterion": {("fc1", "fc1"): nn.MSELoss(), ("", ""): nn.MSELoss()},
            "loss_balancer": mtd.StaticLossBalancer([0.5]),
        },
        ValueError,
        "1 weight.*2 loss pair",
    ),
    ({"expose_minimal_state_dict": "yes"}, TypeError, "must be a bool"),
]


@pytest.mark.parametrize(
    ("overrides", "error", "match"), VALIDATION_CASES, ids=[c[2][:30] for c in VALIDATION_CASES]
)
def test_validation_errors_leave_student_untouched(overrides, error, match):
    student = TinyMLP()
    before = snapshot(student)
    with pytest.raises(error, match=match):
        mtd.convert(student, mode=[("kd_loss", kd_config(**overrides))])
    assert_unchanged(student, before)


class ParamBalancer(mtd.DistillationLossBalancer):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, loss_dict):
        return sum(loss_dict.values()) * self.w


def test_balancer_with_parameters_is_rejected():
    with pytest.raises(ValueError, match="has parameters"):
        mtd.convert(TinyMLP(), mode=[("kd_loss", kd_config(loss_balancer=ParamBalancer()))])


def test_all_problems_reported_at_once():
    with pytest.raises(ValueError, match=r"3 problems") as info:
        mtd.convert(
            TinyMLP(), mode=[("kd_loss", {"teacher_model": None, "criterion": None, "x": 1})]
        )
    assert "teacher_model" in str(info.value) and "criterion" in str(info.value)


def test_key_balancer_and_layer_problems_reported_in_one_pass():
    student = TinyMLP()
    before = snapshot(student)
    config = kd_config(
        temprature=2.0,
        criterion={("fc_1", "fc1"): nn.MSELoss(), ("fc2", "haed"): nn.MSELoss()},
    )
    with pytest.raises(ValueError, match="4 problems") as info:
        mtd.convert(student, mode=[("kd_loss", config)])
    message = str(info.value)
    for part in [
        "Unknown config key 'temprature'",
        "2 loss pairs but `loss_balancer` is None",
        "Unknown student layer 'fc_1'. Did you mean 'fc1'",
        "Unknown teacher layer 'haed'. Did you mean 'head'",
    ]:
        assert part in message, part
    assert_unchanged(student, before)


def test_factory_exception_propagates_and_student_untouched():
    student = TinyMLP()
    before = snapshot(student)
    with pytest.raises(OSError, match="teacher weights not found"):
        mtd.convert(student, mode=[("kd_loss", kd_config(teacher_model=raising_factory))])
    assert_unchanged(student, before)


def test_any_callable_teacher_is_accepted_and_saved_as_must_pass(tmp_path):
    class LocalTeacher(TinyMLP):
        pass

    def local_factory(hidden=8):
        return TinyMLP(hidden=hidden)

    for teacher, cls in [
        (LocalTeacher, LocalTeacher),
        (local_factory, TinyMLP),
        (functools.partial(local_factory, hidden=4), TinyMLP),
        (lambda: TinyMLP(hidden=2), TinyMLP),
        ((local_factory, (), {"hidden": torch.tensor(3)}), TinyMLP),  # non-JSON argument
    ]:
        model = mtd.convert(TinyMLP(), mode=[("kd_loss", kd_config(teacher_model=teacher))])
        assert type(model.teacher_model) is cls
        mtd.save(model, tmp_path / "c.pt")  # never fails because of the teacher
        record = torch.load(tmp_path / "c.pt", weights_only=True)["kdistill_state"]
        assert record["modes"][0]["config"]["teacher_model"]["kind"] == "unrecorded"
        if cls is TinyMLP:  # (an instance of a local class cannot be pickled at all)
            pickle.dumps(model)  # the model keeps no reference to the factory


def test_several_modes_in_one_call_are_refused_before_anything_changes():
    student = TinyMLP()
    before = snapshot(student)
    for mode in (
        [("kd_loss", kd_config()), ("kd_loss", kd_config())],
        [("kd_loss", kd_config()), ("layerwise_kd", kd_config())],
        {"kd_loss": kd_config(), "export_student": None},
    ):
        with pytest.raises(ValueError, match="one mode per call"):
            mtd.convert(student, mode=mode)
        assert_unchanged(student, before)
    with pytest.raises(ValueError, match=r"\['kd_loss'\] listed twice"):
        mtd.convert(student, mode=[("kd_loss", kd_config()), ("kd_loss", kd_config())])


@pytest.mark.parametrize(
    ("mode", "error", "match"),
    [
        ("kd_los", ValueError, "Unknown mode 'kd_los'. Did you mean 'kd_loss'"),
        ([("distill", {})], ValueError, "Unknown mode 'distill'"),
        (42, TypeError, "`mode` must be"),
        ([], ValueError, "`mode` is empty"),
        ([("export_student", {"a": 1})], ValueError, "takes no config keys"),
    ],
    ids=["typo", "unknown", "type", "empty", "export_keys"],
)
def test_bad_modes(mode, error, match):
    with pytest.raises(error, match=match):
        mtd.convert(TinyMLP(), mode=mode)


def test_kd_loss_name_alone_reports_missing_fields():
    with pytest.raises(ValueError, match="missing required field"):
        mtd.convert(TinyMLP(), mode="kd_loss")


def test_converting_twice_raises_and_keeps_model():
    model = mtd.convert(TinyMLP(), mode=[("kd_loss", kd_config())])
    teacher = model.teacher_model
    with pytest.raises(RuntimeError, match="already a DistillationModel"):
        mtd.convert(model, mode=[("kd_loss", kd_config())])
    assert model.teacher_model is teacher


def test_non_module_model_raises():
    with pytest.raises(TypeError, match=r"nn\.Module"):
        mtd.convert("model", mode=[("kd_loss", kd_config())])


def test_failure_during_set_up_leaves_no_hooks(monkeypatch):
    import kdistill.model as model_module

    calls = []
    original = model_module._accepted_kwargs

    def fail_on_second(fn):
        calls.append(fn)
        if len(calls) == 2:
            raise RuntimeError("simulated failure while hooking the second pair")
        return original(fn)

    monkeypatch.setattr(model_module, "_accepted_kwargs", fail_on_second)
    student, teacher = TinyMLP(), make_teacher()
    before = snapshot(student)
    with pytest.raises(RuntimeError, match="simulated failure"):
        mtd.convert(
            student,
            mode=[
                (
                    "kd_loss",
                    kd_config(
                        teacher_model=teacher,
                        criterion={("fc1", "fc1"): nn.MSELoss(), ("fc2", "fc2"): nn.MSELoss()},
                        loss_balancer=mtd.StaticLossBalancer([0.5, 0.5]),
                    ),
                )
            ],
        )
    assert_unchanged(student, before)
    assert all(not m._forward_hooks for m in teacher.modules())
    assert all(p.requires_grad for p in teacher.parameters())


def test_loss_with_builtin_forward_gets_no_keywords():
    class BuiltinForward(nn.Module):
        forward = staticmethod(torch.sub)

    model = mtd.convert(
        TinyMLP(),
        mode=[("kd_loss", kd_config(teacher_model=TinyMLP(), criterion=BuiltinForward()))],
    )
    x = torch.randn(2, 16)
    out = model(x)
    torch.testing.assert_close(model.compute_kd_loss(), out - model.teacher_model(x))
