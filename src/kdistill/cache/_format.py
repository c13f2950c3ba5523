"""On-disk format of a teacher cache (format version 1): a JSON manifest plus raw binary shards.

No pickle, no third-party container: a cache directory holds

- ``manifest.json``: everything needed to read the shards (written atomically, temp file + rename,
  after every finished shard, so an interrupted build leaves a valid manifest behind);
- ``shard-00000.bin``, ``shard-00001.bin``, ...: shard ``i`` is named ``shard_name(i)``; each is
  the concatenation of raw **little-endian** tensors (C order), every one starting at the next
  multiple of ``ALIGNMENT`` bytes (zero padding between them), so each can be viewed in place
  from a memory map.

Nothing else belongs to a cache: kdistill reads, writes and deletes only these names (and their
``.tmp`` siblings while writing), only as regular files directly inside the cache directory, and
never through a symlink (``kdistill.cache._files``). The manifest is checked field by field
against this description and against each shard's size on disk before anything is read or
allocated (``kdistill.cache._manifest``).

A shard holds whole batches of samples. Its fields, in this order, are:

- ``sample_id``: int64 ``[n]``, the dataset's id of each sample;
- ``input_hash``: int64 ``[n]``, the first 8 bytes of the SHA-256 of each sample's teacher inputs
  (see ``sample_input_hashes``);
- per cached layer ``L`` (in the manifest's layer order), either ``L:values`` (``dtype``,
  ``[n, *sample_shape]``: the full output), or, for a top-k layer, ``L:topk_log_probs``
  (``dtype``, ``[n, *positions, k]``: the k largest log-probabilities
  ``log_softmax(logits / temperature)``, computed in float32 and sorted in descending order, then
  cast), ``L:topk_indices`` (int32, same shape: their class indices) and ``L:tail_log_mass``
  (float32, ``[n, *positions]``: ``log(1 − Σ_topk p)``, the log of the mass of the other classes,
  computed exactly as their log-sum-exp before any rounding; a very negative finite number when k
  covers every class). These are the fields of ``kdistill.TopKTeacher``, which
  ``TopKTeacher.from_logits`` computes for the build. At float16 that is ``6k + 4`` bytes per
  position: 388 bytes per token for k = 64.

Each manifest shard entry records its file name, sample count, byte size, SHA-256 and each
field's ``offset`` (bytes), ``dtype`` and ``shape``. The manifest also records the format name
and version, the kdistill version, the teacher and data fingerprints, the number of samples,
the layers (each with ``top_k``, ``null`` for a full layer, ``temperature`` and
``sample_shape``), the storage ``dtype`` and the structure of the teacher inputs
(``input_keys``: ``null`` for one tensor, else the keyword names). A cache of several named
teachers (built from ``{name: teacher}``) also records ``teacher_fingerprints``
(``{name: fingerprint}``; the key is absent for one teacher), and each of its layer names starts
with a teacher's name (``"big"``, ``"expert.fc"``).
"""

import ctypes
import hashlib
import re
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ALIGNMENT",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MAX_TEMPERATURE",
    "STORAGE_DTYPES",
    "TMP_SUFFIX",
    "aligned",
    "check_little_endian",
    "data_fingerprint",
    "dtype_from_name",
    "dtype_name",
    "field_specs",
    "is_cache_file_name",
    "sample_input_hashes",
    "shard_name",
    "teacher_fingerprint",
    "tensor_bytes",
]

FORMAT_NAME = "kdistill-teacher-cache"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TMP_SUFFIX = ".tmp"
MAX_TEMPERATURE = 1e6  # of top-k log-probabilities, as for the losses' temperatures
ALIGNMENT = 64  # bytes; every field starts at a multiple of this inside its shard
# Storage dtypes allowed for cached values (indices are always int32, tail masses float32).
STORAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DTYPES_BY_NAME: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d for d in (*STORAGE_DTYPES, torch.int32, torch.int64)
}
# Every file name a cache may hold: the manifest, shards, and their temp files while writing.
_CACHE_FILE = re.compile(r"(manifest\.json|shard-[0-9]{5,}\.bin)(\.tmp)?")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of ``dtype_name`` for the dtypes a cache may hold; ``ValueError`` otherwise."""
    if not isinstance(name, str) or name not in _DTYPES_BY_NAME:
        raise ValueError(f"Unknown dtype {name!r} in a cache manifest: not a kdistill cache dtype.")
    return _DTYPES_BY_NAME[name]


def shard_name(index: int) -> str:
    """File name of shard ``index`` (``shard-00000.bin``, ...)."""
    return f"shard-{index:05d}.bin"


def is_cache_file_name(name: str) -> bool:
    """Whether ``name`` is a file name the format uses (the only names kdistill touches)."""
    return _CACHE_FILE.fullmatch(name) is not None


def aligned(offset: int) -> int:
    """The first multiple of ``ALIGNMENT`` at or after ``offset``."""
    return offset + (-offset % ALIGNMENT)


def field_specs(layers: list[dict[str, Any]], storage: str) -> list[tuple[str, str, list[int]]]:
    """``(name, dtype name, per-sample shape)`` of every shard field, in file order.

    Args:
        layers: The manifest's layers (``name``, ``top_k``, ``sample_shape``), already checked.
        storage: The manifest's storage dtype name.
    """
    specs: list[tuple[str, str, list[int]]] = [
        ("sample_id", "int64", []),
        ("input_hash", "int64", []),
    ]
    for layer in layers:
        name, shape = layer["name"], list(layer["sample_shape"])
        if layer["top_k"] is None:
            specs.append((f"{name}:values", storage, shape))
        else:
            specs += [
                (f"{name}:topk_log_probs", storage, shape),
                (f"{name}:topk_indices", "int32", shape),
                (f"{name}:tail_log_mass", "float32", shape[:-1]),
            ]
    return specs


def tensor_bytes(tensor: Tensor) -> memoryview:
    """A zero-copy view of a contiguous CPU tensor's bytes, without numpy.

    The caller must keep ``tensor`` alive while the view is used.
    """
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("tensor_bytes needs a contiguous CPU tensor.")
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


def check_little_endian() -> None:
    """Raise ``RuntimeError`` on a big-endian machine (caches are little-endian, read in place)."""
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
    check_little_endian()
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
    check_little_endian()
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
