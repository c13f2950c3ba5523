"""Reading, checking and writing ``manifest.json`` (the format is in ``kdistill.cache._format``).

A manifest is untrusted input: ``read_manifest`` checks every field's type, range and consistency
(shard names, field dtypes, shapes and offsets against the recorded layout and byte sizes) before
any shard is opened, and turns every problem into one ``ValueError`` naming the manifest file and
the field. Nothing read from it decides a path outside the cache directory or an allocation larger
than the shard files on disk (their sizes are compared before mapping).
"""

import json
import math
import re
from pathlib import Path
from typing import Any, NoReturn

from ..teachers import MAX_TEACHERS, teacher_name_problem
from ._files import atomic_write, cache_file, read_file
from ._format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    MAX_TEMPERATURE,
    STORAGE_DTYPES,
    aligned,
    dtype_from_name,
    dtype_name,
    field_specs,
    shard_name,
)

__all__ = ["MAX_MANIFEST_BYTES", "read_manifest", "validate_manifest", "write_manifest"]

MAX_MANIFEST_BYTES = 64 * 2**20  # ~64k shards: 16 TB of cache at the default shard size
_MAX_SIZE = 2**48  # bound on any recorded count or dimension (also keeps products exact)
_MAX_NBYTES = 2**62
_MAX_RANK = 16
_MAX_ITEMS = 100_000  # layers, input keys, shards: far beyond any real cache
_MAX_TEXT = 1_000
_HEX64 = re.compile(r"[0-9a-f]{64}")
_LAYER_NAME = re.compile(r"|[^.]+(\.[^.]+)*")  # "" (the output) or a dotted module path
_STORAGE_NAMES = tuple(dtype_name(d) for d in STORAGE_DTYPES)
_TOP_KEYS = frozenset(
    {
        "byteorder",
        "complete",
        "data_fingerprint",
        "dtype",
        "format",
        "format_version",
        "input_keys",
        "kdistill_version",
        "layers",
        "num_samples",
        "shards",
        "teacher_fingerprint",
    }
)
# several named teachers: {name: fingerprint}; absent for one teacher (format 1 as it was)
_OPTIONAL_TOP_KEYS = frozenset({"teacher_fingerprints"})
_LAYER_KEYS = frozenset({"name", "top_k", "temperature", "sample_shape"})
_SHARD_KEYS = frozenset({"file", "num_samples", "nbytes", "sha256", "fields"})
_FIELD_KEYS = frozenset({"offset", "dtype", "shape"})
_REBUILD = (
    "The cache is corrupt or was edited: rebuild it (TeacherCache.build(..., overwrite=True) or "
    "`kdistill cache-teacher ... --overwrite`)."
)


def _describe(value: Any) -> str:
    """A short description of a JSON value for an error message (never a deep or long repr)."""
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:60] + "...")
    if value is None or isinstance(value, bool | int | float):
        text = repr(value)
        return text if len(text) <= 40 else text[:40] + "..."
    if isinstance(value, list):
        if len(value) <= 8 and all(isinstance(v, bool | int | float | None) for v in value):
            return "[" + ", ".join(_describe(v) for v in value) + "]"
        return f"a list of {len(value)} item(s)"
    if isinstance(value, dict):
        keys = sorted(str(k)[:30] for k in value)[:6]
        return f"an object with keys {keys}{' ...' if len(value) > 6 else ''}"
    return type(value).__name__


class _Checker:
    """Raises one ``ValueError`` naming the manifest file and the field for the first problem."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, field: str, problem: str, value: Any) -> NoReturn:
        raise ValueError(
            f"The teacher-cache manifest {str(self.path)!r} is malformed: `{field}` {problem}, "
            f"got {_describe(value)}. {_REBUILD}"
        )

    def keys(self, field: str, value: Any, required: frozenset, optional: frozenset = frozenset()):
        if not isinstance(value, dict):
            self.fail(field or "(top level)", "must be a JSON object", value)
        missing = sorted(required - value.keys())
        if missing:
            self.fail(f"{field}.{missing[0]}" if field else missing[0], "is missing", value)
        extra = sorted(value.keys() - required - optional)
        if extra:
            self.fail(f"{field}.{extra[0]}" if field else extra[0], "is not a field", value)
        return value

    def integer(self, field: str, value: Any, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(field, "must be an integer", value)
        if not low <= value <= high:
            self.fail(field, f"must be in [{low}, {high}]", value)
        return value

    def text(self, field: str, value: Any, pattern: re.Pattern | None = None) -> str:
        if not isinstance(value, str) or len(value) > _MAX_TEXT:
            self.fail(field, f"must be a string of at most {_MAX_TEXT} characters", value)
        if pattern is not None and pattern.fullmatch(value) is None:
            self.fail(field, f"must match {pattern.pattern!r}", value)
        return value

    def items(self, field: str, value: Any, low: int = 0) -> list:
        if not isinstance(value, list):
            self.fail(field, "must be a list", value)
        if not low <= len(value) <= _MAX_ITEMS:
            self.fail(field, f"must hold between {low} and {_MAX_ITEMS} items", value)
        return value

    def shape(self, field: str, value: Any) -> list[int]:
        if not isinstance(value, list) or len(value) > _MAX_RANK:
            self.fail(field, f"must be a list of at most {_MAX_RANK} sizes", value)
        return [self.integer(f"{field}[{i}]", size, 0, _MAX_SIZE) for i, size in enumerate(value)]


def _check_layers(check: _Checker, manifest: dict[str, Any], has_shards: bool) -> None:
    names: set[str] = set()
    for i, layer in enumerate(check.items("layers", manifest["layers"], low=1)):
        where = f"layers[{i}]"
        check.keys(where, layer, _LAYER_KEYS - {"sample_shape"}, frozenset({"sample_shape"}))
        name = check.text(f"{where}.name", layer["name"], _LAYER_NAME)
        if name in names:
            check.fail(f"{where}.name", "repeats an earlier layer", name)
        names.add(name)
        top_k = layer["top_k"]
        temperature = layer["temperature"]
        if top_k is None:
            if temperature is not None:
                check.fail(f"{where}.temperature", "must be null for a full layer", temperature)
        else:
            check.integer(f"{where}.top_k", top_k, 1, 2**31 - 1)
            number = isinstance(temperature, int | float) and not isinstance(temperature, bool)
            if not (number and 0 < temperature <= MAX_TEMPERATURE):
                check.fail(
                    f"{where}.temperature",
                    f"must be a number in (0, {MAX_TEMPERATURE:g}]",
                    temperature,
                )
        sample_shape = layer.get("sample_shape")
        if sample_shape is None:
            if has_shards:
                check.fail(f"{where}.sample_shape", "must be a list once shards exist", None)
            continue
        shape = check.shape(f"{where}.sample_shape", sample_shape)
        if top_k is not None and (not shape or shape[-1] != top_k):
            check.fail(f"{where}.sample_shape", f"must end with top_k ({top_k})", sample_shape)


def _check_teachers(check: _Checker, manifest: dict[str, Any]) -> None:
    """``teacher_fingerprints`` (several teachers): valid names, each layer inside one of them."""
    if "teacher_fingerprints" not in manifest:
        return
    fingerprints = manifest["teacher_fingerprints"]
    if not isinstance(fingerprints, dict) or not 1 <= len(fingerprints) <= MAX_TEACHERS:
        check.fail(
            "teacher_fingerprints",
            f"must be an object of 1 to {MAX_TEACHERS} teacher fingerprints",
            fingerprints,
        )
    for name, fingerprint in fingerprints.items():
        problem = teacher_name_problem(name)
        if problem is not None:
            check.fail("teacher_fingerprints", f"has a teacher name that {problem}", name)
        check.text(f"teacher_fingerprints[{name!r}]", fingerprint, _HEX64)
    for i, layer in enumerate(manifest["layers"]):
        if layer["name"].partition(".")[0] not in fingerprints:
            check.fail(
                f"layers[{i}].name",
                f"must be a teacher of `teacher_fingerprints` or a layer of one "
                f"({sorted(fingerprints)[:5]})",
                layer["name"],
            )


def _check_shards(check: _Checker, manifest: dict[str, Any]) -> None:
    specs = None
    total = 0
    for i, entry in enumerate(check.items("shards", manifest["shards"])):
        where = f"shards[{i}]"
        check.keys(where, entry, _SHARD_KEYS)
        if entry["file"] != shard_name(i):
            check.fail(f"{where}.file", f"must be {shard_name(i)!r}", entry["file"])
        count = check.integer(f"{where}.num_samples", entry["num_samples"], 0, _MAX_SIZE)
        nbytes = check.integer(f"{where}.nbytes", entry["nbytes"], 0, _MAX_NBYTES)
        check.text(f"{where}.sha256", entry["sha256"], _HEX64)
        if specs is None:
            specs = field_specs(manifest["layers"], manifest["dtype"])
        fields = check.keys(f"{where}.fields", entry["fields"], frozenset(n for n, _, _ in specs))
        end = 0  # the layout the writer produces: fields in order, each at the next alignment
        for name, dtype, sample_shape in specs:
            at = f"{where}.fields[{name!r}]"
            field = check.keys(at, fields[name], _FIELD_KEYS)
            if field["dtype"] != dtype:
                check.fail(f"{at}.dtype", f"must be {dtype!r}", field["dtype"])
            shape = check.shape(f"{at}.shape", field["shape"])
            if shape != [count, *sample_shape]:
                check.fail(f"{at}.shape", f"must be {[count, *sample_shape]}", field["shape"])
            offset = check.integer(f"{at}.offset", field["offset"], 0, _MAX_NBYTES)
            if offset != aligned(end):
                check.fail(f"{at}.offset", f"must be {aligned(end)}", offset)
            end = offset + math.prod(shape) * dtype_from_name(dtype).itemsize
        if nbytes != end:
            check.fail(f"{where}.nbytes", f"must be {end} (the size of its fields)", nbytes)
        total += count
    if manifest["num_samples"] != total:
        check.fail(
            "num_samples", f"must be {total} (the sum over the shards)", manifest["num_samples"]
        )


def validate_manifest(manifest: Any, path: Path) -> dict[str, Any]:
    """Check a parsed manifest completely; return it unchanged.

    Args:
        manifest: The parsed JSON.
        path: The manifest file, named in every error.

    Raises:
        ValueError: Not a kdistill manifest, another format version, or any field that is
            missing, extra, of the wrong type or range, or inconsistent with the layout.
    """
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{str(path)!r} is not a kdistill teacher-cache manifest.")
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version != FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} has cache format version {_describe(version)}; this kdistill reads "
            f"version {FORMAT_VERSION}. Rebuild the cache with this version."
        )
    check = _Checker(path)
    check.keys("", manifest, _TOP_KEYS, _OPTIONAL_TOP_KEYS)
    check.text("kdistill_version", manifest["kdistill_version"])
    if manifest["byteorder"] != "little":
        check.fail("byteorder", "must be 'little'", manifest["byteorder"])
    check.text("teacher_fingerprint", manifest["teacher_fingerprint"], _HEX64)
    if manifest["dtype"] not in _STORAGE_NAMES:
        check.fail("dtype", f"must be one of {list(_STORAGE_NAMES)}", manifest["dtype"])
    keys = manifest["input_keys"]
    if keys is not None:
        for i, key in enumerate(check.items("input_keys", keys, low=1)):
            check.text(f"input_keys[{i}]", key)
        if len(set(keys)) != len(keys):
            check.fail("input_keys", "must not repeat a name", keys)
    check.integer("num_samples", manifest["num_samples"], 0, _MAX_SIZE)
    shards = check.items("shards", manifest["shards"])
    _check_layers(check, manifest, has_shards=bool(shards))
    _check_teachers(check, manifest)
    _check_shards(check, manifest)
    complete = manifest["complete"]
    if not isinstance(complete, bool):
        check.fail("complete", "must be true or false", complete)
    fingerprint = manifest["data_fingerprint"]
    if complete or fingerprint is not None:
        check.text("data_fingerprint", fingerprint, _HEX64)
    if complete and not shards:
        check.fail("shards", "must not be empty in a complete cache", shards)
    return manifest


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {_describe(key)} appears twice in one object")
        result[key] = value
    return result


def read_manifest(directory: Path) -> dict[str, Any]:
    """Read and check ``manifest.json`` of the cache at ``directory`` (see ``validate_manifest``).

    Raises:
        ValueError: No manifest, a symlink or non-regular file in its place, a file larger than
            ``MAX_MANIFEST_BYTES``, invalid JSON (NaN, repeated keys, too deep), or a malformed
            manifest; every message names the file.
    """
    path = cache_file(directory, MANIFEST_NAME)
    if not path.exists() and not path.is_symlink():
        raise ValueError(
            f"No teacher cache at {str(directory)!r}: {MANIFEST_NAME} is missing. Build one with "
            "kdistill.TeacherCache.build(teacher, dataloader, path)."
        )
    raw = read_file(path, MAX_MANIFEST_BYTES)
    try:
        manifest = json.loads(
            raw.decode("utf-8"), parse_constant=_refuse_constant, object_pairs_hook=_unique_keys
        )
    except RecursionError:
        raise ValueError(f"{str(path)!r} is nested too deeply: the cache is corrupt.") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, the hooks above
        raise ValueError(
            f"{str(path)!r} is not valid JSON ({err}): the cache is corrupt."
        ) from None
    return validate_manifest(manifest, path)


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` atomically (exclusive temp file, fsync, rename)."""
    text = json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False)
    with atomic_write(directory, MANIFEST_NAME) as f:
        f.write(text.encode("utf-8"))
