"""TeacherCache.build: contents, manifest, validation, staleness and resuming."""

import hashlib
import json
import logging
import os
import stat

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import kdistill
from kdistill.cache import TeacherCache, sample_input_hashes, teacher_fingerprint
from kdistill.cache._format import data_fingerprint
from kdistill.losses import TopKTeacher
from kdistill.testing.models import TinyMLP

BATCH, NUM_CLASSES = 6, 10  # as in conftest.py


def _build(teacher, loader, path, **kwargs):
    kwargs.setdefault("progress", False)
    return TeacherCache.build(teacher, loader, path, **kwargs)


def _live(teacher, x):
    """The teacher's outputs on ``x`` (output and fc2), computed as the build does."""
    captured = {}
    handle = teacher.fc2.register_forward_hook(lambda m, a, o: captured.update(fc2=o))
    with torch.no_grad():
        out = teacher.eval()(x)
    handle.remove()
    return out, captured["fc2"]


class _CallCounter:
    """Forward pre-hook counting teacher calls, raising at call ``fail_at`` (1-based)."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, module, args) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("simulated interruption")


def test_full_cache_holds_the_teacher_outputs(tmp_path, teacher, loader, data) -> None:
    cache = _build(teacher, loader, tmp_path, layers=["", "fc2"], dtype=torch.float32)
    ids, x, _ = data
    for start in range(0, len(ids), BATCH):  # the build's own batches: bit-identical
        rows = cache.locate(ids[start : start + BATCH])
        out, fc2 = _live(teacher, x[start : start + BATCH])
        assert torch.equal(cache.gather("", rows)[0], out)
        assert torch.equal(cache.gather("fc2", rows)[0], fc2)


def test_float16_cache_is_the_rounded_output(tmp_path, teacher, loader, data) -> None:
    cache = _build(teacher, loader, tmp_path)  # default dtype float16, layers [""]
    ids, x, _ = data
    out, _ = _live(teacher, x[:BATCH])
    stored = cache.gather("", cache.locate(ids[:BATCH]))[0]
    assert stored.dtype == torch.float16
    assert torch.equal(stored, out.half())


@pytest.mark.parametrize("temperature", [1.0, 2.5], ids=["T1", "T2.5"])
def test_topk_cache_holds_topk_teacher_fields(tmp_path, teacher, loader, data, temperature):
    cache = _build(teacher, loader, tmp_path, top_k=3, temperature=temperature, dtype=torch.float32)
    ids, x, _ = data
    out, _ = _live(teacher, x[BATCH : 2 * BATCH])
    expected = TopKTeacher.from_logits(out, 3, temperature)
    log_probs, indices, tail = cache.gather("", cache.locate(ids[BATCH : 2 * BATCH]))
    assert torch.equal(log_probs, expected.log_probs)
    assert torch.equal(indices.long(), expected.indices) and indices.dtype == torch.int32
    assert torch.equal(tail, expected.log_tail_mass)
    # the tail is the log of the mass outside the top k (float64 reference)
    p = torch.softmax(out.double() / temperature, dim=-1)
    torch.testing.assert_close(tail.exp(), (1 - p.topk(3).values.sum(-1)).float())
    assert cache.layer_info("")["sample_shape"] == [3]


def test_manifest_records_provenance(tmp_path, teacher, loader, data) -> None:
    cache = _build(teacher, loader, tmp_path, layers=["fc2", ""], top_k={"": 4}, shard_bytes=1)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    ids, x, _ = data
    assert manifest["format"] == "kdistill-teacher-cache" and manifest["format_version"] == 1
    assert manifest["kdistill_version"] == kdistill.__version__
    assert manifest["complete"] is True and manifest["num_samples"] == len(ids)
    assert manifest["teacher_fingerprint"] == teacher_fingerprint(teacher)
    assert manifest["data_fingerprint"] == data_fingerprint(ids, sample_input_hashes(x, None))
    assert manifest["dtype"] == "float16" and manifest["input_keys"] is None
    assert manifest["layers"] == [
        {"name": "fc2", "top_k": None, "temperature": None, "sample_shape": [32]},
        {"name": "", "top_k": 4, "temperature": 1.0, "sample_shape": [4]},
    ]
    assert len(manifest["shards"]) == 4  # shard_bytes=1: one shard per batch
    for entry in manifest["shards"]:
        assert (
            hashlib.sha256((tmp_path / entry["file"]).read_bytes()).hexdigest() == entry["sha256"]
        )
    assert cache.nbytes == sum(p.stat().st_size for p in tmp_path.glob("shard-*.bin"))


def test_teacher_mode_and_hooks_are_restored(tmp_path, teacher, loader) -> None:
    teacher.train()
    teacher.fc2.eval()
    _build(teacher, loader, tmp_path, layers=["fc1", ""])
    assert teacher.training and teacher.fc1.training and not teacher.fc2.training
    assert not teacher.fc1._forward_hooks


class _KeywordTeacher(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(11, 5)
        self.head = torch.nn.Linear(5, 7)

    def forward(self, input_ids, attention_mask):
        return self.head(self.embed(input_ids)) * attention_mask[..., None]  # [B, T, 7]


def test_mapping_batches_and_keyword_inputs(tmp_path) -> None:
    teacher = _KeywordTeacher()
    input_ids = torch.randint(0, 11, (6, 4))
    mask = torch.ones(6, 4)
    batches = [
        {
            "sample_id": torch.arange(i, i + 3),
            "input": {"input_ids": input_ids[i : i + 3], "attention_mask": mask[i : i + 3]},
        }
        for i in (0, 3)
    ]
    cache = _build(teacher, batches, tmp_path, dtype=torch.float32)
    assert cache.input_keys == ["attention_mask", "input_ids"]
    with torch.no_grad():
        expected = teacher(input_ids[3:], mask[3:])
    assert torch.equal(cache.gather("", cache.locate(torch.arange(3, 6)))[0], expected)


def test_interrupted_build_resumes(tmp_path, teacher, loader, caplog) -> None:
    clean = _build(teacher, loader, tmp_path / "clean", shard_bytes=1)
    counter = _CallCounter(fail_at=3)
    handle = teacher.register_forward_pre_hook(counter)
    with pytest.raises(KeyboardInterrupt, match="simulated"):
        _build(teacher, loader, tmp_path / "c", shard_bytes=1)
    handle.remove()
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert not manifest["complete"] and len(manifest["shards"]) == 2
    with pytest.raises(RuntimeError, match=r"incomplete.*resume"):
        TeacherCache(tmp_path / "c")
    # corrupt the second finished shard: it (and everything after it) is recomputed
    shard = tmp_path / "c" / manifest["shards"][1]["file"]
    shard.write_bytes(b"\xff" + shard.read_bytes()[1:])
    counter = _CallCounter()
    handle = teacher.register_forward_pre_hook(counter)
    with caplog.at_level(logging.WARNING, logger="kdistill.cache"):
        resumed = _build(teacher, loader, tmp_path / "c", shard_bytes=1)
    handle.remove()
    assert counter.calls == 3  # 4 batches, the first shard kept
    assert "fails its checksum" in caplog.text
    assert resumed.manifest["shards"] == clean.manifest["shards"]
    assert resumed.data_fingerprint == clean.data_fingerprint


def test_building_a_complete_cache_again_only_checks_it(tmp_path, teacher, loader) -> None:
    first = _build(teacher, loader, tmp_path)
    counter = _CallCounter()
    teacher.register_forward_pre_hook(counter)
    again = _build(teacher, loader, tmp_path)
    assert counter.calls == 0
    assert again.manifest == first.manifest


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"dtype": torch.float32}, "`dtype` differs"),
        ({"top_k": 3}, r"\(layer, top_k, temperature\) differ"),
        ({"layers": ["", "fc1"]}, r"\(layer, top_k, temperature\) differ"),
    ],
    ids=["dtype", "top_k", "layers"],
)
def test_existing_cache_with_other_settings_is_refused(tmp_path, teacher, loader, change, match):
    _build(teacher, loader, tmp_path)
    with pytest.raises(ValueError, match=f"stale: .*{match}.*overwrite=True"):
        _build(teacher, loader, tmp_path, **change)
    rebuilt = _build(teacher, loader, tmp_path, overwrite=True, **change)
    assert rebuilt.manifest["complete"]


def test_existing_cache_of_another_teacher_is_refused(tmp_path, teacher, loader) -> None:
    _build(teacher, loader, tmp_path)
    other = TinyMLP(16, 32, NUM_CLASSES)
    with pytest.raises(ValueError, match="stale: the teacher's weights differ"):
        _build(other, loader, tmp_path)


def _loader(ids, x, batch_size=BATCH):
    return DataLoader(TensorDataset(ids, x), batch_size=batch_size)


@pytest.mark.parametrize(
    ("edit", "batch_size", "match"),
    [
        (
            lambda ids, x: (ids, x.index_fill(0, torch.tensor([4]), 0.5)),
            BATCH,
            r"inputs of sample ids \[128\]",
        ),
        (lambda ids, x: (ids + 1, x), BATCH, "sample ids differ"),
        (lambda ids, x: (ids[:-3], x[:-3]), BATCH, "fewer samples"),
        (lambda ids, x: (torch.cat([ids, ids + 10_000]), torch.cat([x, x])), 2, "more samples"),
        (lambda ids, x: (ids, x), BATCH + 1, "do not line up"),
    ],
    ids=["inputs", "ids", "fewer", "more", "batches"],
)
def test_changed_data_is_refused(tmp_path, teacher, data, edit, batch_size, match) -> None:
    ids, x, _ = data
    _build(teacher, _loader(ids, x), tmp_path, shard_bytes=1)  # one shard per batch
    new_ids, new_x = edit(ids, x)
    with pytest.raises(ValueError, match=match):
        _build(teacher, _loader(new_ids, new_x, batch_size), tmp_path)


def _bad_build(tmp_path, teacher, loader, **kwargs):
    _build(teacher, loader, tmp_path / "c", **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"layers": ["fc9"]}, ValueError, r"Unknown teacher layer\(s\) \['fc9'\]"),
        ({"layers": []}, ValueError, "`layers` is empty"),
        ({"layers": ["fc1", "fc1"]}, ValueError, "duplicates"),
        ({"layers": [3]}, TypeError, "list of module names"),
        ({"top_k": 0}, ValueError, r"`top_k\[''\]` must be an integer >= 1"),
        ({"top_k": {"": True}}, TypeError, r"`top_k\[''\]` must be an integer"),
        ({"top_k": 2.0}, TypeError, "`top_k` must be None, an int or a dict"),
        ({"top_k": {"fc1": 2}}, ValueError, "not in `layers`"),
        ({"top_k": NUM_CLASSES + 1}, ValueError, "exceeds its 10 classes"),
        ({"dtype": torch.int8}, ValueError, "`dtype` must be one of"),
        ({"shard_bytes": 0}, ValueError, "`shard_bytes` must be an integer >= 1"),
        ({"temperature": 0}, ValueError, "`temperature` must be a finite number > 0"),
        ({"temperature": float("inf")}, ValueError, "`temperature` must be a finite number"),
        ({"temperature": True}, TypeError, "`temperature` must be a number"),
    ],
    ids=lambda v: str(v)[:30],
)
def test_argument_errors(tmp_path, teacher, loader, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        _bad_build(tmp_path, teacher, loader, **kwargs)


@pytest.mark.parametrize(
    ("batches", "error", "match"),
    [
        ([torch.zeros(3, 16)], TypeError, "Each batch must be a tuple"),
        ([{"input": torch.zeros(3, 16)}], TypeError, "keys 'sample_id' and 'input'"),
        ([(torch.zeros(3), torch.zeros(3, 16))], TypeError, "1-D integer"),
        ([(torch.arange(3), "text")], TypeError, "tensor .* or a mapping"),
        ([(torch.arange(2), torch.zeros(3, 16))], ValueError, "2 sample ids but 3 samples"),
        ([(torch.tensor([1, 1]), torch.zeros(2, 16))], ValueError, r"\[1\] occur more than once"),
        (
            [(torch.arange(2), torch.zeros(2, 16)), (torch.arange(1, 3), torch.ones(2, 16))],
            ValueError,
            r"\[1\] occur more than once",
        ),
        ([], ValueError, "no batches"),
    ],
    ids=[
        "tensor",
        "mapping-keys",
        "float-ids",
        "text",
        "count",
        "dup-in-batch",
        "dup-across",
        "empty",
    ],
)
def test_batch_errors(tmp_path, teacher, batches, error, match) -> None:
    with pytest.raises(error, match=match):
        _build(teacher, batches, tmp_path)


def test_changing_output_shape_is_refused(tmp_path) -> None:
    teacher = _KeywordTeacher()
    batches = [
        {
            "sample_id": torch.arange(2),
            "input": {
                "input_ids": torch.zeros(2, 4, dtype=torch.long),
                "attention_mask": torch.ones(2, 4),
            },
        },
        {
            "sample_id": torch.arange(2, 4),
            "input": {
                "input_ids": torch.zeros(2, 5, dtype=torch.long),
                "attention_mask": torch.ones(2, 5),
            },
        },
    ]
    with pytest.raises(ValueError, match=r"per-sample shape \[5, 7\].*pad or pack"):
        _build(teacher, batches, tmp_path)


def test_input_structure_must_not_change(tmp_path, teacher) -> None:
    batches = [
        (torch.arange(2), torch.zeros(2, 16)),
        (torch.arange(2, 4), {"x": torch.zeros(2, 16)}),
    ]
    with pytest.raises(ValueError, match="structure changed"):
        _build(teacher, batches, tmp_path)


def test_path_must_be_a_cache_or_empty(tmp_path, teacher, loader) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="non-empty directory without a cache manifest"):
        _build(teacher, loader, tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        _build(teacher, loader, tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_teacher_must_be_a_module(tmp_path, loader) -> None:
    with pytest.raises(TypeError, match=r"`teacher` must be an nn\.Module"):
        _build(lambda x: x, loader, tmp_path)


def test_progress_bar_uses_tqdm(tmp_path, teacher, loader, capsys) -> None:
    pytest.importorskip("tqdm")
    _build(teacher, loader, tmp_path, progress=True)
    assert "caching teacher outputs" in capsys.readouterr().err


def test_progress_bar_in_a_log_writes_few_updates(tmp_path, teacher, capsys) -> None:
    """Redirected output (not a TTY) gets the final line, not one redraw per batch (issue 17)."""
    pytest.importorskip("tqdm")
    ids, x = torch.arange(400), torch.randn(400, 16)
    many_batches = DataLoader(TensorDataset(ids, x), batch_size=2)  # 200 batches
    _build(teacher, many_batches, tmp_path, progress=True)
    err = capsys.readouterr().err
    assert "200/200" in err
    assert err.count("\r") <= 4, err.count("\r")


def _failing_teacher(teacher, fail_at=1):
    counter = _CallCounter()

    def fail(module, args):
        counter.calls += 1
        if counter.calls >= fail_at:
            raise RuntimeError("the teacher's forward failed")

    return teacher.register_forward_pre_hook(fail)


def test_a_build_failing_before_its_first_shard_leaves_nothing(tmp_path, teacher, loader) -> None:
    handle = _failing_teacher(teacher)
    with pytest.raises(RuntimeError, match="forward failed"):
        _build(teacher, loader, tmp_path / "new" / "cache")
    assert not (tmp_path / "new" / "cache").exists()  # the directory it created is gone too
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match="forward failed"):
        _build(teacher, loader, tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []
    handle.remove()
    # a corrected rerun (here: another teacher) simply builds; nothing is "stale"
    other = TinyMLP(16, 32, NUM_CLASSES)
    cache = _build(other, loader, tmp_path / "empty")
    assert cache.teacher_fingerprint == teacher_fingerprint(other)


def test_a_manifest_without_finished_shards_is_started_over(tmp_path, teacher, loader) -> None:
    _build(teacher, loader, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for entry in manifest["shards"]:
        (tmp_path / entry["file"]).unlink()
    # what an earlier kdistill left after a failed first batch: settings, no shard
    manifest.update(shards=[], num_samples=0, complete=False, data_fingerprint=None)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    other = TinyMLP(16, 32, NUM_CLASSES)  # different weights: no "stale" error
    assert _build(other, loader, tmp_path).teacher_fingerprint == teacher_fingerprint(other)


def test_leftover_temp_files_without_a_manifest_are_cleared(tmp_path, teacher, loader) -> None:
    (tmp_path / "shard-00000.bin.tmp").write_bytes(b"killed while writing")
    (tmp_path / "manifest.json.tmp").write_bytes(b"{")
    cache = _build(teacher, loader, tmp_path)
    assert cache.num_samples == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "shard-00000.bin"]


def test_resume_refuses_batches_whose_shape_differs_from_the_kept_shards(tmp_path) -> None:
    teacher = _KeywordTeacher()
    batches = [
        {
            "sample_id": torch.arange(2 * i, 2 * i + 2),
            "input": {
                "input_ids": torch.zeros(2, length, dtype=torch.long),
                "attention_mask": torch.ones(2, length),
            },
        }
        for i, length in enumerate((4, 5))
    ]
    handle = teacher.register_forward_pre_hook(_CallCounter(fail_at=2))
    with pytest.raises(KeyboardInterrupt):
        _build(teacher, batches, tmp_path, shard_bytes=1)
    handle.remove()
    assert json.loads((tmp_path / "manifest.json").read_text())["layers"][0]["sample_shape"] == [
        4,
        7,
    ]
    with pytest.raises(ValueError, match=r"per-sample shape \[5, 7\], earlier batches \[4, 7\]"):
        _build(teacher, batches, tmp_path, shard_bytes=1)


def test_a_layer_that_does_not_run_is_an_error(tmp_path, teacher, loader) -> None:
    teacher.unused = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="'unused' was not called by the teacher's forward"):
        _build(teacher, loader, tmp_path, layers=["", "unused"])


@pytest.mark.parametrize("mask", [0o022, 0o002], ids=oct)
def test_cache_files_respect_the_umask(tmp_path, teacher, loader, mask) -> None:
    previous = os.umask(mask)
    try:
        _build(teacher, loader, tmp_path / "c", shard_bytes=1)
    finally:
        os.umask(previous)
    for file in (tmp_path / "c").iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~mask, file.name
