"""Benchmarks are not tests, but each script must still run: tiny sizes, CPU, seconds."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import kdistill

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.integration
def test_bench_losses_tiny(tmp_path):
    out = tmp_path / "losses.jsonl"
    stdout = _run("bench_losses.py", "--tiny", "--output", str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    benchmarked = {row["loss"] for row in rows}
    # every registered loss is either benchmarked or reported as skipped
    for name in kdistill.list_losses():
        assert name in benchmarked or name in stdout.split("skipped")[-1], name
    assert all(row["time_ms"] > 0 for row in rows)
    assert "peak_extra_mb" in stdout


@pytest.mark.integration
def test_bench_losses_isolated_subprocess():
    stdout = _run("bench_losses.py", "--tiny", "--isolate", "--losses", "tvd")
    assert "tvd" in stdout and "peak_extra_mb" in stdout
