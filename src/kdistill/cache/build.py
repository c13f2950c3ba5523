"""Building a teacher cache: run the teacher once over a dataset and write its outputs to shards.

Batches follow the convention of ``kdistill.cache._batch``. Every sample of a layer must have the
same output shape (pack or pad sequences to one length).

The build is resumable: the manifest is rewritten after every finished shard, and a later call with
the same teacher, layers, ``top_k`` and ``dtype`` verifies the finished shards (checksums, and the
sample ids and input hashes of the replayed batches), keeps them and computes only the rest. The
dataloader must therefore yield the same batches in the same order (``shuffle=False``). A build
that fails before its first shard is finished leaves nothing behind (not even a directory it
created), so a corrected call simply starts over.

Three pieces do the work: ``_TeacherRunner`` (the teacher in eval mode with hooks on the cached
layers), ``_ShardWriter`` (buffers computed batches, writes shards and the manifest) and
``_Replay`` (checks replayed batches against the finished shards); ``_Build`` runs the loop.
"""

import contextlib
import importlib.util
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._validation import check_int, check_positive
from .._version import __version__
from ..losses import TopKTeacher
from ._batch import input_keys, layer_tensor, split_batch
from ._files import (
    cache_file,
    file_sha256,
    regular_file_size,
    remove_cache_files,
    remove_file,
)
from ._format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    MAX_TEMPERATURE,
    STORAGE_DTYPES,
    data_fingerprint,
    dtype_name,
    is_cache_file_name,
    sample_input_hashes,
    teacher_fingerprint,
)
from ._manifest import read_manifest, write_manifest
from ._shards import map_shard, shard_field, write_shard

__all__ = ["DEFAULT_SHARD_BYTES", "build_cache"]

logger = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 256 * 2**20
# Manifest keys that must agree between an existing (partial or complete) cache and a new build.
_SETTINGS = ("teacher_fingerprint", "layers", "dtype")


def _normalize_layers(teacher: nn.Module, layers: Any) -> list[str]:
    if isinstance(layers, str):
        layers = [layers]
    if not isinstance(layers, Iterable) or not all(isinstance(x, str) for x in layers):
        raise TypeError(f"`layers` must be a list of module names (str), got {layers!r}.")
    layers = list(layers)
    if not layers:
        raise ValueError("`layers` is empty: name at least one teacher layer ('' is the output).")
    if len(set(layers)) != len(layers):
        raise ValueError(f"`layers` has duplicates: {layers}.")
    names = [n for n, _ in teacher.named_modules()]
    unknown = [layer for layer in layers if layer not in names]
    if unknown:
        shown = names[:20]
        raise ValueError(
            f"Unknown teacher layer(s) {unknown} in `layers`. Valid names ('' is the whole "
            f"teacher's output): {shown}{' ...' if len(names) > 20 else ''}."
        )
    return layers


def _normalize_top_k(top_k: Any, layers: list[str]) -> dict[str, int | None]:
    if top_k is None or (isinstance(top_k, int) and not isinstance(top_k, bool)):
        per_layer = dict.fromkeys(layers, top_k)
    elif isinstance(top_k, Mapping):
        unknown = sorted(set(top_k) - set(layers))
        if unknown:
            raise ValueError(f"`top_k` names layers {unknown} that are not in `layers` {layers}.")
        per_layer = {layer: top_k.get(layer) for layer in layers}
    else:
        raise TypeError(
            f"`top_k` must be None, an int or a dict {{layer: int}}, got {type(top_k).__name__}."
        )
    return {
        layer: None if k is None else check_int(f"top_k[{layer!r}]", k, min_value=1)
        for layer, k in per_layer.items()
    }


def _describe_difference(key: str, old: Any, new: Any) -> str:
    if key == "teacher_fingerprint":
        return (
            f"the teacher's weights differ (cache fingerprint {str(old)[:12]}..., this teacher "
            f"{str(new)[:12]}...)"
        )
    return f"`{key}` differs (cache: {old!r}, now: {new!r})"


def _check_settings(path: Path, manifest: dict[str, Any], settings: dict[str, Any]) -> None:
    """Refuse to extend or reuse a cache built with other settings, naming every difference."""
    diffs = [
        _describe_difference(key, manifest[key], settings[key])
        for key in _SETTINGS
        if key != "layers" and manifest[key] != settings[key]
    ]
    keys = ("name", "top_k", "temperature")
    old_layers = [tuple(layer[k] for k in keys) for layer in manifest["layers"]]
    new_layers = [tuple(layer[k] for k in keys) for layer in settings["layers"]]
    if old_layers != new_layers:
        diffs.append(
            f"the (layer, top_k, temperature) differ (cache: {old_layers}, now: {new_layers})"
        )
    if diffs:
        raise ValueError(
            f"The teacher cache at {str(path)!r} is stale: {'; '.join(diffs)}. Pass "
            "overwrite=True to rebuild it, or choose another path."
        )


def _verified_prefix(path: Path, shards: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The finished shards up to the first missing, truncated or corrupt one."""
    kept = []
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


def _progress(dataloader: Any, enable: bool) -> Any:
    """A tqdm progress bar when tqdm is installed and ``enable``; otherwise ``None``."""
    if not enable or importlib.util.find_spec("tqdm") is None:
        return None
    from tqdm.auto import tqdm  # optional: never a dependency of kdistill

    total = len(dataloader) if hasattr(dataloader, "__len__") else None
    return tqdm(total=total, desc="caching teacher outputs", unit="batch")


def _layer_fields(
    name: str, output: Tensor, top_k: int | None, temperature: float, dtype: torch.dtype
) -> list[tuple[str, Tensor]]:
    """The shard fields of one layer for one batch (see ``_format``)."""
    if top_k is None:
        return [(f"{name}:values", output.detach().to(dtype))]
    if top_k > output.shape[-1]:
        raise ValueError(
            f"`top_k`={top_k} for layer {name!r} exceeds its {output.shape[-1]} classes; use "
            f"top_k <= {output.shape[-1]} or cache the full output (top_k=None)."
        )
    # The one truncation used by the sparse losses, so a cached and a live top-k teacher agree.
    sparse = TopKTeacher.from_logits(output.detach(), top_k, temperature)
    return [
        (f"{name}:topk_log_probs", sparse.log_probs.to(dtype)),
        (f"{name}:topk_indices", sparse.indices.to(torch.int32)),
        (f"{name}:tail_log_mass", sparse.log_tail_mass.float()),
    ]


class _TeacherRunner:
    """The teacher in eval mode with forward hooks on the cached layers (a context manager).

    On exit the hooks are removed and every submodule's own train/eval mode is restored.
    """

    def __init__(self, teacher: nn.Module, layers: list[dict[str, Any]], dtype: torch.dtype):
        self.teacher = teacher
        self.layers = layers
        self.dtype = dtype
        params = list(teacher.parameters())
        self.device = params[0].device if params else torch.device("cpu")
        self.outputs: dict[str, Any] = {}
        self._handles: list[Any] = []
        self._training = [(module, module.training) for module in teacher.modules()]

    def _hook(self, name: str) -> Any:
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            self.outputs[name] = output

        return record

    def __enter__(self) -> "_TeacherRunner":
        self.teacher.eval()
        for layer in self.layers:
            if layer["name"]:
                module = self.teacher.get_submodule(layer["name"])
                self._handles.append(module.register_forward_hook(self._hook(layer["name"])))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        for module, flag in self._training:
            module.training = flag

    def fields(self, inputs: Tensor | Mapping[str, Tensor]) -> list[tuple[str, Tensor]]:
        """Run the teacher on one batch; the shard fields of every layer (on the CPU)."""
        self.outputs.clear()
        with torch.no_grad():
            if isinstance(inputs, Tensor):
                self.outputs[""] = self.teacher(inputs.to(self.device))
            else:
                self.outputs[""] = self.teacher(**{k: v.to(self.device) for k, v in inputs.items()})
        fields = []
        for layer in self.layers:
            name = layer["name"]
            if name not in self.outputs:
                raise RuntimeError(
                    f"Teacher layer {name!r} was not called by the teacher's forward, so it has "
                    "no output to cache; choose layers that run (see `kdistill inspect`)."
                )
            tensor = layer_tensor(self.outputs[name], name).to("cpu")
            temperature = layer["temperature"] or 1.0
            fields += _layer_fields(name, tensor, layer["top_k"], temperature, self.dtype)
        self.outputs.clear()
        return fields


class _ShardWriter:
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


class _Replay:
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


def _new_manifest(settings: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kdistill_version": __version__,
        "complete": False,
        "data_fingerprint": None,
        "num_samples": 0,
        "byteorder": "little",
        "input_keys": None,  # set by the first batch
        **settings,
        "shards": [],
    }


def _open_or_start(path: Path, settings: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """The manifest to continue: the existing cache's (checked, finished shards only) or a new one.

    A directory holding only the format's files without anything finished (a build that failed
    before its first shard, or was killed while writing it), or whose first shard fails
    verification, is cleared and started over.
    """
    manifest = None
    has_manifest = (path / MANIFEST_NAME).exists() or (path / MANIFEST_NAME).is_symlink()
    if has_manifest and not overwrite:
        manifest = read_manifest(path)
        if not manifest["shards"] and not manifest["complete"]:
            logger.info("The teacher cache at %s holds no finished shard: starting over.", path)
            manifest = None
    elif not overwrite and any(not is_cache_file_name(p.name) for p in path.iterdir()):
        raise ValueError(
            f"`path` {str(path)!r} is a non-empty directory without a cache manifest; choose an "
            "empty or new directory (kdistill will not write into unrelated files)."
        )
    if manifest is not None:
        _check_settings(path, manifest, settings)
        finished = _verified_prefix(path, manifest["shards"])
        if not finished:  # not one shard survives verification: nothing to keep
            manifest = None
    if manifest is None:
        remove_cache_files(path)
        return _new_manifest(settings)
    for entry in manifest["shards"][len(finished) :]:  # recomputed, maybe split differently
        remove_file(path, entry["file"])
    if len(finished) < len(manifest["shards"]):
        manifest["complete"] = False
    manifest["shards"] = finished
    manifest["num_samples"] = sum(entry["num_samples"] for entry in finished)
    return manifest


class _Build:
    """One ``build_cache`` call over the dataloader: replay, compute, finish the manifest."""

    def __init__(self, path: Path, manifest: dict[str, Any], shard_bytes: int) -> None:
        self.path = path
        self.manifest = manifest
        self.complete = bool(manifest["complete"])  # an existing cache, only to be checked
        self.replay = _Replay(path, list(manifest["shards"]))
        self.writer = _ShardWriter(path, manifest, shard_bytes)
        self.seen: set[int] = set()
        self.ids: list[Tensor] = []
        self.hashes: list[Tensor] = []

    def _checked_hashes(self, ids: Tensor, inputs: Tensor | Mapping[str, Tensor]) -> Tensor:
        """Check one batch's structure and ids; return its input hashes ``[B]``."""
        keys = input_keys(inputs)
        if not self.seen and not self.manifest["shards"]:  # the first batch defines the structure
            self.manifest["input_keys"] = keys
        if keys != self.manifest["input_keys"]:
            raise ValueError(
                f"The teacher inputs' structure changed: the cache at {str(self.path)!r} has "
                f"keyword inputs {self.manifest['input_keys']} (None means one tensor), this "
                f"batch has {keys}."
            )
        hashes = sample_input_hashes(inputs, keys)
        if len(hashes) != len(ids):
            raise ValueError(
                f"A batch has {len(ids)} sample ids but {len(hashes)} samples of inputs."
            )
        id_list = ids.tolist()
        batch_ids = set(id_list)
        if len(batch_ids) != len(id_list) or not self.seen.isdisjoint(batch_ids):
            repeated = sorted(i for i in batch_ids if i in self.seen or id_list.count(i) > 1)
            raise ValueError(
                f"Sample ids {repeated[:5]} occur more than once; each sample needs a unique id."
            )
        self.seen.update(batch_ids)
        self.ids.append(ids)
        self.hashes.append(hashes)
        return hashes

    def run(self, dataloader: Iterable[Any], runner: _TeacherRunner, bar: Any) -> None:
        """Go through the dataloader once, then finish (or check) the manifest."""
        for batch in dataloader:
            ids, inputs = split_batch(batch)
            hashes = self._checked_hashes(ids, inputs)
            if self.replay.active:
                self.replay.feed(ids, hashes)
            elif self.complete:
                raise ValueError(
                    f"The dataloader yields more samples than the complete cache at "
                    f"{str(self.path)!r} holds ({self.manifest['num_samples']}): the data "
                    "changed. Pass overwrite=True to rebuild."
                )
            else:
                self.writer.add(ids, hashes, runner.fields(inputs))
            if bar is not None:
                bar.update(1)
        if self.replay.active:
            raise ValueError(
                f"The dataloader yielded fewer samples than the cache at {str(self.path)!r} holds "
                f"(it ended after {self.replay.samples_replayed()} of "
                f"{self.manifest['num_samples']} cached samples): the data changed. Pass "
                "overwrite=True to rebuild."
            )
        self.writer.flush()
        if not self.ids:
            raise ValueError("The dataloader yielded no batches: nothing to cache.")
        fingerprint = data_fingerprint(torch.cat(self.ids), torch.cat(self.hashes))
        if self.complete:
            if fingerprint != self.manifest["data_fingerprint"]:
                raise ValueError(
                    f"The data differs from the cache at {str(self.path)!r}. Pass overwrite=True."
                )
            return
        self.manifest["complete"] = True
        self.manifest["data_fingerprint"] = fingerprint
        write_manifest(self.path, self.manifest)


def build_cache(
    teacher: nn.Module,
    dataloader: Iterable[Any],
    path: str | Path,
    *,
    layers: Any = ("",),
    top_k: Any = None,
    temperature: float = 1.0,
    dtype: torch.dtype = torch.float16,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Run ``teacher`` once over ``dataloader`` and write (or finish, or check) a cache at ``path``.

    See ``TeacherCache.build`` for the arguments. Returns the cache directory.
    """
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"`teacher` must be an nn.Module, got {type(teacher).__name__}.")
    if dtype not in STORAGE_DTYPES:
        raise ValueError(
            f"`dtype` must be one of {[dtype_name(d) for d in STORAGE_DTYPES]}, got {dtype!r}."
        )
    shard_bytes = check_int("shard_bytes", shard_bytes, min_value=1)
    layer_names = _normalize_layers(teacher, layers)
    per_layer_k = _normalize_top_k(top_k, layer_names)
    temperature = check_positive("temperature", temperature, max_value=MAX_TEMPERATURE)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"`path` {str(path)!r} exists and is not a directory.")
    settings: dict[str, Any] = {
        "teacher_fingerprint": teacher_fingerprint(teacher),
        "layers": [
            {
                "name": n,
                "top_k": per_layer_k[n],
                "temperature": None if per_layer_k[n] is None else temperature,
                "sample_shape": None,  # set by the first computed batch
            }
            for n in layer_names
        ],
        "dtype": dtype_name(dtype),
    }
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        manifest = _open_or_start(path, settings, overwrite)
        build = _Build(path, manifest, shard_bytes)
        bar = _progress(dataloader, progress)
        try:
            with _TeacherRunner(teacher, manifest["layers"], dtype) as runner:
                build.run(dataloader, runner, bar)
        finally:
            if bar is not None:
                bar.close()
    except BaseException:
        if created:  # nothing finished was written (else the directory is not empty): remove it
            with contextlib.suppress(OSError):
                path.rmdir()
        raise
    return path
