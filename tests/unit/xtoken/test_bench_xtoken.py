"""benchmarks/bench_xtoken.py still runs: tiny sizes, CPU, seconds."""

import importlib
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

BENCHMARKS = Path(__file__).resolve().parents[3] / "benchmarks"


@pytest.mark.integration
def test_bench_xtoken_tiny(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    out = tmp_path / "xtoken.jsonl"
    rows = importlib.import_module("bench_xtoken").main(["--tiny", "--output", str(out)])
    assert rows == [json.loads(line) for line in out.read_text().splitlines()]
    align = [r for r in rows if r["case"] == "alignment"]
    assert len(align) == 1 and align[0]["align_tokens_per_s"] > 0
    assert 0 < align[0]["aligned_share_of_teacher_tokens"] <= 1
    losses = {r["variant"]: r for r in rows if r["case"] == "loss"}
    assert set(losses) == {"plain-uld", "chunked-uld", "plain-hybrid", "chunked-hybrid"}
    for name in ("uld", "hybrid"):
        plain, chunked = losses[f"plain-{name}"], losses[f"chunked-{name}"]
        assert chunked["loss_value"] == pytest.approx(plain["loss_value"], rel=1e-4)
    assert all(r["time_s"] > 0 and r["torch"] == torch.__version__ for r in losses.values())
