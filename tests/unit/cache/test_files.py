"""Confined file access of the cache: format names only, no symlinks, exclusive temp files, umask."""

import os
import stat

import pytest

from kdistill.cache._files import (
    atomic_write,
    cache_file,
    file_sha256,
    read_file,
    regular_file_size,
    remove_cache_files,
    remove_file,
)


@pytest.fixture
def umask():
    """Set the process umask for one test (restored after)."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077], ids=oct)
def test_atomic_write_respects_the_umask_like_torch_save(tmp_path, umask, mask) -> None:
    umask(mask)
    with atomic_write(tmp_path, "manifest.json") as f:
        f.write(b"{}")
    # torch.save opens with mode 0o666 minus the umask; so do we (tempfile.mkstemp gives 0o600)
    assert stat.S_IMODE(os.stat(tmp_path / "manifest.json").st_mode) == 0o666 & ~mask
    assert sorted(os.listdir(tmp_path)) == ["manifest.json"]


def _write_then_fail(directory) -> None:
    with atomic_write(directory, "manifest.json") as f:
        f.write(b"new, half")
        raise RuntimeError("disk full")


def test_atomic_write_failure_keeps_the_old_file(tmp_path) -> None:
    (tmp_path / "manifest.json").write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        _write_then_fail(tmp_path)
    assert (tmp_path / "manifest.json").read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["manifest.json"]


def test_leftover_temp_file_is_replaced(tmp_path) -> None:
    (tmp_path / "shard-00000.bin.tmp").write_bytes(b"left by a killed build")
    with atomic_write(tmp_path, "shard-00000.bin") as f:
        f.write(b"data")
    assert (tmp_path / "shard-00000.bin").read_bytes() == b"data"
    assert not (tmp_path / "shard-00000.bin.tmp").exists()


@pytest.mark.parametrize("where", ["manifest.json.tmp", "manifest.json"])
def test_atomic_write_never_writes_through_a_symlink(tmp_path, where) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / where).symlink_to(victim)
    with pytest.raises(ValueError, match="is a symlink"), atomic_write(cache, "manifest.json") as f:
        f.write(b"{}")
    assert victim.read_text() == "keep"
    assert (cache / where).is_symlink()


@pytest.mark.parametrize(
    "name", ["../victim.txt", "/tmp/victim.txt", "notes.txt", "shard-1.bin", ""], ids=repr
)
def test_only_format_names_are_touched(tmp_path, name) -> None:
    with pytest.raises(ValueError, match="not a file name of the teacher-cache format"):
        cache_file(tmp_path, name)
    with pytest.raises(ValueError, match="not a file name"):
        remove_file(tmp_path, name)


def test_reads_refuse_symlinks_and_special_files(tmp_path) -> None:
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"secret")
    (tmp_path / "shard-00000.bin").symlink_to(victim)
    (tmp_path / "shard-00001.bin").mkdir()
    os.mkfifo(tmp_path / "shard-00002.bin")  # must not block
    for name, kind in [("shard-00000.bin", "a symlink"), ("shard-00001.bin", "a directory")]:
        with pytest.raises(ValueError, match=kind):
            file_sha256(tmp_path / name)
        with pytest.raises(ValueError, match=kind):
            regular_file_size(tmp_path / name)
    with pytest.raises(ValueError, match="not a regular file"):
        read_file(tmp_path / "shard-00002.bin", 100)
    assert regular_file_size(tmp_path / "shard-00003.bin") is None


def test_read_file_refuses_oversized_files_before_reading(tmp_path) -> None:
    path = tmp_path / "manifest.json"
    with open(path, "wb") as f:
        f.truncate(10**9)  # sparse: nothing is written, nothing may be read
    with pytest.raises(ValueError, match="more than the 1000 a manifest may have"):
        read_file(path, 1000)


def test_remove_cache_files_deletes_format_names_only(tmp_path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    cache = tmp_path / "cache"
    cache.mkdir()
    for name in ("manifest.json", "manifest.json.tmp", "shard-00000.bin", "notes.txt"):
        (cache / name).write_text(name)
    (cache / "shard-00001.bin").symlink_to(victim)  # only the link goes
    (cache / "shard-00002.bin").mkdir()  # a directory is never removed
    remove_cache_files(cache)
    assert sorted(os.listdir(cache)) == ["notes.txt", "shard-00002.bin"]
    assert victim.read_text() == "keep"
