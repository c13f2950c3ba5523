"""Confined file access for a teacher cache.

Every read, write and delete of a cache goes through these functions, which enforce the format's
rules (``kdistill.cache._format``): only the format's own file names (``manifest.json``,
``shard-NNNNN.bin`` and their ``.tmp`` siblings), directly inside the cache directory, regular
files only, never through a symlink. Files are written to a temp file created exclusively
(``O_CREAT | O_EXCL | O_NOFOLLOW``, mode ``0o666`` minus the umask, like ``torch.save``), synced,
then renamed over the destination, so a crash never leaves a half-written file in its place.
"""

import contextlib
import hashlib
import mmap
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor

from ._format import TMP_SUFFIX, is_cache_file_name

__all__ = [
    "atomic_write",
    "cache_file",
    "file_sha256",
    "map_file",
    "read_file",
    "regular_file_size",
    "remove_cache_files",
    "remove_file",
]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# O_NONBLOCK: opening a FIFO planted at a cache name must not block; no effect on regular files.
_READ_FLAGS = os.O_RDONLY | _NOFOLLOW | _CLOEXEC | getattr(os, "O_NONBLOCK", 0)
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
_HASH_CHUNK = 1 << 22


def cache_file(directory: Path, name: str) -> Path:
    """The path of the cache file ``name``; ``ValueError`` unless the format names it."""
    if not isinstance(name, str) or not is_cache_file_name(name):
        raise ValueError(
            f"{name!r} is not a file name of the teacher-cache format (manifest.json, "
            f"shard-NNNNN.bin): refusing to touch it in the cache at {str(directory)!r}."
        )
    return directory / name


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a regular file"


def _refuse(path: Path, mode: int) -> ValueError:
    return ValueError(
        f"Teacher-cache file {str(path)!r} is {_kind(mode)}: a cache holds only regular files and "
        "kdistill never follows symlinks out of it. Remove it, or rebuild the cache "
        "(overwrite=True)."
    )


def _open_for_reading(path: Path) -> int:
    """A descriptor of the existing regular file ``path`` (never followed through a symlink)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise ValueError(
            f"Teacher-cache file {str(path)!r} is missing: the cache is incomplete."
        ) from None
    if not stat.S_ISREG(mode):
        raise _refuse(path, mode)
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError as error:  # replaced by a symlink since the lstat (ELOOP), or unreadable
        raise ValueError(f"Cannot open teacher-cache file {str(path)!r}: {error}.") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _refuse(path, mode)
    return fd


def regular_file_size(path: Path) -> int | None:
    """The size of the regular cache file ``path``, ``None`` if missing; refuses anything else."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(info.st_mode):
        raise _refuse(path, info.st_mode)
    return info.st_size


def read_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular cache file of at most ``max_bytes`` (checked before reading)."""
    fd = _open_for_reading(path)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise ValueError(
                f"Teacher-cache file {str(path)!r} has {size} bytes, more than the {max_bytes} a "
                "manifest may have: it is not a kdistill manifest."
            )
        return f.read(max_bytes + 1)[:max_bytes]


def file_sha256(path: Path) -> str:
    """SHA-256 (hex) of a regular cache file, read in chunks."""
    hasher = hashlib.sha256()
    with os.fdopen(_open_for_reading(path), "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def map_file(path: Path, nbytes: int) -> Tensor:
    """Memory-map a regular cache file of exactly ``nbytes`` bytes as a uint8 tensor ``[nbytes]``.

    The size is compared before mapping, so a truncated (or padded) file is refused and nothing
    is mapped. The map is private (copy-on-write): writing to the tensor never changes the file.
    """
    fd = _open_for_reading(path)
    try:
        size = os.fstat(fd).st_size
        if size != nbytes:
            raise ValueError(
                f"Cache shard {str(path)!r} has {size} bytes, the manifest says {nbytes}: the "
                "shard is truncated or corrupt. Rebuild the cache (or delete this shard and "
                "resume the build with TeacherCache.build)."
            )
        if size == 0:
            return torch.empty(0, dtype=torch.uint8)
        buffer = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)
    return torch.frombuffer(buffer, dtype=torch.uint8)  # keeps `buffer` alive


def _create_exclusive(path: Path) -> int:
    """Create ``path`` (a temp file) exclusively; a leftover regular temp file is replaced."""
    try:
        return os.open(path, _CREATE_FLAGS, 0o666)
    except FileExistsError:
        mode = os.lstat(path).st_mode
        if not stat.S_ISREG(mode):
            raise _refuse(path, mode) from None
        os.unlink(path)  # left behind by an interrupted write
        return os.open(path, _CREATE_FLAGS, 0o666)


@contextlib.contextmanager
def atomic_write(directory: Path, name: str) -> Iterator[BinaryIO]:
    """Context manager writing the cache file ``name``: exclusive temp file, fsync, rename.

    Yields the temp file, open for binary writing; on a clean exit it is synced and renamed to
    ``name``, on an exception it is deleted and ``name`` is left as it was.

    Raises:
        ValueError: ``name`` is not a format name, or a symlink, directory or other non-regular
            file sits at ``name`` or at its temp name (nothing is written through it).
    """
    final = cache_file(directory, name)
    tmp = cache_file(directory, name + TMP_SUFFIX)
    with contextlib.suppress(FileNotFoundError):
        mode = os.lstat(final).st_mode
        if not stat.S_ISREG(mode):
            raise _refuse(final, mode)
    fd = _create_exclusive(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # ours: created exclusively above
        raise


def remove_file(directory: Path, name: str) -> None:
    """Delete the cache file ``name`` if present (a symlink there is removed, never followed)."""
    path = cache_file(directory, name)
    with contextlib.suppress(FileNotFoundError):
        mode = os.lstat(path).st_mode
        if stat.S_ISDIR(mode):
            raise _refuse(path, mode)
        os.unlink(path)


def remove_cache_files(directory: Path) -> None:
    """Delete every file of the cache at ``directory`` (format names only) and nothing else."""
    for child in directory.iterdir():
        if is_cache_file_name(child.name) and not stat.S_ISDIR(os.lstat(child).st_mode):
            os.unlink(child)
