"""Resuming a cache build: keep the finished shards that verify, check the replayed batches."""

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._files import cache_file, file_sha256, regular_file_size
from ._shards import map_shard, shard_field

__all__ = ["Replay", "verified_prefix"]

logger = logging.getLogger(__name__)


def verified_prefix(path: Path, shards: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The finished shards up to the first missing, truncated or corrupt one."""
    kept: list[dict[str, Any]] = []
    for entry in shards:
        file = cache_file(path, entry["file"])
        ok = regular_file_size(file) == entry["nbytes"] and file_sha256(file) == entry["sha256"]
        if not ok:
            logger.warning(
                "Shard %s of the teacher cache at %s is missing or fails its checksum; it and the "
                "%d shard(s) after it will be recomputed.",
                entry["file"],
                path,
                len(shards) - len(kept) - 1,
            )
            break
        kept.append(entry)
    return kept


class Replay:
    """Checks replayed batches against the finished shards of an existing cache."""

    def __init__(self, path: Path, shards: list[dict[str, Any]]) -> None:
        self.path = path
        self.shards = shards
        self.index = 0
        self.ids: list[Tensor] = []
        self.hashes: list[Tensor] = []

    @property
    def active(self) -> bool:
        """Whether some finished shard has not been replayed yet."""
        return self.index < len(self.shards)

    def feed(self, ids: Tensor, hashes: Tensor) -> None:
        """Take one batch; once a shard's worth is in, compare it with the shard."""
        self.ids.append(ids)
        self.hashes.append(hashes)
        entry = self.shards[self.index]
        count = sum(len(x) for x in self.ids)
        if count < entry["num_samples"]:
            return
        where = f"shard {entry['file']!r} of the cache at {str(self.path)!r}"
        if count > entry["num_samples"]:
            raise ValueError(
                f"The dataloader's batches do not line up with {where} ({entry['num_samples']} "
                f"samples): the data differs from the cached data. Use the same dataset, batch "
                "size and order (shuffle=False), or pass overwrite=True to rebuild."
            )
        data = map_shard(self.path, entry)
        stored_ids = shard_field(data, entry, "sample_id")
        stored_hashes = shard_field(data, entry, "input_hash")
        ids, hashes = torch.cat(self.ids), torch.cat(self.hashes)
        if not torch.equal(ids, stored_ids):
            raise ValueError(
                f"The sample ids differ from those in {where} (cached first ids "
                f"{stored_ids[:5].tolist()}, now {ids[:5].tolist()}): the data changed. Pass "
                "overwrite=True to rebuild."
            )
        changed = (hashes != stored_hashes).nonzero().flatten()
        if len(changed):
            raise ValueError(
                f"The inputs of sample ids {ids[changed[:5]].tolist()} differ from those cached "
                f"in {where}: the data changed. Pass overwrite=True to rebuild."
            )
        self.index += 1
        self.ids, self.hashes = [], []

    def samples_replayed(self) -> int:
        """Samples in the shards replayed so far."""
        return sum(entry["num_samples"] for entry in self.shards[: self.index])
