"""The public API: every name resolves, is documented, and matches the checked-in snapshot."""

import pathlib

import pytest

import kdistill

SNAPSHOT = pathlib.Path(__file__).with_name("public_api.txt")


def test_all_matches_snapshot():
    expected = SNAPSHOT.read_text().split()
    assert sorted(kdistill.__all__) == expected, (
        f"kdistill.__all__ changed. If intended, update {SNAPSHOT} with:\n"
        f"python -c \"import kdistill; print('\\n'.join(sorted(kdistill.__all__)))\" > {SNAPSHOT}"
    )


@pytest.mark.parametrize("name", [n for n in kdistill.__all__ if n != "__version__"])
def test_public_name_resolves_and_has_docstring(name):
    obj = getattr(kdistill, name)
    assert obj.__doc__ and obj.__doc__.strip(), f"kdistill.{name} has no docstring"


def test_modelopt_migration_names():
    # the names a modelopt.torch.distill / modelopt.torch.opt user calls
    for name in [
        "convert",
        "export",
        "DistillationModel",
        "LogitsDistillationLoss",
        "MGDLoss",
        "MFTLoss",
        "StaticLossBalancer",
        "DistillationLossBalancer",
        "save",
        "restore",
        "modelopt_state",
        "restore_from_modelopt_state",
    ]:
        assert hasattr(kdistill, name)
