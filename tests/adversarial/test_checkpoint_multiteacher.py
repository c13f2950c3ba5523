"""Tampered multi-teacher checkpoints (issue 15): dict-teacher records as an attacker edits them.

Every case edits a real ``kdistill.save`` file of a model with two named teachers, restores it
and checks that the error is typed, names the file, and that the victim is exactly as it was
(class, weights, hooks, flags); recorded factories inside a teacher dict are never called unless
allowed.
"""

import os
from pathlib import Path

import pytest
import torch
from checkpoint_victims import Snapshot, victim_for

import kdistill as mtd
from kdistill.testing import TinyMLP, tiny_mlp

MARKER = "pwned"


def saved_two_teachers(path: Path) -> tuple[mtd.DistillationModel, dict]:
    """Save a TinyMLP distilled from two factory teachers; return it and the loaded file."""
    torch.manual_seed(0)
    model = mtd.convert(
        TinyMLP(),
        mode=[
            (
                "kd_loss",
                {
                    "teacher_model": {"big": (tiny_mlp, (16, 32)), "small": (tiny_mlp, (16, 24))},
                    "criterion": {
                        ("", "big"): mtd.LogitsDistillationLoss(2.0),
                        ("", ("big", "small")): mtd.EnsembleLogitsDistillationLoss(2.0),
                    },
                    "loss_balancer": mtd.StaticLossBalancer([0.3, 0.5]),
                },
            )
        ],
    )
    mtd.save(model, path)
    return model, torch.load(path, weights_only=True)


def _config(checkpoint: dict) -> dict:
    return checkpoint["kdistill_state"]["modes"][0]["config"]


def _teachers(checkpoint: dict) -> dict:
    return _config(checkpoint)["teacher_model"]


FACTORY = {
    "kind": "factory",
    "module": "kdistill.testing.models",
    "qualname": "tiny_mlp",
    "args": [16, 32],
    "kwargs": {},
}


def _set_teachers(checkpoint: dict, value) -> None:
    _config(checkpoint)["teacher_model"] = value


EDITS = {
    "dotted-name": (
        lambda c: _set_teachers(c, {"kind": "dict", "teachers": {"big.fc1": FACTORY}}),
        r"teacher name 'big.fc1' holds a dot",
    ),
    "empty-name": (
        lambda c: _set_teachers(c, {"kind": "dict", "teachers": {"": FACTORY}}),
        r"teacher name '' is not a Python identifier",
    ),
    "reserved-name": (
        lambda c: _set_teachers(c, {"kind": "dict", "teachers": {"_modules": FACTORY}}),
        r"teacher name '_modules' is an attribute of TeacherDict",
    ),
    "path-like-name": (
        lambda c: _set_teachers(c, {"kind": "dict", "teachers": {"../../etc": FACTORY}}),
        r"teacher name '../../etc' holds a dot",
    ),
    "long-name": (
        lambda c: _set_teachers(c, {"kind": "dict", "teachers": {"a" * 5000: FACTORY}}),
        r"is longer than 128 characters",
    ),
    "huge-dict": (
        lambda c: _set_teachers(
            c, {"kind": "dict", "teachers": {f"t{i}": FACTORY for i in range(257)}}
        ),
        r"it names 257 teachers \(expected 1 to 256\)",
    ),
    "huge-record": (
        lambda c: _set_teachers(
            c, {"kind": "dict", "teachers": {f"t{i}": FACTORY for i in range(3000)}}
        ),
        r"holds more than 10000 values",
    ),
    "empty-dict": (
        lambda c: _set_teachers(c, {"kind": "dict", "teachers": {}}),
        r"it names 0 teachers",
    ),
    "nested-dict": (
        lambda c: _set_teachers(
            c,
            {"kind": "dict", "teachers": {"big": {"kind": "dict", "teachers": {"x": FACTORY}}}},
        ),
        r"teacher 'big' is a nested dict",
    ),
    "deeply-nested": (
        lambda c: _set_teachers(c, _deep(40)),
        r"nested deeper than 32 levels",
    ),
    "teachers-as-list": (
        lambda c: _set_teachers(c, {"kind": "dict", "teachers": [FACTORY, FACTORY]}),
        r"malformed teacher dict record",
    ),
    "extra-key": (
        lambda c: _teachers(c).update(module="os"),
        r"malformed teacher dict record",
    ),
    "member-not-a-record": (
        lambda c: _teachers(c)["teachers"].update(big="os:system"),
        r"malformed teacher record 'os:system'",
    ),
    "member-bad-factory": (
        lambda c: _teachers(c)["teachers"]["big"].update(args={"a": 1}),
        r"malformed teacher factory record",
    ),
    "non-string-key": (
        lambda c: _teachers(c)["teachers"].update({1: FACTORY}),
        r"non-string key 1",
    ),
    "teacher-layer-empty-list": (
        lambda c: _config(c)["criterion"][1].update(teacher_layer=[]),
        r"`teacher_layer` \[\] \(expected a string or a list of 1 to 256 strings\)",
    ),
    "teacher-layer-not-strings": (
        lambda c: _config(c)["criterion"][1].update(teacher_layer=["big", 3]),
        r"`teacher_layer` \['big', 3\]",
    ),
    "teacher-layer-nested-list": (
        lambda c: _config(c)["criterion"][1].update(teacher_layer=[["big"], "small"]),
        r"`teacher_layer` \[\['big'\], 'small'\]",
    ),
    "teacher-layer-huge-list": (
        lambda c: _config(c)["criterion"][1].update(teacher_layer=["big"] * 300),
        r"list of 1 to 256 strings",
    ),
    "teacher-layer-dict": (
        lambda c: _config(c)["criterion"][1].update(teacher_layer={"big": 1}),
        r"`teacher_layer` \{'big': 1\}",
    ),
}


def _deep(levels: int) -> dict:
    record: dict = FACTORY
    for _ in range(levels):
        record = {"kind": "dict", "teachers": {"t": record}}
    return record


@pytest.mark.parametrize("edit", list(EDITS), ids=list(EDITS))
def test_tampered_dict_teacher_record_is_a_typed_error_naming_the_file(tmp_path, edit):
    path = tmp_path / "evil.pt"
    model, checkpoint = saved_two_teachers(path)
    change, match = EDITS[edit]
    change(checkpoint)
    torch.save(checkpoint, path)
    mtd.add_safe_factories([tiny_mlp])  # even with the factory allowed, nothing is built
    try:
        victim = victim_for(model)
        snapshot = Snapshot(victim)
        with pytest.raises(ValueError, match=match) as info:
            mtd.restore(victim, path)
        assert str(info.value).startswith(str(path)), info.value
        snapshot.assert_unchanged()
    finally:
        mtd.clear_safe_factories()


@pytest.mark.parametrize(
    ("teacher_layer", "match"),
    [
        (["big", "zzz"], r"Unknown teacher 'zzz'"),
        (["big", ""], r"Teacher layer '' \(the whole teacher\) is ambiguous"),
        ("big.fc9", r"Unknown teacher layer 'big.fc9'"),
        ("", r"Teacher layer '' \(the whole teacher\) is ambiguous"),
    ],
    ids=["unknown-in-tuple", "root-in-tuple", "unknown-layer", "root"],
)
def test_criterion_names_outside_the_recorded_teachers_leave_the_victim_untouched(
    tmp_path, teacher_layer, match
):
    path = tmp_path / "evil.pt"
    model, checkpoint = saved_two_teachers(path)
    _config(checkpoint)["criterion"][1]["teacher_layer"] = teacher_layer
    torch.save(checkpoint, path)
    victim = victim_for(model)
    snapshot = Snapshot(victim)
    teachers = {"big": tiny_mlp(16, 32), "small": tiny_mlp(16, 24)}
    with pytest.raises(ValueError, match=match) as info:
        mtd.restore(victim, path, teacher_model=teachers)
    assert str(path) in str(info.value)
    snapshot.assert_unchanged()
    assert all(not m._forward_hooks for t in teachers.values() for m in t.modules())


def _touch_marker(*args, **kwargs) -> str:
    Path(os.environ["KD_MARKER"]).write_text("ran")
    return "x"


@pytest.mark.parametrize("allowed", [False, True], ids=["nothing-allowed", "one-allowed"])
def test_a_recorded_factory_inside_a_dict_is_never_called_unless_allowed(
    tmp_path, monkeypatch, allowed
):
    monkeypatch.setenv("KD_MARKER", str(tmp_path / MARKER))
    path = tmp_path / "evil.pt"
    model, checkpoint = saved_two_teachers(path)
    _teachers(checkpoint)["teachers"]["small"] = {
        "kind": "factory",
        "module": "os",
        "qualname": "system",
        "args": [f"touch {tmp_path / MARKER}"],
        "kwargs": {},
    }
    _teachers(checkpoint)["teachers"]["big"]["qualname"] = "_touch_marker"
    _teachers(checkpoint)["teachers"]["big"]["module"] = __name__
    torch.save(checkpoint, path)
    if allowed:
        mtd.add_safe_factories([tiny_mlp])  # allowing one factory never lets the file name another
    try:
        victim = victim_for(model)
        snapshot = Snapshot(victim)
        with pytest.warns(UserWarning, match=r"teacher 'big' cannot be rebuilt") as caught:
            restored = mtd.restore(victim, path)
        message = str(caught[0].message)
        assert "teacher 'small' cannot be rebuilt: its teacher factory 'os:system'" in message
        assert restored is victim and type(victim) is TinyMLP
        assert not (tmp_path / MARKER).exists(), "a recorded function ran"
        snapshot.assert_unchanged()  # the victim held the saved weights already
    finally:
        mtd.clear_safe_factories()


def test_teacher_model_naming_a_teacher_the_file_lacks_leaves_the_victim_untouched(tmp_path):
    path = tmp_path / "ckpt.pt"
    model, _ = saved_two_teachers(path)
    victim = victim_for(model)
    snapshot = Snapshot(victim)
    with pytest.raises(ValueError, match=r"Unknown teacher in `teacher_model` 'bigg'") as info:
        mtd.restore(victim, path, teacher_model={"bigg": tiny_mlp(16, 32)})
    assert str(path) in str(info.value)
    snapshot.assert_unchanged()
