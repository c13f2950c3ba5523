"""The MNIST demo: reproduce the shape of Hinton et al.'s distillation table with kdistill.

Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (arXiv 1503.02531), §3:
a large regularized teacher MLP makes 67 test errors on MNIST, a smaller student trained alone
146, and the same student distilled at a high temperature 74.

The pipeline, for each preset:

1. train a regularized teacher MLP (dropout, random 2-pixel shifts on MNIST), or load it from a
   cache directory keyed by a hash of everything that determines its weights;
2. for each seed, train the same student twice from the same initialization, on the same batches
   in the same order: alone (cross-entropy) and distilled through ``kdistill.convert`` with
   ``LogitsDistillationLoss`` + ``StaticLossBalancer``;
3. count test errors after every epoch and return a report (see :mod:`kdistill.demo.report`).

Only kdistill's public API is used for distillation (``convert``, ``export``, the loss and the
balancer), so this file doubles as a worked example.
"""

import dataclasses
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kdistill as mtd

from .data import Dataset, load_dataset
from .report import PUBLISHED, gap_closed_percent, summarize

__all__ = [
    "PRESETS",
    "MnistDemoConfig",
    "build_mlp",
    "default_cache_dir",
    "load_or_train_teacher",
    "run_mnist_demo",
    "teacher_cache_key",
]

# Bump when the teacher's training code changes in a way that changes its weights.
_TEACHER_FORMAT = 1
_EVAL_BATCH = 2000


@dataclass(frozen=True)
class MnistDemoConfig:
    """Everything that determines a demo run (JSON-able via ``dataclasses.asdict``).

    Attributes:
        preset: Name of the preset this config came from (``"quick"``, ``"paper"``).
        teacher_hidden: Hidden widths of the teacher MLP.
        teacher_dropout: Dropout after each hidden layer of the teacher.
        teacher_input_dropout: Dropout on the teacher's input pixels.
        teacher_jitter: Random shift of each training image by up to this many pixels (28x28
            images only; 0 disables).
        teacher_epochs: Passes over the training set for the teacher.
        teacher_seed: Seed of the teacher's initialization and batch order.
        student_hidden: Hidden widths of the student MLP (no dropout).
        student_epochs: Passes over the training set for each student.
        batch_size: Examples per step, for every model.
        lr: Peak Adam learning rate; it decays linearly to 0 over each run.
        temperature: Softmax temperature T of the distillation loss.
        kd_loss_weight: Weight of the KD loss; the cross-entropy gets ``1 - kd_loss_weight``.
        seeds: Student seeds; each trains one student alone and one distilled.
        dataset: ``"auto"``, ``"mnist"`` or ``"digits"`` (see :func:`load_dataset`).
        train_samples: Use only the first N training images (``None``: all of them).
        test_samples: Use only the first M test images (``None``: all of them).
    """

    preset: str = "quick"
    teacher_hidden: tuple[int, ...] = (800, 800)
    teacher_dropout: float = 0.3
    teacher_input_dropout: float = 0.1
    teacher_jitter: int = 1
    teacher_epochs: int = 8
    teacher_seed: int = 0
    student_hidden: tuple[int, ...] = (128,)
    student_epochs: int = 6
    batch_size: int = 128
    lr: float = 1e-3
    temperature: float = 4.0
    kd_loss_weight: float = 0.9
    seeds: tuple[int, ...] = (0, 1, 2)
    dataset: str = "auto"
    train_samples: int | None = None
    test_samples: int | None = None


PRESETS: dict[str, MnistDemoConfig] = {
    # About two minutes on two CPU cores: a mid-size teacher, a one-hidden-layer student.
    "quick": MnistDemoConfig(),
    # Hinton et al.'s architectures: 784-1200-1200-10 teacher with dropout and jitter,
    # 784-800-800-10 student without regularization, longer training, T = 20.
    "paper": MnistDemoConfig(
        preset="paper",
        teacher_hidden=(1200, 1200),
        teacher_dropout=0.5,
        teacher_input_dropout=0.2,
        teacher_jitter=2,
        teacher_epochs=40,
        student_hidden=(800, 800),
        student_epochs=20,
        temperature=20.0,
        kd_loss_weight=0.9,
    ),
}


def build_mlp(
    in_features: int,
    hidden: tuple[int, ...],
    num_classes: int,
    dropout: float = 0.0,
    input_dropout: float = 0.0,
) -> nn.Sequential:
    """A ReLU MLP ``in_features -> *hidden -> num_classes`` mapping ``[B, D]`` to ``[B, C]``."""
    layers: list[nn.Module] = [nn.Dropout(input_dropout)] if input_dropout > 0 else []
    width = in_features
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def default_cache_dir() -> Path:
    """``$KDISTILL_CACHE_DIR``, else ``$XDG_CACHE_HOME/kdistill``, else ``~/.cache/kdistill``."""
    if "KDISTILL_CACHE_DIR" in os.environ:
        return Path(os.environ["KDISTILL_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kdistill"


def teacher_cache_key(config: MnistDemoConfig, data: Dataset) -> str:
    """A short hash of everything that determines the teacher's weights."""
    fields = {
        "format": _TEACHER_FORMAT,
        "dataset": data.name,
        "train_samples": len(data.y_train),
        "hidden": list(config.teacher_hidden),
        "dropout": config.teacher_dropout,
        "input_dropout": config.teacher_input_dropout,
        "jitter": config.teacher_jitter,
        "epochs": config.teacher_epochs,
        "seed": config.teacher_seed,
        "batch_size": config.batch_size,
        "lr": config.lr,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _jitter(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Shift each 28x28 image of ``x`` ``[B, 784]`` by up to ``max_shift`` pixels (zero fill)."""
    batch, side = x.shape[0], 28
    padded = F.pad(x.view(batch, side, side), (max_shift,) * 4)  # [B, 28 + 2s, 28 + 2s]
    shifts = torch.randint(0, 2 * max_shift + 1, (2, batch), generator=generator).to(x.device)
    grid = torch.arange(side, device=x.device)
    rows = (grid[None, :] + shifts[0][:, None])[:, :, None]  # [B, 28, 1]
    cols = (grid[None, :] + shifts[1][:, None])[:, None, :]  # [B, 1, 28]
    batch_index = torch.arange(batch, device=x.device)[:, None, None]
    return padded[batch_index, rows, cols].reshape(batch, side * side)


@torch.no_grad()
def _test_errors(model: nn.Module, data: Dataset) -> int:
    """Number of misclassified test examples."""
    was_training = model.training
    model.eval()
    errors = 0
    for start in range(0, len(data.y_test), _EVAL_BATCH):
        logits = model(data.x_test[start : start + _EVAL_BATCH])  # [B, C]
        errors += int((logits.argmax(-1) != data.y_test[start : start + _EVAL_BATCH]).sum())
    model.train(was_training)
    return errors


def _train(
    model: nn.Module,
    data: Dataset,
    *,
    epochs: int,
    config: MnistDemoConfig,
    seed: int,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    evaluate: Callable[[], int],
    jitter: int,
    desc: str,
    progress: bool,
) -> list[int]:
    """Train ``model`` with Adam and a linear learning-rate decay; return test errors per epoch."""
    from tqdm.auto import tqdm  # optional dependency: the [demo] extra

    generator = torch.Generator().manual_seed(seed)
    num_train = len(data.y_train)
    steps_per_epoch = -(-num_train // config.batch_size)
    total_steps = epochs * steps_per_epoch
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / total_steps)
    curve: list[int] = []
    model.train()
    with tqdm(total=total_steps, desc=desc, disable=not progress, leave=True) as bar:
        for _ in range(epochs):
            order = torch.randperm(num_train, generator=generator).to(data.x_train.device)
            for start in range(0, num_train, config.batch_size):
                index = order[start : start + config.batch_size]
                x, y = data.x_train[index], data.y_train[index]  # [B, D], [B]
                if jitter:
                    x = _jitter(x, jitter, generator)
                loss = loss_fn(x, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update()
            curve.append(evaluate())
            bar.set_postfix(loss=f"{loss.item():.3f}", test_errors=curve[-1])
    model.eval()
    return curve


def load_or_train_teacher(
    config: MnistDemoConfig,
    data: Dataset,
    cache_dir: Path | None,
    device: torch.device,
    progress: bool,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train the demo's teacher, or load it from ``cache_dir`` when a matching one is there.

    Args:
        config: The teacher fields of the config (and ``batch_size``, ``lr``) are used.
        data: The dataset, already on ``device``.
        cache_dir: Cache directory (``None``: always train, never write).
        device: Where the teacher lives.
        progress: Show a tqdm bar while training.

    Returns:
        The teacher in eval mode, and its report entry: ``test_errors``, ``params``, ``cached``,
        ``cache_key``, ``cache_file``, ``curve`` (test errors per epoch; ``None`` when cached),
        ``seconds``.
    """
    torch.manual_seed(config.teacher_seed)
    teacher = build_mlp(
        data.in_features,
        config.teacher_hidden,
        data.num_classes,
        config.teacher_dropout,
        config.teacher_input_dropout,
    ).to(device)
    key = teacher_cache_key(config, data)
    path = None if cache_dir is None else cache_dir / f"mnist-teacher-{key}.pt"
    info: dict[str, Any] = {"cache_key": key, "cache_file": None if path is None else str(path)}
    start = time.perf_counter()
    if path is not None and path.is_file():
        teacher.load_state_dict(torch.load(path, map_location=device, weights_only=True))
        info.update(cached=True, curve=None)
    else:
        jitter = config.teacher_jitter if data.in_features == 28 * 28 else 0
        info["curve"] = _train(
            teacher,
            data,
            epochs=config.teacher_epochs,
            config=config,
            seed=config.teacher_seed,
            loss_fn=lambda x, y: F.cross_entropy(teacher(x), y),
            evaluate=lambda: _test_errors(teacher, data),
            jitter=jitter,
            desc="teacher",
            progress=progress,
        )
        info["cached"] = False
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write to a temporary file and rename, so a crash never leaves a partial cache entry.
            with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
                torch.save({k: v.cpu() for k, v in teacher.state_dict().items()}, tmp)
            os.replace(tmp.name, path)
    teacher.eval()
    info.update(
        test_errors=_test_errors(teacher, data),
        params=sum(p.numel() for p in teacher.parameters()),
        seconds=round(time.perf_counter() - start, 2),
    )
    return teacher, info


def _train_student(
    config: MnistDemoConfig,
    data: Dataset,
    seed: int,
    teacher: nn.Module | None,
    device: torch.device,
    progress: bool,
) -> tuple[list[int], float]:
    """Train one student (alone when ``teacher`` is None); return its error curve and seconds."""
    torch.manual_seed(seed)  # same initialization for the alone and the distilled student
    student = build_mlp(data.in_features, config.student_hidden, data.num_classes).to(device)
    start = time.perf_counter()
    if teacher is None:
        curve = _train(
            student,
            data,
            epochs=config.student_epochs,
            config=config,
            seed=seed,
            loss_fn=lambda x, y: F.cross_entropy(student(x), y),
            evaluate=lambda: _test_errors(student, data),
            jitter=0,
            desc=f"student alone  (seed {seed})",
            progress=progress,
        )
        return curve, time.perf_counter() - start

    model = mtd.convert(
        student,
        mode=[
            (
                "kd_loss",
                {
                    "teacher_model": teacher,
                    "criterion": mtd.LogitsDistillationLoss(temperature=config.temperature),
                    "loss_balancer": mtd.StaticLossBalancer(kd_loss_weight=config.kd_loss_weight),
                },
            )
        ],
    )

    def kd_loss(x: Tensor, y: Tensor) -> Tensor:
        logits = model(x)  # runs the teacher (no grad) and the student; [B, C]
        return model.compute_kd_loss(student_loss=F.cross_entropy(logits, y))

    def evaluate() -> int:
        with model.only_student_forward():
            return _test_errors(model, data)

    curve = _train(
        model,
        data,
        epochs=config.student_epochs,
        config=config,
        seed=seed,
        loss_fn=kd_loss,
        evaluate=evaluate,
        jitter=0,
        desc=f"distilled      (seed {seed})",
        progress=progress,
    )
    student = mtd.export(model)
    if curve[-1] != _test_errors(student, data):
        raise RuntimeError("The exported student disagrees with the distilled model.")
    return curve, time.perf_counter() - start


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    versions["kdistill"] = mtd.__version__
    for name in ("numpy", "tqdm", "matplotlib"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "unknown")
    return versions


def run_mnist_demo(
    config: MnistDemoConfig,
    *,
    device: str = "cpu",
    cache_dir: Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Run the demo and return its report (a JSON-able dict).

    Args:
        config: What to train (see :data:`PRESETS`).
        device: Torch device for every model and the data.
        cache_dir: Where trained teachers are cached (``None`` disables the cache).
        progress: Show tqdm progress bars (on stderr).
        log: Called with one-line messages for the user (e.g. the dataset fallback notice).

    Returns:
        The report: config, dataset, teacher, ``student_alone`` and ``distilled`` (test errors per
        seed, mean, std, per-epoch curves, seconds), the gap closed, the published row, versions
        and machine.
    """
    wall_start = time.perf_counter()
    torch_device = torch.device(device)
    data = load_dataset(config.dataset).subset(config.train_samples, config.test_samples)
    if data.note:
        log(f"note: {data.note}")
    data = Dataset(
        data.name,
        data.x_train.to(torch_device),
        data.y_train.to(torch_device),
        data.x_test.to(torch_device),
        data.y_test.to(torch_device),
        data.num_classes,
        data.note,
    )
    log(
        f"dataset: {data.name} ({len(data.y_train)} train / {len(data.y_test)} test), "
        f"device: {torch_device}, seeds: {list(config.seeds)}"
    )
    teacher, teacher_info = load_or_train_teacher(config, data, cache_dir, torch_device, progress)
    if teacher_info["cached"]:
        log(f"teacher: loaded from cache {teacher_info['cache_file']}")
    runs: dict[str, dict[str, list]] = {
        name: {"test_errors": [], "curves": [], "seconds": []}
        for name in ("student_alone", "distilled")
    }
    for seed in config.seeds:
        for name, kd_teacher in (("student_alone", None), ("distilled", teacher)):
            curve, seconds = _train_student(config, data, seed, kd_teacher, torch_device, progress)
            runs[name]["test_errors"].append(curve[-1])
            runs[name]["curves"].append(curve)
            runs[name]["seconds"].append(round(seconds, 2))
    for run in runs.values():
        run.update(summarize(run["test_errors"]))
    student_params = sum(
        p.numel()
        for p in build_mlp(data.in_features, config.student_hidden, data.num_classes).parameters()
    )
    return {
        "demo": "mnist",
        "config": dataclasses.asdict(config),
        "dataset": {
            "name": data.name,
            "train_samples": len(data.y_train),
            "test_samples": len(data.y_test),
            "note": data.note,
        },
        "device": str(torch_device),
        "seeds": list(config.seeds),
        "teacher": teacher_info,
        "student_params": student_params,
        **runs,
        "gap_closed_percent": gap_closed_percent(
            teacher_info["test_errors"],
            runs["student_alone"]["mean"],
            runs["distilled"]["mean"],
        ),
        "published": PUBLISHED,
        "versions": _versions(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "wall_seconds": round(time.perf_counter() - wall_start, 2),
    }
