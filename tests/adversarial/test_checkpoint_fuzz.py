"""Property-based fuzzing of restore: random edits of a valid checkpoint (issue 10).

The only allowed outcomes of restoring an edited state are: a model that records exactly what it
was rebuilt from (saving it again gives a state that restores to the same state), or a typed error
(``ValueError`` / ``TypeError``) naming the file or "mode state", with the victim untouched.
"""

import copy
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoint_victims import Snapshot, saved, victim_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kdistill as mtd
from kdistill.testing import TinyMLP

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same examples on every run (CI stays reproducible)
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

_names = st.sampled_from(
    [*mtd.list_losses(), *mtd.list_balancers(), "kd_loss", "layerwise_kd", "export_student"]
)
_keys = st.one_of(
    _names,
    st.sampled_from(["kind", "module", "qualname", "args", "kwargs", "name", "temperature"]),
    st.text(max_size=8),
)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-3, max_value=70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-300, 1e300, 2.0, 0.5]),
    _names,
    st.text(max_size=20),
)
_values = st.recursive(
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(_keys, children, max_size=4)
    ),
    max_leaves=12,
)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys / indices) into a JSON value, the root included."""
    paths = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            paths += _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            paths += _paths(child, (*prefix, i))
    return paths


def _mutate(state: dict, data: st.DataObject) -> dict:
    """Replace, delete or add one entry somewhere in ``state`` (a deep copy)."""
    state = copy.deepcopy(state)
    paths = _paths(state)
    path = data.draw(st.sampled_from(paths[1:]), label="path")
    parent = state
    for key in path[:-1]:
        parent = parent[key]
    action = data.draw(st.sampled_from(["replace", "delete", "add"]), label="action")
    if action == "replace":
        parent[path[-1]] = data.draw(_values, label="value")
    elif action == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[data.draw(_keys, label="key")] = data.draw(_values, label="value")
    else:
        parent.append(data.draw(_values, label="value"))
    return state


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> tuple[Any, dict]:
    path = tmp_path_factory.mktemp("fuzz") / "valid.pt"
    return saved(path)


def _check_outcome(victim, snapshot, call, source: str) -> None:
    error: Exception | None = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the plain-student warning is a valid outcome
            restored = call()
    except (ValueError, TypeError) as err:  # anything else fails the test
        error = err
    if error is not None:
        message = str(error)
        assert message.startswith(f"{source}:") or source in message, message
        assert len(message) < 5000
        snapshot.assert_unchanged()
        return
    assert restored is victim
    if isinstance(restored, mtd.DistillationModel):
        # the model records what it was rebuilt from: saving and restoring it is a fixed point
        again = mtd.restore_from_mode_state(TinyMLP(), mtd.mode_state(restored), TinyMLP())
        assert mtd.mode_state(again) == mtd.mode_state(restored)
    else:
        assert type(restored) is TinyMLP


@SETTINGS
@given(data=st.data(), with_teacher=st.booleans())
def test_edited_mode_state_restores_consistently_or_fails_cleanly(valid, data, with_teacher):
    _, checkpoint = valid
    state = _mutate(checkpoint["kdistill_state"], data)
    victim = TinyMLP()
    snapshot = Snapshot(victim)
    teacher = TinyMLP() if with_teacher else None
    _check_outcome(
        victim,
        snapshot,
        lambda: mtd.restore_from_mode_state(victim, state, teacher_model=teacher),
        "mode state",
    )


_tensors = st.one_of(
    st.builds(torch.zeros, st.integers(0, 40)),
    st.builds(lambda n: torch.zeros(n, 32), st.integers(0, 12)),
    st.sampled_from(
        [
            torch.zeros(10, 32, dtype=torch.float64),
            torch.zeros(10, 32, dtype=torch.int64),
            torch.zeros(10, 32, dtype=torch.bool),
            torch.zeros(10, 32, dtype=torch.complex64),
            torch.full((10, 32), math.nan),
            torch.zeros(1, 32).expand(10, 32),
            torch.zeros(32, 10).t(),
            torch.empty(10, 32, device="meta"),
            torch.zeros(10, 32).to_sparse(),
        ]
    ),
    _scalars,
)


@settings(SETTINGS, max_examples=60)
@given(data=st.data())
def test_edited_checkpoint_file_restores_consistently_or_fails_cleanly(tmp_path, valid, data):
    model, checkpoint = valid
    checkpoint = copy.copy(checkpoint)
    if data.draw(st.booleans(), label="edit state"):
        checkpoint["kdistill_state"] = _mutate(checkpoint["kdistill_state"], data)
    weights = dict(checkpoint["model_state_dict"])
    key = data.draw(st.sampled_from([*sorted(weights), "_loss_modules.0.weight", "x"]), label="key")
    if data.draw(st.booleans(), label="delete"):
        weights.pop(key, None)
    else:
        weights[key] = data.draw(_tensors, label="tensor")
    checkpoint["model_state_dict"] = weights
    path = Path(tmp_path) / "edited.pt"
    torch.save(checkpoint, path)
    victim = victim_for(model)
    snapshot = Snapshot(victim)
    teacher = TinyMLP() if data.draw(st.booleans(), label="teacher") else None
    _check_outcome(
        victim, snapshot, lambda: mtd.restore(victim, path, teacher_model=teacher), str(path)
    )
