"""Peak memory and time of LLM logit distillation through the lm_head: plain vs chunked vs Liger.

Question: what does one forward + backward of token-level forward-KL distillation cost when the
student and teacher logits come from lm_head matmuls over a large vocabulary? Three variants
compute the same value (mean over tokens of KL(p_T ‖ p_S) at temperature 1, checked to agree):

- ``plain``: full logits ``h @ W.T`` for student and teacher ``[N, V]``, float32 log-softmax,
  ``F.kl_div(..., log_target=True)``, autograd (what a naive training step does);
- ``kdistill``: ``kdistill.LMHeadDistillationLoss`` (default chunk size), chunked over tokens
  with the gradients computed in forward;
- ``liger``: Liger-Kernel's ``LigerFusedLinearJSDLoss(beta=0)`` from
  ``liger_kernel.chunked_loss`` (pure PyTorch; ``weight_hard_loss=0``, ``weight_soft_loss=1``,
  default ``chunk_size=1024``, ``compiled=False``: ``torch.compile`` needs a C++ toolchain on
  CPU). Liger does not multiply by T², hence T = 1. Skipped if ``liger_kernel`` is missing.

Measured per variant, each in a fresh subprocess (so allocator caches of one cannot hide
another's memory), after creating the inputs (hidden states ``[N, D]`` for both models, two
lm_head weights ``[V, D]``; the student's require grad) and one small warm-up call on 64 tokens:

- ``peak_extra_mb``: peak RSS during one forward + backward minus the RSS just before it (the
  kernel's ``VmHWM`` is reset through ``/proc/self/clear_refs``; where that is impossible,
  ``ru_maxrss`` minus its value before the step). It includes the student weight gradient
  ``[V, D]`` that any variant must produce. On CUDA: ``torch.cuda.max_memory_allocated`` extra;
- ``time_s``: wall time of that forward + backward (the median with ``--repeats`` > 1);
- ``tokens_per_s`` and the ratios to ``plain`` of the same run.

Defaults: N = 4096 tokens, D = 1024, V ∈ {32000, 128256} (Llama-2 and Llama-3 vocabularies),
float32, CPU. The 128k plain run needs ~14 GB of RAM.

Commands (from the repository root):
    .venv/bin/python benchmarks/bench_llm_kd.py --output benchmarks/results/llm-kd-fp32-cpu.jsonl
    .venv/bin/python benchmarks/bench_llm_kd.py --vocab 32000 --variants kdistill liger
    .venv/bin/python benchmarks/bench_llm_kd.py --device cuda --dtype bfloat16   # on a GPU
    .venv/bin/python benchmarks/bench_llm_kd.py --tiny                          # smoke run
"""

import argparse
import json
import resource
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _memory import proc_status_kb, reset_peak_rss, run_isolated
from _timing import environment, format_table, median, synchronize, write_rows
from torch import Tensor, nn

import kdistill

VARIANTS = ("plain", "kdistill", "liger")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
WARMUP_TOKENS = 64


def _make_step(
    variant: str, hidden_s: Tensor, head_s: nn.Linear, hidden_t: Tensor, head_t: nn.Linear
) -> Callable[[int], Tensor]:
    """``step(n)``: forward + backward on the first ``n`` tokens; returns the detached loss."""
    if variant == "plain":

        def loss_fn(n: int) -> Tensor:
            log_q = F.log_softmax(head_s(hidden_s[:n]).float(), dim=-1)  # [n, V]
            with torch.no_grad():
                log_p = F.log_softmax(head_t(hidden_t[:n]).float(), dim=-1)
            return F.kl_div(log_q, log_p, reduction="sum", log_target=True) / n

    elif variant == "kdistill":
        loss = kdistill.LMHeadDistillationLoss(head_s, head_t)

        def loss_fn(n: int) -> Tensor:
            return loss(hidden_s[:n], hidden_t[:n])

    else:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger = LigerFusedLinearJSDLoss(
            weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, temperature=1.0, compiled=False
        )
        targets = torch.zeros(hidden_s.shape[0], dtype=torch.long, device=hidden_s.device)

        def loss_fn(n: int) -> Tensor:
            return liger(hidden_s[:n], head_s.weight, hidden_t[:n], head_t.weight, targets[:n])

    def step(n: int) -> Tensor:
        hidden_s.grad = head_s.weight.grad = None
        value = loss_fn(n)
        value.backward()
        return value.detach()

    return step


def measure(
    variant: str, tokens: int, hidden: int, vocab: int, device: str, dtype: str, repeats: int
) -> dict:
    """Peak extra memory and time of one variant (see the module docstring)."""
    torch.manual_seed(0)
    dt = DTYPES[dtype]
    # LLM-like scales: unit-variance final-norm outputs, lm_head weights with std 0.02
    hidden_s = torch.randn(tokens, hidden, device=device, dtype=dt, requires_grad=True)
    hidden_t = torch.randn(tokens, hidden, device=device, dtype=dt)
    head_s = nn.Linear(hidden, vocab, bias=False, device=device, dtype=dt)
    head_t = nn.Linear(hidden, vocab, bias=False, device=device, dtype=dt).requires_grad_(False)
    with torch.no_grad():
        head_s.weight.normal_(0, 0.02)
        head_t.weight.normal_(0, 0.02)
    step = _make_step(variant, hidden_s, head_s, hidden_t, head_t)
    step(min(WARMUP_TOKENS, tokens))  # library initialization, first-call allocations
    hidden_s.grad = head_s.weight.grad = None

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    rss_before = proc_status_kb("VmRSS")
    hwm_reset = rss_before is not None and reset_peak_rss()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    value = step(tokens)
    synchronize(device)
    times = [time.perf_counter() - start]
    if cuda:
        peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
    elif hwm_reset:
        peak_mb = max(proc_status_kb("VmHWM") - rss_before, 0) / 1024
    else:  # ru_maxrss is in KiB on Linux
        peak_mb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_before, 0) / 1024
    for _ in range(repeats - 1):
        start = time.perf_counter()
        step(tokens)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {
        "variant": variant,
        "tokens": tokens,
        "hidden": hidden,
        "vocab": vocab,
        "loss_value": float(value),
        "time_s": median(times),
        "peak_extra_mb": peak_mb,
        "peak_method": "cuda" if cuda else ("VmHWM" if hwm_reset else "ru_maxrss"),
    }


def _measure_isolated(variant: str, args: argparse.Namespace, vocab: int) -> dict | None:
    """Run ``measure`` in a fresh Python process and read back its JSON row."""
    command = ["--child", variant, "--tokens", str(args.tokens), "--hidden", str(args.hidden)]
    command += ["--vocab", str(vocab), "--device", args.device, "--dtype", args.dtype]
    command += ["--repeats", str(args.repeats)]
    try:
        return run_isolated(__file__, command, f"{variant!r} (V={vocab})")
    except RuntimeError as error:
        if variant == "liger" and "No module named 'liger_kernel'" in str(error):
            print(
                "liger skipped: liger_kernel is not installed (pip install --no-deps liger-kernel)"
            )
            return None
        raise


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse arguments, run the variants, print the table; return the rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (smoke run, seconds)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--tokens", type=int, default=4096, help="N = batch x sequence tokens")
    parser.add_argument("--hidden", type=int, default=1024, help="D, both models")
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256], help="V values")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--repeats", type=int, default=1, help="timed forward + backward calls")
    parser.add_argument("--output", help="write rows to a .jsonl or .csv file")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        args.tokens, args.hidden, args.vocab = 96, 32, [1000]
    if args.child:
        row = measure(
            args.child,
            args.tokens,
            args.hidden,
            args.vocab[0],
            args.device,
            args.dtype,
            args.repeats,
        )
        print(json.dumps(row))
        return []

    env = environment(args.device, DTYPES[args.dtype])
    rows: list[dict] = []
    for vocab in args.vocab:
        group = [r for v in args.variants if (r := _measure_isolated(v, args, vocab)) is not None]
        plain = next((r for r in group if r["variant"] == "plain"), None)
        for row in group:
            row["tokens_per_s"] = row["tokens"] / row["time_s"]
            if plain is not None:
                row["time_vs_plain"] = row["time_s"] / plain["time_s"]
                row["memory_vs_plain"] = row["peak_extra_mb"] / max(plain["peak_extra_mb"], 1e-9)
        values = [r["loss_value"] for r in group]
        spread = max(values) - min(values)
        # the variants compute the same number; a large spread means one of them is wrong
        tolerance = 1e-3 * max(abs(v) for v in values) + (1e-2 if args.dtype != "float32" else 1e-5)
        if spread > tolerance:
            raise RuntimeError(f"Variants disagree at V={vocab}: loss values {values}.")
        rows += [{**r, **env} for r in group]
    columns = [
        "variant",
        "vocab",
        "loss_value",
        "time_s",
        "peak_extra_mb",
        "time_vs_plain",
        "memory_vs_plain",
        "tokens_per_s",
    ]
    print(format_table(rows, columns))
    if args.output:
        write_rows(rows, args.output)
    return rows


if __name__ == "__main__":
    main()
