"""Building a teacher cache: run the teacher once over a dataset and write its outputs to shards.

Batch convention (what the dataloader given to ``TeacherCache.build`` must yield):

- a tuple or list ``(sample_ids, inputs, *rest)``, e.g. from
  ``DataLoader(TensorDataset(torch.arange(N), x, y))``; ``rest`` (labels, ...) is ignored; or
- a mapping with keys ``"sample_id"`` and ``"input"`` (other keys are ignored).

``sample_ids`` is an integer tensor ``[B]`` (or a list of ints), unique across the dataset.
``inputs`` is either a tensor ``[B, ...]``, passed as ``teacher(inputs)``, or a mapping of keyword
tensors ``[B, ...]`` (e.g. ``input_ids`` and ``attention_mask``), passed as ``teacher(**inputs)``.
Every sample of a layer must have the same output shape (pack or pad sequences to one length).

The build is resumable: the manifest is rewritten after every finished shard, and a later call with
the same teacher, layers, ``top_k`` and ``dtype`` verifies the finished shards (checksums, and the
sample ids and input hashes of the replayed batches), keeps them and computes only the rest. The
dataloader must therefore yield the same batches in the same order (``shuffle=False``).
"""

import importlib.util
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..losses.logits import TopKTeacher
from ._format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    STORAGE_DTYPES,
    data_fingerprint,
    dtype_name,
    file_sha256,
    map_shard,
    read_manifest,
    sample_input_hashes,
    shard_field,
    shard_name,
    teacher_fingerprint,
    write_manifest,
    write_shard,
)

__all__ = ["DEFAULT_SHARD_BYTES", "build_cache", "split_batch"]

logger = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 256 * 2**20
# Manifest keys that must agree between an existing (partial or complete) cache and a new build.
_SETTINGS = ("teacher_fingerprint", "layers", "dtype")


def split_batch(batch: Any) -> tuple[Tensor, Tensor | Mapping[str, Tensor]]:
    """Split a batch into ``(sample_ids [B] int64, teacher inputs)`` (see the module docstring).

    Raises:
        TypeError: The batch follows neither convention, or the ids are not integers.
        ValueError: The number of ids differs from the batch size.
    """
    if isinstance(batch, Mapping):
        if "sample_id" not in batch or "input" not in batch:
            raise TypeError(
                "A mapping batch must have the keys 'sample_id' and 'input', got keys "
                f"{sorted(map(str, batch))}."
            )
        ids, inputs = batch["sample_id"], batch["input"]
    elif isinstance(batch, tuple | list) and len(batch) >= 2:
        ids, inputs = batch[0], batch[1]
    else:
        raise TypeError(
            "Each batch must be a tuple (sample_ids, inputs, ...) — e.g. from "
            "DataLoader(TensorDataset(torch.arange(N), x, y)) — or a mapping with keys "
            f"'sample_id' and 'input'; got {type(batch).__name__}."
        )
    ids = torch.as_tensor(ids)
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(
            f"Sample ids must be a 1-D integer tensor [B], got dtype {ids.dtype} and shape "
            f"{tuple(ids.shape)}."
        )
    if not isinstance(inputs, Tensor | Mapping):
        raise TypeError(
            "Teacher inputs must be a tensor [B, ...] or a mapping of keyword tensors, got "
            f"{type(inputs).__name__}."
        )
    return ids.to(torch.int64), inputs


def _input_keys(inputs: Tensor | Mapping[str, Tensor]) -> list[str] | None:
    return None if isinstance(inputs, Tensor) else sorted(inputs)


def _as_tensor(output: Any, layer: str) -> Tensor:
    """The tensor a layer produced: itself, ``.logits`` / ``["logits"]``, or a tuple's first."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(getattr(output, "logits", None), Tensor):
        return output.logits
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"Teacher layer {layer!r} returned {type(output).__name__}: a cache stores a tensor, an "
        "object or mapping with `logits`, or a tuple whose first element is a tensor."
    )


class _Recorder:
    """Forward hook keeping a teacher layer's latest output."""

    def __init__(self) -> None:
        self.output: Any = None

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.output = output


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
    for layer, k in per_layer.items():
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise ValueError(f"`top_k` for layer {layer!r} must be a positive int, got {k!r}.")
    return per_layer


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
        _describe_difference(key, manifest.get(key), settings[key])
        for key in _SETTINGS
        if key != "layers" and manifest.get(key) != settings[key]
    ]
    keys = ("name", "top_k", "temperature")
    old_layers = [tuple(layer.get(k) for k in keys) for layer in manifest.get("layers", [])]
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


def _remove_cache_files(path: Path) -> None:
    """Delete the files a cache consists of (manifest, shards, temp files) and nothing else."""
    for child in path.iterdir():
        name = child.name
        is_ours = name in (MANIFEST_NAME, MANIFEST_NAME + ".tmp") or (
            name.startswith("shard-") and name.endswith((".bin", ".bin.tmp"))
        )
        if is_ours and child.is_file():
            child.unlink()


def _progress(dataloader: Any, enable: bool) -> Any:
    """A tqdm progress bar when tqdm is installed and ``enable``; otherwise ``None``."""
    if not enable or importlib.util.find_spec("tqdm") is None:
        return None
    from tqdm.auto import tqdm  # optional: never a dependency of kdistill

    total = len(dataloader) if hasattr(dataloader, "__len__") else None
    return tqdm(total=total, desc="caching teacher outputs", unit="batch")


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
        return self.index < len(self.shards)

    def feed(self, ids: Tensor, hashes: Tensor) -> None:
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


def _verified_prefix(path: Path, shards: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The finished shards up to the first missing, truncated or corrupt one."""
    kept = []
    for entry in shards:
        file = path / entry["file"]
        ok = (
            file.is_file()
            and file.stat().st_size == entry["nbytes"]
            and file_sha256(file) == entry["sha256"]
        )
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
    if not isinstance(shard_bytes, int) or shard_bytes < 1:
        raise ValueError(f"`shard_bytes` must be a positive int, got {shard_bytes!r}.")
    layer_names = _normalize_layers(teacher, layers)
    per_layer_k = _normalize_top_k(top_k, layer_names)
    is_number = isinstance(temperature, int | float) and not isinstance(temperature, bool)
    if not is_number or temperature <= 0:
        raise ValueError(f"`temperature` must be a positive number, got {temperature!r}.")
    path = Path(path)
    from .. import __version__  # a late import: kdistill/__init__ imports this package

    settings: dict[str, Any] = {
        "teacher_fingerprint": teacher_fingerprint(teacher),
        "layers": [
            {
                "name": n,
                "top_k": per_layer_k[n],
                "temperature": None if per_layer_k[n] is None else float(temperature),
            }
            for n in layer_names
        ],
        "dtype": dtype_name(dtype),
    }
    manifest: dict[str, Any] | None = None
    if path.exists() and not path.is_dir():
        raise ValueError(f"`path` {str(path)!r} exists and is not a directory.")
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        if overwrite:
            _remove_cache_files(path)
        else:
            manifest = read_manifest(path)
    elif path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ValueError(
            f"`path` {str(path)!r} is a non-empty directory without a cache manifest; choose an "
            "empty or new directory (kdistill will not write into unrelated files)."
        )
    path.mkdir(parents=True, exist_ok=True)

    training_flags = [(module, module.training) for module in teacher.modules()]
    teacher.eval()
    recorders: dict[str, _Recorder] = {}
    handles = []
    for name in layer_names:
        if name:
            recorders[name] = _Recorder()
            handles.append(teacher.get_submodule(name).register_forward_hook(recorders[name]))
    params = list(teacher.parameters())
    device = params[0].device if params else torch.device("cpu")
    bar = _progress(dataloader, progress)
    try:
        _run(
            teacher,
            dataloader,
            path,
            manifest,
            settings,
            dtype,
            shard_bytes,
            recorders,
            device,
            bar,
            __version__,
        )
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in training_flags:  # restore each submodule's own mode
            module.training = flag
        if bar is not None:
            bar.close()
    return path


def _run(
    teacher: nn.Module,
    dataloader: Iterable[Any],
    path: Path,
    manifest: dict[str, Any] | None,
    settings: dict[str, Any],
    dtype: torch.dtype,
    shard_bytes: int,
    recorders: dict[str, _Recorder],
    device: torch.device,
    bar: Any,
    version: str,
) -> dict[str, Any]:
    """The build loop: replay finished shards, compute the rest, finalize the manifest."""
    complete = False
    if manifest is not None:
        _check_settings(path, manifest, settings)
        finished = _verified_prefix(path, manifest["shards"])
        complete = bool(manifest.get("complete")) and len(finished) == len(manifest["shards"])
        for entry in manifest["shards"][len(finished) :]:  # recomputed below, maybe re-split
            (path / entry["file"]).unlink(missing_ok=True)
        manifest["shards"] = finished
        manifest["complete"] = complete
        manifest["num_samples"] = sum(entry["num_samples"] for entry in finished)
    else:
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "kdistill_version": version,
            "complete": False,
            "data_fingerprint": None,
            "num_samples": 0,
            "byteorder": "little",
            "input_keys": None,  # set by the first batch
            **settings,
            "shards": [],
        }
        write_manifest(path, manifest)
    replay = _Replay(path, list(manifest["shards"]))
    seen: set[int] = set()
    all_ids: list[Tensor] = []
    all_hashes: list[Tensor] = []
    buffer: dict[str, list[Tensor]] = {}
    buffered_bytes = 0
    first_computed = True

    def flush() -> None:
        nonlocal buffer, buffered_bytes
        if not buffer:
            return
        fields = [(name, torch.cat(parts)) for name, parts in buffer.items()]
        entry = write_shard(path / shard_name(len(manifest["shards"])), fields)
        manifest["shards"].append(entry)
        manifest["num_samples"] = sum(s["num_samples"] for s in manifest["shards"])
        write_manifest(path, manifest)
        buffer, buffered_bytes = {}, 0

    for batch in dataloader:
        ids, inputs = split_batch(batch)
        keys = _input_keys(inputs)
        if not seen and not manifest["shards"]:  # the first batch defines the input structure
            manifest["input_keys"] = keys
        if keys != manifest["input_keys"]:
            raise ValueError(
                f"The teacher inputs' structure changed: the cache has keyword inputs "
                f"{manifest['input_keys']} (None means one tensor), this batch has {keys}."
            )
        hashes = sample_input_hashes(inputs, keys)
        if len(hashes) != len(ids):
            raise ValueError(
                f"A batch has {len(ids)} sample ids but {len(hashes)} samples of inputs."
            )
        id_list = ids.tolist()
        batch_ids = set(id_list)
        if len(batch_ids) != len(id_list) or not seen.isdisjoint(batch_ids):
            repeated = sorted(i for i in batch_ids if i in seen or id_list.count(i) > 1)
            raise ValueError(
                f"Sample ids {repeated[:5]} occur more than once; each sample needs a unique id."
            )
        seen.update(batch_ids)
        all_ids.append(ids)
        all_hashes.append(hashes)
        if replay.active:
            replay.feed(ids, hashes)
        elif complete:
            raise ValueError(
                f"The dataloader yields more samples than the complete cache at {str(path)!r} "
                f"holds ({manifest['num_samples']}): the data changed. Pass overwrite=True to "
                "rebuild."
            )
        else:
            fields = _compute(teacher, inputs, manifest["layers"], dtype, recorders, device)
            if first_computed:
                _record_shapes(manifest, fields, ids)
                first_computed = False
            else:
                _check_shapes(manifest, fields)
            for name, tensor in [("sample_id", ids), ("input_hash", hashes), *fields]:
                buffer.setdefault(name, []).append(tensor)
                buffered_bytes += tensor.numel() * tensor.element_size()
            if buffered_bytes >= shard_bytes:
                flush()
        if bar is not None:
            bar.update(1)
    if replay.active:
        done = sum(s["num_samples"] for s in manifest["shards"][: replay.index])
        raise ValueError(
            f"The dataloader yielded fewer samples than the cache at {str(path)!r} holds (it "
            f"ended after {done} of {manifest['num_samples']} cached samples): the data changed. "
            "Pass overwrite=True to rebuild."
        )
    flush()
    if not all_ids:
        raise ValueError("The dataloader yielded no batches: nothing to cache.")
    fingerprint = data_fingerprint(torch.cat(all_ids), torch.cat(all_hashes))
    if complete and fingerprint != manifest["data_fingerprint"]:
        raise ValueError(f"The data differs from the cache at {str(path)!r}. Pass overwrite=True.")
    manifest["complete"] = True
    manifest["data_fingerprint"] = fingerprint
    write_manifest(path, manifest)
    return manifest


def _compute(
    teacher: nn.Module,
    inputs: Tensor | Mapping[str, Tensor],
    layers: list[dict[str, Any]],
    dtype: torch.dtype,
    recorders: dict[str, _Recorder],
    device: torch.device,
) -> list[tuple[str, Tensor]]:
    """Run the teacher on one batch and return the shard fields of every layer (on the CPU)."""
    with torch.no_grad():
        if isinstance(inputs, Tensor):
            output = teacher(inputs.to(device))
        else:
            output = teacher(**{k: v.to(device) for k, v in inputs.items()})
    fields = []
    for layer in layers:
        name = layer["name"]
        raw = output if name == "" else recorders[name].output
        tensor = _as_tensor(raw, name).to("cpu")
        fields += _layer_fields(name, tensor, layer["top_k"], layer["temperature"] or 1.0, dtype)
    for recorder in recorders.values():
        recorder.output = None
    return fields


def _record_shapes(manifest: dict[str, Any], fields: list[tuple[str, Tensor]], ids: Tensor) -> None:
    """Store each layer's per-sample shape (and class count for top-k layers) in the manifest."""
    by_name = dict(fields)
    for layer in manifest["layers"]:
        name = layer["name"]
        if layer["top_k"] is None:
            values = by_name[f"{name}:values"]
            if values.shape[0] != len(ids):
                raise ValueError(
                    f"Teacher layer {name!r} output has leading size {values.shape[0]}, the batch "
                    f"has {len(ids)} samples: a cached layer's output must be [B, ...]."
                )
            layer["sample_shape"] = list(values.shape[1:])
        else:
            layer["sample_shape"] = list(by_name[f"{name}:topk_log_probs"].shape[1:])


def _check_shapes(manifest: dict[str, Any], fields: list[tuple[str, Tensor]]) -> None:
    by_name = dict(fields)
    for layer in manifest["layers"]:
        key = f"{layer['name']}:" + ("values" if layer["top_k"] is None else "topk_log_probs")
        shape = list(by_name[key].shape[1:])
        if shape != layer["sample_shape"]:
            raise ValueError(
                f"Teacher layer {layer['name']!r} produced per-sample shape {shape}, earlier "
                f"batches {layer['sample_shape']}: a cache needs one shape per layer (pad or pack "
                "sequences to a fixed length)."
            )
