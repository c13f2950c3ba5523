"""The MNIST demo end to end on tiny settings: report, plot, teacher cache, equivalences."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from kdistill.cli.__main__ import main
from kdistill.demo.data import load_dataset, mnist_available
from kdistill.demo.mnist import PRESETS, _jitter, build_mlp, run_mnist_demo, teacher_cache_key
from kdistill.demo.report import PUBLISHED, format_table, gap_closed_percent

pytestmark = pytest.mark.integration

TINY = [
    "--train-samples", "256", "--test-samples", "200", "--teacher-epochs", "1",
    "--student-epochs", "2", "--no-progress",
]  # fmt: skip
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tiny_config(**overrides: object) -> object:
    fields = dict(
        teacher_hidden=(32,),
        student_hidden=(8,),
        teacher_epochs=1,
        student_epochs=2,
        train_samples=256,
        test_samples=200,
        seeds=(0,),
        dataset="digits",
    )
    fields.update(overrides)
    return dataclasses.replace(PRESETS["quick"], **fields)


def test_demo_cli_writes_valid_report_and_reuses_cached_teacher(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["demo", *TINY, "--cache-dir", str(tmp_path / "cache")]
    assert main([*common, "--seeds", "0,1", "--output-dir", str(tmp_path / "run1")]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "run1" / "report.json").read_text())
    assert (tmp_path / "run1" / "report.png").read_bytes()[:8] == PNG_MAGIC
    assert format_table(report) in out

    expected_name = "mnist" if mnist_available() else "digits"
    assert report["dataset"]["name"] == expected_name
    assert report["dataset"]["train_samples"] == 256
    assert report["dataset"]["test_samples"] == 200
    assert report["seeds"] == [0, 1]
    assert report["config"]["preset"] == "quick"
    assert report["published"] == PUBLISHED
    for name in ("student_alone", "distilled"):
        run = report[name]
        assert len(run["curves"]) == 2
        assert all(len(curve) == 2 for curve in run["curves"])
        assert run["test_errors"] == [curve[-1] for curve in run["curves"]]
        assert all(0 <= e <= 200 for e in run["test_errors"])
        assert math.isclose(run["mean"], sum(run["test_errors"]) / 2)
        diffs = [e - run["mean"] for e in run["test_errors"]]
        assert math.isclose(run["std"], math.sqrt(sum(d * d for d in diffs) / (2 - 1)))
    teacher = report["teacher"]
    assert teacher["cached"] is False
    assert len(teacher["curve"]) == 1
    alone, distilled = report["student_alone"]["mean"], report["distilled"]["mean"]
    gap = report["gap_closed_percent"]
    if alone > teacher["test_errors"]:
        assert math.isclose(gap, 100 * (alone - distilled) / (alone - teacher["test_errors"]))
    else:
        assert gap is None
    assert Path(teacher["cache_file"]).is_file()
    assert set(report["versions"]) >= {"python", "torch", "kdistill"}

    # Second run: the teacher comes from the cache, with the same weights and test errors.
    assert main([*common, "--seed", "0", "--output-dir", str(tmp_path / "run2")]) == 0
    second = json.loads((tmp_path / "run2" / "report.json").read_text())
    assert second["teacher"]["cached"] is True
    assert second["teacher"]["test_errors"] == teacher["test_errors"]
    assert second["teacher"]["cache_key"] == teacher["cache_key"]
    # same seed, same data, same teacher: the seed-0 students are reproduced exactly
    assert second["student_alone"]["curves"][0] == report["student_alone"]["curves"][0]
    assert second["distilled"]["curves"][0] == report["distilled"]["curves"][0]
    assert "loaded from cache" in capsys.readouterr().out


def test_zero_kd_weight_distilled_student_equals_student_alone(tmp_path: Path) -> None:
    # With kd_loss_weight=0 the kd_loss path reduces to plain cross-entropy: given the same
    # initialization and batches, the distilled run must reproduce the student-alone run.
    config = _tiny_config(kd_loss_weight=0.0, seeds=(3,))
    report = run_mnist_demo(config, cache_dir=None, progress=False)
    assert report["distilled"]["curves"] == report["student_alone"]["curves"]
    assert report["teacher"]["cached"] is False
    assert report["teacher"]["cache_file"] is None


def test_digits_dataset_and_fallback_note(tmp_path: Path) -> None:
    data = load_dataset("digits")
    assert data.in_features == 64
    assert len(data.y_train) + len(data.y_test) == 1797
    assert float(data.x_train.max()) <= 1.0
    assert data.note == ""
    report = run_mnist_demo(_tiny_config(), cache_dir=tmp_path, progress=False)
    assert report["dataset"]["name"] == "digits"
    assert report["student_params"] == 64 * 8 + 8 + 8 * 10 + 10
    assert report["teacher"]["params"] == 64 * 32 + 32 + 32 * 10 + 10


def test_load_dataset_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match=r"`dataset` must be one of \['auto', 'digits', 'mnist'\]"):
        load_dataset("cifar")


def test_teacher_cache_key_tracks_teacher_fields_only() -> None:
    data = load_dataset("digits")
    base = _tiny_config()
    key = teacher_cache_key(base, data)
    assert teacher_cache_key(dataclasses.replace(base, seeds=(5, 6), temperature=9.0), data) == key
    for change in ({"teacher_hidden": (64,)}, {"teacher_epochs": 3}, {"teacher_seed": 1}):
        assert teacher_cache_key(dataclasses.replace(base, **change), data) != key
    assert teacher_cache_key(base, data.subset(100, None)) != key


def test_jitter_matches_shifting_by_hand() -> None:
    images = torch.rand(4, 784)
    generator = torch.Generator().manual_seed(1)
    shifted = _jitter(images, 2, generator)
    # replay the generator to know each image's shift, then shift with plain slicing
    shifts = torch.randint(0, 5, (2, 4), generator=torch.Generator().manual_seed(1))
    for b in range(4):
        dy, dx = int(shifts[0, b]) - 2, int(shifts[1, b]) - 2
        padded = torch.nn.functional.pad(images[b].view(28, 28), (2, 2, 2, 2))
        expected = padded[2 + dy : 30 + dy, 2 + dx : 30 + dx]
        torch.testing.assert_close(shifted[b].view(28, 28), expected)


def test_build_mlp_layers() -> None:
    model = build_mlp(784, (1200, 1200), 10, dropout=0.5, input_dropout=0.2)
    linear = [m for m in model if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [
        (784, 1200),
        (1200, 1200),
        (1200, 10),
    ]
    assert [m.p for m in model if isinstance(m, torch.nn.Dropout)] == [0.2, 0.5, 0.5]


def test_gap_closed_and_published_row() -> None:
    assert math.isclose(PUBLISHED["gap_closed_percent"], round(100 * 72 / 79, 1))
    assert gap_closed_percent(10, 30, 20) == 50.0
    assert gap_closed_percent(30, 30, 20) is None


def _tiny_llama(vocab: int = 64, hidden: int = 32, layers: int = 2) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(config)


def test_llm_demo_pipeline_on_tiny_llama() -> None:
    from kdistill.demo.llm import LLMDemoConfig, format_llm_table, perplexity, run_llm_demo

    teacher = _tiny_llama()
    config = LLMDemoConfig(
        student_hidden=16,
        student_layers=1,
        student_heads=2,
        student_intermediate=32,
        seq_len=16,
        batch_size=4,
        train_tokens=128,
        eval_tokens=32,
    )
    ids = torch.randint(0, 64, (400,))
    report = run_llm_demo(config, teacher, ids, progress=False)
    # reference: Hugging Face's own mean next-token cross-entropy on the held-out sequences
    held_out = ids[-32:].view(2, 16)
    with torch.no_grad():
        reference = math.exp(float(teacher(input_ids=held_out, labels=held_out).loss))
    assert math.isclose(report["teacher"]["perplexity"], reference, rel_tol=1e-5)
    assert math.isclose(perplexity(teacher, held_out, batch_size=1), reference, rel_tol=1e-5)
    assert report["train_tokens"] == 128
    assert report["held_out_tokens"] == 32
    for name in ("ce_only", "distilled"):
        run = report[name]
        assert len(run["perplexity"]) == 1
        assert run["mean"] == run["perplexity"][0]
        assert 1 < run["mean"] < 10 * 64  # finite and not absurd for a 64-token vocabulary
        assert run["tokens_per_second"][0] > 0
    assert report["student_params"] < report["teacher"]["params"]
    assert report["peak_memory_mb"] > 0
    # the teacher got its lm_head back and still computes logits
    assert teacher(input_ids=held_out).logits.shape == (2, 16, 64)
    json.dumps(report, allow_nan=False)
    assert "student, distilled (n=1)" in format_llm_table(report)


def test_llm_split_tokens() -> None:
    from kdistill.demo.llm import LLMDemoConfig, split_tokens

    config = LLMDemoConfig(seq_len=4, batch_size=2, train_tokens=16, eval_tokens=8)
    ids = torch.arange(40)
    train, held_out = split_tokens(ids, config)
    torch.testing.assert_close(train, torch.arange(16).view(4, 4))
    torch.testing.assert_close(held_out, torch.arange(32, 40).view(2, 4))
    with pytest.raises(ValueError, match="Need 24 tokens for the budget, the text has 20"):
        split_tokens(torch.arange(20), config)


def test_paper_preset_runs_hintons_architectures(tmp_path: Path) -> None:
    argv = ["demo", "--paper", "--dataset", "digits", "--train-samples", "64", "--seed", "0"]
    argv += ["--teacher-epochs", "1", "--student-epochs", "1", "--no-cache", "--no-progress"]
    assert main([*argv, "--output-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["config"]["preset"] == "paper"
    teacher = build_mlp(64, (1200, 1200), 10)  # Hinton's teacher, on 8x8 digits
    student = build_mlp(64, (800, 800), 10)
    assert report["teacher"]["params"] == sum(p.numel() for p in teacher.parameters())
    assert report["student_params"] == sum(p.numel() for p in student.parameters())
