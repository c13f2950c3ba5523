"""Benchmarks are not tests, but each script must still run: tiny sizes, CPU, seconds."""

import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
def test_bench_losses_tiny(bench_script, tmp_path, capsys):
    out = tmp_path / "losses.jsonl"
    rows = bench_script("bench_losses").main(["--tiny", "--output", str(out)])
    assert rows == [json.loads(line) for line in out.read_text().splitlines()]
    stdout = capsys.readouterr().out
    # every registered loss is either benchmarked or reported as skipped
    benchmarked = {row["loss"] for row in rows}
    for name in kdistill.list_losses():
        assert name in benchmarked or name in stdout.split("skipped")[-1], name
    assert all(row["time_ms"] > 0 and row["torch"] == torch.__version__ for row in rows)
    assert all(row["peak_extra_mb"] is None or row["peak_extra_mb"] >= 0 for row in rows)


@pytest.fixture
def bench_script(monkeypatch):
    """Import a benchmark script in-process (saves a subprocess import of torch)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    threads = torch.get_num_threads()
    yield importlib.import_module
    torch.set_num_threads(threads)  # bench_step sets its own thread count


@pytest.mark.integration
def test_bench_step_tiny(bench_script, tmp_path, capsys):
    out = tmp_path / "step.jsonl"
    assert (
        bench_script("bench_step").main(["--tiny", "--modelopt", "off", "--output", str(out)]) == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(row["case"], row["variant"]) for row in rows} == {
        (case, variant) for case in ("tiny_mlp", "small_cnn") for variant in ("plain", "kdistill")
    }
    assert capsys.readouterr().out.count("first-step losses agree") == 2
    for row in rows:
        assert row["median_us"] > 0
        assert row["commit"] and row["torch"] == torch.__version__
        plain = next(r for r in rows if r["case"] == row["case"] and r["variant"] == "plain")
        assert row["ratio_of_medians"] == pytest.approx(row["median_us"] / plain["median_us"])
        assert row["ratio_vs_plain"] > 0 and plain["ratio_vs_plain"] == 1.0
        assert row["first_loss"] == pytest.approx(plain["first_loss"], rel=1e-5)


def test_bench_step_refuses_steps_that_disagree(bench_script):
    weight = torch.nn.Parameter(torch.ones(2))
    steps = {"plain": lambda: torch.tensor(1.0), "kdistill": lambda: torch.tensor(1.5)}
    with pytest.raises(RuntimeError, match="kdistill does not compute the same step"):
        bench_script("bench_step").check_agreement(steps, {"plain": [weight], "kdistill": [weight]})


@pytest.mark.integration
def test_bench_import_tiny(bench_script, tmp_path):
    out = tmp_path / "import.jsonl"
    assert bench_script("bench_import").main(["--tiny", "--output", str(out)]) == 0
    rows = {row["import"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"torch", "kdistill"}
    assert rows["torch"]["total_ms"] > 0 and rows["kdistill"]["own_ms"] > 0
    assert rows["kdistill"]["heavy_added"] == "-", "import kdistill pulled in optional packages"


@pytest.mark.integration
def test_bench_cache_tiny(bench_script, tmp_path):
    out = tmp_path / "cache.jsonl"
    assert bench_script("bench_cache").main(["--tiny", "--output", str(out)]) == 0
    speed, size = map(json.loads, out.read_text().splitlines())
    assert speed["question"] == "speed" and size["question"] == "size"
    assert min(speed["live_ms"], speed["cached_ms"], speed["cached_ids_ms"]) > 0
    assert speed["teacher_params"] > speed["student_params"]
    assert speed["speedup"] == pytest.approx(speed["live_ms"] / speed["cached_ms"])
    # the analytic size is exact per position and an upper bound on the per-shard padding
    assert 6 * size["top_k"] + 4 <= size["bytes_per_token"] <= size["analytic_bytes_per_token"]
    assert size["bytes"] == size["bytes_per_token"] * size["samples"] * size["seq_len"]


@pytest.mark.integration
def test_bench_llm_kd_tiny(tmp_path):
    out = tmp_path / "llm_kd.jsonl"
    stdout = _run("bench_llm_kd.py", "--tiny", "--output", str(out))
    rows = {row["variant"]: row for row in map(json.loads, out.read_text().splitlines())}
    # liger-kernel is optional (pip install --no-deps liger-kernel): skipped when absent
    liger = {"liger"} if importlib.util.find_spec("liger_kernel") else set()
    assert set(rows) == {"plain", "kdistill"} | liger, stdout
    # each variant ran in its own process and computed the same loss (the script checks it too)
    values = [row["loss_value"] for row in rows.values()]
    assert max(values) - min(values) <= 1e-5 + 1e-3 * max(values)
    assert all(row["time_s"] > 0 and row["peak_extra_mb"] >= 0 for row in rows.values())
    assert rows["plain"]["time_vs_plain"] == 1.0 and "memory_vs_plain" in rows["kdistill"]


@pytest.mark.integration
def test_bench_onpolicy_tiny(tmp_path):
    out = tmp_path / "onpolicy.jsonl"
    stdout = _run("bench_onpolicy.py", "--tiny", "--output", str(out))
    rows = {row["variant"]: row for row in map(json.loads, out.read_text().splitlines())}
    # TRL is optional (a scratch venv beside the pinned torch): skipped when absent
    trl = {"trl"} if importlib.util.find_spec("trl") else set()
    assert set(rows) == {"kdistill", "kdistill-trainer"} | trl, stdout
    for row in rows.values():
        assert min(row["sampling_s"], row["scoring_s"], row["total_s"]) > 0
        assert 0 < row["mean_completion_length"] <= row["completion"]
        assert row["peak_extra_mb"] is None or row["peak_extra_mb"] >= 0
    # the same models in every variant (the trainer's converted student holds the teacher too)
    assert len({(row["student_params"], row["teacher_params"]) for row in rows.values()}) == 1


@pytest.mark.integration
def test_bench_multiteacher_mnist_tiny(bench_script, tmp_path):
    out = tmp_path / "multiteacher.jsonl"
    assert bench_script("bench_multiteacher_mnist").main(["--tiny", "--output", str(out)]) == 0
    rows = {row["variant"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"alone", "kd_demo", "kd_second", "ensemble_probs", "ensemble_losses"}
    for row in rows.values():
        assert len(row["test_errors"]) == 1 and 0 <= row["mean"] <= row["test_samples"]
        assert set(row["teacher_errors"]) == {"demo", "second"}


@pytest.mark.integration
def test_bench_hf_trainer_tiny(tmp_path):
    out = tmp_path / "hf_trainer.jsonl"
    stdout = _run("bench_hf_trainer.py", "--tiny", "--output", str(out))
    rows = {row["variant"]: row for row in map(json.loads, out.read_text().splitlines())}
    # ModelOpt is optional (a scratch venv beside the pinned torch): skipped when absent
    modelopt = {"modelopt"} if importlib.util.find_spec("modelopt") else set()
    assert set(rows) == {"default", "full"} | modelopt, stdout
    assert rows["default"]["chunked"] and not rows["full"]["chunked"]
    # every variant ran in its own process and logged the same first loss (checked there too)
    assert rows["default"]["first_loss"] == pytest.approx(rows["full"]["first_loss"], rel=1e-4)
    assert all(row["step_s"] > 0 and row["peak_rss_mb"] > 0 for row in rows.values())
    assert rows["full"]["time_vs_full"] == 1.0 and "memory_vs_full" in rows["default"]
