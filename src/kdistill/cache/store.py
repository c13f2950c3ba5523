"""``TeacherCache``: build a teacher cache, open it, look samples up and verify it.

The format is described in ``kdistill.cache._format``, the batch convention in
``kdistill.cache._batch`` and the build (resuming) in ``kdistill.cache.build``.
"""

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..teachers import TeacherDict, describe_names
from ._batch import split_batch
from ._files import cache_file, file_sha256
from ._format import dtype_from_name, sample_input_hashes, teacher_fingerprint
from ._manifest import read_manifest
from ._shards import map_shard, shard_field
from .build import DEFAULT_SHARD_BYTES, build_cache

__all__ = ["TeacherCache"]


def _first(values: Tensor, count: int = 5) -> list[int]:
    return values[:count].tolist()


class TeacherCache:
    """A finished teacher cache on disk, opened read-only and memory-mapped.

    Opening reads and checks the manifest (every field, against the format and each shard's size
    on disk: a malformed manifest or a truncated shard is refused here, before anything is mapped)
    and each shard's sample ids and input hashes. Shards are read only as regular files inside
    ``path``, never through a symlink. A shard's SHA-256 is checked the first time
    any of its values is read (or all at once with ``verify()``), so corrupt values are never
    returned.

    Args:
        path: The cache directory written by ``TeacherCache.build``.

    Raises:
        ValueError: No cache at ``path``, an unknown format version, a malformed manifest, a
            missing, truncated or symlinked shard, or repeated sample ids; the message names the
            cache path.
        RuntimeError: The cache is incomplete (its build was interrupted): resume it by calling
            ``TeacherCache.build`` again with the same arguments.

    Example:
        >>> import tempfile, torch, kdistill as mtd
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> teacher = torch.nn.Linear(4, 3)
        >>> loader = DataLoader(TensorDataset(torch.arange(8), torch.randn(8, 4)), batch_size=4)
        >>> tmp = tempfile.TemporaryDirectory()
        >>> cache = mtd.TeacherCache.build(
        ...     teacher, loader, tmp.name, dtype=torch.float32, progress=False)
        >>> cache.num_samples, cache.layers
        (8, [''])
        >>> tmp.cleanup()
    """

    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)
        manifest = read_manifest(self._path)
        if not manifest["complete"]:
            raise RuntimeError(
                f"The teacher cache at {str(self._path)!r} is incomplete "
                f"({len(manifest['shards'])} shard(s), {manifest['num_samples']} "
                "samples written): its build was interrupted. Call TeacherCache.build again with "
                "the same teacher, dataloader and settings to resume it."
            )
        self._manifest = manifest
        self._shards: list[dict[str, Any]] = manifest["shards"]
        self._data = [map_shard(self._path, entry) for entry in self._shards]
        self._verified: set[int] = set()
        pairs = list(zip(self._data, self._shards, strict=True))
        ids = [shard_field(d, e, "sample_id") for d, e in pairs]
        hashes = [shard_field(d, e, "input_hash") for d, e in pairs]
        all_ids = torch.cat(ids) if ids else torch.empty(0, dtype=torch.int64)  # [N]
        self._hashes = torch.cat(hashes) if hashes else torch.empty(0, dtype=torch.int64)  # [N]
        self._shard_of = torch.cat(
            [torch.full((len(x),), i, dtype=torch.int64) for i, x in enumerate(ids)]
        )  # [N]
        self._row_of = torch.cat([torch.arange(len(x)) for x in ids])  # [N]
        self._sorted_ids, self._id_order = torch.sort(all_ids)
        repeated = self._sorted_ids[1:][self._sorted_ids[1:] == self._sorted_ids[:-1]]
        if len(repeated):
            raise ValueError(
                f"The teacher cache at {str(self._path)!r} holds sample ids "
                f"{_first(repeated.unique())} more than once: it is corrupt. Rebuild it."
            )
        self._sorted_hashes, self._hash_order = torch.sort(self._hashes)
        self._layers = {layer["name"]: layer for layer in manifest["layers"]}

    def __getstate__(self) -> dict[str, Any]:
        # Pickle / deepcopy by path: the memory-mapped shards are reopened, never copied.
        return {"path": str(self._path)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        type(self).__init__(self, state["path"])  # reopen from the path, as a new cache would

    def __repr__(self) -> str:
        return (
            f"TeacherCache({str(self._path)!r}, num_samples={self.num_samples}, "
            f"layers={self.layers}, dtype={self._manifest['dtype']})"
        )

    # ------------------------------------------------------------------ building
    @classmethod
    def build(
        cls,
        teacher: nn.Module | Mapping[str, nn.Module],
        dataloader: Iterable[Any],
        path: str | Path,
        *,
        layers: Sequence[str] | str | None = None,
        top_k: int | dict[str, int] | None = None,
        temperature: float = 1.0,
        dtype: torch.dtype = torch.float16,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        overwrite: bool = False,
        progress: bool = True,
    ) -> "TeacherCache":
        """Run ``teacher`` once over ``dataloader`` and write its outputs to a cache at ``path``.

        The teacher runs in eval mode under ``no_grad`` (its train/eval mode is restored after).
        Batches are ``(sample_ids, inputs, *ignored)`` tuples — e.g. from
        ``DataLoader(TensorDataset(torch.arange(N), x, y), shuffle=False)`` — or mappings with
        ``"sample_id"`` and ``"input"`` keys; ``inputs`` is a tensor (``teacher(inputs)``) or a
        mapping of keyword tensors (``teacher(**inputs)``). Sample ids must be unique integers.

        Calling ``build`` again on the same path resumes an interrupted build (finished shards
        are verified by checksum and kept; the dataloader must replay the same batches), or, for
        a complete cache, checks it against the data and returns it without running the teacher.
        A build that fails before its first shard is finished leaves nothing behind (a directory
        it created is removed again), so a corrected call simply starts over. Files are created
        with mode ``0o666`` minus the umask (like ``torch.save``); only the format's own files
        (``manifest.json``, ``shard-NNNNN.bin``) are written or deleted, never through a symlink.

        Several named teachers, ``teacher={"big": big, "expert": expert}`` (or a
        ``kdistill.TeacherDict``), share one cache: each batch runs all of them, the cached
        layers are named ``"big"`` (a teacher's output) or ``"expert.fc"`` (a layer of one),
        exactly as the criterion of a multi-teacher ``convert`` names them, and each teacher is
        fingerprinted on its own (``teacher_fingerprints``). ``CachedTeacher`` then serves a
        criterion written for the live teachers.

        Args:
            teacher: The teacher model, or a dict ``{name: model}`` of several; each
                ``state_dict`` is fingerprinted into the manifest.
            dataloader: Iterable of batches (above), in a fixed order.
            path: Cache directory (created; must be new, empty, or an existing cache).
            layers: Teacher module names to cache (dotted, as for ``get_submodule``); ``""`` is
                the teacher's output (a tensor, or the ``logits`` of a model output). Default:
                ``[""]``, or for several teachers each teacher's output (``["big", "expert"]``;
                ``""`` is refused there).
            top_k: ``None`` caches full outputs. An int ``k`` (or ``{layer: k}``) caches, for
                those layers' last axis (the classes, V), what ``TopKTeacher.from_logits``
                keeps: the top-k log-probabilities in ``dtype``, their indices (int32) and the
                log of the remaining probability mass (float32): ``6k + 4`` bytes per position
                in float16. ``CachedTeacher`` returns them as a ``TopKTeacher``.
            temperature: Temperature of the top-k log-probabilities (``TopKLogitsKLLoss``
                needs the same); ignored for full layers, which are stored as they are.
            dtype: Storage dtype of cached values (float16, bfloat16, float32 or float64);
                float32 reproduces a float32 teacher exactly.
            shard_bytes: A shard is written once this many bytes are buffered (whole batches).
            overwrite: Delete an existing cache at ``path`` (its manifest and shards only) first.
            progress: Show a tqdm progress bar when tqdm is installed.

        Returns:
            The opened cache.

        Raises:
            ValueError: Unknown layer, bad ``top_k``/``dtype``, repeated sample ids, outputs whose
                per-sample shape changes, an existing cache at ``path`` built with another
                teacher, settings or data (the message names what differs), a malformed manifest,
                or a symlink or other non-regular file at one of the cache's file names.
            TypeError: A batch that follows neither convention.
            RuntimeError: A cached layer that the teacher's forward does not call.
        """
        build_cache(
            teacher,
            dataloader,
            path,
            layers=layers,
            top_k=top_k,
            temperature=temperature,
            dtype=dtype,
            shard_bytes=shard_bytes,
            overwrite=overwrite,
            progress=progress,
        )
        return cls(path)

    # ------------------------------------------------------------------ description
    @property
    def path(self) -> Path:
        """The cache directory."""
        return self._path

    @property
    def manifest(self) -> dict[str, Any]:
        """The parsed ``manifest.json`` (do not modify)."""
        return self._manifest

    @property
    def num_samples(self) -> int:
        """Number of cached samples."""
        return int(self._manifest["num_samples"])

    @property
    def layers(self) -> list[str]:
        """Names of the cached teacher layers (``""`` is the teacher's output)."""
        return list(self._layers)

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of the cached values."""
        return dtype_from_name(self._manifest["dtype"])

    @property
    def teacher_fingerprint(self) -> str:
        """SHA-256 of the teacher's state dict the cache was built from (all teachers together)."""
        return self._manifest["teacher_fingerprint"]

    @property
    def teacher_fingerprints(self) -> dict[str, str] | None:
        """``{name: fingerprint}`` of a cache of several named teachers, else ``None``."""
        fingerprints = self._manifest.get("teacher_fingerprints")
        return None if fingerprints is None else dict(fingerprints)

    @property
    def teacher_names(self) -> tuple[str, ...] | None:
        """The names of the cached teachers (a cache of several), else ``None``."""
        fingerprints = self._manifest.get("teacher_fingerprints")
        return None if fingerprints is None else tuple(sorted(fingerprints))

    @property
    def data_fingerprint(self) -> str:
        """SHA-256 of the sorted (sample id, input hash) pairs."""
        return self._manifest["data_fingerprint"]

    @property
    def input_keys(self) -> list[str] | None:
        """``None`` when the teacher takes one input tensor, else its keyword input names."""
        return self._manifest["input_keys"]

    @property
    def nbytes(self) -> int:
        """Total size of the shards in bytes."""
        return sum(int(entry["nbytes"]) for entry in self._shards)

    def layer_info(self, layer: str) -> dict[str, Any]:
        """``{"name", "top_k", "temperature", "sample_shape"}`` of a cached layer."""
        if layer not in self._layers:
            raise ValueError(f"Layer {layer!r} is not cached; cached layers: {self.layers}.")
        return self._layers[layer]

    # ------------------------------------------------------------------ checks
    def check_teacher(self, teacher: nn.Module | str | Mapping[str, nn.Module]) -> None:
        """Raise ``ValueError`` unless ``teacher`` (a module or fingerprint) built this cache.

        For a cache of several named teachers, ``teacher`` may also be a dict (or
        ``TeacherDict``) of all or some of them: each is compared with its own fingerprint.
        """
        if isinstance(teacher, Mapping | TeacherDict):
            self._check_named_teachers(dict(teacher.items()))
            return
        if isinstance(teacher, nn.Module):
            fingerprint = teacher_fingerprint(teacher)
        elif isinstance(teacher, str):
            fingerprint = teacher
        else:
            raise TypeError(
                "`teacher` must be an nn.Module or a fingerprint string, got "
                f"{type(teacher).__name__}."
            )
        if fingerprint != self.teacher_fingerprint:
            names = self.teacher_names
            hint = (
                ""
                if names is None
                else f" The cache holds the teachers {describe_names(names)}: pass "
                "teacher={name: module} to check them one by one."
            )
            raise ValueError(
                f"The teacher cache at {str(self._path)!r} is stale: the teacher's weights differ "
                f"(cache fingerprint {self.teacher_fingerprint[:12]}..., this teacher "
                f"{fingerprint[:12]}...). Rebuild it with TeacherCache.build(..., overwrite=True)."
                f"{hint}"
            )

    def _check_named_teachers(self, teachers: dict[Any, Any]) -> None:
        fingerprints = self._manifest.get("teacher_fingerprints")
        if fingerprints is None:
            raise TypeError(
                f"The teacher cache at {str(self._path)!r} holds one teacher's outputs; pass "
                "that teacher (a module) or its fingerprint, not a dict of teachers."
            )
        if not teachers:
            raise ValueError("`teacher` is an empty dict: name at least one cached teacher.")
        unknown = [name for name in teachers if name not in fingerprints]
        if unknown:
            raise ValueError(
                f"The teacher cache at {str(self._path)!r} holds no teacher(s) "
                f"{describe_names(map(str, unknown))}; it holds "
                f"{describe_names(sorted(fingerprints))}."
            )
        stale = []
        for name, module in teachers.items():
            if not isinstance(module, nn.Module | str):
                raise TypeError(
                    f"`teacher[{name!r}]` must be an nn.Module or a fingerprint string, got "
                    f"{type(module).__name__}."
                )
            fingerprint = module if isinstance(module, str) else teacher_fingerprint(module)
            if fingerprint != fingerprints[name]:
                stale.append(name)
        if stale:
            raise ValueError(
                f"The teacher cache at {str(self._path)!r} is stale: the weights of teacher(s) "
                f"{describe_names(stale)} differ from the ones it was built from. Rebuild it "
                "with TeacherCache.build(..., overwrite=True)."
            )

    def check_samples(self, sample_ids: Tensor, input_hashes: Tensor) -> None:
        """Raise ``ValueError`` unless every id is cached with exactly these input hashes."""
        flat = self.locate(sample_ids)
        changed = (self._hashes[flat] != input_hashes).nonzero().flatten()
        if len(changed):
            raise ValueError(
                f"The inputs of sample ids {_first(sample_ids[changed])} differ from the ones the "
                f"teacher cache at {str(self._path)!r} was built on: the data changed since (or "
                "the inputs are augmented). Rebuild the cache for this data."
            )

    def verify(self, *, teacher: nn.Module | str | None = None, dataloader: Any = None) -> None:
        """Check every shard's checksum, and optionally the teacher and the data.

        Args:
            teacher: A module (or its fingerprint) that must be the one the cache was built from.
            dataloader: Batches in the build convention; every sample must be cached with the
                same inputs (in any order; the teacher is not run).

        Raises:
            ValueError: A corrupt shard, another teacher, or samples that are missing or differ.
        """
        for index in range(len(self._shards)):
            self._verify_shard(index)
        if teacher is not None:
            self.check_teacher(teacher)
        if dataloader is not None:
            for batch in dataloader:
                ids, inputs = split_batch(batch)
                self.check_samples(ids, sample_input_hashes(inputs, self.input_keys))

    def _verify_shard(self, index: int) -> None:
        if index in self._verified:
            return
        entry = self._shards[index]
        file = cache_file(self._path, entry["file"])
        if file_sha256(file) != entry["sha256"]:
            raise ValueError(
                f"Cache shard {str(file)!r} fails its SHA-256 checksum: it "
                "is corrupt. Rebuild the cache (or delete the shard and resume the build with "
                "TeacherCache.build)."
            )
        self._verified.add(index)

    # ------------------------------------------------------------------ look-ups
    def locate(self, sample_ids: Tensor) -> Tensor:
        """Flat cache rows ``[B]`` (int64) holding the given sample ids.

        Raises:
            ValueError: Some ids are not cached (the message lists them).
        """
        sample_ids = torch.as_tensor(sample_ids).to("cpu", torch.int64).flatten()
        if not len(self._sorted_ids):
            raise ValueError(f"The teacher cache at {str(self._path)!r} is empty.")
        pos = torch.searchsorted(self._sorted_ids, sample_ids).clamp(max=len(self._sorted_ids) - 1)
        missing = self._sorted_ids[pos] != sample_ids
        if missing.any():
            raise ValueError(
                f"Sample ids {_first(sample_ids[missing])} are not in the teacher cache at "
                f"{str(self._path)!r} ({self.num_samples} samples): it was built on other data."
            )
        return self._id_order[pos]

    def locate_inputs(self, input_hashes: Tensor) -> Tensor:
        """Flat cache rows ``[B]`` whose inputs have these hashes (see ``sample_input_hashes``).

        Raises:
            ValueError: Some inputs were never cached (other data, or augmented inputs).
        """
        if not len(self._sorted_hashes):
            raise ValueError(f"The teacher cache at {str(self._path)!r} is empty.")
        last = len(self._sorted_hashes) - 1
        pos = torch.searchsorted(self._sorted_hashes, input_hashes).clamp(max=last)
        missing = self._sorted_hashes[pos] != input_hashes
        if missing.any():
            raise ValueError(
                f"{int(missing.sum())} of the {len(input_hashes)} samples in this batch (batch "
                f"positions {_first(missing.nonzero().flatten())}) are not in the teacher cache at "
                f"{str(self._path)!r}: the inputs differ from the cached data (other data, "
                "augmentation, or a different padding). Pass sample ids (CachedTeacher.sample_ids) "
                "to find out which, or rebuild the cache."
            )
        return self._hash_order[pos]

    def gather(self, layer: str, rows: Tensor) -> tuple[Tensor, ...]:
        """Read a layer's cached fields for flat cache rows ``rows`` ``[B]`` (CPU tensors).

        Returns:
            ``(values [B, *sample_shape],)`` for a full layer, or ``(log_probs [B, ..., k],
            indices [B, ..., k] int32, tail_log_mass [B, ...] float32)`` for a top-k layer.
        """
        info = self.layer_info(layer)
        names = (
            ["values"]
            if info["top_k"] is None
            else ["topk_log_probs", "topk_indices", "tail_log_mass"]
        )
        shards = self._shard_of[rows]
        local = self._row_of[rows]
        outputs = []
        for suffix in names:
            field_name = f"{layer}:{suffix}"
            first = self._shards[0]["fields"][field_name]
            shape = [len(rows), *first["shape"][1:]]
            out = torch.empty(shape, dtype=dtype_from_name(first["dtype"]))
            for shard in shards.unique().tolist():
                self._verify_shard(shard)
                sel = (shards == shard).nonzero().flatten()
                field = shard_field(self._data[shard], self._shards[shard], field_name)
                out[sel] = field[local[sel]]
            if suffix == "topk_indices" and len(out) and out.min() < 0:
                raise ValueError(
                    f"The teacher cache at {str(self._path)!r} holds negative class indices in "
                    f"layer {layer!r}: it is corrupt. Rebuild it."
                )
            outputs.append(out)
        return tuple(outputs)
