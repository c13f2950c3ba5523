"""save / restore / mode_state: round trips, safety rules and error handling."""

import json
import os
import subprocess
import sys
import textwrap

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


def test_instance_teacher_needs_teacher_model_on_restore(tmp_path):
    teacher = TinyMLP(16, 20, 10)
    model = converted(teacher=teacher)
    mto.save(model, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="teacher_model="):
        mto.restore(TinyMLP(), tmp_path / "c.pt")
    restored = mto.restore(TinyMLP(), tmp_path / "c.pt", teacher_model=teacher)
    assert restored.teacher_model is teacher


def test_non_json_factory_args_need_teacher_model(tmp_path):
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
    with pytest.raises(ValueError, match=r"do not fit this model.*shape mismatches.*fc1.weight"):
        mto.restore(model, tmp_path / "c.pt")
    assert_untouched(model, before)


def test_restore_into_converted_model_raises(tmp_path):
    mto.save(converted(), tmp_path / "c.pt")
    with pytest.raises(RuntimeError, match="plain student"):
        mto.restore(converted(), tmp_path / "c.pt")


# ----------------------------------------------------------------------------- safety
def tampered(tmp_path, module, qualname, args):
    path = tmp_path / "evil.pt"
    mto.save(converted(), path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["kdistill_state"]["modes"][0]["config"]["teacher_model"].update(
        module=module, qualname=qualname, args=args, kwargs={}
    )
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize(
    ("module", "qualname"),
    [
        ("os", "system"),
        ("builtins", "eval"),
        ("subprocess", "run"),
        ("torch", "load"),
        ("shutil", "rmtree"),
        ("kdistill.checkpoint", "save"),
        ("not_imported_mod", "f"),
        ("test_checkpoint", "make_teacher.__globals__"),
    ],
)
def test_tampered_factory_is_refused_and_nothing_runs(tmp_path, module, qualname):
    marker = tmp_path / "pwned"
    path = tampered(tmp_path, module, qualname, [f"touch {marker}"])
    model = TinyMLP()
    before = snapshot(model)
    with pytest.raises(ValueError, match="teacher_model=") as info:
        mto.restore(model, path)
    assert str(path) in str(info.value)
    assert not marker.exists()
    assert_untouched(model, before)


def test_factory_lookup_never_imports(tmp_path):
    assert "xml.dom.minidom" not in sys.modules or pytest.skip("already imported")
    path = tampered(tmp_path, "xml.dom.minidom", "parseString", ["<a/>"])
    with pytest.raises(ValueError, match="not imported"):
        mto.restore(TinyMLP(), path)
    assert "xml.dom.minidom" not in sys.modules


def test_user_factory_is_called_with_recorded_args(tmp_path):
    path = tampered(tmp_path, __name__, "make_teacher", [32])
    FACTORY_CALLS.clear()
    restored = mto.restore(TinyMLP(), path)
    assert FACTORY_CALLS == [(32,)]
    assert isinstance(restored.teacher_model, TinyMLP)


def test_tampered_loss_name_is_refused(tmp_path):
    path = tmp_path / "c.pt"
    mto.save(converted(), path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["kdistill_state"]["modes"][0]["config"]["criterion"][0]["loss"]["name"] = "os.system"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"Unknown loss 'os.system'"):
        mto.restore(TinyMLP(), path)


def test_unsupported_version(tmp_path):
    path = tmp_path / "c.pt"
    mto.save(converted(), path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["kdistill_state"]["version"] = 99
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match="version 99"):
        mto.restore(TinyMLP(), path)
