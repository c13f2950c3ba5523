"""Shared timing helpers for the scripts in ``benchmarks/``.

Warm-up, device synchronisation, several repeats with the median, interleaved timing of
competing implementations (so machine noise hits all of them alike), environment metadata and
machine-readable output rows. Nothing here knows about distillation.
"""

import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CLOCKS",
    "environment",
    "format_table",
    "git_commit",
    "interleaved_rounds",
    "interleaved_times",
    "median",
    "paired_ratio",
    "synchronize",
    "time_fn",
    "write_rows",
]

_REPO_ROOT = Path(__file__).resolve().parent.parent


def synchronize(device: torch.device | str) -> None:
    """Wait for queued work on ``device`` (a no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values: Sequence[float]) -> float:
    """Median of ``values``."""
    return statistics.median(values)


def paired_ratio(times: Sequence[float], baseline: Sequence[float]) -> float:
    """Median over rounds of ``times[i] / baseline[i]``, for two series from ``interleaved_times``.

    Each round's two blocks ran back to back, so a burst of load from other processes mostly
    cancels in their ratio; on a shared machine this is steadier than a ratio of medians.
    """
    if len(times) != len(baseline) or not times:
        raise ValueError(
            f"Need two non-empty series of equal length, got {len(times)} and {len(baseline)}."
        )
    return median([t / b for t, b in zip(times, baseline, strict=True)])


# Clocks: wall time, or the CPU time of this process (all its threads). On a shared CPU machine
# the CPU time leaves out the time the process waits while other processes run, so it measures
# the work itself; it is meaningless for GPU work, which the CPU only waits for.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def _time_block(
    fn: Callable[[], object], number: int, device: torch.device | str, clock: str
) -> float:
    """Seconds per call of ``fn`` on ``clock``, averaged over ``number`` back-to-back calls."""
    now = CLOCKS[clock]
    synchronize(device)
    start = now()
    for _ in range(number):
        fn()
    synchronize(device)
    return (now() - start) / number


def interleaved_rounds(
    variants: Sequence[str], rounds: int, run: Callable[[str], Mapping[str, Any] | None]
) -> dict[str, list[Mapping[str, Any]]]:
    """Run every variant ``rounds`` times, the starting variant rotating (A B C, B C A, ...).

    For benchmarks whose variants each run in a fresh process (``run(variant)`` returns its
    result row, or None when the variant is unavailable): a burst of load from other processes
    then lands on every variant alike.

    Returns:
        Variant to its rows, in round order (variants that returned None are left out).
    """
    if rounds < 1:
        raise ValueError(f"`rounds` must be at least 1, got {rounds}.")
    results: dict[str, list[Mapping[str, Any]]] = {}
    order = list(variants)
    for index in range(rounds):
        shift = index % len(order)
        for variant in order[shift:] + order[:shift]:
            row = run(variant)
            if row is not None:
                results.setdefault(variant, []).append(row)
    return {v: results[v] for v in order if v in results}


def interleaved_times(
    fns: Mapping[str, Callable[[], object]],
    *,
    number: int,
    repeats: int,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    clock: str = "wall",
) -> dict[str, list[float]]:
    """Time competing callables in interleaved rounds (A B C, B C A, C A B, ...).

    Each round times one block of ``number`` calls of every callable; the starting callable
    rotates from round to round so none is always first. Noise from other processes therefore
    lands on all of them alike, and ratios of the medians are meaningful on a shared machine.

    Args:
        fns: Name to zero-argument callable.
        number: Calls per timed block (raise it until a block takes a few milliseconds).
        repeats: Timed rounds; report the median of the ``repeats`` block times.
        warmup: Untimed blocks of ``number`` calls per callable before timing.
        device: Synchronised before and after each block.
        clock: ``"wall"`` (``time.perf_counter``) or ``"cpu"`` (``time.process_time``: CPU
            seconds of this process, immune to waiting for other processes; CPU work only).

    Returns:
        Name to the list of ``repeats`` per-call times in seconds.
    """
    if clock not in CLOCKS:
        raise ValueError(f"`clock` must be one of {sorted(CLOCKS)}, got {clock!r}.")
    if number < 1 or repeats < 1 or warmup < 0:
        raise ValueError(
            f"`number` and `repeats` must be >= 1 and `warmup` >= 0, got number={number}, "
            f"repeats={repeats}, warmup={warmup}."
        )
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            _time_block(fns[name], number, device, clock)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(_time_block(fns[name], number, device, clock))
    return times


def time_fn(
    fn: Callable[[], object],
    *,
    number: int,
    repeats: int,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    clock: str = "wall",
) -> list[float]:
    """Per-call times in seconds of ``repeats`` blocks of ``number`` calls of one callable."""
    return interleaved_times(
        {"fn": fn}, number=number, repeats=repeats, warmup=warmup, device=device, clock=clock
    )["fn"]


def git_commit() -> str:
    """Short commit hash of the repository, or ``"unknown"`` outside a git checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=_REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return result.stdout.strip()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Metadata to store with every result row.

    Returns:
        torch / CUDA / Python versions, CPU name and core count, torch intra-op threads,
        GPU name (``None`` on CPU), device, dtype, git commit and the UTC time.
    """
    device = torch.device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gpu": gpu,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def write_rows(rows: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """Write ``rows`` as JSON lines (``.jsonl``) or CSV (``.csv``, columns of the first row)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(dict(row)) + "\n" for row in rows))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
            writer.writeheader()
            writer.writerows(rows)
    else:
        raise ValueError(f"Output file must end in .jsonl or .csv, got {str(path)!r}.")


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table of ``columns`` of ``rows``; floats are shown with 3 significant digits."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}"
        return "" if value is None else str(value)

    cells = [[cell(row.get(col)) for col in columns] for row in rows]
    widths = [max([len(col)] + [len(r[i]) for r in cells]) for i, col in enumerate(columns)]
    lines = ["  ".join(col.ljust(w) for col, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)
