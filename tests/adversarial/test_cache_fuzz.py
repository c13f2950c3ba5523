"""Property-based fuzzing of the teacher-cache manifest (hypothesis).

Random mutations of a valid manifest (values replaced by other JSON of any type, numbers nudged,
strings swapped for paths, keys deleted or added, values wrapped in deeper nesting) are written
into a copy of a real cache. Opening it and resuming its build may only (a) give exactly the
reference values, or (b) raise ``ValueError``/``RuntimeError`` naming the cache directory; and
nothing outside the cache directory may change.
"""

import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from cache_support import (
    build,
    load_manifest,
    make_teacher_and_loader,
    plant_victims,
    read_all,
    same_values,
    save_manifest,
    snapshot,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kdistill.cache import CachedTeacher

PATHS = [
    "../victim.txt",
    "/tmp/victim.txt",
    "../outside/secret.bin",
    "shard-00000.bin",
    "shard-00003.bin",
    "shard-00009.bin",
    "manifest.json",
    "manifest.json.tmp",
    "",
    ".",
    "fc2",
    "a..b",
    "float16",
    "int64",
    "0" * 64,
]
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([-1, 0, 1, 6, 32, 64, 2**31, 2**48, 2**63, 10**12])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(PATHS)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def _locations(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys/indices) into a JSON value, the root excluded."""
    found = []
    children = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for key, child in children:
        found.append((*prefix, key))
        found += _locations(child, (*prefix, key))
    return found


def _parent(manifest: Any, location: tuple) -> Any:
    for key in location[:-1]:
        manifest = manifest[key]
    return manifest


DEEP = "<3000 nested lists>"
# "same-type" edits are the likeliest to leave a valid manifest (the interesting case): weigh them
KINDS = ["replace", "nudge", "delete", "add", "nest", "deep", "path"] + ["same-type"] * 5


def _write(cache: Path, manifest: Any) -> None:
    """Write the tampered manifest; ``DEEP`` values become 3,000 nested lists in the text."""
    save_manifest(cache, manifest)
    path = cache / "manifest.json"
    path.write_text(path.read_text().replace(json.dumps(DEEP), "[" * 3000 + "]" * 3000))


@st.composite
def mutated(draw, manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` after one to three random mutations."""
    manifest = json.loads(json.dumps(manifest))
    # uniform choices: hypothesis favours (and shrinks towards) the first item of a choice
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    for _ in range(draw(st.integers(1, 3))):
        locations = _locations(manifest)
        if not locations:
            break
        outer = [loc for loc in locations if "fields" not in loc]  # most locations are in fields
        location = rng.choice(outer if outer and rng.random() < 0.5 else locations)
        parent, key = _parent(manifest, location), location[-1]
        old = parent[key]
        kind = rng.choice(KINDS)
        if kind == "same-type":  # plausible edits: often a valid manifest that must still be safe
            if isinstance(old, bool):
                parent[key] = not old
            elif isinstance(old, str) and len(old) == 64:
                parent[key] = f"{rng.getrandbits(256):064x}"
            elif isinstance(old, str):
                parent[key] = draw(st.text(max_size=12))
            elif isinstance(old, int):
                parent[key] = old + rng.choice([-1, 1])
            else:
                parent[key] = draw(JSON)
        elif kind == "replace":
            parent[key] = draw(JSON)
        elif kind == "nudge" and isinstance(old, int) and not isinstance(old, bool):
            parent[key] = old + draw(st.sampled_from([-64, -1, 1, 64, old, -2 * old, 2**40]))
        elif kind == "delete":
            del parent[key]
        elif kind == "add" and isinstance(old, dict):
            old[draw(st.text(max_size=8))] = draw(JSON)
        elif kind == "nest":
            for _ in range(draw(st.sampled_from([1, 2, 50]))):
                old = [old]
            parent[key] = old
        elif kind == "deep":  # written as 3,000 nested lists (see _write)
            parent[key] = DEEP
        else:  # "path", or a kind that did not fit the value
            parent[key] = draw(st.sampled_from(PATHS))
    return manifest


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """A real cache and its reference values, built once for the module."""
    directory = tmp_path_factory.mktemp("fuzz") / "cache"
    teacher, loader = make_teacher_and_loader()
    reference = read_all(build(directory, teacher, loader))
    return directory, load_manifest(directory), teacher, loader, reference


def _outcome(action, cache: Path) -> Any:
    """The action's result, or the message of a typed error (``ValueError``/``RuntimeError``)."""
    try:
        return action()
    except (ValueError, RuntimeError) as error:
        return f"{type(error).__name__}: {error}"


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_mutated_manifest_gives_the_same_values_or_a_typed_error(valid, data) -> None:
    source, manifest, teacher, loader, reference = valid
    bad = data.draw(mutated(manifest), label="manifest")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        plant_victims(root)
        cache = root / "cache"
        shutil.copytree(source, cache)
        _write(cache, bad)
        before = snapshot(root, exclude=cache)

        # open (as CachedTeacher, which also turns layer names into modules), then resume
        for action in (lambda: CachedTeacher(cache).cache, lambda: build(cache, teacher, loader)):
            outcome = _outcome(lambda action=action: read_all(action()), cache)
            if isinstance(outcome, str):
                assert str(cache) in outcome, f"an error without the cache path: {outcome}"
                event(outcome.split(":")[0])  # the outcome mix: hypothesis --show-statistics
            else:
                assert same_values(outcome, reference)
                event("same values")

        assert snapshot(root, exclude=cache) == before
