"""Time and peak memory of one forward + backward of every registered kdistill loss, on CPU.

What is measured, per loss, for one realistic input shape (float32, synthetic data, seed 0):

- ``time_ms``: median wall time of ``loss(student, teacher).backward()`` over ``--repeats``
  timed blocks after one warm-up block (``_timing.time_fn``);
- ``peak_extra_mb``: the peak resident memory (RSS) of the process during one forward + backward,
  minus the RSS just before it (inputs already allocated). The kernel's peak counter
  (``VmHWM``) is reset through ``/proc/self/clear_refs`` right before the call, so this is what
  the loss itself needs on top of its inputs: activations kept for backward, temporaries and the
  gradient of the student input. Each loss runs in a fresh subprocess so allocator caches of one
  loss cannot hide another's memory (``--no-isolate`` runs in-process: faster, less precise);
- ``inputs_mb``: the size of the student and teacher inputs, for scale.

Shapes (full run): logit losses on ``[2, 512, 32000]`` (1024 tokens, a 32k vocabulary; top-k
k = 64; labels for DKD/MFT), projected feature losses on hidden states ``[2, 512, 1024]`` ->
``[2, 512, 2048]``, feature-map losses on ``[32, 64, 16, 16]`` -> ``[32, 128, 16, 16]``,
relational losses on embeddings ``[128, 512]`` -> ``[128, 1024]``. ``--tiny`` shrinks every
shape for a smoke run. Losses registered without a benchmark case here are listed as skipped.

Commands (from the repository root):
    .venv/bin/python benchmarks/bench_losses.py                    # all losses (a few minutes)
    .venv/bin/python benchmarks/bench_losses.py --losses jsd tvd topk_kl
    .venv/bin/python benchmarks/bench_losses.py --tiny             # smoke run (seconds)
    .venv/bin/python benchmarks/bench_losses.py --output benchmarks/results/losses-cpu.jsonl
"""

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass

import torch
from _memory import proc_status_kb, reset_peak_rss, run_isolated
from _timing import environment, format_table, median, time_fn, write_rows
from torch import Tensor, nn

import kdistill

Inputs = tuple[Tensor, Tensor, dict[str, Tensor]]


@dataclass(frozen=True)
class Case:
    """A loss factory and an input builder taking the ``tiny`` flag."""

    make_loss: Callable[[], nn.Module]
    make_inputs: Callable[[bool], Inputs]


def _logits(tiny: bool, labels: bool = False) -> Inputs:
    shape = (2, 8, 64) if tiny else (2, 512, 32000)
    student, teacher = torch.randn(shape), torch.randn(shape)
    kwargs = {"labels": torch.randint(0, shape[-1], shape[:-1])} if labels else {}
    return student, teacher, kwargs


def _features(student_shape, teacher_shape, tiny_student, tiny_teacher):
    def make(tiny: bool) -> Inputs:
        s_shape, t_shape = (tiny_student, tiny_teacher) if tiny else (student_shape, teacher_shape)
        return torch.randn(s_shape), torch.randn(t_shape), {}

    return make


_HIDDEN = _features((2, 512, 1024), (2, 512, 2048), (2, 4, 8), (2, 4, 16))
_HIDDEN_SAME = _features((2, 512, 2048), (2, 512, 2048), (2, 4, 8), (2, 4, 8))
_MAPS = _features((32, 64, 16, 16), (32, 128, 16, 16), (2, 4, 4, 4), (2, 8, 4, 4))
_EMBEDDINGS = _features((128, 512), (128, 1024), (4, 8), (4, 16))


def _cases(tiny: bool) -> dict[str, Case]:
    k = 4 if tiny else 64
    hidden = (8, 16) if tiny else (1024, 2048)
    channels = (4, 8) if tiny else (64, 128)
    return {
        "logits_distillation": Case(kdistill.LogitsDistillationLoss, _logits),
        "reverse_kl": Case(kdistill.ReverseKLLoss, _logits),
        "jsd": Case(kdistill.JSDLoss, _logits),
        "skew_kl": Case(kdistill.SkewKLLoss, _logits),
        "skew_reverse_kl": Case(kdistill.SkewReverseKLLoss, _logits),
        "tvd": Case(kdistill.TVDLoss, _logits),
        "topk_kl": Case(lambda: kdistill.TopKLogitsKLLoss(k=k), _logits),
        "dkd": Case(kdistill.DKDLoss, lambda t: _logits(t, labels=True)),
        "mft": Case(kdistill.MFTLoss, lambda t: _logits(t, labels=True)),
        "hint": Case(lambda: kdistill.HintLoss(*hidden), _HIDDEN),
        "cosine": Case(kdistill.CosineLoss, _HIDDEN_SAME),
        "attention_transfer": Case(kdistill.AttentionTransferLoss, _MAPS),
        "mgd": Case(lambda: kdistill.MGDLoss(*channels), _MAPS),
        "rkd": Case(kdistill.RKDLoss, _EMBEDDINGS),
        "pkt": Case(kdistill.PKTLoss, _EMBEDDINGS),
        "similarity_preserving": Case(kdistill.SimilarityPreservingLoss, _EMBEDDINGS),
    }


def measure(name: str, tiny: bool, repeats: int) -> dict:
    """Time and peak extra memory of one loss (see the module docstring)."""
    torch.manual_seed(0)
    case = _cases(tiny)[name]
    loss = case.make_loss()
    student, teacher, kwargs = case.make_inputs(tiny)
    student.requires_grad_(True)

    def step() -> None:
        student.grad = None
        for param in loss.parameters():
            param.grad = None
        loss(student, teacher, **kwargs).backward()

    rss_before = proc_status_kb("VmRSS")
    peak_mb = None
    if rss_before is not None and reset_peak_rss():
        step()
        peak = proc_status_kb("VmHWM")
        peak_mb = None if peak is None else max(peak - rss_before, 0) / 1024
    times = time_fn(step, number=1, repeats=repeats, warmup=1)
    inputs_mb = (student.numel() + teacher.numel()) * student.element_size() / 2**20
    return {
        "loss": name,
        "student_shape": "x".join(map(str, student.shape)),
        "teacher_shape": "x".join(map(str, teacher.shape)),
        "inputs_mb": inputs_mb,
        "time_ms": median(times) * 1e3,
        "peak_extra_mb": peak_mb,
    }


def _measure_isolated(name: str, tiny: bool, repeats: int) -> dict:
    """Run ``measure`` in a fresh Python process and read back its JSON row."""
    args = ["--child", name, "--repeats", str(repeats)] + (["--tiny"] if tiny else [])
    return run_isolated(__file__, args, repr(name))


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse arguments, run the benchmark, print the table; return the rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, 1 repeat (smoke run)")
    parser.add_argument("--losses", nargs="+", help="registered loss names (default: all)")
    parser.add_argument("--repeats", type=int, default=None, help="timed blocks (default 5)")
    parser.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one fresh subprocess per loss (default: on, off with --tiny)",
    )
    parser.add_argument("--output", help="write rows to a .jsonl or .csv file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.tiny else 5)
    if args.child:
        print(json.dumps(measure(args.child, args.tiny, repeats)))
        return []

    cases = _cases(args.tiny)
    names = args.losses or kdistill.list_losses()
    unknown = [n for n in names if n not in kdistill.list_losses()]
    if unknown:
        parser.error(f"unknown losses {unknown}; registered: {kdistill.list_losses()}")
    skipped = [n for n in names if n not in cases]
    isolate = (not args.tiny) if args.isolate is None else args.isolate
    env = environment("cpu", torch.float32)
    rows = []
    for name in (n for n in names if n in cases):
        row = (
            _measure_isolated(name, args.tiny, repeats)
            if isolate
            else measure(name, args.tiny, repeats)
        )
        rows.append({**row, "isolated": isolate, **env})
    columns = ["loss", "student_shape", "teacher_shape", "inputs_mb", "time_ms", "peak_extra_mb"]
    print(format_table(rows, columns))
    print(
        f"\n{env['cpu']} ({env['cpu_count']} cores, {env['threads']} torch threads), "
        f"torch {env['torch']}, commit {env['commit']}, {env['date']}"
    )
    if skipped:
        print(f"skipped (no benchmark case in bench_losses.py): {skipped}")
    if args.output:
        write_rows(rows, args.output)
    return rows


if __name__ == "__main__":
    main()
