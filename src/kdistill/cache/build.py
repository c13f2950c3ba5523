"""Building a teacher cache: run the teacher once over a dataset and write its outputs to shards.

Batches follow the convention of ``kdistill.cache._batch``. Every sample of a layer must have the
same output shape (pack or pad sequences to one length).

The build is resumable: the manifest is rewritten after every finished shard, and a later call with
the same teacher, layers, ``top_k`` and ``dtype`` verifies the finished shards (checksums, and the
sample ids and input hashes of the replayed batches), keeps them and computes only the rest. The
dataloader must therefore yield the same batches in the same order (``shuffle=False``). A build
that fails before its first shard is finished leaves nothing behind (not even a directory it
created), so a corrected call simply starts over.

Several named teachers (``teacher={"big": big, "expert": expert}``) share one cache: they run
together on each batch (as a ``kdistill.TeacherDict``), the cached layers are named ``"big"`` (a
teacher's output) or ``"expert.fc"`` (a layer of one), and the manifest records each teacher's
fingerprint (``teacher_fingerprints``) besides the fingerprint of all of them together.

Three pieces do the work: ``TeacherRunner`` (``_runner.py``: the teacher in eval mode with hooks
on the cached layers), ``ShardWriter`` (``_writer.py``: buffers computed batches, writes shards
and the manifest) and ``Replay`` (``_replay.py``: keeps the finished shards that verify and checks
the replayed batches against them); ``_Build`` here runs the loop.
"""

import contextlib
import importlib.util
import logging
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._validation import check_int, check_positive
from .._version import __version__
from ..teachers import TeacherDict, describe_names, teacher_layer_problem
from ._batch import input_keys, split_batch
from ._files import remove_cache_files, remove_file
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
from ._replay import Replay, verified_prefix
from ._runner import TeacherRunner
from ._writer import ShardWriter

__all__ = ["DEFAULT_SHARD_BYTES", "as_teacher_module", "build_cache"]

logger = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 256 * 2**20
# Manifest keys that must agree between an existing (partial or complete) cache and a new build.
_SETTINGS = ("teacher_fingerprint", "teacher_fingerprints", "layers", "dtype")


def as_teacher_module(teacher: Any) -> nn.Module:
    """The teacher to run: a module, or a ``TeacherDict`` of a dict ``{name: module}``.

    Raises:
        TypeError: Neither a module nor a dict of modules.
        ValueError: An empty dict, or a name that cannot name a teacher.
    """
    if isinstance(teacher, Mapping) and not isinstance(teacher, nn.Module):
        if not teacher:
            raise ValueError("`teacher` is an empty dict: give at least one {name: module}.")
        return TeacherDict(teacher)
    if not isinstance(teacher, nn.Module):
        raise TypeError(
            f"`teacher` must be an nn.Module or a dict {{name: module}}, got "
            f"{type(teacher).__name__}."
        )
    return teacher


def _normalize_layers(teacher: nn.Module, layers: Any) -> list[str]:
    names = teacher.kd_teacher_names if isinstance(teacher, TeacherDict) else None
    if layers is None:
        layers = list(names) if names is not None else [""]
    if isinstance(layers, str):
        layers = [layers]
    if not isinstance(layers, Iterable) or not all(isinstance(x, str) for x in layers):
        raise TypeError(f"`layers` must be a list of module names (str), got {layers!r}.")
    layers = list(layers)
    if not layers:
        raise ValueError("`layers` is empty: name at least one teacher layer ('' is the output).")
    if len(set(layers)) != len(layers):
        raise ValueError(f"`layers` has duplicates: {layers}.")
    module_names = [n for n, _ in teacher.named_modules()]
    if names is not None:
        if "" in layers:
            raise ValueError(
                f"`layers` names '' (the whole teacher), but there are several teachers "
                f"{describe_names(names)}: cache each teacher's output by its name, e.g. "
                f"layers={list(names)} (the default), and layers of them as '<teacher>.<layer>'."
            )
        for layer in layers:
            problem = teacher_layer_problem(layer, names, module_names)
            if problem is not None:
                raise ValueError(f"`layers`: {problem}")
        return layers
    unknown = [layer for layer in layers if layer not in module_names]
    if unknown:
        shown = module_names[:20]
        raise ValueError(
            f"Unknown teacher layer(s) {unknown} in `layers`. Valid names ('' is the whole "
            f"teacher's output): {shown}{' ...' if len(module_names) > 20 else ''}."
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
    if key == "teacher_fingerprints":
        if not old or not new or set(old) != set(new):

            def teachers(fingerprints: dict | None) -> str:
                return describe_names(fingerprints) if fingerprints else "one unnamed teacher"

            return f"the teachers differ (cache: {teachers(old)}, now: {teachers(new)})"
        stale = [name for name in new if old[name] != new[name]]
        return f"the weights of teacher(s) {describe_names(stale)} differ"
    if key == "teacher_fingerprint":
        return (
            f"the teacher's weights differ (cache fingerprint {str(old)[:12]}..., this teacher "
            f"{str(new)[:12]}...)"
        )
    return f"`{key}` differs (cache: {old!r}, now: {new!r})"


def _check_settings(path: Path, manifest: dict[str, Any], settings: dict[str, Any]) -> None:
    """Refuse to extend or reuse a cache built with other settings, naming every difference."""
    differ = [
        key for key in _SETTINGS if key != "layers" and manifest.get(key) != settings.get(key)
    ]
    if "teacher_fingerprints" in differ and "teacher_fingerprint" in differ:
        differ.remove("teacher_fingerprint")  # said per teacher instead
    diffs = [_describe_difference(key, manifest.get(key), settings.get(key)) for key in differ]
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


def _progress(dataloader: Any, enable: bool) -> Any:
    """A tqdm progress bar when tqdm is installed and ``enable``; otherwise ``None``.

    On a terminal the bar redraws as usual; redirected to a file or a CI log it writes at most one
    update every 30 s (plus the final line), so a long build does not flood the log.
    """
    if not enable or importlib.util.find_spec("tqdm") is None:
        return None
    from tqdm.auto import tqdm  # optional: never a dependency of kdistill

    total = len(dataloader) if hasattr(dataloader, "__len__") else None
    interactive = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return tqdm(
        total=total,
        desc="caching teacher outputs",
        unit="batch",
        file=sys.stderr,
        mininterval=0.1 if interactive else 30.0,
    )


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
        finished = verified_prefix(path, manifest["shards"])
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
        self.replay = Replay(path, list(manifest["shards"]))
        self.writer = ShardWriter(path, manifest, shard_bytes)
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

    def run(self, dataloader: Iterable[Any], runner: TeacherRunner, bar: Any) -> None:
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
    teacher: nn.Module | Mapping[str, nn.Module],
    dataloader: Iterable[Any],
    path: str | Path,
    *,
    layers: Any = None,
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
    teacher = as_teacher_module(teacher)
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
        **(
            {"teacher_fingerprints": {n: teacher_fingerprint(t) for n, t in teacher.items()}}
            if isinstance(teacher, TeacherDict)
            else {}  # one teacher: the manifest of format 1 as it always was
        ),
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
            with TeacherRunner(teacher, manifest["layers"], dtype) as runner:
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
