"""Docstring examples are real: run them."""

import doctest
import importlib
import pkgutil

import pytest

import kdistill

# modules that need optional extras are documented but not doctested here
MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(kdistill.__path__, prefix="kdistill.")
    if not any(part in info.name for part in ("hf", "lightning", "cli", "demo", "__main__"))
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"
