"""The cache's on-disk primitives: fingerprints, input hashes, file names and shards."""

import copy
import hashlib
import struct

import pytest
import torch

from kdistill.cache._format import (
    ALIGNMENT,
    aligned,
    data_fingerprint,
    is_cache_file_name,
    sample_input_hashes,
    teacher_fingerprint,
)
from kdistill.cache._shards import map_shard, shard_field, write_shard
from kdistill.testing.models import TinyMLP


def test_teacher_fingerprint_tracks_every_weight() -> None:
    teacher = TinyMLP()
    same = copy.deepcopy(teacher)
    assert teacher_fingerprint(teacher) == teacher_fingerprint(same)
    with torch.no_grad():
        same.fc2.bias[3] += 1e-6
    assert teacher_fingerprint(teacher) != teacher_fingerprint(same)


def test_teacher_fingerprint_matches_hand_hash() -> None:
    teacher = torch.nn.Linear(3, 2)
    hasher = hashlib.sha256()
    for key, value in teacher.state_dict().items():
        hasher.update(key.encode() + b"\0")
        hasher.update(f"float32{tuple(value.shape)}".encode())
        hasher.update(struct.pack(f"<{value.numel()}f", *value.flatten().tolist()))
    assert teacher_fingerprint(teacher) == hasher.hexdigest()


def test_teacher_fingerprint_rejects_non_module() -> None:
    with pytest.raises(TypeError, match=r"must be an nn\.Module"):
        teacher_fingerprint({"w": torch.zeros(2)})


def test_sample_hash_is_per_sample_and_batch_independent() -> None:
    x = torch.randn(6, 4)
    whole = sample_input_hashes(x, None)
    parts = torch.cat([sample_input_hashes(x[:2], None), sample_input_hashes(x[2:], None)])
    assert torch.equal(whole, parts)
    assert whole.dtype == torch.int64 and len(set(whole.tolist())) == 6
    changed = x.clone()
    changed[4, 1] += 1e-3
    assert (sample_input_hashes(changed, None) != whole).tolist() == [0, 0, 0, 0, 1, 0]


def test_sample_hash_mapping_uses_named_keys_only() -> None:
    inputs = {"input_ids": torch.arange(6).view(3, 2), "mask": torch.ones(3, 2)}
    extra = {**inputs, "labels": torch.zeros(3)}
    keys = ["input_ids", "mask"]
    assert torch.equal(sample_input_hashes(inputs, keys), sample_input_hashes(extra, keys))
    swapped = {"input_ids": inputs["mask"], "mask": inputs["input_ids"]}
    assert not torch.equal(sample_input_hashes(inputs, keys), sample_input_hashes(swapped, keys))


@pytest.mark.parametrize(
    ("inputs", "keys", "error", "match"),
    [
        ({"a": torch.zeros(2)}, None, TypeError, "Expected a tensor"),
        (torch.zeros(2), ["a"], TypeError, "Expected a mapping"),
        ({"a": 3}, ["a"], TypeError, "must be a tensor with a batch dimension"),
        ({"a": torch.zeros(2), "b": torch.zeros(3)}, ["a", "b"], ValueError, "batch size"),
    ],
    ids=["mapping-for-tensor", "tensor-for-mapping", "not-a-tensor", "batch-sizes"],
)
def test_sample_hash_errors(inputs, keys, error, match) -> None:
    with pytest.raises(error, match=match):
        sample_input_hashes(inputs, keys)


def test_data_fingerprint_is_order_independent() -> None:
    ids, hashes = torch.tensor([3, 1, 2]), torch.tensor([30, 10, 20])
    order = torch.tensor([2, 0, 1])
    assert data_fingerprint(ids, hashes) == data_fingerprint(ids[order], hashes[order])
    assert data_fingerprint(ids, hashes) != data_fingerprint(ids, hashes + 1)


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int32], ids=str
)
def test_shard_round_trip(tmp_path, dtype) -> None:
    ids = torch.arange(5)
    values = (torch.randn(5, 3, 7) * 10).to(dtype)
    entry = write_shard(tmp_path, 3, [("sample_id", ids), ("v", values)])
    raw = (tmp_path / "shard-00003.bin").read_bytes()
    assert entry["file"] == "shard-00003.bin"
    assert entry["nbytes"] == len(raw)
    assert entry["sha256"] == hashlib.sha256(raw).hexdigest()
    assert all(f["offset"] % ALIGNMENT == 0 for f in entry["fields"].values())
    data = map_shard(tmp_path, entry)
    assert torch.equal(shard_field(data, entry, "sample_id"), ids)
    assert torch.equal(shard_field(data, entry, "v"), values)
    assert entry["num_samples"] == 5


def test_shard_bytes_are_little_endian_raw(tmp_path) -> None:
    entry = write_shard(tmp_path, 0, [("x", torch.tensor([1, 256], dtype=torch.int32))])
    assert (tmp_path / "shard-00000.bin").read_bytes() == b"\x01\0\0\0\0\x01\0\0"
    assert entry["fields"]["x"] == {"offset": 0, "dtype": "int32", "shape": [2]}


def test_fields_are_padded_to_the_alignment(tmp_path) -> None:
    entry = write_shard(
        tmp_path, 0, [("a", torch.tensor([7], dtype=torch.int32)), ("b", torch.tensor([9.0]))]
    )
    raw = (tmp_path / "shard-00000.bin").read_bytes()
    assert entry["fields"]["b"]["offset"] == ALIGNMENT
    assert raw == struct.pack("<i", 7) + b"\0" * (ALIGNMENT - 4) + struct.pack("<f", 9.0)
    assert [aligned(n) for n in (0, 1, ALIGNMENT, ALIGNMENT + 1)] == [0, 64, 64, 128]


def test_map_shard_refuses_truncated_and_missing(tmp_path) -> None:
    entry = write_shard(tmp_path, 0, [("x", torch.zeros(100))])
    with open(tmp_path / "shard-00000.bin", "r+b") as f:
        f.truncate(entry["nbytes"] - 4)
    with pytest.raises(ValueError, match="truncated"):
        map_shard(tmp_path, entry)
    (tmp_path / "shard-00000.bin").unlink()
    with pytest.raises(ValueError, match="missing"):
        map_shard(tmp_path, entry)


def test_mapped_shard_is_private(tmp_path) -> None:
    entry = write_shard(tmp_path, 0, [("x", torch.arange(4.0))])
    before = (tmp_path / "shard-00000.bin").read_bytes()
    data = map_shard(tmp_path, entry)
    data.fill_(0)  # copy-on-write: the file keeps its bytes
    assert (tmp_path / "shard-00000.bin").read_bytes() == before
    assert torch.equal(shard_field(map_shard(tmp_path, entry), entry, "x"), torch.arange(4.0))


@pytest.mark.parametrize(
    ("name", "ours"),
    [
        ("manifest.json", True),
        ("manifest.json.tmp", True),
        ("shard-00000.bin", True),
        ("shard-123456.bin.tmp", True),
        ("shard-0000.bin", False),
        ("../manifest.json", False),
        ("/etc/passwd", False),
        ("shard-00000.bin/x", False),
        ("notes.txt", False),
        ("manifest.json.bak", False),
    ],
)
def test_cache_file_names_are_the_formats_only(name, ours) -> None:
    assert is_cache_file_name(name) is ours
