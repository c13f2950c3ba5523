"""The MNIST demo: Hinton et al.'s distillation table with kdistill, on the teacher cache.

Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (arXiv 1503.02531), §3:
a large regularized teacher MLP makes 67 test errors on MNIST, a smaller student trained alone
146, and the same student distilled at a high temperature 74.

The pipeline, for each preset:

1. train a regularized teacher MLP (dropout, random pixel shifts), or load it from a cache
   directory keyed by a hash of everything that determines its weights;
2. cache the teacher's logits for the (unaugmented) training set once, with
   ``kdistill.TeacherCache``, next to the checkpoint and under the same key; later runs and
   other seeds reuse it;
3. for each seed, train the same student twice from the same initialization, on the same batches
   in the same order: alone (cross-entropy) and distilled through ``kdistill.convert`` with
   ``LogitsDistillationLoss`` + ``StaticLossBalancer``, its teacher a ``kdistill.CachedTeacher``
   (``live_teacher=True`` runs the teacher instead: same logits, slower);
4. count validation errors after every epoch and test errors once per model at the end, and
   return a report (see :mod:`kdistill.demo.report`).

The protocol is honest: the presets' temperature, KD weight, epochs and learning rate were chosen
on MNIST's 10,000-image validation split by :func:`run_mnist_tuning` (``kdistill demo --tune``),
whose checked-in results (:mod:`kdistill.demo.selected`) go into every report; the test split
is never used to choose anything.

The distilled students learn from the unaugmented training images only, as in Hinton et al.
(the teacher alone is trained on shifted images): so the teacher's outputs are needed for exactly
50,000 fixed inputs, which is what makes one cache serve every run.

Only kdistill's public API is used for distillation (``convert``, ``export``, ``TeacherCache``,
``CachedTeacher``, the loss and the balancer), so this file doubles as a worked example.
"""

import contextlib
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
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import kdistill as mtd
from kdistill._validation import check_choice, check_int, check_positive, check_unit_interval
from kdistill.cache import sample_input_hashes

from .data import DATASETS, Dataset, load_dataset
from .progress import Progress
from .report import PUBLISHED, gap_closed_percent, summarize
from .selected import SELECTED

__all__ = [
    "PRESETS",
    "TUNED_FIELDS",
    "TUNING_GRIDS",
    "MnistDemoConfig",
    "TuningGrid",
    "build_mlp",
    "count_errors",
    "default_cache_dir",
    "load_or_build_logits_cache",
    "load_or_train_teacher",
    "run_mnist_demo",
    "run_mnist_tuning",
    "teacher_cache_key",
    "train_student",
]

# Bump when the teacher's training code changes in a way that changes its weights.
_TEACHER_FORMAT = 2
_EVAL_BATCH = 2000
_CACHE_BATCH = 1000

# The fields of MnistDemoConfig chosen on the validation split by run_mnist_tuning.
TUNED_FIELDS = ("lr", "alone_epochs", "temperature", "kd_loss_weight", "distilled_epochs")


@dataclass(frozen=True)
class MnistDemoConfig:
    """Everything that determines a demo run (JSON-able via ``dataclasses.asdict``).

    Attributes:
        preset: Name of the preset this config came from (``"quick"``, ``"paper"``).
        teacher_hidden: Hidden widths of the teacher MLP.
        teacher_dropout: Dropout after each hidden layer of the teacher.
        teacher_input_dropout: Dropout on the teacher's input pixels.
        teacher_jitter: Random shift of each training image of the teacher by up to this many
            pixels (28x28 images only; 0 disables). The students see unshifted images.
        teacher_epochs: Passes over the training set for the teacher.
        teacher_seed: Seed of the teacher's initialization and batch order.
        student_hidden: Hidden widths of the student MLP (no dropout).
        alone_epochs: Passes over the training set for the student trained alone.
        distilled_epochs: Passes over the training set for the distilled student.
        batch_size: Examples per step, for every model.
        lr: Peak Adam learning rate of the students; it decays linearly to 0 over each run.
        teacher_lr: Peak Adam learning rate of the teacher (same schedule).
        temperature: Softmax temperature T of the distillation loss.
        kd_loss_weight: Weight of the KD loss; the cross-entropy gets ``1 - kd_loss_weight``.
        seeds: Student seeds; each trains one student alone and one distilled.
        dataset: ``"auto"``, ``"mnist"`` or ``"digits"`` (see :func:`load_dataset`).
        train_samples: Use only the first N training images (``None``: all of them).
        val_samples: Use only the first N validation images (``None``: all of them).
        test_samples: Use only the first N test images (``None``: all of them).
    """

    preset: str = "quick"
    teacher_hidden: tuple[int, ...] = (800, 800)
    teacher_dropout: float = 0.3
    teacher_input_dropout: float = 0.1
    teacher_jitter: int = 1
    teacher_epochs: int = 12
    teacher_seed: int = 0
    student_hidden: tuple[int, ...] = (100,)
    alone_epochs: int = 40
    distilled_epochs: int = 40
    batch_size: int = 256
    lr: float = 3e-3
    teacher_lr: float = 1e-3
    temperature: float = 2.0
    kd_loss_weight: float = 0.5
    seeds: tuple[int, ...] = (0, 1, 2)
    dataset: str = "auto"
    train_samples: int | None = None
    val_samples: int | None = None
    test_samples: int | None = None

    def __post_init__(self) -> None:
        for name in ("teacher_epochs", "alone_epochs", "distilled_epochs", "batch_size"):
            check_int(name, getattr(self, name), min_value=1)
        for name in ("train_samples", "val_samples", "test_samples"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), min_value=1)
        check_int("teacher_jitter", self.teacher_jitter, min_value=0)
        for name in ("lr", "teacher_lr", "temperature"):
            check_positive(name, getattr(self, name))
        for name in ("kd_loss_weight", "teacher_dropout", "teacher_input_dropout"):
            check_unit_interval(name, getattr(self, name))
        if not self.seeds:
            raise ValueError("`seeds` is empty: give at least one seed.")
        check_choice("dataset", self.dataset, DATASETS)


PRESETS: dict[str, MnistDemoConfig] = {
    # About three minutes on two CPU cores from nothing: a mid-size regularized teacher trained
    # briefly, and a small student (784-100-10) so that the student-teacher gap is wide. The
    # students' lr, epochs, T and KD weight come from the validation sweep in `selected.py`.
    "quick": MnistDemoConfig(),
    # Hinton et al.'s architectures: 784-1200-1200-10 teacher with dropout and jitter trained
    # longer, 784-800-800-10 student without regularization.
    "paper": MnistDemoConfig(
        preset="paper",
        teacher_hidden=(1200, 1200),
        teacher_dropout=0.5,
        teacher_input_dropout=0.2,
        teacher_jitter=2,
        teacher_epochs=60,
        student_hidden=(800, 800),
        alone_epochs=40,
        distilled_epochs=40,
        lr=1e-3,
        temperature=20.0,
        kd_loss_weight=1.0,
    ),
}


@dataclass(frozen=True)
class TuningGrid:
    """The values :func:`run_mnist_tuning` tries, stage by stage (see its docstring).

    Attributes:
        lrs: Student learning rates (stage 1, with ``alone_epochs``).
        alone_epochs: Epochs of the student alone (stage 1).
        temperatures: Temperatures T (stage 2, with ``kd_loss_weights``).
        kd_loss_weights: KD loss weights (stage 2).
        distilled_epochs: Epochs of the distilled student (stage 3).
        seed: The one student seed of the sweep (not one of the demo's seeds).
    """

    lrs: tuple[float, ...]
    alone_epochs: tuple[int, ...]
    temperatures: tuple[float, ...]
    kd_loss_weights: tuple[float, ...]
    distilled_epochs: tuple[int, ...]
    seed: int = 100


TUNING_GRIDS: dict[str, TuningGrid] = {
    "quick": TuningGrid(
        lrs=(1e-3, 3e-3),
        alone_epochs=(10, 20, 40),
        temperatures=(2.0, 4.0, 8.0, 20.0),
        kd_loss_weights=(0.5, 0.9, 1.0),
        distilled_epochs=(20, 40),
    ),
    # Smaller, as 800-800 students cost ~10x the quick ones: the student alone gets the whole
    # 40-epoch budget (the quick sweep's student alone was still improving at its largest).
    "paper": TuningGrid(
        lrs=(1e-3,),
        alone_epochs=(40,),
        temperatures=(4.0, 20.0),
        kd_loss_weights=(0.5, 1.0),
        distilled_epochs=(40,),
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
        "lr": config.teacher_lr,
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
def count_errors(model: nn.Module, x: Tensor, y: Tensor) -> int:
    """Number of examples of ``x`` ``[N, D]`` whose argmax prediction differs from ``y`` ``[N]``.

    The model is evaluated in eval mode (its previous mode is restored).
    """
    was_training = model.training
    model.eval()
    errors = 0
    for start in range(0, len(y), _EVAL_BATCH):
        logits = model(x[start : start + _EVAL_BATCH])  # [B, C]
        errors += int((logits.argmax(-1) != y[start : start + _EVAL_BATCH]).sum())
    model.train(was_training)
    return errors


class _TestSplit:
    """The test split behind a counter: each final model is evaluated on it once, at the end."""

    def __init__(self, data: Dataset) -> None:
        self._x, self._y = data.x_test, data.y_test
        self.evaluations = 0

    def errors(self, model: nn.Module) -> int:
        self.evaluations += 1
        return count_errors(model, self._x, self._y)


def _train(
    model: nn.Module,
    data: Dataset,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    loss_fn: Callable[[Tensor, Tensor, Tensor], Tensor],
    val_errors: Callable[[], int],
    jitter: int,
    desc: str,
    progress: Progress,
) -> list[int]:
    """Train ``model`` with Adam and a linear learning-rate decay to 0.

    ``loss_fn(x [B, D], y [B], sample_ids [B])`` returns the loss of one batch.

    Returns:
        Validation errors after each epoch.
    """
    generator = torch.Generator().manual_seed(seed)
    num_train = len(data.y_train)
    steps_per_epoch = -(-num_train // batch_size)
    total_steps = epochs * steps_per_epoch
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / total_steps)
    curve: list[int] = []
    model.train()
    with progress.bar(total_steps, desc) as bar:
        for epoch in range(epochs):
            order = torch.randperm(num_train, generator=generator)
            for start in range(0, num_train, batch_size):
                index = order[start : start + batch_size]  # [B] sample ids (row numbers)
                x = data.x_train[index.to(data.x_train.device)]  # [B, D]
                y = data.y_train[index.to(data.y_train.device)]  # [B]
                if jitter:
                    x = _jitter(x, jitter, generator)
                loss = loss_fn(x, y, index)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update()
            curve.append(val_errors())
            bar.epoch(f"epoch {epoch + 1}/{epochs}, loss {loss.item():.3f}, val errors {curve[-1]}")
    model.eval()
    return curve


def _atomic_save(state: dict[str, Tensor], path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves a partial file.

    The file is created like ``torch.save`` creates it (mode 0666 less the umask).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_or_train_teacher(
    config: MnistDemoConfig,
    data: Dataset,
    cache_dir: Path | None,
    device: torch.device,
    progress: Progress,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train the demo's teacher, or load it from ``cache_dir`` when a matching one is there.

    Args:
        config: The teacher fields of the config (and ``batch_size``) are used.
        data: The dataset, already on ``device``.
        cache_dir: Cache directory (``None``: always train, never write).
        device: Where the teacher lives.
        progress: Where training progress goes.

    Returns:
        The teacher in eval mode, and its report entry: ``params``, ``cached``, ``cache_key``,
        ``cache_file``, ``val_curve`` (validation errors per epoch; ``None`` when loaded),
        ``val_errors``, ``seconds``.
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
        try:
            teacher.load_state_dict(torch.load(path, map_location=device, weights_only=True))
        except Exception as error:  # unpickling or shape errors: any of them means a bad file
            raise ValueError(
                f"The cached teacher {str(path)!r} cannot be loaded ({type(error).__name__}): "
                "it is corrupt or not this config's teacher. Delete it to train the teacher again."
            ) from error
        info.update(cached=True, val_curve=None)
    else:
        jitter = config.teacher_jitter if data.in_features == 28 * 28 else 0
        info["val_curve"] = _train(
            teacher,
            data,
            epochs=config.teacher_epochs,
            batch_size=config.batch_size,
            lr=config.teacher_lr,
            seed=config.teacher_seed,
            loss_fn=lambda x, y, ids: F.cross_entropy(teacher(x), y),
            val_errors=lambda: count_errors(teacher, *data.validation),
            jitter=jitter,
            desc="teacher",
            progress=progress,
        )
        info["cached"] = False
        if path is not None:
            _atomic_save({k: v.cpu() for k, v in teacher.state_dict().items()}, path)
    teacher.eval()
    info.update(
        params=sum(p.numel() for p in teacher.parameters()),
        val_errors=count_errors(teacher, *data.validation),
        seconds=round(time.perf_counter() - start, 2),
    )
    return teacher, info


def load_or_build_logits_cache(
    teacher: nn.Module,
    data: Dataset,
    path: Path,
    progress: Progress,
) -> tuple[mtd.TeacherCache, dict[str, Any]]:
    """Open the teacher's cached training-set logits at ``path``, building them when missing.

    The cache holds ``teacher(x_train[i])`` (float32, so exactly what the live teacher returns)
    under sample id ``i`` (the row number). An existing complete cache is opened without running
    the teacher; ``CachedTeacher(..., teacher=teacher)`` then refuses it if it was built from
    other weights. An incomplete one (an interrupted build) is resumed.

    Returns:
        The cache and its report entry: ``path``, ``built`` (False when reused), ``seconds``,
        ``nbytes``.
    """
    start = time.perf_counter()
    built = False
    try:
        cache = mtd.TeacherCache(path)
    except (RuntimeError, ValueError):  # no cache yet, or an interrupted build: (re)build it
        ids = torch.arange(len(data.y_train))
        loader = DataLoader(TensorDataset(ids, data.x_train), batch_size=_CACHE_BATCH)
        progress.line(f"caching the teacher's logits of {len(ids)} training images in {path}")
        cache = mtd.TeacherCache.build(
            teacher, loader, path, dtype=torch.float32, progress=progress.mode == "bar"
        )
        built = True
    info = {
        "path": str(path),
        "built": built,
        "seconds": round(time.perf_counter() - start, 2),
        "nbytes": cache.nbytes,
    }
    return cache, info


class _CachedTeacherLoss:
    """The distilled student's loss, its teacher's logits read from a ``CachedTeacher``."""

    def __init__(self, model: mtd.DistillationModel, cached: mtd.CachedTeacher) -> None:
        self.model = model
        self.cached = cached

    def __call__(self, x: Tensor, y: Tensor, sample_ids: Tensor) -> Tensor:
        with self.cached.sample_ids(sample_ids):  # which cached rows this batch is
            logits = self.model(x)  # the cached teacher's logits, then the student; [B, C]
        return self.model.compute_kd_loss(student_loss=F.cross_entropy(logits, y))


def train_student(
    config: MnistDemoConfig,
    data: Dataset,
    seed: int,
    *,
    teacher: nn.Module | None,
    epochs: int,
    progress: Progress,
) -> tuple[nn.Module, list[int], float]:
    """Train one student: alone when ``teacher`` is None, else distilled from it.

    Args:
        config: Student fields (``student_hidden``, ``batch_size``, ``lr``, ``temperature``,
            ``kd_loss_weight``).
        data: The dataset (on the students' device).
        seed: Seed of the initialization and of the batch order (the same for both students).
        teacher: ``None``, a live teacher module, or a ``kdistill.CachedTeacher`` (its samples
            are named by their row numbers with ``sample_ids``).
        epochs: Passes over the training set.
        progress: Where training progress goes.

    Returns:
        The trained plain student (exported), its validation errors per epoch, and seconds.
    """
    torch.manual_seed(seed)  # same initialization for the alone and the distilled student
    student = build_mlp(data.in_features, config.student_hidden, data.num_classes)
    student = student.to(data.x_train.device)
    start = time.perf_counter()
    common: dict[str, Any] = {
        "data": data,
        "epochs": epochs,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "seed": seed,
        "jitter": 0,
        "progress": progress,
    }
    if teacher is None:
        curve = _train(
            student,
            loss_fn=lambda x, y, ids: F.cross_entropy(student(x), y),
            val_errors=lambda: count_errors(student, *data.validation),
            desc=f"student alone (seed {seed})",
            **common,
        )
        return student, curve, time.perf_counter() - start

    model = cast(
        mtd.DistillationModel,
        mtd.convert(
            student,
            mode=[
                (
                    "kd_loss",
                    {
                        "teacher_model": teacher,
                        "criterion": mtd.LogitsDistillationLoss(temperature=config.temperature),
                        "loss_balancer": mtd.StaticLossBalancer(
                            kd_loss_weight=config.kd_loss_weight
                        ),
                    },
                )
            ],
        ),
    )
    if isinstance(teacher, mtd.CachedTeacher):
        loss_fn: Callable[[Tensor, Tensor, Tensor], Tensor] = _CachedTeacherLoss(model, teacher)
    else:

        def loss_fn(x: Tensor, y: Tensor, sample_ids: Tensor) -> Tensor:
            logits = model(x)  # runs the teacher (no grad) and the student; [B, C]
            return model.compute_kd_loss(student_loss=F.cross_entropy(logits, y))

    def val_errors() -> int:
        with model.only_student_forward():
            return count_errors(model, *data.validation)

    kind = "cached" if isinstance(teacher, mtd.CachedTeacher) else "live"
    curve = _train(
        model,
        loss_fn=loss_fn,
        val_errors=val_errors,
        desc=f"distilled, {kind} teacher (seed {seed})",
        **common,
    )
    exported = mtd.export(model)
    if curve[-1] != count_errors(exported, *data.validation):
        raise RuntimeError("The exported student disagrees with the distilled model.")
    return exported, curve, time.perf_counter() - start


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    versions["kdistill"] = mtd.__version__
    for name in ("numpy", "tqdm", "matplotlib"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "unknown")
    return versions


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def _prepare(
    config: MnistDemoConfig,
    device: str,
    cache_dir: Path | None,
    live_teacher: bool,
    progress: Progress,
    stack: contextlib.ExitStack,
) -> tuple[Dataset, nn.Module, nn.Module, dict[str, Any], dict[str, Any] | None]:
    """Load the data, the teacher and (unless ``live_teacher``) its cached logits.

    A temporary cache directory (when ``cache_dir`` is None) lives as long as ``stack``.
    """
    data = load_dataset(config.dataset)
    if data.x_val is None or data.y_val is None:
        raise ValueError(
            f"The {data.name!r} dataset has no validation split to choose settings on."
        )
    data = data.subset(config.train_samples, config.val_samples, config.test_samples)
    data = data.to(torch.device(device))
    if data.note:
        progress.line(f"note: {data.note}")
    progress.line(
        f"dataset: {data.name} ({len(data.y_train)} train / {len(data.validation[1])} validation / "
        f"{len(data.y_test)} test), device: {device}, seeds: {list(config.seeds)}"
    )
    teacher, teacher_info = load_or_train_teacher(
        config, data, cache_dir, torch.device(device), progress
    )
    if teacher_info["cached"]:
        progress.line(f"teacher: loaded from {teacher_info['cache_file']}")
    if live_teacher:
        return data, teacher, teacher, teacher_info, None
    if cache_dir is None:
        # No cache directory: the logits still go through a TeacherCache, in a temporary one.
        path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kdistill-"))) / "logits"
    else:
        path = cache_dir / f"mnist-teacher-{teacher_info['cache_key']}-logits"
    cache, cache_info = load_or_build_logits_cache(teacher, data, path, progress)
    if not cache_info["built"]:
        progress.line(f"teacher logits: reused {path}")
    if cache_dir is None:
        cache_info["path"] = None
    # The cache must come from exactly this teacher (else ValueError: stale), and hold exactly
    # these training images (checked once here, so the training steps skip the hashing).
    distill_teacher = mtd.CachedTeacher(cache, teacher=teacher, verify_inputs=False)
    ids = torch.arange(len(data.y_train))
    cache.check_samples(ids, sample_input_hashes(data.x_train, None))
    return data, teacher, distill_teacher, teacher_info, cache_info


def _selection(config: MnistDemoConfig) -> dict[str, Any]:
    """How the tuned fields of ``config`` were chosen: the checked-in validation sweep, or not.

    The sweep applies only to its preset as checked in (any seeds); any other field changed on
    the command line (the student's size, the epochs, ...) is listed under ``overridden``.
    """
    chosen = {field: getattr(config, field) for field in TUNED_FIELDS}
    preset = PRESETS.get(config.preset)
    sweep = SELECTED.get(config.preset)
    unchanged = preset is not None and dataclasses.replace(config, seeds=preset.seeds) == preset
    if unchanged and sweep is not None:
        return {"method": "validation sweep (kdistill demo --tune)", "chosen": chosen, **sweep}
    if unchanged:
        return {
            "method": "the preset's values; no validation sweep is checked in for this preset",
            "chosen": chosen,
        }
    mine, theirs = dataclasses.asdict(config), dataclasses.asdict(preset or config)
    overridden = {k: v for k, v in mine.items() if k != "seeds" and theirs[k] != v}
    return {
        "method": "given on the command line (not chosen by the checked-in validation sweep)",
        "chosen": chosen,
        "overridden": overridden,
    }


def run_mnist_demo(
    config: MnistDemoConfig,
    *,
    device: str = "cpu",
    cache_dir: Path | None = None,
    live_teacher: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run the demo and return its report (a JSON-able dict).

    Args:
        config: What to train (see :data:`PRESETS`).
        device: Torch device for every model and the data.
        cache_dir: Where the teacher checkpoint and its cached logits live (``None``: train the
            teacher and cache its logits in a temporary directory, removed at the end).
        live_teacher: Run the teacher at every distillation step instead of reading its cached
            logits (same logits on the unaugmented training images, several times slower).
        progress: Where progress goes (default: bars on a terminal, else one line per epoch).

    Returns:
        The report: config, dataset, ``selection`` (how the hyperparameters were chosen, with
        the validation numbers), teacher, ``teacher_cache``, ``student_alone`` and ``distilled``
        (test errors per seed, mean, std, validation curves, seconds), the gap closed,
        ``test_evaluations``, the published row, versions and machine.
    """
    progress = Progress() if progress is None else progress
    with contextlib.ExitStack() as stack:
        return _run_demo(config, device, cache_dir, live_teacher, progress, stack)


def _run_demo(
    config: MnistDemoConfig,
    device: str,
    cache_dir: Path | None,
    live_teacher: bool,
    progress: Progress,
    stack: contextlib.ExitStack,
) -> dict[str, Any]:
    wall_start = time.perf_counter()
    data, teacher, distill_teacher, teacher_info, cache_info = _prepare(
        config, device, cache_dir, live_teacher, progress, stack
    )
    runs: dict[str, dict[str, Any]] = {
        name: {"test_errors": [], "val_errors": [], "val_curves": [], "seconds": []}
        for name in ("student_alone", "distilled")
    }
    students: list[tuple[str, nn.Module]] = []
    for seed in config.seeds:
        for name, kd_teacher, epochs in (
            ("student_alone", None, config.alone_epochs),
            ("distilled", distill_teacher, config.distilled_epochs),
        ):
            student, curve, seconds = train_student(
                config, data, seed, teacher=kd_teacher, epochs=epochs, progress=progress
            )
            students.append((name, student))
            runs[name]["val_errors"].append(curve[-1])
            runs[name]["val_curves"].append(curve)
            runs[name]["seconds"].append(round(seconds, 2))
    # The test split, once per final model, after all training and choosing is done.
    test = _TestSplit(data)
    teacher_info["test_errors"] = test.errors(teacher)
    for name, student in students:
        runs[name]["test_errors"].append(test.errors(student))
    for run in runs.values():
        run.update(summarize(run["test_errors"]))
        run["seconds_mean"] = sum(run["seconds"]) / len(run["seconds"])
    student_params = sum(
        p.numel()
        for p in build_mlp(data.in_features, config.student_hidden, data.num_classes).parameters()
    )
    return {
        "demo": "mnist",
        "config": dataclasses.asdict(config),
        "protocol": (
            "lr, epochs, temperature and KD weight chosen on the validation split (see "
            "`selection`); the test split is evaluated once per final model, at the end"
        ),
        "selection": _selection(config),
        "dataset": {
            "name": data.name,
            "train_samples": len(data.y_train),
            "val_samples": len(data.validation[1]),
            "test_samples": len(data.y_test),
            "note": data.note,
        },
        "device": device,
        "seeds": list(config.seeds),
        "teacher_source": "live" if live_teacher else "cache",
        "teacher": teacher_info,
        "teacher_cache": cache_info,
        "student_params": student_params,
        **runs,
        "gap_closed_percent": gap_closed_percent(
            teacher_info["test_errors"],
            runs["student_alone"]["mean"],
            runs["distilled"]["mean"],
        ),
        "test_evaluations": test.evaluations,
        "published": PUBLISHED,
        "versions": _versions(),
        "machine": _machine(),
        "wall_seconds": round(time.perf_counter() - wall_start, 2),
    }


def _best(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    """The row with the fewest validation errors (ties: the earliest, i.e. the cheapest)."""
    best = min(rows, key=lambda row: row["val_errors"])
    return {key: best[key] for key in keys}


def run_mnist_tuning(
    config: MnistDemoConfig,
    grid: TuningGrid,
    *,
    device: str = "cpu",
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Choose the students' hyperparameters on the validation split, in three stages.

    One student seed (``grid.seed``), the preset's teacher (trained or loaded from the cache) and
    its cached logits; every number is a count of validation errors after the last epoch, and the
    test split is never touched.

    1. Student alone: every ``lr`` x ``alone_epochs``; the best gives ``lr`` and
       ``alone_epochs`` (the baseline is tuned too).
    2. Distilled, at that ``lr`` and ``alone_epochs`` epochs: every ``temperature`` x
       ``kd_loss_weight``; the best gives both.
    3. Distilled, at those values: every ``distilled_epochs``; the best gives it.

    Ties go to the earlier value of the grid (the grids list cheaper settings first).

    Returns:
        ``{"grid", "seed", "stages": {"alone", "distilled", "distilled_epochs"}, "chosen",
        "teacher", "dataset", "test_evaluations": 0, "seconds", ...}``; the ``chosen`` values are
        what the preset should hold.
    """
    progress = Progress() if progress is None else progress
    with contextlib.ExitStack() as stack:
        return _run_tuning(config, grid, device, cache_dir, progress, stack)


def _run_tuning(
    config: MnistDemoConfig,
    grid: TuningGrid,
    device: str,
    cache_dir: Path | None,
    progress: Progress,
    stack: contextlib.ExitStack,
) -> dict[str, Any]:
    start = time.perf_counter()
    data, _, cached, teacher_info, _ = _prepare(config, device, cache_dir, False, progress, stack)
    seed = grid.seed

    def distilled_row(cfg: MnistDemoConfig, epochs: int) -> dict[str, Any]:
        _, curve, seconds = train_student(
            cfg, data, seed, teacher=cached, epochs=epochs, progress=progress
        )
        row = {"temperature": cfg.temperature, "kd_loss_weight": cfg.kd_loss_weight}
        return {**row, "epochs": epochs, "val_errors": curve[-1], "seconds": round(seconds, 2)}

    alone = []
    for lr in grid.lrs:
        for epochs in grid.alone_epochs:
            cfg = dataclasses.replace(config, lr=lr)
            _, curve, seconds = train_student(
                cfg, data, seed, teacher=None, epochs=epochs, progress=progress
            )
            alone.append(
                {"lr": lr, "epochs": epochs, "val_errors": curve[-1], "seconds": round(seconds, 2)}
            )
            progress.line(f"tune alone: lr {lr:g}, {epochs} epochs -> {curve[-1]} val errors")
    best_alone = _best(alone, ("lr", "epochs"))
    tuned = dataclasses.replace(config, lr=best_alone["lr"])
    distilled = []
    for temperature in grid.temperatures:
        for weight in grid.kd_loss_weights:
            cfg = dataclasses.replace(tuned, temperature=temperature, kd_loss_weight=weight)
            distilled.append(distilled_row(cfg, best_alone["epochs"]))
            progress.line(
                f"tune distilled: T {temperature:g}, weight {weight:g} -> "
                f"{distilled[-1]['val_errors']} val errors"
            )
    best_kd = _best(distilled, ("temperature", "kd_loss_weight"))
    tuned = dataclasses.replace(tuned, **best_kd)
    by_epochs = []
    for epochs in grid.distilled_epochs:
        same = [r for r in distilled if r["epochs"] == epochs and _matches(r, best_kd)]
        by_epochs.append(same[0] if same else distilled_row(tuned, epochs))
        progress.line(
            f"tune distilled: {epochs} epochs -> {by_epochs[-1]['val_errors']} val errors"
        )
    chosen = {
        "lr": best_alone["lr"],
        "alone_epochs": best_alone["epochs"],
        **best_kd,
        "distilled_epochs": _best(by_epochs, ("epochs",))["epochs"],
    }
    return {
        "demo": "mnist-tuning",
        "preset": config.preset,
        "grid": dataclasses.asdict(grid),
        "seed": seed,
        "split": "validation",
        "stages": {"alone": alone, "distilled": distilled, "distilled_epochs": by_epochs},
        "chosen": chosen,
        "teacher": {"hidden": list(config.teacher_hidden), **teacher_info},
        "student_hidden": list(config.student_hidden),
        "dataset": {"name": data.name, "val_samples": len(data.validation[1])},
        "test_evaluations": 0,
        "versions": _versions(),
        "machine": _machine(),
        "seconds": round(time.perf_counter() - start, 2),
    }


def _matches(row: dict[str, Any], values: dict[str, Any]) -> bool:
    return all(row[key] == value for key, value in values.items())
