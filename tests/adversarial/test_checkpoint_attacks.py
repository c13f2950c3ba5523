"""Tampered checkpoints, as an attacker would write them (issue 10, items 1, 3, 4 and 9).

Each test edits a real ``kdistill.save`` file, restores it, and checks that nothing ran (marker
files absent, no module imported), that nothing outside ``tmp_path`` changed (the working
directory is a fresh folder inside it), and that the victim model is exactly as it was.
"""

import os
import resource
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from checkpoint_victims import Snapshot, saved, victim_for

import kdistill as mtd
from kdistill.testing import TinyMLP

MARKER_NAME = "pwned"


@pytest.fixture
def cwd(tmp_path, monkeypatch) -> Path:
    """An empty working directory inside tmp_path (relative paths of an attack land here)."""
    folder = tmp_path / "cwd"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


def _touch_marker() -> str:
    Path(os.environ["KD_MARKER"]).write_text("ran")
    return "x"


@dataclass
class Victim:
    """A dataclass: its generated ``__init__`` has source ``<string>`` (the old heuristic's hole)."""

    value: str = field(default_factory=_touch_marker)


def _edit_teacher(checkpoint: dict, module: str, qualname: str, args: list) -> None:
    record = checkpoint["kdistill_state"]["modes"][0]["config"]["teacher_model"]
    record.update(kind="factory", module=module, qualname=qualname, args=args, kwargs={})


def _restore_expecting_plain(path: Path, victim) -> None:
    """The only allowed outcome: the plain student (its weights, unchanged here) and a warning."""
    with pytest.warns(UserWarning, match=r"not in kdistill's allow-list") as caught:
        restored = mtd.restore(victim, path)
    assert restored is victim and str(path) in str(caught[0].message)


def _attacks(tmp_path: Path) -> dict[str, tuple[str, str, list]]:
    marker = tmp_path / MARKER_NAME
    script = tmp_path / "evil_script.py"
    script.write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    site_dir = tmp_path / "site_dir"
    site_dir.mkdir()
    (site_dir / "evil.pth").write_text(f"import os; open({str(marker)!r}, 'w').write('ran')\n")
    (tmp_path / "kd_evil_module.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    this = __name__
    return {
        "os-popen": ("os", "popen", [f"touch {marker}"]),
        "os-system": ("os", "system", [f"touch {marker}"]),
        "os-makedirs": ("os", "makedirs", [str(marker)]),
        "os-makedirs-relative": ("os", "makedirs", ["pwned_dir"]),
        "runpy-run-path": ("runpy", "run_path", [str(script)]),
        "site-addsitedir": ("site", "addsitedir", [str(site_dir)]),
        "importlib-gcd-import": ("importlib._bootstrap", "_gcd_import", ["kd_evil_module"]),
        "builtins-exec": ("builtins", "exec", [f"open({str(marker)!r}, 'w')"]),
        "dataclass-string-init": (this, "Victim.__init__", [[]]),
        "attribute-walk-to-kdistill-save": (this, "mtd.save", [[], str(marker)]),
        "attribute-walk-to-os-system": (this, "os.system", [f"touch {marker}"]),
        "kdistill-own-function": ("kdistill.checkpoint", "save", [[], str(marker)]),
        "not-imported-module": ("xml.dom.minidom", "parseString", ["<a/>"]),
    }


ATTACK_IDS = [
    "os-popen",
    "os-system",
    "os-makedirs",
    "os-makedirs-relative",
    "runpy-run-path",
    "site-addsitedir",
    "importlib-gcd-import",
    "builtins-exec",
    "dataclass-string-init",
    "attribute-walk-to-kdistill-save",
    "attribute-walk-to-os-system",
    "kdistill-own-function",
    "not-imported-module",
]


@pytest.mark.parametrize("attack", ATTACK_IDS)
def test_recorded_factory_is_never_resolved_or_called(tmp_path, cwd, monkeypatch, attack):
    monkeypatch.setenv("KD_MARKER", str(tmp_path / MARKER_NAME))
    monkeypatch.syspath_prepend(str(tmp_path))  # kd_evil_module would be importable
    module, qualname, args = _attacks(tmp_path)[attack]
    path = tmp_path / "evil.pt"
    model, checkpoint = saved(path)
    _edit_teacher(checkpoint, module, qualname, args)
    torch.save(checkpoint, path)
    victim = victim_for(model)
    snapshot = Snapshot(victim)
    modules_before = set(sys.modules)
    path_before = list(sys.path)

    _restore_expecting_plain(path, victim)

    assert not (tmp_path / MARKER_NAME).exists(), "the recorded function ran"
    assert list(cwd.iterdir()) == [], "something was written to the working directory"
    imported = {m for m in set(sys.modules) - modules_before if not m.startswith("torch.")}
    assert imported == set(), "restore imported a module"
    assert sys.path == path_before
    snapshot.assert_unchanged()


def test_allow_listed_factory_is_the_only_one_called(tmp_path, monkeypatch):
    """Allowing one factory never lets the file name another (lookup by exact name only)."""
    monkeypatch.setenv("KD_MARKER", str(tmp_path / MARKER_NAME))
    mtd.add_safe_factories([TinyMLP])
    try:
        path = tmp_path / "evil.pt"
        model, checkpoint = saved(path)
        _edit_teacher(checkpoint, "kdistill.testing.models", "TinyMLP.__init__", [[]])
        torch.save(checkpoint, path)
        _restore_expecting_plain(path, victim_for(model))
        _edit_teacher(checkpoint, "kdistill.testing.models", "TinyMLP", [16, 32])
        torch.save(checkpoint, path)
        assert isinstance(mtd.restore(TinyMLP(), path), mtd.DistillationModel)
    finally:
        mtd.clear_safe_factories()


# ----------------------------------------------------------------------------- sizes
def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


HUGE_HINT = {"name": "hint", "args": {"student_dim": 60000, "teacher_dim": 60000}}


@pytest.mark.parametrize("with_tensor", [False, True], ids=["no-tensor", "expanded-tensor"])
def test_huge_loss_dims_allocate_nothing(tmp_path, with_tensor):
    path = tmp_path / "huge.pt"
    model, checkpoint = saved(path)
    checkpoint["kdistill_state"]["modes"][0]["config"]["criterion"][0]["loss"] = HUGE_HINT
    if with_tensor:  # a 14 GB-shaped tensor on one float of storage: passes a naive shape check
        weights = checkpoint["model_state_dict"]
        weights["_loss_modules.0.projector.weight"] = torch.zeros(1).expand(60000, 60000)
        weights["_loss_modules.0.projector.bias"] = torch.zeros(1).expand(60000)
    torch.save(checkpoint, path)
    victim = victim_for(model)
    snapshot = Snapshot(victim)
    before = _max_rss_mb()
    with pytest.raises(ValueError, match="do not fit") as info:
        mtd.restore(victim, path)
    assert _max_rss_mb() - before < 500, "restore allocated memory for the tampered loss"
    assert str(path) in str(info.value)
    if with_tensor:
        assert "overlap" in str(info.value)
    snapshot.assert_unchanged()


def test_huge_loss_dims_in_a_mode_state_are_refused_before_allocating():
    state = {
        "version": 1,
        "modes": [
            {
                "mode": "kd_loss",
                "config": {
                    "teacher_model": {"kind": "instance", "class": "TinyMLP"},
                    "criterion": [{"student_layer": "", "teacher_layer": "", "loss": HUGE_HINT}],
                    "loss_balancer": None,
                    "expose_minimal_state_dict": True,
                },
            }
        ],
    }
    victim = TinyMLP()
    snapshot = Snapshot(victim)
    before = _max_rss_mb()
    with pytest.raises(ValueError, match=r"^mode state: .*parameter elements"):
        mtd.restore_from_mode_state(victim, state, teacher_model=TinyMLP())
    assert _max_rss_mb() - before < 500
    snapshot.assert_unchanged()


@pytest.mark.parametrize(
    ("where", "payload", "match"),
    [
        ("loss_args", "deep", "nested deeper than"),
        ("loss_args", "wide", "more than 10000 values"),
        ("loss_args", "long", "more than 1000000 characters"),
        ("loss_args", "nan", "records hold finite numbers"),
        ("loss_args", "inf", "records hold finite numbers"),
        ("loss_args", "bigint", "too large"),
        ("loss_args", "tensor", "is a Tensor"),
        ("loss_args", "tuple", "is a tuple"),
        ("teacher_args", "deep", "nested deeper than"),
        ("state", "tensor", "is a Tensor"),
    ],
)
def test_record_caps_are_checked_before_anything(tmp_path, where, payload, match):
    value = {
        "deep": (lambda: [_nested(3000)])(),
        "wide": list(range(20000)),
        "long": "x" * 2_000_000,
        "nan": float("nan"),
        "inf": float("inf"),
        "bigint": 2**70,
        "tensor": torch.zeros(3),
        "tuple": (1, 2),
    }[payload]
    path = tmp_path / "c.pt"
    model, checkpoint = saved(path)
    config = checkpoint["kdistill_state"]["modes"][0]["config"]
    if where == "loss_args":
        config["criterion"][1]["loss"]["args"]["temperature"] = value
    elif where == "teacher_args":
        config["teacher_model"]["args"] = [value]
    else:
        checkpoint["kdistill_state"]["modes"][0]["extra"] = value
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)  # only so that the pickler can write 3000 levels
    try:
        torch.save(checkpoint, path)
    finally:
        sys.setrecursionlimit(limit)
    victim = victim_for(model)
    snapshot = Snapshot(victim)
    with pytest.raises(ValueError, match=match) as info:
        mtd.restore(victim, path)
    assert str(path) in str(info.value)
    assert len(str(info.value)) < 2000, "error messages stay readable"
    snapshot.assert_unchanged()


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


# ----------------------------------------------------------------------------- all-or-nothing
def test_duplicate_modes_in_a_checkpoint_change_nothing(tmp_path):
    path = tmp_path / "dup.pt"
    model, checkpoint = saved(path)
    modes = checkpoint["kdistill_state"]["modes"]
    modes.append(dict(modes[0]))
    torch.save(checkpoint, path)
    victim = victim_for(model)
    snapshot = Snapshot(victim)
    with pytest.raises(ValueError, match="lists 2 modes") as info:
        mtd.restore(victim, path, teacher_model=TinyMLP())
    assert str(path) in str(info.value)
    snapshot.assert_unchanged()


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("meta", "a meta tensor"),
        ("sparse", "sparse"),
        ("expanded", "overlap"),
        ("complex", "does not cast safely"),
        ("non_tensor", "not a tensor"),
        ("wrong_shape", "shape"),
    ],
)
def test_uncopyable_weights_are_refused_before_the_first_copy(tmp_path, kind, match):
    path = tmp_path / "w.pt"
    model, checkpoint = saved(path)
    weights = checkpoint["model_state_dict"]
    good = weights["fc1.weight"]
    weights["fc1.weight"] = good + 1  # a copy of this one first would change the victim
    weights["head.weight"] = {
        "meta": torch.empty(10, 32, device="meta"),
        "sparse": torch.zeros(10, 32).to_sparse(),
        "expanded": torch.zeros(1, 32).expand(10, 32),
        "complex": torch.zeros(10, 32, dtype=torch.complex64),
        "non_tensor": [[0.0] * 32] * 10,
        "wrong_shape": torch.zeros(32, 10),
    }[kind]
    torch.save(checkpoint, path)
    for teacher in (None, TinyMLP()):  # plain-student path and distillation path
        victim = victim_for(model)
        snapshot = Snapshot(victim)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(ValueError, match=match) as info:
                mtd.restore(victim, path, teacher_model=teacher)
        assert str(path) in str(info.value) and "left unchanged" in str(info.value)
        snapshot.assert_unchanged()


def test_convert_with_the_same_mode_twice_changes_nothing():
    student, teacher = TinyMLP(), TinyMLP()
    snapshot, teacher_snapshot = Snapshot(student), Snapshot(teacher)
    config = {"teacher_model": teacher, "criterion": mtd.LogitsDistillationLoss()}
    with pytest.raises(ValueError, match="listed twice"):
        mtd.convert(student, mode=[("kd_loss", config), ("kd_loss", config)])
    snapshot.assert_unchanged()
    teacher_snapshot.assert_unchanged()


def test_a_file_naming_the_teacher_kind_unknown_is_malformed(tmp_path):
    path = tmp_path / "k.pt"
    model, checkpoint = saved(path)
    checkpoint["kdistill_state"]["modes"][0]["config"]["teacher_model"] = {"kind": "pickle"}
    torch.save(checkpoint, path)
    victim = victim_for(model)
    snapshot = Snapshot(victim)
    with pytest.raises(ValueError, match=r"malformed teacher record.*re-save") as info:
        mtd.restore(victim, path)
    assert str(path) in str(info.value)
    snapshot.assert_unchanged()
