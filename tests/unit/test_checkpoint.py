"""save / restore / mode_state: round trips, safety rules and error handling."""

import functools
import json
import os
import stat
import subprocess
import sys
import textwrap
import types

import pytest
import torch
from torch import nn

import kdistill as mto
from kdistill.testing import TinyCNN, TinyMLP, tiny_mlp

FACTORY_CALLS: list[tuple] = []


def make_teacher(hidden: int = 32) -> nn.Module:
    """A module-level teacher factory (restorable by name)."""
    FACTORY_CALLS.append((hidden,))
    torch.manual_seed(123)
    return TinyMLP(16, hidden, 10)


class NotALoss(nn.Module):
    def forward(self, student, teacher):
        return (student - teacher).abs().mean()


@pytest.fixture(autouse=True)
def allow_make_teacher():
    """The allow-list holds make_teacher during each test, and nothing after it."""
    mto.add_safe_factories([make_teacher])
    yield
    mto.clear_safe_factories()


def converted(teacher=(make_teacher, (32,)), **config):
    config.setdefault(
        "criterion",
        {("fc2", "fc2"): nn.MSELoss(), ("", ""): mto.LogitsDistillationLoss(3.0, reduction="sum")},
    )
    config.setdefault("loss_balancer", mto.StaticLossBalancer([0.25, 0.5]))
    return mto.convert(TinyMLP(), mode=[("kd_loss", {"teacher_model": teacher, **config})])


def test_round_trip_gives_identical_outputs_losses_and_keys(tmp_path):
    model = converted()
    path = tmp_path / "ckpt.pt"
    mto.save(model, path)
    restored = mto.restore(TinyMLP(), path)
    assert isinstance(restored, mto.DistillationModel) and isinstance(restored, TinyMLP)
    assert list(restored.state_dict()) == list(model.state_dict())
    x = torch.randn(5, 16)
    torch.testing.assert_close(restored(x), model(x))
    torch.testing.assert_close(restored.teacher_model(x), model.teacher_model(x))
    y = torch.tensor(1.0)
    torch.testing.assert_close(
        restored.compute_kd_loss(student_loss=y), model.compute_kd_loss(student_loss=y)
    )
    assert FACTORY_CALLS[-1] == (32,)
    assert mto.mode_state(restored) == mto.mode_state(model)


def test_checkpoint_never_contains_teacher_weights(tmp_path):
    model = converted(expose_minimal_state_dict=False)
    mto.save(model, tmp_path / "c.pt")
    checkpoint = torch.load(tmp_path / "c.pt", weights_only=True)
    assert not any(k.startswith("_teacher_model") for k in checkpoint["model_state_dict"])
    assert json.loads(json.dumps(checkpoint["kdistill_state"])) == checkpoint["kdistill_state"]


def test_loss_module_parameters_round_trip(tmp_path):
    mto.add_safe_factories([TinyCNN])
    model = mto.convert(
        TinyCNN(1, 4),
        mode=[
            (
                "kd_loss",
                {
                    "teacher_model": (TinyCNN, (1, 6)),
                    "criterion": {("conv2", "conv2"): mto.MGDLoss(4, 6)},
                },
            )
        ],
    )
    with torch.no_grad():
        model.loss_modules[0].align.weight.fill_(0.5)
    mto.save(model, tmp_path / "m.pt")
    restored = mto.restore(TinyCNN(1, 4), tmp_path / "m.pt")
    assert torch.all(restored.loss_modules[0].align.weight == 0.5)


def test_checkpoint_loads_weights_only_in_fresh_process(tmp_path):
    path = tmp_path / "ckpt.pt"
    mto.save(converted(), path)
    code = textwrap.dedent(f"""
        import torch
        ckpt = torch.load({str(path)!r}, weights_only=True)
        assert set(ckpt) == {{"kdistill_state", "model_state_dict"}}
        print(ckpt["kdistill_state"]["modes"][0]["mode"])
    """)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "kd_loss"


@pytest.mark.parametrize("teacher_kind", ["instance", "not_allowed", "unrecorded"])
def test_teacher_that_cannot_be_rebuilt_gives_plain_student_and_one_warning(tmp_path, teacher_kind):
    teacher = {
        "instance": TinyMLP(16, 20, 10),
        "not_allowed": (tiny_mlp, (16, 20)),
        "unrecorded": lambda: TinyMLP(16, 20, 10),
    }[teacher_kind]
    model = converted(teacher=teacher)
    path = tmp_path / "c.pt"
    mto.save(model, path)
    student = TinyMLP()
    with pytest.warns(UserWarning, match="was not restored") as record:
        restored = mto.restore(student, path)
    assert len(record) == 1
    message = str(record[0].message)
    assert str(path) in message and "was not restored" in message
    assert "teacher_model=" in message
    if teacher_kind == "not_allowed":
        assert "kdistill.add_safe_factories([kdistill.testing.models.tiny_mlp])" in message
    assert restored is student and type(restored) is TinyMLP
    expected = mto.export(model).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in restored.state_dict().items())
    # with the teacher given, the distillation model comes back
    again = mto.restore(TinyMLP(), path, teacher_model=TinyMLP(16, 20, 10))
    assert isinstance(again, mto.DistillationModel)


def test_plain_restore_sets_loss_module_weights_aside(tmp_path):
    model = mto.convert(
        TinyCNN(1, 4),
        mode=[
            (
                "kd_loss",
                {
                    "teacher_model": TinyCNN(1, 6),
                    "criterion": {("conv2", "conv2"): mto.MGDLoss(4, 6)},
                },
            )
        ],
    )
    mto.save(model, tmp_path / "m.pt")
    with pytest.warns(UserWarning, match=r"loss-module tensor\(s\) set aside"):
        restored = mto.restore(TinyCNN(1, 4), tmp_path / "m.pt")
    assert set(restored.state_dict()) == set(TinyCNN(1, 4).state_dict())


def test_non_json_factory_args_need_teacher_model(tmp_path):
    mto.add_safe_factories([tiny_mlp])
    model = converted(teacher=(tiny_mlp, (16,), {"hidden": torch.tensor(8).item()}))
    mto.save(model, tmp_path / "ok.pt")  # ints are JSON: restorable
    assert mto.restore(TinyMLP(), tmp_path / "ok.pt").teacher_model.fc1.out_features == 8


def test_teacher_model_override_with_factory(tmp_path):
    mto.save(converted(), tmp_path / "c.pt")
    restored = mto.restore(TinyMLP(), tmp_path / "c.pt", teacher_model=(make_teacher, (32,), {}))
    assert FACTORY_CALLS[-1] == (32,)
    assert isinstance(restored.teacher_model, TinyMLP)


def test_exported_and_plain_models_round_trip(tmp_path):
    model = converted()
    x = torch.randn(3, 16)
    student = mto.export(model)
    mto.save(student, tmp_path / "s.pt")
    assert torch.load(tmp_path / "s.pt", weights_only=True)["kdistill_state"]["modes"] == []
    restored = mto.restore(TinyMLP(), tmp_path / "s.pt")
    assert type(restored) is TinyMLP
    torch.testing.assert_close(restored(x), student(x))


def test_layerwise_round_trip(tmp_path):
    model = mto.convert(
        TinyMLP(),
        mode=[
            (
                "layerwise_kd",
                {"teacher_model": make_teacher, "criterion": {("fc2", "fc2"): nn.MSELoss()}},
            )
        ],
    )
    mto.save(model, tmp_path / "l.pt")
    restored = mto.restore(TinyMLP(), tmp_path / "l.pt")
    assert [n for n, p in restored.named_parameters() if p.requires_grad] == [
        "fc2.weight",
        "fc2.bias",
    ]


def test_mode_state_round_trip_without_weights():
    model = converted()
    state = json.loads(json.dumps(mto.mode_state(model)))
    restored = mto.restore_from_mode_state(TinyMLP(), state)
    assert mto.mode_state(restored) == state
    assert mto.modelopt_state is mto.mode_state


def test_unregistered_loss_cannot_be_saved(tmp_path):
    model = converted(criterion=NotALoss(), loss_balancer=None)
    with pytest.raises(ValueError, match=r"not a registered loss.*register_loss"):
        mto.save(model, tmp_path / "c.pt")
    assert not (tmp_path / "c.pt").exists()


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    mto.save(converted(), path)
    good = path.read_bytes()

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        mto.save(converted(), path)
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["c.pt"]


# ----------------------------------------------------------------------------- bad files
def snapshot(model):
    return (
        type(model),
        {k: v.clone() for k, v in model.state_dict().items()},
        sorted(model.__dict__),
    )


def assert_untouched(model, before):
    cls, weights, attrs = snapshot(model)
    assert cls is before[0] and attrs == before[2]
    assert all(torch.equal(weights[k], before[1][k]) for k in weights)
    assert all(not m._forward_hooks for m in model.modules())


def write_bad(path, kind):
    good = path.with_name("good.pt")
    mto.save(converted(), good)
    data = good.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "corrupt":
        path.write_bytes(b"\x00garbage" * 50)
    elif kind == "plain_state_dict":
        torch.save(TinyMLP().state_dict(), path)
    elif kind == "pickled_object":
        torch.save({"kdistill_state": TinyMLP()}, path)


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("truncated", "corrupt, truncated"),
        ("corrupt", "corrupt, truncated"),
        ("plain_state_dict", "plain state dict"),
        ("pickled_object", "corrupt, truncated"),
    ],
)
def test_bad_files_raise_naming_file_and_leave_model_untouched(tmp_path, kind, match):
    path = tmp_path / "bad.pt"
    write_bad(path, kind)
    model = TinyMLP()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match) as info:
        mto.restore(model, path)
    assert str(path) in str(info.value)
    assert_untouched(model, before)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pt"):
        mto.restore(TinyMLP(), tmp_path / "nope.pt")


def test_wrong_architecture_leaves_model_untouched(tmp_path):
    mto.save(converted(), tmp_path / "c.pt")
    model = TinyMLP(16, 64, 10)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"do not fit this model.*mismatches.*fc1.weight: shape"):
        mto.restore(model, tmp_path / "c.pt")
    assert_untouched(model, before)


def test_restore_into_converted_model_raises(tmp_path):
    mto.save(converted(), tmp_path / "c.pt")
    with pytest.raises(RuntimeError, match="plain student"):
        mto.restore(converted(), tmp_path / "c.pt")


# ----------------------------------------------------------------------------- allow-list
def tampered(tmp_path, **teacher_record):
    path = tmp_path / "edited.pt"
    mto.save(converted(), path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["kdistill_state"]["modes"][0]["config"]["teacher_model"].update(teacher_record)
    torch.save(checkpoint, path)
    return path


def test_allowed_factory_is_called_with_recorded_args(tmp_path):
    path = tampered(tmp_path, args=[24])
    FACTORY_CALLS.clear()
    restored = mto.restore(TinyMLP(), path)
    assert FACTORY_CALLS == [(24,)]
    assert restored.teacher_model.fc1.out_features == 24


def test_factory_not_in_allow_list_is_never_called(tmp_path):
    path = tmp_path / "c.pt"
    mto.save(converted(), path)
    mto.clear_safe_factories()
    FACTORY_CALLS.clear()
    with pytest.warns(UserWarning, match=r"not in kdistill's allow-list.*add_safe_factories"):
        restored = mto.restore(TinyMLP(), path)
    assert FACTORY_CALLS == [] and type(restored) is TinyMLP
    mto.safe_factory(make_teacher)  # the decorator form allows it again
    assert isinstance(mto.restore(TinyMLP(), path), mto.DistillationModel)


def test_lookup_is_by_exact_recorded_name(tmp_path):
    # the record names a function by module:qualname; another allowed object is never used
    path = tampered(tmp_path, qualname="make_teacher.__globals__")
    with pytest.warns(UserWarning, match="not in kdistill's allow-list"):
        assert type(mto.restore(TinyMLP(), path)) is TinyMLP


def test_factory_type_error_names_the_file_and_the_fix(tmp_path):
    path = tampered(tmp_path, args=[1, 2, 3, 4])
    student = TinyMLP()
    before = snapshot(student)
    with pytest.raises(TypeError, match="positional argument") as info:
        mto.restore(student, path)
    assert str(path) in str(info.value)
    assert_untouched(student, before)


def test_add_safe_factories_refuses_what_cannot_be_named():
    def local():
        return TinyMLP()

    for bad, match in [
        (lambda: TinyMLP(), "no module-level name"),
        (local, "no module-level name"),
        (functools.partial(make_teacher, 8), "no module-level name"),
        (42, "must be callables"),
    ]:
        with pytest.raises(TypeError, match=match):
            mto.add_safe_factories([bad])
    with pytest.raises(TypeError, match="a list of callables"):
        mto.add_safe_factories(make_teacher)
    mto.add_safe_factories([make_teacher, make_teacher])  # the same object: a no-op
    assert mto.get_safe_factories() == [make_teacher]


def test_safe_factory_names_are_unique():
    impostor = types.FunctionType(make_teacher.__code__, {})
    impostor.__module__, impostor.__qualname__ = make_teacher.__module__, make_teacher.__qualname__
    with pytest.raises(ValueError, match="already allowed"):
        mto.add_safe_factories([impostor])
    assert mto.get_safe_factories() == [make_teacher]


def test_tampered_loss_name_is_refused(tmp_path):
    path = tmp_path / "c.pt"
    mto.save(converted(), path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["kdistill_state"]["modes"][0]["config"]["criterion"][0]["loss"]["name"] = "os.system"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"Unknown loss 'os.system'") as info:
        mto.restore(TinyMLP(), path)
    assert str(path) in str(info.value)


def test_unsupported_version(tmp_path):
    path = tmp_path / "c.pt"
    mto.save(converted(), path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["kdistill_state"]["version"] = 99
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match="version 99"):
        mto.restore(TinyMLP(), path)


def test_checkpoint_holding_only_export_student_names_the_file(tmp_path):
    path = tmp_path / "c.pt"
    torch.save(
        {
            "kdistill_state": {"version": 1, "modes": [{"mode": "export_student", "config": {}}]},
            "model_state_dict": TinyMLP().state_dict(),
        },
        path,
    )
    with pytest.raises(ValueError, match="'export_student', which save never records") as info:
        mto.restore(TinyMLP(), path)
    assert str(path) in str(info.value) and "re-save" in str(info.value)


def test_mode_state_errors_say_mode_state():
    state = mto.mode_state(converted())
    state["modes"][0]["config"]["criterion"][0]["loss"]["args"] = {"bogus": 1}
    with pytest.raises(TypeError, match=r"^mode state: .*cannot be built from its recorded"):
        mto.restore_from_mode_state(TinyMLP(), state)


# ----------------------------------------------------------------------------- permissions
@pytest.mark.parametrize("writer", ["save", "distributed.save"])
def test_checkpoints_respect_the_umask_like_torch_save(tmp_path, writer):
    from kdistill import distributed

    save = mto.save if writer == "save" else distributed.save
    model = converted()
    previous = os.umask(0o022)
    try:
        torch.save({}, tmp_path / "torch.pt")
        save(model, tmp_path / "kd.pt")
        os.umask(0o077)
        save(model, tmp_path / "private.pt")
    finally:
        os.umask(previous)
    mode = stat.S_IMODE(os.stat(tmp_path / "kd.pt").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "torch.pt").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "private.pt").st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["kd.pt", "private.pt", "torch.pt"]  # no temp left


def test_save_never_writes_through_a_planted_symlink(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    path = tmp_path / "ckpt.pt"
    mto.save(converted(), path)  # the temporary file name is random and created exclusively
    assert victim.read_text() == "keep me"
    assert not path.is_symlink()


# ----------------------------------------------------------------------------- ModelOpt names
def test_modelopt_state_manager_reports_whether_a_mode_is_applied(tmp_path):
    model = converted()
    assert mto.ModeloptStateManager(model).has_state
    assert mto.ModeloptStateManager.is_converted(model)
    mto.save(model, tmp_path / "c.pt")
    mto.clear_safe_factories()
    with pytest.warns(UserWarning, match="was not restored"):
        plain = mto.restore(TinyMLP(), tmp_path / "c.pt")
    assert not mto.ModeloptStateManager(plain).has_state
    with pytest.raises(TypeError, match=r"nn\.Module"):
        mto.ModeloptStateManager("model")
