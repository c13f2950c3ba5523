"""Writing a cache build's shards: buffer computed batches, write a shard, rewrite the manifest."""

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._manifest import write_manifest
from ._shards import write_shard

__all__ = ["ShardWriter"]


class ShardWriter:
    """Buffers computed batches; writes a shard (then the manifest) per ``shard_bytes`` buffered.

    It also records each layer's per-sample shape from the first computed batch (or checks it
    against the finished shards' when resuming) and refuses a batch whose shape differs.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], shard_bytes: int) -> None:
        self.path = path
        self.manifest = manifest
        self.shard_bytes = shard_bytes
        self.buffer: dict[str, list[Tensor]] = {}
        self.buffered_bytes = 0

    def add(self, ids: Tensor, hashes: Tensor, fields: list[tuple[str, Tensor]]) -> None:
        """Buffer one batch (``ids [B]``, ``hashes [B]``, its layer fields)."""
        self._check_shapes(dict(fields), len(ids))
        for name, tensor in [("sample_id", ids), ("input_hash", hashes), *fields]:
            self.buffer.setdefault(name, []).append(tensor)
            self.buffered_bytes += tensor.numel() * tensor.element_size()
        if self.buffered_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the buffered batches as the next shard and rewrite the manifest."""
        if not self.buffer:
            return
        shards = self.manifest["shards"]
        fields = [(name, torch.cat(parts)) for name, parts in self.buffer.items()]
        shards.append(write_shard(self.path, len(shards), fields))
        self.manifest["num_samples"] = sum(entry["num_samples"] for entry in shards)
        write_manifest(self.path, self.manifest)
        self.buffer, self.buffered_bytes = {}, 0

    def _check_shapes(self, fields: dict[str, Tensor], batch_size: int) -> None:
        for layer in self.manifest["layers"]:
            name = layer["name"]
            key = f"{name}:" + ("values" if layer["top_k"] is None else "topk_log_probs")
            output = fields[key]
            if layer["top_k"] is None and output.shape[0] != batch_size:
                raise ValueError(
                    f"Teacher layer {name!r} output has leading size {output.shape[0]}, the batch "
                    f"has {batch_size} samples: a cached layer's output must be [B, ...]."
                )
            shape = list(output.shape[1:])
            if layer["sample_shape"] is None:
                layer["sample_shape"] = shape
            elif shape != layer["sample_shape"]:
                raise ValueError(
                    f"Teacher layer {name!r} produced per-sample shape {shape}, earlier batches "
                    f"{layer['sample_shape']} (cache at {str(self.path)!r}): a cache needs one "
                    "shape per layer (pad or pack sequences to a fixed length)."
                )
