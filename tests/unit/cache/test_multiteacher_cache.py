"""One teacher cache of several named teachers: build, per-teacher fingerprints, exact replay."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdistill as mtd
from kdistill.cache import CachedTeacher, TeacherCache, teacher_fingerprint
from kdistill.testing.models import TinyMLP

IN_FEATURES, NUM_CLASSES = 16, 10  # as in conftest.py


class WideHead(nn.Module):
    """A hand-written second teacher: ``fc`` then ``head``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(IN_FEATURES, 40)
        self.head = nn.Linear(40, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc(x)))


@pytest.fixture
def teachers() -> dict[str, nn.Module]:
    torch.manual_seed(7)
    return {"big": TinyMLP(IN_FEATURES, 48, NUM_CLASSES), "expert": WideHead()}


def _build(teachers, loader, path, **kwargs):
    kwargs.setdefault("dtype", torch.float32)
    return TeacherCache.build(teachers, loader, path, progress=False, **kwargs)


def _criterion():
    torch.manual_seed(4)
    return {
        ("", "big"): mtd.LogitsDistillationLoss(temperature=2.0),
        ("fc2", "big.fc2"): mtd.HintLoss(32, 48),
        ("", "expert"): mtd.ReverseKLLoss(),
        ("fc1", "expert.fc"): mtd.HintLoss(32, 40),
        ("", ("big", "expert")): mtd.EnsembleLogitsDistillationLoss(2.0, [0.25, 0.75]),
    }


def _convert(student, teacher):
    return mtd.convert(
        student,
        mode=[
            (
                "kd_loss",
                {
                    "teacher_model": teacher,
                    "criterion": _criterion(),
                    "loss_balancer": mtd.StaticLossBalancer([0.1, 0.1, 0.2, 0.1, 0.3]),
                },
            )
        ],
    )


def test_build_records_each_teachers_fingerprint_and_caches_named_layers(
    tmp_path, teachers, loader
) -> None:
    cache = _build(teachers, loader, tmp_path)
    assert cache.layers == ["big", "expert"]  # the default: every teacher's output
    assert cache.teacher_names == ("big", "expert")
    assert cache.teacher_fingerprints == {n: teacher_fingerprint(t) for n, t in teachers.items()}
    assert cache.teacher_fingerprint == teacher_fingerprint(mtd.TeacherDict(teachers))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(manifest["teacher_fingerprints"]) == {"big", "expert"}


def test_one_teacher_caches_keep_the_manifest_as_it_was(tmp_path, teacher, loader) -> None:
    cache = TeacherCache.build(teacher, loader, tmp_path, progress=False)
    assert cache.teacher_names is None and cache.teacher_fingerprints is None
    assert "teacher_fingerprints" not in json.loads((tmp_path / "manifest.json").read_text())
    assert CachedTeacher(tmp_path).kd_teacher_names is None


@pytest.mark.parametrize("explicit_ids", [False, True], ids=["by-input", "by-id"])
def test_cached_dict_teacher_trains_exactly_like_the_live_teachers(
    tmp_path, teachers, student, loader, explicit_ids
) -> None:
    _build(teachers, loader, tmp_path, layers=["big", "big.fc2", "expert", "expert.fc"])
    cached = CachedTeacher(tmp_path, teacher=teachers)
    assert cached.kd_teacher_names == ("big", "expert")
    live_model = _convert(copy.deepcopy(student), teachers)
    cached_model = _convert(copy.deepcopy(student), cached)
    for model in (live_model, cached_model):
        model.train()
    live_opt = torch.optim.SGD([p for p in live_model.parameters() if p.requires_grad], lr=0.1)
    cached_opt = torch.optim.SGD([p for p in cached_model.parameters() if p.requires_grad], lr=0.1)
    for ids, x, y in loader:
        live_out = live_model(x)
        if explicit_ids:
            with cached.sample_ids(ids):
                cached_out = cached_model(x)
        else:
            cached_out = cached_model(x)
        live_terms = live_model.compute_kd_loss(
            student_loss=F.cross_entropy(live_out, y), skip_balancer=True
        )
        cached_terms = cached_model.compute_kd_loss(
            student_loss=F.cross_entropy(cached_out, y), skip_balancer=True
        )
        assert list(live_terms) == list(cached_terms) and len(live_terms) == 6
        for key in live_terms:
            assert torch.equal(live_terms[key], cached_terms[key]), key
        for model, opt, terms in (
            (live_model, live_opt, live_terms),
            (cached_model, cached_opt, cached_terms),
        ):
            model.loss_balancer(terms).backward()
            opt.step()
            opt.zero_grad()
    live_state, cached_state = live_model.state_dict(), cached_model.state_dict()
    assert list(live_state) == list(cached_state)
    for key in live_state:
        assert torch.equal(live_state[key], cached_state[key]), key


def test_stale_teachers_are_named_and_subsets_are_checked(tmp_path, teachers, loader) -> None:
    _build(teachers, loader, tmp_path)
    CachedTeacher(tmp_path, teacher={"expert": teachers["expert"]})  # a subset is fine
    CachedTeacher(tmp_path, teacher=mtd.TeacherDict(teachers))
    CachedTeacher(tmp_path, teacher={"big": teacher_fingerprint(teachers["big"])})
    changed = copy.deepcopy(teachers["expert"])
    with torch.no_grad():
        changed.fc.bias.add_(1e-3)
    with pytest.raises(ValueError, match=r"stale: the weights of teacher\(s\) \['expert'\] differ"):
        CachedTeacher(tmp_path, teacher={"big": teachers["big"], "expert": changed})
    with pytest.raises(ValueError, match=r"holds no teacher\(s\) \['small'\]; it holds"):
        CachedTeacher(tmp_path, teacher={"small": changed})
    with pytest.raises(ValueError, match=r"`teacher` is an empty dict"):
        CachedTeacher(tmp_path, teacher={})
    with pytest.raises(TypeError, match=r"`teacher\['big'\]` must be an nn.Module"):
        CachedTeacher(tmp_path, teacher={"big": 3})
    with pytest.raises(ValueError, match=r"holds the teachers \['big', 'expert'\]: pass teacher="):
        CachedTeacher(tmp_path, teacher=teachers["big"])


def test_a_dict_for_a_one_teacher_cache_is_a_type_error(tmp_path, teacher, loader) -> None:
    TeacherCache.build(teacher, loader, tmp_path, progress=False)
    with pytest.raises(TypeError, match=r"holds one teacher's outputs"):
        CachedTeacher(tmp_path, teacher={"big": teacher})


def test_rebuild_resumes_and_refuses_changed_teachers_by_name(tmp_path, teachers, loader) -> None:
    _build(teachers, loader, tmp_path)
    again = _build(teachers, loader, tmp_path)  # complete: checked, nothing recomputed
    assert again.teacher_names == ("big", "expert")
    changed = {"big": teachers["big"], "expert": copy.deepcopy(teachers["expert"])}
    with torch.no_grad():
        changed["expert"].head.weight.mul_(2)
    with pytest.raises(
        ValueError, match=r"is stale: the weights of teacher\(s\) \['expert'\] differ"
    ):
        _build(changed, loader, tmp_path)
    with pytest.raises(ValueError, match=r"the teachers differ \(cache: \['big', 'expert'\], now:"):
        _build({"big": teachers["big"]}, loader, tmp_path, layers=["big"])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"layers": [""]}, ValueError, r"`layers` names '' \(the whole teacher\), but there are"),
        ({"layers": ["bigg"]}, ValueError, r"Unknown teacher 'bigg'. Did you mean 'big'"),
        ({"layers": ["big.fc9"]}, ValueError, r"Unknown teacher layer 'big.fc9'.*of teacher 'big'"),
    ],
    ids=["root", "unknown-teacher", "unknown-layer"],
)
def test_bad_layers_of_a_dict_teacher(tmp_path, teachers, loader, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        _build(teachers, loader, tmp_path / "cache", **kwargs)
    assert not (tmp_path / "cache").exists()  # a failed build leaves nothing behind


@pytest.mark.parametrize(
    ("teacher", "error", "match"),
    [
        ({}, ValueError, r"`teacher` is an empty dict"),
        ({"a.b": TinyMLP()}, ValueError, r"Teacher name 'a.b' holds a dot"),
        ({"a": 3}, TypeError, r"Teacher 'a' must be an nn.Module"),
        ([TinyMLP()], TypeError, r"`teacher` must be an nn.Module or a dict"),
    ],
    ids=["empty", "dotted", "not-a-module", "list"],
)
def test_bad_teacher_dicts_are_refused_by_build(tmp_path, loader, teacher, error, match) -> None:
    with pytest.raises(error, match=match):
        _build(teacher, loader, tmp_path / "cache")


def _tamper(path, edit) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.update(teacher_fingerprints={}), r"`teacher_fingerprints` must be an object"),
        (
            lambda m: m.update(teacher_fingerprints=["big"]),
            r"`teacher_fingerprints` must be an object",
        ),
        (
            lambda m: m["teacher_fingerprints"].update({"a.b": "0" * 64}),
            r"`teacher_fingerprints` has a teacher name that holds a dot",
        ),
        (
            lambda m: m["teacher_fingerprints"].update(big="not-hex"),
            r"`teacher_fingerprints\['big'\]` must match",
        ),
        (
            lambda m: m.update(teacher_fingerprints={f"t{i}": "0" * 64 for i in range(257)}),
            r"must be an object of 1 to 256 teacher fingerprints",
        ),
        (
            lambda m: m["teacher_fingerprints"].pop("expert"),
            r"`layers\[1\].name` must be a teacher of `teacher_fingerprints`",
        ),
    ],
    ids=["empty", "list", "dotted-name", "bad-fingerprint", "huge", "layer-outside"],
)
def test_tampered_teacher_fingerprints_are_refused(tmp_path, teachers, loader, edit, match) -> None:
    _build(teachers, loader, tmp_path)
    _tamper(tmp_path, edit)
    with pytest.raises(ValueError, match=match) as info:
        TeacherCache(tmp_path)
    assert str(tmp_path / "manifest.json") in str(info.value)


def test_checkpoints_move_between_live_teachers_and_their_cache(
    tmp_path, teachers, student, loader
) -> None:
    _build(teachers, loader, tmp_path / "cache", layers=["big", "big.fc2", "expert", "expert.fc"])
    cached = CachedTeacher(tmp_path / "cache", teacher=teachers)
    x = next(iter(loader))[1]
    for source, target in ((teachers, cached), (cached, teachers)):
        model = _convert(copy.deepcopy(student), source).eval()
        mtd.save(model, tmp_path / "ckpt.pt")
        restored = mtd.restore(copy.deepcopy(student), tmp_path / "ckpt.pt", teacher_model=target)
        restored.eval()
        model(x)
        restored(x)
        expected = model.compute_kd_loss(skip_balancer=True)
        got = restored.compute_kd_loss(skip_balancer=True)
        for key in expected:
            assert torch.equal(got[key], expected[key]), key
        mtd.export(model)
        mtd.export(restored)
