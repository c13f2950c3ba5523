"""Several named teachers in one criterion (issue 15): convert, forward, losses, training, export.

Every number is checked against separate, hand-written teachers run by hand on the same inputs.
"""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdistill as mtd
from kdistill.testing import TinyCNN

IMAGE = (1, 6, 6)


class FlatMLP(nn.Module):
    """A hand-written teacher of a different architecture: flatten, ``fc``, ``head``."""

    def __init__(self, hidden: int = 24, num_classes: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(36, hidden)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.relu(self.fc(x.flatten(1)))))


def make_teachers(seed: int = 0) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    return {"cnn": TinyCNN(1, 12, 10), "mlp": FlatMLP(24, 10)}


def make_student(seed: int = 1) -> TinyCNN:
    torch.manual_seed(seed)
    return TinyCNN(1, 8, 10)


def images(n: int = 5, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, *IMAGE, generator=torch.Generator().manual_seed(seed))


def criterion() -> dict:
    torch.manual_seed(3)
    return {
        ("", "cnn"): mtd.LogitsDistillationLoss(temperature=2.0),
        ("", "mlp"): mtd.LogitsDistillationLoss(temperature=2.0),
        ("conv2", "cnn.conv2"): mtd.HintLoss(8, 12),
        ("", ("cnn", "mlp")): mtd.EnsembleLogitsDistillationLoss(2.0, weights=[0.7, 0.3]),
    }


def convert(student, teachers, crit=None, **extra):
    config = {
        "teacher_model": teachers,
        "criterion": criterion() if crit is None else crit,
        "loss_balancer": mtd.StaticLossBalancer([0.2, 0.2, 0.1, 0.3]),
        **extra,
    }
    return mtd.convert(student, mode=[("kd_loss", config)])


def conv2_output(cnn: TinyCNN, x: torch.Tensor) -> torch.Tensor:
    """TinyCNN's ``conv2`` output, by hand."""
    return cnn.conv2(torch.relu(cnn.conv1(x)))


# ------------------------------------------------------------------ convert and forward
def test_teacher_model_is_a_module_dict_of_the_named_teachers():
    teachers = make_teachers()
    model = convert(make_student(), dict(teachers))
    container = model.teacher_model
    assert isinstance(container, mtd.TeacherDict) and isinstance(container, nn.ModuleDict)
    assert list(container) == ["cnn", "mlp"]
    assert container["cnn"] is teachers["cnn"] and container["mlp"] is teachers["mlp"]
    assert container.get_submodule("cnn.conv2") is teachers["cnn"].conv2
    assert container.kd_teacher_names == ("cnn", "mlp")
    assert [p.teacher_layer for p in model.kd_pairs] == ["cnn", "mlp", "cnn.conv2", ("cnn", "mlp")]


def test_a_teacher_dict_is_used_as_is():
    teachers = mtd.TeacherDict(make_teachers())
    model = convert(make_student(), teachers)
    assert model.teacher_model is teachers


def test_every_term_equals_the_single_teacher_computation_on_the_same_inputs():
    teachers = make_teachers()
    reference = {name: copy.deepcopy(t) for name, t in teachers.items()}  # separate copies
    student = make_student()
    reference_student = copy.deepcopy(student)
    crit = criterion()
    hint = copy.deepcopy(crit[("conv2", "cnn.conv2")])
    model = convert(student, teachers, crit)
    x = images()
    out = model(x)
    terms = model.compute_kd_loss(skip_balancer=True)

    with torch.no_grad():
        t_cnn, t_mlp = reference["cnn"](x), reference["mlp"](x)
        t_conv2 = conv2_output(reference["cnn"], x)
    s_out = reference_student(x)
    torch.testing.assert_close(out, s_out)
    kd = mtd.LogitsDistillationLoss(temperature=2.0)
    expected = {
        "LogitsDistillationLoss_0": kd(s_out, t_cnn),
        "LogitsDistillationLoss_1": kd(s_out, t_mlp),
        "HintLoss_2": hint(conv2_output(reference_student, x), t_conv2),
        "EnsembleLogitsDistillationLoss_3": mtd.EnsembleLogitsDistillationLoss(2.0, [0.7, 0.3])(
            s_out, (t_cnn, t_mlp)
        ),
    }
    assert list(terms) == list(expected)
    for key, value in expected.items():
        torch.testing.assert_close(terms[key], value, msg=key)


def test_teachers_run_before_the_student_in_eval_mode_without_grad():
    teachers = {"cnn": TinyCNN(1, 12, 10), "mlp": FlatMLP(24, 10, dropout=0.5)}
    student = make_student()
    order: list[tuple[str, bool, bool]] = []

    def record(name):
        def hook(module, args):
            order.append((name, module.training, torch.is_grad_enabled()))

        return hook

    for name, teacher in teachers.items():
        teacher.register_forward_pre_hook(record(name))
    student.conv1.register_forward_pre_hook(record("student"))
    model = convert(student, teachers)
    model.train()
    x = images()
    model(x)
    captured = model.compute_kd_loss(skip_balancer=True)
    assert order == [("cnn", False, False), ("mlp", False, False), ("student", True, True)]
    assert teachers["mlp"].drop.training is False  # dropout off: the teacher's output is stable
    model(x)
    terms = model.compute_kd_loss(skip_balancer=True)
    assert torch.equal(terms["LogitsDistillationLoss_1"], captured["LogitsDistillationLoss_1"])
    assert all(not p.requires_grad for t in teachers.values() for p in t.parameters())


def test_only_teacher_forward_returns_every_teachers_output():
    teachers = make_teachers()
    model = convert(make_student(), teachers).eval()
    x = images()
    with model.only_teacher_forward():
        outputs = model(x)
    assert list(outputs) == ["cnn", "mlp"]
    for name, teacher in teachers.items():
        torch.testing.assert_close(outputs[name], teacher(x).detach())


def test_teachers_weights_are_bit_identical_after_training():
    teachers = make_teachers()
    before = {n: copy.deepcopy(t.state_dict()) for n, t in teachers.items()}
    student = make_student()
    student_before = copy.deepcopy(student.state_dict())
    model = convert(student, teachers)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x, y = images(8), torch.arange(8) % 10
    for _ in range(3):
        out = model(x)
        loss = model.compute_kd_loss(student_loss=F.cross_entropy(out, y))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, teacher in teachers.items():
        assert all(p.grad is None for p in teacher.parameters()), name
        for key, value in teacher.state_dict().items():
            assert torch.equal(value, before[name][key]), (name, key)
    changed = [
        k
        for k, v in mtd.export(model).state_dict().items()
        if not torch.equal(v, student_before[k])
    ]
    assert changed, "the student did not train"


@pytest.mark.parametrize("expose", [True, False], ids=["minimal", "full"])
def test_state_dict_hides_every_teacher_or_shows_them_by_name(expose):
    teachers = make_teachers()
    model = convert(make_student(), teachers, expose_minimal_state_dict=expose)
    keys = list(model.state_dict())
    teacher_keys = sorted(k for k in keys if k.startswith("_teacher_model."))
    if expose:
        assert teacher_keys == []
    else:
        expected = sorted(
            f"_teacher_model.{name}.{key}" for name, t in teachers.items() for key in t.state_dict()
        )
        assert teacher_keys == expected
    assert "_loss_modules.0.projector.weight" in keys  # the HintLoss, as for one teacher
    with model.hide_teacher_model():
        assert not any(k.startswith("_teacher_model") for k in model.state_dict())


def test_export_restores_every_teachers_flags_and_removes_hooks():
    teachers = make_teachers()
    teachers["mlp"].train()
    teachers["cnn"].eval()
    model = convert(make_student(), teachers)
    student = mtd.export(model)
    assert type(student) is TinyCNN
    assert teachers["mlp"].training and not teachers["cnn"].training
    assert all(p.requires_grad for t in teachers.values() for p in t.parameters())
    assert all(not m._forward_hooks for t in teachers.values() for m in t.modules())


def test_pickle_and_deepcopy_of_a_multi_teacher_model():
    model = convert(make_student(), make_teachers())
    x = images()
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert list(clone.teacher_model) == ["cnn", "mlp"]
        clone(x)
        model(x)
        expected = model.compute_kd_loss(skip_balancer=True)
        got = clone.compute_kd_loss(skip_balancer=True)
        for key in expected:
            torch.testing.assert_close(got[key], expected[key])


def test_a_tuple_teacher_side_works_with_one_teacher_too():
    teacher = FlatMLP(24, 10)
    student = make_student()
    reference = copy.deepcopy(student)
    model = mtd.convert(
        student,
        mode=[
            (
                "kd_loss",
                {
                    "teacher_model": teacher,
                    "criterion": {("", ("", "head")): mtd.EnsembleLogitsDistillationLoss()},
                },
            )
        ],
    )
    x = images()
    model(x)
    got = model.compute_kd_loss()
    with torch.no_grad():
        t = teacher(x)
    expected = mtd.LogitsDistillationLoss()(reference(x), t)  # the mixture of t and t is t
    torch.testing.assert_close(got, expected)


def test_missing_captures_of_a_tuple_side_name_the_pair():
    model = convert(make_student(), make_teachers())
    with model.only_student_forward():
        model(images())
    with pytest.raises(RuntimeError, match=r"\('', \('cnn', 'mlp'\)\): teacher"):
        model.compute_kd_loss()


def test_layerwise_kd_with_named_teachers_feeds_a_teachers_layer_inputs():
    torch.manual_seed(0)
    teachers = {"cnn": TinyCNN(1, 8, 10), "mlp": FlatMLP()}  # cnn.conv2 takes 8 channels
    student = make_student()
    reference = copy.deepcopy(student)
    model = mtd.convert(
        student,
        mode=[
            (
                "layerwise_kd",
                {"teacher_model": teachers, "criterion": {("conv2", "cnn.conv2"): nn.MSELoss()}},
            )
        ],
    )
    x = images()
    model(x)
    got = model.compute_kd_loss()
    with torch.no_grad():
        teacher_input = torch.relu(teachers["cnn"].conv1(x))
        expected = F.mse_loss(reference.conv2(teacher_input), teachers["cnn"].conv2(teacher_input))
    torch.testing.assert_close(got, expected)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["conv2.bias", "conv2.weight"]


# ------------------------------------------------------------------ validation
def _convert_error(teachers, crit=None, mode="kd_loss", balancer=None):
    config = {
        "teacher_model": teachers,
        "criterion": crit or {("", "cnn"): mtd.LogitsDistillationLoss()},
    }
    if balancer is not None:
        config["loss_balancer"] = balancer
    student = make_student()
    before = copy.deepcopy(student.state_dict())
    try:
        mtd.convert(student, mode=[(mode, config)])
    except (ValueError, TypeError) as err:
        assert type(student) is TinyCNN and all(
            torch.equal(v, before[k]) for k, v in student.state_dict().items()
        ), "a failed convert changed the student"
        raise err
    raise AssertionError("convert did not fail")


KD = mtd.LogitsDistillationLoss


@pytest.mark.parametrize(
    ("teachers", "crit", "error", "match"),
    [
        ({}, None, ValueError, r"`teacher_model` is an empty dict"),
        ({"a.b": FlatMLP()}, None, ValueError, r"name 'a.b' holds a dot"),
        ({"2nd": FlatMLP()}, None, ValueError, r"name '2nd' is not a Python identifier"),
        ({"": FlatMLP()}, None, ValueError, r"name '' is not a Python identifier"),
        ({"big teacher": FlatMLP()}, None, ValueError, r"'big teacher' is not a Python identifier"),
        ({1: FlatMLP()}, None, TypeError, r"name 1 must be a string, got int"),
        ({"forward": FlatMLP()}, None, ValueError, r"'forward' is an attribute of TeacherDict"),
        ({"keys": FlatMLP()}, None, ValueError, r"'keys' is an attribute of TeacherDict"),
        ({"a" * 129: FlatMLP()}, None, ValueError, r"is longer than 128 characters"),
        ({"cnn": None}, None, TypeError, r"`teacher_model\['cnn'\]` is None"),
        (
            {"cnn": {"x": FlatMLP()}},
            None,
            TypeError,
            r"`teacher_model\['cnn'\]` is a dict of teachers",
        ),
        ({"cnn": 3}, None, TypeError, r"`teacher_model\['cnn'\]` must be an nn.Module, a class"),
        ({"cnn": (FlatMLP, 1)}, None, TypeError, r"`teacher_model\['cnn'\]` tuple must hold"),
        ({"cnn": ()}, None, TypeError, r"`teacher_model\['cnn'\]` tuple must be \(fn,\)"),
    ],
    ids=[
        "empty",
        "dotted",
        "digit-first",
        "empty-name",
        "space",
        "non-string",
        "reserved-forward",
        "reserved-keys",
        "too-long",
        "none-value",
        "nested",
        "not-a-teacher",
        "bad-tuple-args",
        "empty-tuple",
    ],
)
def test_bad_teacher_dicts_are_refused_at_convert(teachers, crit, error, match):
    with pytest.raises(error, match=match):
        _convert_error(teachers, crit)


def test_too_many_teachers_are_refused():
    teachers = {f"t{i}": FlatMLP() for i in range(mtd.teachers.MAX_TEACHERS + 1)}
    with pytest.raises(ValueError, match=r"names 257 teachers; at most 256"):
        _convert_error(teachers)


@pytest.mark.parametrize(
    ("crit", "match"),
    [
        (
            {("", ""): KD()},
            r"Teacher layer '' \(the whole teacher\) is ambiguous with several "
            r"teachers \['cnn', 'mlp'\]: name one teacher \('cnn'\), a layer of one "
            r"\('cnn.<layer>'\), or several as a tuple",
        ),
        (KD(), r"Teacher layer '' \(the whole teacher\) is ambiguous"),
        (
            {("", "cnnn"): KD()},
            r"Unknown teacher 'cnnn'. Did you mean 'cnn'\? Available: \['cnn', 'mlp'\]",
        ),
        (
            {("", "cnn.conv9"): KD()},
            r"Unknown teacher layer 'cnn.conv9'. Did you mean .*'cnn.conv1'.*Available: \['cnn', 'cnn.conv1', 'cnn.conv2', 'cnn.head'\]. It names layer 'conv9' of teacher 'cnn'",
        ),
        ({("", ("cnn", "xyz")): KD()}, r"Unknown teacher 'xyz'"),
        ({("", ("cnn", "")): KD()}, r"Teacher layer '' \(the whole teacher\) is ambiguous"),
        ({("", ("mlp", "mlp")): KD()}, r"names a teacher layer twice"),
        ({("", ()): KD()}, r"teacher_layer may also be a non-empty tuple"),
        ({("", ("cnn", 3)): KD()}, r"teacher_layer may also be a non-empty tuple"),
        ({("nope", "cnn"): KD()}, r"Unknown student layer 'nope'"),
    ],
    ids=[
        "root-root",
        "bare-loss",
        "unknown-teacher",
        "unknown-layer-of-teacher",
        "unknown-in-tuple",
        "root-in-tuple",
        "repeated-in-tuple",
        "empty-tuple",
        "non-string-in-tuple",
        "unknown-student-layer",
    ],
)
def test_bad_criterion_names_are_refused_saying_which_teacher(crit, match):
    with pytest.raises((ValueError, TypeError), match=match):
        _convert_error(make_teachers(), crit)


def test_the_same_module_twice_or_the_student_as_a_teacher_is_refused():
    shared = FlatMLP()
    with pytest.raises(
        ValueError, match=r"`teacher_model\['b'\]` and `teacher_model\['a'\]` are the same"
    ):
        _convert_error({"a": shared, "b": shared}, {("", "a"): KD()})
    student = make_student()
    with pytest.raises(ValueError, match=r"`teacher_model\['me'\]` is the student itself"):
        mtd.convert(
            student,
            mode=[("kd_loss", {"teacher_model": {"me": student}, "criterion": {("", "me"): KD()}})],
        )


def test_a_factory_returning_a_non_module_names_the_teacher():
    with pytest.raises(TypeError, match=r"`teacher_model\['cnn'\]` factory .* returned int"):
        _convert_error({"cnn": lambda: 3})


def test_layerwise_kd_refuses_a_tuple_teacher_side():
    with pytest.raises(ValueError, match=r"'layerwise_kd' feeds one teacher layer's input"):
        _convert_error(
            make_teachers(), {("head", ("cnn.head", "mlp.head")): nn.MSELoss()}, mode="layerwise_kd"
        )


def test_every_problem_is_reported_at_once():
    with pytest.raises(ValueError, match=r"4 problems") as info:
        _convert_error(
            make_teachers(),
            {("", ""): KD(), ("", "cnn.nope"): KD(), ("", "zzz"): KD()},
        )
    message = str(info.value)
    for part in (
        "`criterion` has 3 loss pairs but `loss_balancer` is None",
        "Teacher layer '' (the whole teacher) is ambiguous",
        "Unknown teacher layer 'cnn.nope'",
        "Unknown teacher 'zzz'",
    ):
        assert part in message
    with pytest.raises(ValueError, match=r"2 problems:\n  - `teacher_model` name 'a.b'"):
        _convert_error({"a.b": FlatMLP()}, {("", "a"): KD(), ("", "b"): KD()})
