"""The validation sweeps that chose the MNIST presets' hyperparameters (checked-in results).

Each entry is the output of ``kdistill demo --tune --<preset>`` (:func:`kdistill.demo.mnist.
run_mnist_tuning`) on MNIST's validation split, trimmed to the numbers that chose the values:
``chosen`` holds the values the preset uses, ``stages`` the validation errors of every point
tried. Every demo report copies its preset's entry into ``report["selection"]``;
``benchmarks/RESULTS.md`` has the same tables. Re-run ``kdistill demo --tune`` to reproduce them.
"""

from typing import Any

__all__ = ["SELECTED", "XTOKEN_SELECTED"]

SELECTED: dict[str, dict[str, Any]] = {
    "quick": {
        "split": "validation",
        "seed": 100,
        "grid": {
            "lrs": [0.001, 0.003],
            "alone_epochs": [10, 20, 40],
            "temperatures": [2.0, 4.0, 8.0, 20.0],
            "kd_loss_weights": [0.5, 0.9, 1.0],
            "distilled_epochs": [20, 40],
        },
        "teacher_hidden": [800, 800],
        "teacher_val_errors": 126,
        "student_hidden": [100],
        "val_samples": 10000,
        "stages": {
            "alone": [
                {"lr": 0.001, "epochs": 10, "val_errors": 403},
                {"lr": 0.001, "epochs": 20, "val_errors": 288},
                {"lr": 0.001, "epochs": 40, "val_errors": 243},
                {"lr": 0.003, "epochs": 10, "val_errors": 260},
                {"lr": 0.003, "epochs": 20, "val_errors": 235},
                {"lr": 0.003, "epochs": 40, "val_errors": 216},
            ],
            "distilled": [
                {"temperature": 2.0, "kd_loss_weight": 0.5, "epochs": 40, "val_errors": 176},
                {"temperature": 2.0, "kd_loss_weight": 0.9, "epochs": 40, "val_errors": 187},
                {"temperature": 2.0, "kd_loss_weight": 1.0, "epochs": 40, "val_errors": 184},
                {"temperature": 4.0, "kd_loss_weight": 0.5, "epochs": 40, "val_errors": 176},
                {"temperature": 4.0, "kd_loss_weight": 0.9, "epochs": 40, "val_errors": 180},
                {"temperature": 4.0, "kd_loss_weight": 1.0, "epochs": 40, "val_errors": 185},
                {"temperature": 8.0, "kd_loss_weight": 0.5, "epochs": 40, "val_errors": 183},
                {"temperature": 8.0, "kd_loss_weight": 0.9, "epochs": 40, "val_errors": 198},
                {"temperature": 8.0, "kd_loss_weight": 1.0, "epochs": 40, "val_errors": 179},
                {"temperature": 20.0, "kd_loss_weight": 0.5, "epochs": 40, "val_errors": 190},
                {"temperature": 20.0, "kd_loss_weight": 0.9, "epochs": 40, "val_errors": 202},
                {"temperature": 20.0, "kd_loss_weight": 1.0, "epochs": 40, "val_errors": 206},
            ],
            "distilled_epochs": [
                {"temperature": 2.0, "kd_loss_weight": 0.5, "epochs": 20, "val_errors": 198},
                {"temperature": 2.0, "kd_loss_weight": 0.5, "epochs": 40, "val_errors": 176},
            ],
        },
        "chosen": {
            "lr": 0.003,
            "alone_epochs": 40,
            "temperature": 2.0,
            "kd_loss_weight": 0.5,
            "distilled_epochs": 40,
        },
        "test_evaluations": 0,
    }
}

# The validation sweep of `kdistill demo xtoken --tune` (kdistill.demo.xtoken.run_xtoken_tuning,
# default config, 2026-12-02): the temperature and KD weights of XTokenDemoConfig's defaults and
# the validation bits/char (after the last epoch, one student seed) behind them.
XTOKEN_SELECTED: dict[str, Any] = {
    "split": "validation",
    "seed": 100,
    "grid": {
        "temperatures": [1.0, 2.0],
        "uld_kd_weights": [0.1, 0.3],
        "hybrid_kd_weights": [0.5, 0.9],
    },
    "val_chars": 4494,
    "teacher_val_bpc": 1.0187,
    "ce_only_val_bpc": 2.1534,
    "stages": {
        "uld": [
            {"temperature": 1.0, "kd_loss_weight": 0.1, "val_bpc": 2.1658},
            {"temperature": 1.0, "kd_loss_weight": 0.3, "val_bpc": 2.2231},
            {"temperature": 2.0, "kd_loss_weight": 0.1, "val_bpc": 2.1567},
            {"temperature": 2.0, "kd_loss_weight": 0.3, "val_bpc": 2.1707},
        ],
        "hybrid": [
            {"temperature": 1.0, "kd_loss_weight": 0.5, "val_bpc": 2.1218},
            {"temperature": 1.0, "kd_loss_weight": 0.9, "val_bpc": 2.143},
            {"temperature": 2.0, "kd_loss_weight": 0.5, "val_bpc": 2.2837},
            {"temperature": 2.0, "kd_loss_weight": 0.9, "val_bpc": 2.8306},
        ],
    },
    "chosen": {"temperature": 1.0, "uld_kd_weight": 0.1, "hybrid_kd_weight": 0.5},
    "test_evaluations": 0,
}
