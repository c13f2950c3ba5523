"""Writing and reading shards: named raw tensors at aligned offsets (format: ``_format``)."""

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import Tensor

from ._files import atomic_write, cache_file, map_file
from ._format import (
    aligned,
    check_little_endian,
    dtype_from_name,
    dtype_name,
    shard_name,
    tensor_bytes,
)

__all__ = ["map_shard", "shard_field", "write_shard"]


def write_shard(
    directory: Path, index: int, fields: Iterable[tuple[str, Tensor]]
) -> dict[str, Any]:
    """Write named tensors as shard ``index`` of the cache at ``directory`` (atomically).

    Args:
        directory: The cache directory.
        index: The shard's position in the manifest (its file is ``shard_name(index)``).
        fields: ``(name, tensor)`` pairs in file order.

    Returns:
        ``{"file", "num_samples", "nbytes", "sha256", "fields": {name: {offset, dtype, shape}}}``
        where ``num_samples`` is the first field's leading size.
    """
    check_little_endian()
    name = shard_name(index)
    hasher = hashlib.sha256()
    entries: dict[str, dict[str, Any]] = {}
    end = num_samples = 0
    with atomic_write(directory, name) as f:
        for position, (field, tensor) in enumerate(fields):
            tensor = tensor.detach().to("cpu").contiguous()
            if position == 0:
                num_samples = tensor.shape[0]
            padding = b"\0" * (aligned(end) - end)
            f.write(padding)
            hasher.update(padding)
            end += len(padding)
            data = tensor_bytes(tensor)
            f.write(data)
            hasher.update(data)
            entries[field] = {
                "offset": end,
                "dtype": dtype_name(tensor.dtype),
                "shape": list(tensor.shape),
            }
            end += len(data)
    return {
        "file": name,
        "num_samples": num_samples,
        "nbytes": end,
        "sha256": hasher.hexdigest(),
        "fields": entries,
    }


def map_shard(directory: Path, entry: dict[str, Any]) -> Tensor:
    """Memory-map a shard of a checked manifest as a uint8 tensor, after checking its size."""
    return map_file(cache_file(directory, entry["file"]), entry["nbytes"])


def shard_field(data: Tensor, entry: dict[str, Any], name: str) -> Tensor:
    """View field ``name`` of a mapped shard ``data`` (uint8) with its dtype and shape.

    The manifest was checked (``kdistill.cache._manifest``): the field lies inside the shard.
    """
    field = entry["fields"][name]
    dtype = dtype_from_name(field["dtype"])
    numel = 1
    for size in field["shape"]:
        numel *= size
    raw = data[field["offset"] : field["offset"] + numel * dtype.itemsize]
    return raw.view(dtype).view(field["shape"])
