"""The validation sweeps that chose the MNIST presets' hyperparameters (checked-in results).

Each entry is the output of ``kdistill demo --tune --<preset>`` (:func:`kdistill.demo.mnist.
run_mnist_tuning`) on MNIST's validation split, trimmed to the numbers that chose the values:
``chosen`` holds the values the preset uses, ``stages`` the validation errors of every point
tried. Every demo report copies its preset's entry into ``report["selection"]``;
``benchmarks/RESULTS.md`` has the same tables. Re-run ``kdistill demo --tune`` to reproduce them.
"""

from typing import Any

__all__ = ["SELECTED"]

SELECTED: dict[str, dict[str, Any]] = {}
