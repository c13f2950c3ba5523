"""A teacher cache is hostile input: paths, symlinks, special files, sizes, nesting, names.

Every test builds a real cache at ``tmp/cache`` next to victim files, tampers with it as an
attacker with write access to the cache folder could, and checks that kdistill refuses with a
``ValueError`` naming the cache (or recovers to the exact values), and that nothing outside the
cache directory changed.
"""

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from cache_support import (
    VICTIM_TEXT,
    build,
    load_manifest,
    make_teacher_and_loader,
    plant_victims,
    read_all,
    same_values,
    save_manifest,
    snapshot,
)

from kdistill.cache import CachedTeacher, TeacherCache
from kdistill.cache._format import FORMAT_NAME, FORMAT_VERSION


@dataclass
class Scene:
    root: Path
    cache: Path
    teacher: torch.nn.Module
    loader: object
    reference: dict
    before: dict | None = None

    def freeze_outside(self) -> None:
        """Record everything outside the cache (call after the attack's own set-up)."""
        self.before = snapshot(self.root, exclude=self.cache)

    def assert_outside_untouched(self) -> None:
        assert snapshot(self.root, exclude=self.cache) == self.before
        assert (self.root / "victim.txt").read_text() == VICTIM_TEXT

    def refused(self, action, match: str | None = None) -> ValueError:
        """``action()`` raises a ValueError naming the cache directory (and matching ``match``)."""
        with pytest.raises(ValueError, match=match) as info:
            action()
        assert str(self.cache) in str(info.value)
        return info.value

    def open(self) -> TeacherCache:
        return TeacherCache(self.cache)

    def resume(self, **kwargs) -> TeacherCache:
        return build(self.cache, self.teacher, self.loader, **kwargs)

    def make_partial(self) -> None:
        """Drop the last shard and mark the cache incomplete: a resume writes shard 3 again."""
        manifest = load_manifest(self.cache)
        last = manifest["shards"].pop()
        (self.cache / last["file"]).unlink()
        manifest.update(
            complete=False,
            num_samples=manifest["num_samples"] - last["num_samples"],
            data_fingerprint=None,
        )
        save_manifest(self.cache, manifest)


@pytest.fixture
def scene(tmp_path) -> Scene:
    plant_victims(tmp_path)
    teacher, loader = make_teacher_and_loader()
    cache = build(tmp_path / "cache", teacher, loader)
    assert len(cache.manifest["shards"]) == 4
    return Scene(tmp_path, tmp_path / "cache", teacher, loader, read_all(cache))


# ------------------------------------------------------------------ paths from the manifest
@pytest.mark.parametrize(
    "file",
    [
        "ABSOLUTE_VICTIM",
        "../victim.txt",
        "../outside/secret.bin",
        "shard-00000.bin/../../victim.txt",
        "victim.txt",
        "manifest.json",
        "shard-00000.bin",
        "shard-00001.bin\x00.txt",
    ],
)
def test_shard_paths_from_the_manifest_never_leave_the_cache(scene, file) -> None:
    manifest = load_manifest(scene.cache)
    target = str(scene.root / "victim.txt") if file == "ABSOLUTE_VICTIM" else file
    manifest["shards"][1]["file"] = target
    manifest["shards"][1]["sha256"] = "0" * 64  # "fails verification": old versions deleted it
    save_manifest(scene.cache, manifest)
    scene.freeze_outside()
    for action in (scene.open, scene.resume):
        error = scene.refused(action, match=re.escape("`shards[1].file` must be 'shard-00001.bin'"))
        assert "malformed" in str(error)
    scene.assert_outside_untouched()
    assert same_values(read_all(scene.resume(overwrite=True)), scene.reference)
    scene.assert_outside_untouched()


# ------------------------------------------------------------------ symlinks
def test_symlink_at_manifest_tmp_is_never_written_through(scene) -> None:
    scene.make_partial()
    (scene.cache / "manifest.json.tmp").symlink_to(scene.root / "victim.txt")
    scene.freeze_outside()
    scene.refused(scene.resume, match=r"manifest\.json\.tmp' is a symlink")
    scene.assert_outside_untouched()
    assert not (scene.cache / "manifest.json").is_symlink()
    (scene.cache / "manifest.json.tmp").unlink()
    assert same_values(read_all(scene.resume()), scene.reference)  # the shard written is kept
    scene.assert_outside_untouched()


def test_symlink_at_a_shard_temp_path_is_never_written_through(scene) -> None:
    scene.make_partial()
    (scene.cache / "shard-00003.bin.tmp").symlink_to(scene.root / "victim.txt")
    scene.freeze_outside()
    scene.refused(scene.resume, match=r"shard-00003\.bin\.tmp' is a symlink")
    scene.assert_outside_untouched()


def test_symlinked_shard_is_refused_even_with_the_right_bytes(scene) -> None:
    shard = scene.cache / "shard-00001.bin"
    copy = scene.root / "outside" / "shard-00001.bin"
    copy.write_bytes(shard.read_bytes())  # same size and checksum: only the link is wrong
    shard.unlink()
    shard.symlink_to(copy)
    scene.freeze_outside()
    for action in (scene.open, scene.resume):
        scene.refused(action, match=r"shard-00001\.bin' is a symlink")
    scene.assert_outside_untouched()
    assert same_values(read_all(scene.resume(overwrite=True)), scene.reference)
    assert not shard.is_symlink()
    scene.assert_outside_untouched()


def test_symlinked_manifest_is_refused(scene) -> None:
    real = scene.root / "outside" / "manifest.json"
    real.write_text((scene.cache / "manifest.json").read_text())
    (scene.cache / "manifest.json").unlink()
    (scene.cache / "manifest.json").symlink_to(real)
    scene.freeze_outside()
    for action in (scene.open, scene.resume, lambda: CachedTeacher(scene.cache)):
        scene.refused(action, match=r"manifest\.json' is a symlink")
    assert same_values(read_all(scene.resume(overwrite=True)), scene.reference)
    assert not (scene.cache / "manifest.json").is_symlink()
    scene.assert_outside_untouched()


def test_hard_linked_shard_is_replaced_never_written_into(scene) -> None:
    shard = scene.cache / "shard-00001.bin"
    shard.unlink()
    os.link(scene.root / "victim.txt", shard)  # a regular file inside: size and checksum differ
    scene.freeze_outside()
    scene.refused(scene.open, match="truncated or corrupt")
    assert same_values(read_all(scene.resume()), scene.reference)  # recomputed by rename
    scene.assert_outside_untouched()


@pytest.mark.parametrize("name", ["manifest.json", "shard-00002.bin"])
@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_special_files_at_cache_names_are_refused_without_blocking(scene, name, kind) -> None:
    (scene.cache / name).unlink()
    if kind == "fifo":
        os.mkfifo(scene.cache / name)
    else:
        (scene.cache / name).mkdir()
    scene.freeze_outside()
    match = "not a regular file" if kind == "fifo" else "is a directory"
    for action in (scene.open, scene.resume):
        scene.refused(action, match=match)
    scene.assert_outside_untouched()


def test_overwrite_deletes_only_the_formats_files(scene) -> None:
    (scene.cache / "notes.txt").write_text("the user's")
    (scene.cache / "shard-00009.bin").symlink_to(scene.root / "victim.txt")
    scene.freeze_outside()
    assert same_values(read_all(scene.resume(overwrite=True)), scene.reference)
    assert (scene.cache / "notes.txt").read_text() == "the user's"
    assert not (scene.cache / "shard-00009.bin").exists()  # the link (only) was removed
    scene.assert_outside_untouched()


# ------------------------------------------------------------------ sizes and shapes
def _consistent_huge_shape(manifest) -> None:
    """A self-consistent manifest claiming 10**12 values per sample (8 TB): only disk disagrees."""
    manifest["layers"][0]["sample_shape"] = [10**12]
    end = 0
    for entry in manifest["shards"]:
        n = entry["num_samples"]
        fields = entry["fields"]
        fields["fc2:values"]["shape"] = [n, 10**12]
        offset = 0  # the writer's layout for the new shape
        order = [
            "sample_id",
            "input_hash",
            "fc2:values",
            ":topk_log_probs",
            ":topk_indices",
            ":tail_log_mass",
        ]
        sizes = {"sample_id": 8 * n, "input_hash": 8 * n, "fc2:values": 4 * n * 10**12}
        sizes |= {":topk_log_probs": 12 * n, ":topk_indices": 12 * n, ":tail_log_mass": 4 * n}
        for name in order:
            offset += -offset % 64
            fields[name]["offset"] = offset
            offset += sizes[name]
        entry["nbytes"] = end = offset
    assert end > 10**12


def _set_field(key: str, value):
    def mutate(manifest) -> None:
        manifest["shards"][0]["fields"]["fc2:values"][key] = value

    return mutate


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (_set_field("shape", [8, 10**12]), r"shape` must be \[6, 32\], got \[8, 1000000000000\]"),
        (_set_field("shape", [6, -1]), r"shape\[1\]` must be in \[0,"),
        (_set_field("shape", [-6, 32]), r"shape\[0\]` must be in \[0,"),
        (_set_field("shape", [6, True]), r"shape\[1\]` must be an integer"),
        (_set_field("shape", [6, 32.0]), r"shape\[1\]` must be an integer"),
        (_set_field("shape", [6, "32"]), r"shape\[1\]` must be an integer"),
        (_set_field("shape", [6, 2**70]), r"shape\[1\]` must be in \[0,"),
        (_set_field("offset", 2**63), r"offset` must be in \[0,"),
        (_set_field("offset", 64 * 10**9), r"offset` must be \d+, got 64000000000"),
        (_set_field("dtype", "complex128"), r"dtype` must be 'float32'"),
        (lambda m: m["shards"][0].update(nbytes=10**15), r"nbytes` must be \d+ \(the size"),
        (lambda m: m["layers"][1].update(top_k=2**40), r"top_k` must be in \[1,"),
        (lambda m: m.update(num_samples=10**30), r"`num_samples` must be in \[0,"),
        (_consistent_huge_shape, r"shard-00000\.bin' has \d+ bytes, the manifest says"),
    ],
    ids=[
        "8TB",
        "wildcard",
        "negative",
        "bool",
        "float",
        "string",
        "overflow",
        "offset-2^63",
        "offset-far",
        "dtype",
        "nbytes",
        "top_k",
        "num_samples",
        "consistent-8TB",
    ],
)
def test_sizes_are_checked_against_the_bytes_on_disk_before_anything_is_allocated(
    scene, mutate, match
) -> None:
    manifest = load_manifest(scene.cache)
    mutate(manifest)
    save_manifest(scene.cache, manifest)
    scene.freeze_outside()
    scene.refused(scene.open, match=match)  # a ValueError, not a MemoryError or RuntimeError
    if mutate is _consistent_huge_shape:  # a resume finds no valid shard: it starts over
        assert same_values(read_all(scene.resume()), scene.reference)
    else:
        scene.refused(scene.resume, match=match)
    scene.assert_outside_untouched()


def test_truncated_shard_is_refused_then_recomputed(scene) -> None:
    shard = scene.cache / "shard-00002.bin"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 3)
    scene.freeze_outside()
    scene.refused(scene.open, match="truncated")
    assert same_values(read_all(scene.resume()), scene.reference)
    scene.assert_outside_untouched()


@pytest.mark.parametrize("where", ["top", "layers", "shape"])
def test_deep_nesting_is_one_value_error(scene, where) -> None:
    deep = "[" * 3000 + "]" * 3000
    text = (scene.cache / "manifest.json").read_text()
    if where == "top":
        text = deep
    elif where == "layers":
        text = re.sub(r'"layers": \[', f'"layers": [{deep}, ', text, count=1)
    else:
        text = text.replace('"shape": [', f'"shape": [{deep}, ', 1)
    (scene.cache / "manifest.json").write_text(text)
    scene.freeze_outside()
    for action in (scene.open, scene.resume):
        scene.refused(action, match="nested too deeply")
    scene.assert_outside_untouched()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "null",
        '{"format": "kdistill-teacher-cache", "format_version": 1}',
        json.dumps(
            {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "shards": "x" * 10**6}
        ),
        '{"format": "kdistill-teacher-cache", "format_version": 1, "layers": NaN}',
    ],
    ids=["empty", "null", "bare", "big-string", "nan"],
)
def test_malformed_manifests_are_one_value_error(scene, text) -> None:
    (scene.cache / "manifest.json").write_text(text)
    scene.freeze_outside()
    for action in (scene.open, scene.resume):
        scene.refused(action)
    scene.assert_outside_untouched()


# ------------------------------------------------------------------ names and values
def _rename_layer(manifest, old: str, new: str) -> None:
    for layer in manifest["layers"]:
        if layer["name"] == old:
            layer["name"] = new
    for entry in manifest["shards"]:
        fields = entry["fields"]
        for key in [k for k in fields if k.startswith(f"{old}:")]:
            fields[f"{new}:{key.split(':')[1]}"] = fields.pop(key)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("forward", "clashes with an attribute of CachedTeacher"),
        ("cache", "clashes with an attribute of CachedTeacher"),
        ("training.fc", "clashes with an attribute of CachedTeacher"),
        ("_modules.x", "clashes with an attribute of CachedTeacher"),
        ("a..b", r"`layers\[0\].name` must match"),
        (".fc", r"`layers\[0\].name` must match"),
        ("x" * 2000, r"`layers\[0\].name` must be a string of at most"),
    ],
)
def test_layer_names_cannot_break_the_cached_teacher(scene, name, match) -> None:
    manifest = load_manifest(scene.cache)
    _rename_layer(manifest, "fc2", name)
    save_manifest(scene.cache, manifest)
    scene.freeze_outside()
    scene.refused(lambda: CachedTeacher(scene.cache), match=match)  # never a KeyError
    scene.assert_outside_untouched()


def test_negative_class_indices_are_refused(scene) -> None:
    manifest = load_manifest(scene.cache)
    entry = manifest["shards"][0]
    field = entry["fields"][":topk_indices"]
    shard = scene.cache / entry["file"]
    data = bytearray(shard.read_bytes())
    data[field["offset"] : field["offset"] + 4] = (-(2**31)).to_bytes(4, "little", signed=True)
    shard.write_bytes(bytes(data))
    entry["sha256"] = hashlib.sha256(bytes(data)).hexdigest()  # a consistent forgery
    save_manifest(scene.cache, manifest)
    scene.freeze_outside()
    scene.refused(lambda: read_all(scene.open()), match="negative class indices")
    scene.assert_outside_untouched()
