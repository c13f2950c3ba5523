"""Time one full knowledge-distillation training step: kdistill vs plain PyTorch (vs ModelOpt).

The step is: teacher forward (eval, no grad), student forward, Hinton KD loss (T=2, batchmean)
plus cross-entropy task loss combined with weights 0.5 / 0.5, backward, optimizer step. Each
implementation trains its own copy of the same initial models on the same synthetic batch:

- ``plain``: the step written by hand in PyTorch (``F.kl_div`` on log-probabilities);
- ``kdistill``: ``kdistill.convert`` with ``LogitsDistillationLoss(temperature=2)`` and
  ``StaticLossBalancer(0.5)``, then ``model(x)`` and ``model.compute_kd_loss(student_loss=...)``;
- ``modelopt``: the same through ``modelopt.torch.distill`` (``reduction="batchmean"``), only when
  ``nvidia-modelopt`` is importable
  (``.venv/bin/python -m pip install -c constraints-dev.txt -e ".[bench]"``).

Before timing, the script checks that all of them give the same first-step loss and the same
updated student weights, and stops with an error if not. Steps are timed in short interleaved
blocks (``_timing.interleaved_times``: one block of each variant per round, order rotating).
Reported per variant: the median and minimum per-step time, and ``ratio_vs_plain``, the median
over rounds of (variant block / plain block of the same round), which cancels most load from
other processes; ``ratio_of_medians`` and ``ratio_of_mins`` are in the rows too. Targets:
kdistill/plain <= 1.05 on ``tiny_mlp`` and <= 1.01 on ``medium_mlp``. Optimizers hold the
student's parameters only. Synthetic data, fixed seed, one intra-op thread by default. On CPU
the default clock is the process's CPU time (``--clock cpu``), which leaves out the time spent
waiting while other processes run; ``--clock wall`` gives wall time.

Commands (from the repository root):
    .venv/bin/python benchmarks/bench_step.py                      # all cases (minutes on 2 CPUs)
    .venv/bin/python benchmarks/bench_step.py --tiny               # smoke run (seconds)
    .venv/bin/python benchmarks/bench_step.py --cases tiny_mlp --optimizer adamw
    .venv/bin/python benchmarks/bench_step.py --output benchmarks/results/step.jsonl
    .venv/bin/python benchmarks/bench_step.py --profile tiny_mlp   # cProfile one variant's steps
"""

import argparse
import copy
import cProfile
import importlib.util
import pstats
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from _timing import (
    environment,
    format_table,
    interleaved_times,
    median,
    paired_ratio,
    write_rows,
)
from torch import Tensor, nn

import kdistill
from kdistill.testing.models import TinyCNN, TinyMLP

TEMPERATURE = 2.0
KD_WEIGHT = 0.5
VARIANTS = ("plain", "kdistill", "modelopt")

Step = Callable[[], Tensor]


@dataclass(frozen=True)
class Case:
    """One model size: how to build student and teacher, the batch shape and the timing budget.

    ``number`` steps make one timed block (a few milliseconds: short blocks often run
    undisturbed on a shared machine); each of ``repeats`` interleaved rounds times one block per
    variant.
    """

    name: str
    student: Callable[[], nn.Module]
    teacher: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # [B, D] or [B, C, H, W]
    num_classes: int
    number: int
    repeats: int


CASES = {
    case.name: case
    for case in (
        Case("tiny_mlp", lambda: TinyMLP(16, 32, 10), lambda: TinyMLP(16, 64, 10), (32, 16), 10,
             number=10, repeats=301),
        Case("small_mlp", lambda: TinyMLP(128, 256, 100), lambda: TinyMLP(128, 512, 100),
             (64, 128), 100, number=5, repeats=201),
        Case("medium_mlp", lambda: TinyMLP(512, 1024, 1000), lambda: TinyMLP(512, 2048, 1000),
             (64, 512), 1000, number=1, repeats=101),
        Case("small_cnn", lambda: TinyCNN(3, 16, 10), lambda: TinyCNN(3, 32, 10),
             (32, 3, 16, 16), 10, number=1, repeats=101),
    )
}  # fmt: skip
# --tiny: the two cheapest cases, few steps, for the smoke test
TINY_CASES = ("tiny_mlp", "small_cnn")
TINY_NUMBER, TINY_REPEATS, TINY_BATCH = 3, 3, 4


def hinton_kd_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """``T² · KL(softmax(t/T) ‖ softmax(s/T))`` averaged over the batch, written by hand."""
    return (
        F.kl_div(
            F.log_softmax(student_logits / TEMPERATURE, dim=-1),
            F.log_softmax(teacher_logits / TEMPERATURE, dim=-1),
            reduction="batchmean",
            log_target=True,
        )
        * TEMPERATURE**2
    )


def make_optimizer(params: list[nn.Parameter], name: str) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW, the same settings for every variant."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-2, momentum=0.9)
    return torch.optim.AdamW(params, lr=1e-3)


def plain_step(
    student: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor
) -> Step:
    """The KD step written by hand in plain PyTorch."""
    teacher.eval().requires_grad_(False)

    def step() -> Tensor:
        with torch.no_grad():
            teacher_logits = teacher(x)
        student_logits = student(x)
        kd = hinton_kd_loss(student_logits, teacher_logits)
        loss = KD_WEIGHT * kd + (1 - KD_WEIGHT) * F.cross_entropy(student_logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def converted_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor
) -> Step:
    """The KD step through a converted model's ``forward`` and ``compute_kd_loss`` (both APIs)."""

    def step() -> Tensor:
        student_logits = model(x)
        loss = model.compute_kd_loss(student_loss=F.cross_entropy(student_logits, y))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def kdistill_step(
    student: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor
) -> Step:
    """The KD step through kdistill."""
    model = kdistill.convert(
        student,
        mode=[
            (
                "kd_loss",
                {
                    "teacher_model": teacher,
                    "criterion": kdistill.LogitsDistillationLoss(temperature=TEMPERATURE),
                    "loss_balancer": kdistill.StaticLossBalancer(kd_loss_weight=KD_WEIGHT),
                },
            )
        ],
    )
    return converted_step(model, optimizer, x, y)


def modelopt_step(
    student: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor
) -> Step:
    """The KD step through ModelOpt (its loss defaults to reduction="mean"; we ask batchmean)."""
    # ModelOpt warns about untested transformers versions on import, and that the balancer
    # weights do not sum to 1 (we pass student_loss, as it asks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import modelopt.torch.distill as mtd

        model = mtd.convert(
            student,
            mode=[
                (
                    "kd_loss",
                    {
                        "teacher_model": teacher,
                        "criterion": mtd.LogitsDistillationLoss(
                            temperature=TEMPERATURE, reduction="batchmean"
                        ),
                        "loss_balancer": mtd.StaticLossBalancer(kd_loss_weight=KD_WEIGHT),
                    },
                )
            ],
        )
    return converted_step(model, optimizer, x, y)


BUILDERS = {"plain": plain_step, "kdistill": kdistill_step, "modelopt": modelopt_step}


def build_steps(
    case: Case, variants: list[str], args: argparse.Namespace
) -> tuple[dict[str, Step], dict[str, list[nn.Parameter]]]:
    """One step callable per variant, each on its own copy of the same initial models and batch.

    Returns:
        The step callables and each variant's student parameters, listed before conversion
        (to compare weights after a step).
    """
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    base_student = case.student().to(device).train()
    base_teacher = case.teacher().to(device)
    shape = (TINY_BATCH, *case.input_shape[1:]) if args.tiny else case.input_shape
    x = torch.randn(shape, device=device)
    y = torch.randint(0, case.num_classes, shape[:1], device=device)
    steps, params = {}, {}
    for name in variants:
        student, teacher = copy.deepcopy(base_student), copy.deepcopy(base_teacher)
        params[name] = list(student.parameters())
        optimizer = make_optimizer(params[name], args.optimizer)
        steps[name] = BUILDERS[name](student, teacher, optimizer, x, y)
    return steps, params


def check_agreement(
    steps: dict[str, Step], params: dict[str, list[nn.Parameter]]
) -> dict[str, float]:
    """Run one step of each variant; require equal losses and equal updated student weights.

    Returns:
        Each variant's first-step loss.

    Raises:
        RuntimeError: A variant's loss or weights differ from ``plain``'s.
    """
    losses = {name: step() for name, step in steps.items()}
    for name in steps:
        try:
            torch.testing.assert_close(losses[name], losses["plain"])
            for param, reference in zip(params[name], params["plain"], strict=True):
                torch.testing.assert_close(param, reference)
        except AssertionError as error:
            raise RuntimeError(
                f"{name} does not compute the same step as plain PyTorch: {error}"
            ) from error
    return {name: loss.item() for name, loss in losses.items()}


def run_case(case: Case, variants: list[str], args: argparse.Namespace) -> list[dict]:
    """Check agreement, time the variants interleaved, and return one result row per variant."""
    steps, params = build_steps(case, variants, args)
    first_losses = check_agreement(steps, params)
    number = TINY_NUMBER if args.tiny else max(1, round(case.number * args.scale))
    repeats = TINY_REPEATS if args.tiny else args.repeats or case.repeats
    times = interleaved_times(
        steps,
        number=number,
        repeats=repeats,
        warmup=args.warmup,
        device=args.device,
        clock=args.clock,
    )
    plain_median, plain_min = median(times["plain"]), min(times["plain"])
    rows = []
    for name in variants:
        step_median = median(times[name])
        rows.append(
            {
                "case": case.name,
                "variant": name,
                "optimizer": args.optimizer,
                "clock": args.clock,
                "batch": TINY_BATCH if args.tiny else case.input_shape[0],
                "median_us": step_median * 1e6,
                "min_us": min(times[name]) * 1e6,
                "max_us": max(times[name]) * 1e6,
                "ratio_vs_plain": paired_ratio(times[name], times["plain"]),
                "ratio_of_medians": step_median / plain_median,
                "ratio_of_mins": min(times[name]) / plain_min,
                "steps_per_s": 1 / step_median,
                "first_loss": first_losses[name],
                "number": number,
                "repeats": repeats,
            }
        )
    return rows


def profile_variant(case: Case, variant: str, args: argparse.Namespace) -> None:
    """Print a cProfile of ``variant``'s steps on ``case``, per-step microseconds per function."""
    steps, _ = build_steps(case, [variant], args)
    step = steps[variant]
    count = 2000 if not args.tiny else 20
    for _ in range(count // 10):  # warm-up
        step()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(count):
        step()
    profiler.disable()
    stats = pstats.Stats(profiler)
    print(f"cProfile of {count} {variant} steps on {case.name} (times in us per step):")
    rows = sorted(
        stats.stats.items(),  # type: ignore[attr-defined]
        key=lambda kv: kv[1][3],  # cumulative time
        reverse=True,
    )
    print(f"{'cumulative':>10} {'own':>8} {'calls':>6}  function")
    for (filename, line, func), (_, ncalls, own, cumulative, _) in rows[: args.profile_top]:
        where = filename.split("site-packages/")[-1].split("/src/")[-1]
        print(
            f"{cumulative / count * 1e6:10.1f} {own / count * 1e6:8.1f} "
            f"{ncalls / count:6.1f}  {where}:{line}({func})"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    parser.add_argument(
        "--modelopt",
        choices=["auto", "on", "off"],
        default="auto",
        help="time ModelOpt too: auto = when installed",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default=None,
        help="wall time, or this process's CPU time (steadier on a shared CPU machine; CPU "
        "work only). Default: cpu on a CPU device, wall otherwise",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared CPU a descheduled worker thread "
        "stalls whole ops; 0 keeps torch's default)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="override per-case repeats")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply steps per block")
    parser.add_argument("--warmup", type=int, default=5, help="untimed blocks per variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="smoke run: tiny batch, few steps")
    parser.add_argument("--output", default=None, help="write rows to this .jsonl or .csv file")
    parser.add_argument("--profile", choices=list(CASES), default=None, metavar="CASE")
    parser.add_argument("--profile-variant", choices=VARIANTS, default="kdistill")
    parser.add_argument("--profile-top", type=int, default=40)
    args = parser.parse_args(argv)
    if args.clock is None:
        args.clock = "cpu" if torch.device(args.device).type == "cpu" else "wall"
    if args.tiny:
        args.cases = [c for c in args.cases if c in TINY_CASES] or list(TINY_CASES)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.profile is not None:
        profile_variant(CASES[args.profile], args.profile_variant, args)
        return 0
    has_modelopt = importlib.util.find_spec("modelopt") is not None
    if args.modelopt == "on" and not has_modelopt:
        print("--modelopt on: nvidia-modelopt is not installed.", file=sys.stderr)
        return 2
    variants = ["plain", "kdistill"]
    if args.modelopt == "on" or (args.modelopt == "auto" and has_modelopt):
        variants.append("modelopt")
    env = environment(args.device, torch.float32)
    print(
        f"torch {env['torch']}, {env['cpu']} ({env['cpu_count']} cores, {env['threads']} threads),"
        f" device {env['device']}, commit {env['commit']}, optimizer {args.optimizer},"
        f" {args.clock} clock"
    )
    rows = []
    for name in args.cases:
        case_rows = run_case(CASES[name], variants, args)
        losses = ", ".join(f"{r['variant']} {r['first_loss']:.6f}" for r in case_rows)
        print(f"{name}: first-step losses agree ({losses})")
        rows += case_rows
    columns = ["case", "variant", "median_us", "min_us", "ratio_vs_plain", "ratio_of_mins"]
    columns += ["number", "repeats"]
    print(format_table(rows, columns))
    if args.output:
        write_rows([{**row, **env} for row in rows], args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
