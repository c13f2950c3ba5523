"""Demo reports: summary statistics, the results table, ``report.json`` and ``report.png``."""

import importlib.util
import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

__all__ = [
    "PUBLISHED",
    "format_table",
    "format_tuning",
    "gap_closed_percent",
    "summarize",
    "write_report",
    "write_report_files",
]

# Hinton, Vinyals & Dean (2015), arXiv 1503.02531, §3: MNIST test errors (out of 10,000).
PUBLISHED: dict[str, Any] = {
    "source": "Hinton, Vinyals & Dean (2015), Distilling the Knowledge in a Neural Network, §3",
    "teacher": 67,
    "student_alone": 146,
    "distilled": 74,
    "test_samples": 10000,
}


def gap_closed_percent(teacher: float, student_alone: float, distilled: float) -> float | None:
    """Share of the student-alone → teacher gap that distillation closes, in percent.

    ``100 · (student_alone - distilled) / (student_alone - teacher)``; ``None`` when the student
    alone is not worse than the teacher (the gap is undefined).
    """
    gap = student_alone - teacher
    if gap <= 0:
        return None
    return 100.0 * (student_alone - distilled) / gap


PUBLISHED["gap_closed_percent"] = round(
    cast(  # defined: the published student alone (146) is worse than the teacher (67)
        float,
        gap_closed_percent(
            PUBLISHED["teacher"], PUBLISHED["student_alone"], PUBLISHED["distilled"]
        ),
    ),
    1,
)


def summarize(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value) of ``values``."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std}


def _mean_std(run: dict[str, Any]) -> str:
    return f"{run['mean']:.1f} ± {run['std']:.1f}"


def _seconds(run: dict[str, Any]) -> str:
    seconds = summarize(run["seconds"])
    return f"{seconds['mean']:.1f} ± {seconds['std']:.1f}"


def format_table(report: dict[str, Any]) -> str:
    """The results table: this run (test errors, seconds per run) beside Hinton et al.'s row."""
    dataset = report["dataset"]
    gap = report["gap_closed_percent"]
    num_seeds = len(report["seeds"])
    teacher = report["teacher"]
    cache = report.get("teacher_cache")
    if report.get("teacher_source") == "live":
        distilled_source = "live teacher"
    else:
        distilled_source = "cached teacher"
    teacher_seconds = "loaded" if teacher["cached"] else f"{teacher['seconds']:.1f}"
    rows = [
        (
            "",
            "teacher",
            f"student alone (n={num_seeds})",
            f"distilled (n={num_seeds})",
            "gap closed",
        ),
        (
            f"this run: {dataset['name']}, {dataset['test_samples']} test",
            str(teacher["test_errors"]),
            _mean_std(report["student_alone"]),
            _mean_std(report["distilled"]),
            "n/a" if gap is None else f"{gap:.0f}%",
        ),
        (
            f"  seconds per run ({distilled_source})",
            teacher_seconds,
            _seconds(report["student_alone"]),
            _seconds(report["distilled"]),
            "",
        ),
        (
            "Hinton et al. 2015: MNIST, 10000 test",
            str(PUBLISHED["teacher"]),
            str(PUBLISHED["student_alone"]),
            str(PUBLISHED["distilled"]),
            f"{PUBLISHED['gap_closed_percent']:.0f}%",
        ),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)
        ).rstrip()
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    per_seed = ", ".join(
        f"seed {seed}: {alone} -> {distilled}"
        for seed, alone, distilled in zip(
            report["seeds"],
            report["student_alone"]["test_errors"],
            report["distilled"]["test_errors"],
            strict=True,
        )
    )
    lines.append(f"test errors (mean ± std over seeds); per seed, alone -> distilled: {per_seed}")
    if cache is not None:
        how = "built" if cache["built"] else "reused"
        lines.append(
            f"teacher logits cache: {how} in {cache['seconds']:.1f} s ({cache['nbytes']} bytes); "
            f"hyperparameters: {report['selection']['method']}"
        )
    else:
        lines.append(f"hyperparameters: {report['selection']['method']}")
    return "\n".join(lines)


def format_tuning(sweep: dict[str, Any]) -> str:
    """The validation sweep of ``kdistill demo --tune``: every point and the values chosen."""
    stages = sweep["stages"]
    lines = [
        f"validation sweep ({sweep['preset']}, seed {sweep['seed']}, "
        f"{sweep['dataset']['val_samples']} validation images; teacher "
        f"{sweep['teacher']['val_errors']} validation errors); validation errors per point:",
        "1. student alone: "
        + ", ".join(
            f"lr {r['lr']:g} x {r['epochs']} ep: {r['val_errors']}" for r in stages["alone"]
        ),
        "2. distilled: "
        + ", ".join(
            f"T {r['temperature']:g} w {r['kd_loss_weight']:g}: {r['val_errors']}"
            for r in stages["distilled"]
        ),
        "3. distilled epochs: "
        + ", ".join(f"{r['epochs']} ep: {r['val_errors']}" for r in stages["distilled_epochs"]),
        "chosen: " + ", ".join(f"{k}={v}" for k, v in sweep["chosen"].items()),
    ]
    return "\n".join(lines)


def _plot(report: dict[str, Any], path: Path) -> None:
    """Validation-error curves of both students (mean over seeds, min-max band), the teacher."""
    import matplotlib  # optional dependency: the [demo] extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, label in (("student_alone", "student alone"), ("distilled", "distilled student")):
        curves = report[name]["val_curves"]
        epochs = range(1, len(curves[0]) + 1)
        by_epoch = list(zip(*curves, strict=True))
        ax.plot(epochs, [statistics.fmean(v) for v in by_epoch], marker=".", label=label)
        ax.fill_between(epochs, [min(v) for v in by_epoch], [max(v) for v in by_epoch], alpha=0.2)
    ax.axhline(report["teacher"]["val_errors"], color="gray", linestyle="--", label="teacher")
    cast(MaxNLocator, ax.xaxis.get_major_locator()).set_params(integer=True)  # an AutoLocator
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation errors (of {report['dataset']['val_samples']})")
    ax.set_title(
        f"kdistill demo ({report['config']['preset']}, {report['dataset']['name']}, "
        f"{len(report['seeds'])} seeds)"
    )
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _json_safe(value: Any) -> Any:
    """Replace NaN/inf (not valid JSON) by ``None``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_report(report: dict[str, Any], output_dir: Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.png`` into ``output_dir`` (created if needed).

    Returns:
        The paths of the JSON report and of the plot.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = output_dir / "report.json", output_dir / "report.png"
    json_path.write_text(json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n")
    _plot(report, png_path)
    return json_path, png_path


def write_report_files(
    report: dict[str, Any], output_dir: Path, plot: Callable[[dict[str, Any], Path], None]
) -> tuple[Path, Path | None]:
    """Write ``report.json`` and, when matplotlib is installed, ``report.png`` drawn by ``plot``.

    Args:
        report: The JSON-able report (NaN and inf are written as ``null``).
        output_dir: Created if needed.
        plot: Draws the report into the PNG path it is given.

    Returns:
        The paths of the JSON report and of the plot (``None`` without matplotlib).
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / "report.json"
    json_path.write_text(json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n")
    if importlib.util.find_spec("matplotlib") is None:
        return json_path, None
    png_path = output_dir / "report.png"
    plot(report, png_path)
    return json_path, png_path
