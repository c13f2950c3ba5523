"""The manifest is checked field by field: every malformed one is one ValueError naming the file."""

import copy
import json
import re

import pytest

from kdistill.cache import TeacherCache
from kdistill.cache._format import FORMAT_NAME, FORMAT_VERSION
from kdistill.cache._manifest import (
    MAX_MANIFEST_BYTES,
    read_manifest,
    validate_manifest,
    write_manifest,
)


@pytest.fixture
def built(tmp_path, teacher, loader):
    """A complete cache (full layer ``fc2`` + top-3 output, one shard per batch) and its manifest."""
    path = tmp_path / "cache"
    TeacherCache.build(
        teacher, loader, path, layers=["fc2", ""], top_k={"": 3}, shard_bytes=1, progress=False
    )
    return path, json.loads((path / "manifest.json").read_text())


def test_a_built_manifest_is_valid_and_round_trips(built) -> None:
    path, manifest = built
    assert read_manifest(path) == manifest
    write_manifest(path, manifest)
    assert read_manifest(path) == manifest
    assert len(manifest["shards"]) == 4


def _set(*keys, value):
    def mutate(manifest):
        target = manifest
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return mutate


def _delete(*keys):
    def mutate(manifest):
        target = manifest
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]

    return mutate


FIELD = ("shards", 0, "fields", "fc2:values")
CASES = [
    (_delete("teacher_fingerprint"), "`teacher_fingerprint` is missing"),
    (_set("extra", value=1), "`extra` is not a field"),
    (_set("complete", value="yes"), "`complete` must be true or false"),
    (_set("complete", value=1), "`complete` must be true or false"),
    (_set("num_samples", value=True), "`num_samples` must be an integer"),
    (_set("num_samples", value=-1), r"`num_samples` must be in \[0,"),
    (_set("num_samples", value=19), "`num_samples` must be 20"),
    (_set("dtype", value="int8"), "`dtype` must be one of"),
    (_set("dtype", value=["float16"]), "`dtype` must be one of"),
    (_set("byteorder", value="big"), "`byteorder` must be 'little'"),
    (_set("teacher_fingerprint", value="abc"), "`teacher_fingerprint` must match"),
    (_set("data_fingerprint", value=None), "`data_fingerprint` must be a string"),
    (_set("input_keys", value=[]), "`input_keys` must hold between 1"),
    (_set("input_keys", value=["a", "a"]), "`input_keys` must not repeat"),
    (_set("input_keys", value=[3]), r"`input_keys\[0\]` must be a string"),
    (_set("layers", value=[]), "`layers` must hold between 1"),
    (_set("layers", 0, "name", value="a..b"), r"`layers\[0\].name` must match"),
    (_set("layers", 0, "name", value=".."), r"`layers\[0\].name` must match"),
    (_set("layers", 1, "name", value="fc2"), r"`layers\[1\].name` repeats"),
    (_set("layers", 0, "temperature", value=1.0), r"`layers\[0\].temperature` must be null"),
    (_set("layers", 1, "temperature", value=0), r"`layers\[1\].temperature` must be a number"),
    (_set("layers", 1, "temperature", value=True), r"`layers\[1\].temperature` must be a number"),
    (_set("layers", 1, "top_k", value=0), r"`layers\[1\].top_k` must be in \[1,"),
    (_set("layers", 1, "sample_shape", value=[4]), r"`layers\[1\].sample_shape` must end with"),
    (_set("layers", 0, "sample_shape", value=None), r"`layers\[0\].sample_shape` must be a list"),
    (_set("layers", 0, "sample_shape", value=[-1]), r"`layers\[0\].sample_shape\[0\]` must be in"),
    (_set("layers", 0, "sample_shape", value=[10**12]), r"`shards\[0\].fields\['fc2:values'\]"),
    (_set("layers", 0, "sample_shape", value=[1] * 17), "at most 16 sizes"),
    (_set("shards", 0, "file", value="../victim.txt"), r"`shards\[0\].file` must be 'shard-00000"),
    (_set("shards", 0, "file", value="/etc/passwd"), r"`shards\[0\].file` must be"),
    (_set("shards", 0, "file", value="shard-00001.bin"), r"`shards\[0\].file` must be"),
    (_set("shards", 0, "nbytes", value=10**30), r"`shards\[0\].nbytes` must be in"),
    (_set("shards", 0, "nbytes", value=1), r"`shards\[0\].nbytes` must be \d+ \(the size"),
    (_set("shards", 0, "sha256", value=None), r"`shards\[0\].sha256` must be a string"),
    (_set("shards", 0, "num_samples", value=5), r"`shards\[0\].fields\['sample_id'\].shape` must"),
    (_delete("shards", 0, "fields", "fc2:values"), r"`shards\[0\].fields.fc2:values` is missing"),
    (_set("shards", 0, "fields", "evil", value={}), r"`shards\[0\].fields.evil` is not a field"),
    (_set(*FIELD, "dtype", value="float64"), r"fields\['fc2:values'\].dtype` must be 'float16'"),
    (
        _set(*FIELD, "shape", value=[8, 10**12]),
        r"shape` must be \[6, 32\], got \[8, 1000000000000\]",
    ),
    (_set(*FIELD, "shape", value=[8, 10**15]), r"fields\['fc2:values'\].shape\[1\]` must be in"),
    (_set(*FIELD, "shape", value=[6, -1]), r"fields\['fc2:values'\].shape\[1\]` must be in"),
    (_set(*FIELD, "shape", value=[6, 32.0]), r"fields\['fc2:values'\].shape\[1\]` must be an int"),
    (_set(*FIELD, "shape", value=[6, True]), r"fields\['fc2:values'\].shape\[1\]` must be an int"),
    (_set(*FIELD, "shape", value=[6, "32"]), r"fields\['fc2:values'\].shape\[1\]` must be an int"),
    (_set(*FIELD, "shape", value=[6, 16]), r"fields\['fc2:values'\].shape` must be \[6, 32\]"),
    (_set(*FIELD, "shape", value=7), r"fields\['fc2:values'\].shape` must be a list"),
    (_set(*FIELD, "offset", value=-64), r"fields\['fc2:values'\].offset` must be in"),
    (_set(*FIELD, "offset", value=0), r"fields\['fc2:values'\].offset` must be \d+"),
    (_set(*FIELD, "offset", value=10**15), r"fields\['fc2:values'\].offset` must be \d+"),
    (_set("shards", 0, value=[[[[]]]]), r"`shards\[0\]` must be a JSON object"),
    (_set("shards", value={}), "`shards` must be a list"),
]


@pytest.mark.parametrize(("mutate", "match"), CASES, ids=[m for _, m in CASES])
def test_malformed_manifest_is_one_value_error_naming_file_and_field(built, mutate, match) -> None:
    path, manifest = built
    bad = copy.deepcopy(manifest)
    mutate(bad)
    with pytest.raises(ValueError, match=match) as info:
        validate_manifest(bad, path / "manifest.json")
    assert str(path / "manifest.json") in str(info.value)
    assert "malformed" in str(info.value) and "rebuild it" in str(info.value)
    # through the public API too, from disk
    (path / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=re.escape(str(path))):
        TeacherCache(path)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "not valid JSON"),
        ('{"a": NaN}', "not valid JSON .*NaN is not a JSON number"),
        ('{"a": -Infinity}', "not valid JSON .*Infinity is not a JSON number"),
        ('{"a": 1, "a": 2}', "key 'a' appears twice"),
        ("[" * 3000 + "]" * 3000, "nested too deeply"),
        ("9" * 5000, "not valid JSON"),
        ('"\udcff"', "not valid JSON"),
        ("[1, 2]", "not a kdistill teacher-cache manifest"),
        (json.dumps({"format": "other"}), "not a kdistill teacher-cache manifest"),
        (json.dumps({"format": FORMAT_NAME, "format_version": 99}), "format version 99"),
        (json.dumps({"format": FORMAT_NAME, "format_version": 1.0}), "format version 1.0"),
        (json.dumps({"format": FORMAT_NAME, "format_version": [1]}), r"format version \[1\]"),
    ],
    ids=[
        "syntax",
        "nan",
        "inf",
        "duplicate",
        "deep",
        "long-int",
        "surrogate",
        "list",
        "format",
        "version",
        "float-version",
        "list-version",
    ],
)
def test_unreadable_manifests(tmp_path, text, match) -> None:
    path = tmp_path / "manifest.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match=match) as info:
        read_manifest(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_missing_symlinked_and_oversized_manifests(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"No teacher cache at .*manifest\.json is missing"):
        read_manifest(tmp_path)
    real = tmp_path / "real.json"
    real.write_text(json.dumps({"format": FORMAT_NAME, "format_version": FORMAT_VERSION}))
    (tmp_path / "manifest.json").symlink_to(real)
    with pytest.raises(ValueError, match="is a symlink"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").unlink()
    (tmp_path / "manifest.json").symlink_to(tmp_path / "dangling")
    with pytest.raises(ValueError, match="is a symlink"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with open(tmp_path / "manifest.json", "wb") as f:
        f.truncate(MAX_MANIFEST_BYTES + 1)
    with pytest.raises(ValueError, match="more than the"):
        read_manifest(tmp_path)
