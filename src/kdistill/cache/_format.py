"""On-disk format of a teacher cache (format version 1): a JSON manifest plus raw binary shards.

No pickle, no third-party container: a cache directory holds

- ``manifest.json``: everything needed to read the shards (written atomically, temp file + rename,
  after every finished shard, so an interrupted build leaves a valid manifest behind);
- ``shard-00000.bin``, ``shard-00001.bin``, ...: each the concatenation of raw **little-endian**
  tensors (C order), every one starting at a multiple of ``ALIGNMENT`` bytes (zero padding
  between them), so each can be viewed in place from a memory map with ``torch.from_file``.

A shard holds whole batches of samples. Its fields, in this order, are:

- ``sample_id``: int64 ``[n]``, the dataset's id of each sample;
- ``input_hash``: int64 ``[n]``, the first 8 bytes of the SHA-256 of each sample's teacher inputs
  (see ``sample_input_hashes``);
- per cached layer ``L``, either ``L:values`` (``dtype``, ``[n, *sample_shape]``: the full output),
  or, for a top-k layer, ``L:topk_log_probs`` (``dtype``, ``[n, *positions, k]``: the k largest
  log-probabilities ``log_softmax(logits / temperature)``, computed in float32 and sorted in
  descending order, then cast), ``L:topk_indices`` (int32, same shape: their class indices) and
  ``L:tail_log_mass`` (float32, ``[n, *positions]``: ``log(1 − Σ_topk p)``, the log of the mass
  of the other classes, computed exactly as their log-sum-exp before any rounding; a very
  negative finite number when k covers every class). These are the fields of
  ``kdistill.TopKTeacher``, which ``TopKTeacher.from_logits`` computes for the build.
  At float16 that is ``6k + 4`` bytes per position: 388 bytes per token for k = 64.

Each manifest shard entry records its file name, sample count, byte size, SHA-256 and each
field's ``offset`` (bytes), ``dtype`` and ``shape``. The manifest also records the format name
and version, the kdistill version, the teacher and data fingerprints, the number of samples,
the layers (each with ``top_k``, ``null`` for a full layer, ``temperature`` and
``sample_shape``), the storage ``dtype`` and the structure of the teacher inputs
(``input_keys``: ``null`` for one tensor, else the keyword names).
"""

import ctypes
import hashlib
import json
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ALIGNMENT",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "STORAGE_DTYPES",
    "data_fingerprint",
    "dtype_from_name",
    "dtype_name",
    "file_sha256",
    "map_shard",
    "read_manifest",
    "sample_input_hashes",
    "shard_field",
    "shard_name",
    "teacher_fingerprint",
    "tensor_bytes",
    "write_manifest",
    "write_shard",
]

FORMAT_NAME = "kdistill-teacher-cache"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
ALIGNMENT = 64  # bytes; every field starts at a multiple of this inside its shard
# Storage dtypes allowed for cached values (indices are always int32, tail masses float32).
STORAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DTYPES_BY_NAME: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (*STORAGE_DTYPES, torch.int32, torch.int64, torch.uint8, torch.bool)
}
_HASH_CHUNK = 1 << 22


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of ``dtype_name`` for the dtypes a cache may hold; ``ValueError`` otherwise."""
    if name not in _DTYPES_BY_NAME:
        raise ValueError(f"Unknown dtype {name!r} in a cache manifest: not a kdistill cache dtype.")
    return _DTYPES_BY_NAME[name]


def tensor_bytes(tensor: Tensor) -> memoryview:
    """A zero-copy view of a CPU tensor's bytes (made contiguous first), without numpy.

    The caller must keep ``tensor`` alive while the view is used; pass a contiguous CPU tensor.
    """
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("tensor_bytes needs a contiguous CPU tensor.")
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


def _check_little_endian() -> None:
    if sys.byteorder != "little":
        raise RuntimeError(
            "kdistill teacher caches store little-endian bytes and are read in place; this "
            f"machine is {sys.byteorder}-endian, which is not supported."
        )


def _hash_tensor(hasher: Any, tensor: Tensor) -> None:
    """Feed dtype, shape and the raw bytes of ``tensor`` into ``hasher``."""
    tensor = tensor.detach().to("cpu").contiguous()
    hasher.update(f"{dtype_name(tensor.dtype)}{tuple(tensor.shape)}".encode())
    hasher.update(tensor_bytes(tensor))


def teacher_fingerprint(teacher: torch.nn.Module) -> str:
    """SHA-256 (hex) of a model's ``state_dict``: each key, dtype, shape and bytes, in key order.

    Two teachers share a fingerprint exactly when their state dicts hold the same names and
    bit-identical tensors, so any weight update or a different checkpoint changes it.
    """
    if not isinstance(teacher, torch.nn.Module):
        raise TypeError(f"`teacher` must be an nn.Module, got {type(teacher).__name__}.")
    _check_little_endian()
    hasher = hashlib.sha256()
    for key, value in teacher.state_dict().items():
        hasher.update(key.encode() + b"\0")
        if isinstance(value, Tensor):
            _hash_tensor(hasher, value)
    return hasher.hexdigest()


def sample_input_hashes(inputs: Tensor | Mapping[str, Tensor], keys: list[str] | None) -> Tensor:
    """One int64 hash per sample of a batch of teacher inputs.

    Sample ``i``'s hash is the first 8 bytes (little-endian, signed) of the SHA-256 of its slice
    ``inputs[i]`` (dtype, shape and bytes); for keyword inputs, of each ``inputs[key][i]`` in the
    order of ``keys``, each preceded by its name.

    Args:
        inputs: A tensor ``[B, ...]``, or a mapping of keyword inputs, each ``[B, ...]``.
        keys: ``None`` for a tensor; the keyword names to hash (in this order) for a mapping.

    Returns:
        int64 ``[B]``.
    """
    _check_little_endian()
    if keys is None:
        if not isinstance(inputs, Tensor):
            raise TypeError(f"Expected a tensor of teacher inputs, got {type(inputs).__name__}.")
        columns = [("", inputs)]
    else:
        if not isinstance(inputs, Mapping):
            raise TypeError(f"Expected a mapping of teacher inputs, got {type(inputs).__name__}.")
        columns = [(key, inputs[key]) for key in keys]
    sizes = set()
    cpu_columns = []
    for key, value in columns:
        if not isinstance(value, Tensor) or value.dim() == 0:
            raise TypeError(
                f"Teacher input {key or '(positional)'!r} must be a tensor with a batch dimension, "
                f"got {type(value).__name__}."
            )
        sizes.add(value.shape[0])
        cpu_columns.append((key, value.detach().to("cpu").contiguous()))
    if len(sizes) != 1:
        raise ValueError(f"Teacher inputs disagree on the batch size: {sorted(sizes)}.")
    hashes = []
    for i in range(sizes.pop()):
        hasher = hashlib.sha256()
        for key, value in cpu_columns:
            hasher.update(key.encode() + b"\0")
            _hash_tensor(hasher, value[i])
        hashes.append(int.from_bytes(hasher.digest()[:8], "little", signed=True))
    return torch.tensor(hashes, dtype=torch.int64)


def data_fingerprint(sample_ids: Tensor, input_hashes: Tensor) -> str:
    """SHA-256 (hex) of the ``(sample_id, input_hash)`` pairs sorted by id (order-independent)."""
    order = torch.argsort(sample_ids)
    pairs = torch.stack([sample_ids[order], input_hashes[order]], dim=1).contiguous()  # [N, 2]
    return hashlib.sha256(tensor_bytes(pairs)).hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in chunks."""
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def shard_name(index: int) -> str:
    """File name of shard ``index``."""
    return f"shard-{index:05d}.bin"


def write_shard(path: Path, fields: Iterable[tuple[str, Tensor]]) -> dict[str, Any]:
    """Write named tensors as one shard (atomically) and return its manifest entry.

    Args:
        path: Destination file; a ``.tmp`` sibling is written, synced, then renamed over it.
        fields: ``(name, tensor)`` pairs in file order.

    Returns:
        ``{"file", "num_samples", "nbytes", "sha256", "fields": {name: {offset, dtype, shape}}}``
        where ``num_samples`` is the first field's leading size.
    """
    _check_little_endian()
    tmp = path.with_name(path.name + ".tmp")
    hasher = hashlib.sha256()
    entries: dict[str, dict[str, Any]] = {}
    offset = 0
    num_samples = None
    with open(tmp, "wb") as f:
        for name, tensor in fields:
            tensor = tensor.detach().to("cpu").contiguous()
            if num_samples is None:
                num_samples = tensor.shape[0]
            padding = -offset % ALIGNMENT
            f.write(b"\0" * padding)
            hasher.update(b"\0" * padding)
            offset += padding
            data = tensor_bytes(tensor)
            f.write(data)
            hasher.update(data)
            entries[name] = {
                "offset": offset,
                "dtype": dtype_name(tensor.dtype),
                "shape": list(tensor.shape),
            }
            offset += len(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {
        "file": path.name,
        "num_samples": num_samples or 0,
        "nbytes": offset,
        "sha256": hasher.hexdigest(),
        "fields": entries,
    }


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` atomically (temp file, fsync, rename)."""
    path = directory / MANIFEST_NAME
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(directory: Path) -> dict[str, Any]:
    """Read and sanity-check ``manifest.json``; ``ValueError`` naming the file if it is not one."""
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(
            f"No teacher cache at {str(directory)!r}: {MANIFEST_NAME} is missing. Build one with "
            "kdistill.TeacherCache.build(teacher, dataloader, path)."
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not valid JSON ({err}): the cache is corrupt.") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{str(path)!r} is not a kdistill teacher-cache manifest.")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} has cache format version {manifest.get('format_version')!r}; this "
            f"kdistill reads version {FORMAT_VERSION}. Rebuild the cache with this version."
        )
    return manifest


def map_shard(directory: Path, entry: dict[str, Any]) -> Tensor:
    """Memory-map a shard as a uint8 tensor, after checking its size (truncation)."""
    path = directory / entry["file"]
    if not path.is_file():
        raise ValueError(f"Cache shard {str(path)!r} is missing: the cache is incomplete.")
    size = path.stat().st_size
    if size != entry["nbytes"]:
        raise ValueError(
            f"Cache shard {str(path)!r} has {size} bytes, the manifest says {entry['nbytes']}: "
            "the shard is truncated or corrupt. Rebuild the cache (or delete this shard and "
            "resume the build with TeacherCache.build)."
        )
    if size == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)


def shard_field(data: Tensor, entry: dict[str, Any], name: str) -> Tensor:
    """View field ``name`` of a mapped shard ``data`` (uint8) with its dtype and shape."""
    field = entry["fields"][name]
    dtype = dtype_from_name(field["dtype"])
    shape = field["shape"]
    numel = 1
    for size in shape:
        numel *= size
    nbytes = numel * torch.empty(0, dtype=dtype).element_size()
    raw = data[field["offset"] : field["offset"] + nbytes]
    return raw.view(dtype).view(shape)
