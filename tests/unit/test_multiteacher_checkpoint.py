"""save / restore of several named teachers: per-teacher records, overrides, the plain fallback."""

import copy
import json

import pytest
import torch
from torch import nn

import kdistill as mto
from kdistill.testing import TinyCNN

CALLS: list[str] = []


class FlatMLP(nn.Module):
    """A hand-written teacher: flatten, ``fc``, ``head``."""

    def __init__(self, hidden: int = 24) -> None:
        super().__init__()
        self.fc = nn.Linear(36, hidden)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(x.flatten(1))))


def make_cnn(channels: int = 12) -> nn.Module:
    """Module-level factory (restorable by name); seeded so every call builds the same weights."""
    CALLS.append("cnn")
    torch.manual_seed(11)
    return TinyCNN(1, channels, 10)


def make_mlp(hidden: int = 24) -> nn.Module:
    """Module-level factory (restorable by name)."""
    CALLS.append("mlp")
    torch.manual_seed(12)
    return FlatMLP(hidden)


@pytest.fixture(autouse=True)
def _allow_list():
    CALLS.clear()
    yield
    mto.clear_safe_factories()


def criterion() -> dict:
    torch.manual_seed(3)
    return {
        ("", "cnn"): mto.LogitsDistillationLoss(temperature=2.0),
        ("conv2", "cnn.conv2"): mto.HintLoss(8, 12),
        ("", ("cnn", "mlp")): mto.EnsembleLogitsDistillationLoss(2.0, [0.6, 0.4], "losses"),
    }


def converted(teachers=None, expose=True) -> mto.DistillationModel:
    torch.manual_seed(1)
    config = {
        "teacher_model": teachers
        if teachers is not None
        else {"cnn": (make_cnn, (12,)), "mlp": (make_mlp, (), {"hidden": 24})},
        "criterion": criterion(),
        "loss_balancer": mto.StaticLossBalancer([0.3, 0.3, 0.4]),
        "expose_minimal_state_dict": expose,
    }
    model = mto.convert(TinyCNN(1, 8, 10), mode=[("kd_loss", config)])
    with torch.no_grad():  # trained-looking weights, so a restore that loses them shows
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1)
    return model


def images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 1, 6, 6, generator=torch.Generator().manual_seed(5))


def assert_same_model(restored: mto.DistillationModel, model: mto.DistillationModel) -> None:
    assert list(restored.state_dict()) == list(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    assert list(restored.teacher_model) == list(model.teacher_model)
    x = images()
    restored.eval()
    model.eval()
    assert torch.equal(restored(x), model(x))
    expected = model.compute_kd_loss(skip_balancer=True)
    got = restored.compute_kd_loss(skip_balancer=True)
    assert list(got) == list(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_each_teacher_is_recorded_as_a_single_teacher_is(tmp_path):
    instance = FlatMLP()
    model = converted({"cnn": (make_cnn, (12,)), "mlp": instance, "local": lambda: FlatMLP()})
    state = mto.mode_state(model)
    config = state["modes"][0]["config"]
    teachers = config["teacher_model"]
    assert teachers["kind"] == "dict" and list(teachers["teachers"]) == ["cnn", "mlp", "local"]
    cnn, mlp, local = teachers["teachers"].values()
    assert cnn == {
        "kind": "factory",
        "module": __name__,
        "qualname": "make_cnn",
        "args": [12],
        "kwargs": {},
    }
    assert mlp == {"kind": "instance", "class": "FlatMLP"}
    assert local["kind"] == "unrecorded"
    assert [p["teacher_layer"] for p in config["criterion"]] == ["cnn", "cnn.conv2", ["cnn", "mlp"]]
    assert json.loads(json.dumps(state)) == state
    mto.save(model, tmp_path / "ckpt.pt")  # save never fails because of a teacher


@pytest.mark.parametrize("expose", [True, False], ids=["minimal", "full"])
def test_round_trip_with_allowed_factories(tmp_path, expose):
    model = converted(expose=expose)
    path = tmp_path / "ckpt.pt"
    mto.save(model, path)
    saved = torch.load(path, weights_only=True)["model_state_dict"]
    assert not any(k.startswith("_teacher_model") for k in saved)  # never the teachers' weights
    mto.add_safe_factories([make_cnn, make_mlp])
    CALLS.clear()
    restored = mto.restore(TinyCNN(1, 8, 10), path)
    assert CALLS == ["cnn", "mlp"]
    assert isinstance(restored, mto.DistillationModel)
    assert restored.expose_minimal_state_dict is expose
    assert_same_model(restored, model)


def test_round_trip_with_the_same_dict_passed_at_restore(tmp_path):
    model = converted()
    path = tmp_path / "ckpt.pt"
    mto.save(model, path)
    teachers = {"mlp": make_mlp(), "cnn": make_cnn()}  # any order: the recorded one is kept
    CALLS.clear()
    restored = mto.restore(TinyCNN(1, 8, 10), path, teacher_model=teachers)
    assert CALLS == []  # nothing allowed, nothing called
    assert list(restored.teacher_model) == ["cnn", "mlp"]
    assert restored.teacher_model["mlp"] is teachers["mlp"]
    assert_same_model(restored, model)


def test_a_subset_overrides_some_teachers_and_the_others_come_from_allowed_factories(tmp_path):
    model = converted()
    path = tmp_path / "ckpt.pt"
    mto.save(model, path)
    mto.add_safe_factories([make_cnn])  # not make_mlp: its teacher must be passed
    override = make_mlp()
    CALLS.clear()
    restored = mto.restore(TinyCNN(1, 8, 10), path, teacher_model={"mlp": override})
    assert CALLS == ["cnn"]
    assert restored.teacher_model["mlp"] is override
    assert_same_model(restored, model)


def test_a_teacher_dict_passed_at_restore_works_like_its_dict(tmp_path):
    model = converted()
    path = tmp_path / "ckpt.pt"
    mto.save(model, path)
    teachers = mto.TeacherDict({"cnn": make_cnn(), "mlp": make_mlp()})
    restored = mto.restore(TinyCNN(1, 8, 10), path, teacher_model=teachers)
    assert restored.teacher_model["cnn"] is teachers["cnn"]
    assert_same_model(restored, model)


def test_any_teacher_that_cannot_be_rebuilt_gives_the_plain_student_and_a_warning(tmp_path):
    model = converted({"cnn": (make_cnn, (12,)), "mlp": FlatMLP()})
    path = tmp_path / "ckpt.pt"
    mto.save(model, path)
    mto.add_safe_factories([make_cnn])
    student = TinyCNN(1, 8, 10)
    CALLS.clear()
    with pytest.warns(UserWarning, match="was not restored") as caught:
        restored = mto.restore(student, path)
    assert restored is student and type(restored) is TinyCNN
    assert CALLS == []  # nothing is called when the distillation state is not restored
    message = str(caught[0].message)
    assert str(path) in message
    assert "teachers ['cnn', 'mlp']" in message
    assert "teacher 'mlp' cannot be rebuilt: the teacher was an nn.Module instance" in message
    assert "teacher 'cnn' cannot be rebuilt" not in message  # its factory is allowed
    assert "teacher_model={'cnn': ..., 'mlp': ...}) (all or some of them)" in message
    with model.as_student():
        expected = model.state_dict()
    for key, value in restored.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_the_warning_names_the_factories_still_to_allow(tmp_path):
    model = converted()
    path = tmp_path / "ckpt.pt"
    mto.save(model, path)
    mto.add_safe_factories([make_cnn])
    with pytest.warns(UserWarning, match=r"teacher 'mlp' cannot be rebuilt: its teacher factory"):
        mto.restore(TinyCNN(1, 8, 10), path)
    with pytest.warns(UserWarning, match=rf"add_safe_factories\(\[{__name__}.make_mlp\]\)"):
        mto.restore(TinyCNN(1, 8, 10), path)


@pytest.mark.parametrize(
    ("teacher_model", "error", "match"),
    [
        (
            {"cnn": make_cnn, "big": make_mlp},
            ValueError,
            r"Unknown teacher in `teacher_model` 'big'",
        ),
        (FlatMLP(), TypeError, r"holds the teachers \['cnn', 'mlp'\]: pass teacher_model=\{name"),
        (make_mlp, TypeError, r"holds the teachers \['cnn', 'mlp'\]"),
    ],
    ids=["unknown-name", "one-module", "one-factory"],
)
def test_wrong_teacher_model_at_restore_is_a_typed_error_and_changes_nothing(
    tmp_path, teacher_model, error, match
):
    model = converted()
    path = tmp_path / "ckpt.pt"
    mto.save(model, path)
    student = TinyCNN(1, 8, 10)
    before = copy.deepcopy(student.state_dict())
    with pytest.raises(error, match=match) as info:
        mto.restore(student, path, teacher_model=teacher_model)
    assert str(path) in str(info.value)
    assert type(student) is TinyCNN
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())


def test_a_dict_for_a_one_teacher_checkpoint_is_checked_like_convert(tmp_path):
    model = mto.convert(
        TinyCNN(1, 8, 10),
        mode=[
            ("kd_loss", {"teacher_model": make_cnn(), "criterion": mto.LogitsDistillationLoss()})
        ],
    )
    path = tmp_path / "ckpt.pt"
    mto.save(model, path)
    student = TinyCNN(1, 8, 10)
    with pytest.raises(ValueError, match=r"ckpt.pt: .*Teacher layer '' \(the whole teacher\) is"):
        mto.restore(student, path, teacher_model={"cnn": make_cnn()})
    assert type(student) is TinyCNN


def test_restore_from_mode_state_with_several_teachers():
    model = converted()
    mto.add_safe_factories([make_cnn, make_mlp])
    restored = mto.restore_from_mode_state(TinyCNN(1, 8, 10), mto.mode_state(model))
    assert list(restored.teacher_model) == ["cnn", "mlp"]
    assert [p.teacher_layer for p in restored.kd_pairs] == ["cnn", "cnn.conv2", ("cnn", "mlp")]
