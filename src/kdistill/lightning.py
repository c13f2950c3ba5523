"""Lightning integration: ``distill`` turns a ``LightningModule`` into a ``KDModule``.

``distill(module, student="net", teacher_model=..., criterion=...)`` checks the KD config and, like
``convert`` does for models, swaps the module's class for a generated subclass of ``KDModule`` and
the module's own class. Every hook of the module keeps working. While ``Trainer.fit`` runs, the
student network ``module.net`` is converted with ``kdistill.convert`` (so calling it also runs the
frozen teacher) and ``training_step`` returns the balanced KD loss, logging each component with
``self.log``; when ``fit`` returns or raises, ``module.net`` is the plain, trained student again.

Install the extra: ``pip install "kdistill[lightning]"``. This module is never imported by
``kdistill``.
"""

from collections.abc import Callable, Mapping
from typing import Any, cast

try:
    import lightning as L
except ModuleNotFoundError as err:  # only a missing lightning, never a bug inside it
    if err.name != "lightning":
        raise
    raise ImportError(
        'kdistill.lightning needs lightning: pip install "kdistill[lightning]"'
    ) from err

from torch import Tensor, nn

from ._dynamic import SubclassFactory
from .balancers import STUDENT_LOSS_KEY, DistillationLossBalancer, sum_losses
from .conversion import convert, export
from .model import LOSS_MODULES_KEY, TEACHER_KEY, DistillationModel

__all__ = ["KDModule", "distill"]

_EVAL_STEPS = ("validation_step", "test_step", "predict_step")


class KDModule(L.LightningModule):
    """Mixin of LightningModules converted by ``distill`` (never built directly).

    - During ``Trainer.fit`` (from its ``setup`` until it returns or raises) the student
      submodule is a ``DistillationModel``; before and after, it is the plain student (trained),
      and ``trainer.validate`` / ``test`` / ``predict`` run it alone.
    - ``training_step`` runs the module's own step (whose call of the student also runs the
      teacher), takes the loss it returns (a tensor, or the ``"loss"`` of a dict) as the student
      loss, and returns ``loss_balancer({"student_loss": loss, **kd_terms})``, or the KD loss
      alone when there is no balancer (ModelOpt's convention). It logs ``kd_loss`` (the sum of
      the KD terms), ``student_loss``, ``total_loss`` and each term ``f"{LossClass}_{i}"``.
    - ``validation_step`` / ``test_step`` / ``predict_step`` (when the module defines them) run
      the student alone: the teacher costs nothing outside training.
    - ``configure_optimizers`` sees the module without the teacher, so ``self.parameters()``
      there never includes it; the optimizer state carries over between ``fit`` calls.
    - Checkpoints hold no teacher weights and load back both into the distilled module and into
      the plain module class (``MyModule.load_from_checkpoint``).
    """

    original_cls: type[L.LightningModule]
    _kd_student_name: str
    _kd_config: dict[str, Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            "KDModule is not built directly: use kdistill.lightning.distill(module, student=..., "
            "teacher_model=..., criterion=...)."
        )

    @property
    def kd_student(self) -> nn.Module:
        """The student network: a ``DistillationModel`` during ``fit``, else the plain student."""
        return self.get_submodule(self._kd_student_name)

    def _distilled_student(self) -> DistillationModel:
        student = self.kd_student
        if not isinstance(student, DistillationModel):
            raise RuntimeError(
                f"The student {self._kd_student_name!r} is distilled only while Trainer.fit runs."
            )
        return student

    def convert_student_(self) -> None:
        """Convert the student for distillation (``fit`` does this in its ``setup``)."""
        if not isinstance(self.kd_student, DistillationModel):
            student = convert(self.kd_student, mode=[("kd_loss", self._kd_config)])
            cast(DistillationModel, student).align_teacher_()  # a kd_loss mode converts

    def export_student_(self) -> None:
        """Give the plain student back (``fit`` does this when it returns or raises)."""
        if isinstance(self.kd_student, DistillationModel):
            export(self.kd_student)

    def configure_callbacks(self) -> Any:
        """The module's own callbacks, plus the one that distills during ``fit`` only."""
        own = super().configure_callbacks()
        own = [own] if isinstance(own, L.Callback) else list(own or [])
        return [*own, _DistillDuringFit()]

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """The module's own step, with its loss replaced by the balanced KD loss."""
        output = super().training_step(*args, **kwargs)
        student_loss = output.get("loss") if isinstance(output, Mapping) else output
        if student_loss is not None and not isinstance(student_loss, Tensor):
            raise TypeError(
                f"{self.original_cls.__name__}.training_step must return a loss tensor, a dict "
                f"with 'loss', or None; got {type(output).__name__}."
            )
        student = self._distilled_student()
        kd_terms = student.compute_kd_loss(skip_balancer=True)
        kd_loss = sum_losses(kd_terms.values())
        balancer = student.loss_balancer
        if balancer is None:
            total = kd_loss
        else:
            losses = dict(kd_terms)
            if student_loss is not None:
                losses = {STUDENT_LOSS_KEY: student_loss, **kd_terms}
            total = balancer(losses)
        logged = {"kd_loss": kd_loss, **kd_terms, "total_loss": total}
        if student_loss is not None:
            logged["student_loss"] = student_loss
        for name, value in logged.items():
            self.log(name, value.detach(), prog_bar=name == "kd_loss")
        return {**output, "loss": total} if isinstance(output, Mapping) else total

    def configure_optimizers(self) -> Any:
        """The module's optimizers, built while the teacher is hidden from ``parameters()``."""
        student = self.kd_student
        if not isinstance(student, DistillationModel):
            return super().configure_optimizers()
        with student.hide_teacher_model():
            return super().configure_optimizers()

    def state_dict(  # type: ignore[override]  # forwards torch's overloads through *args
        self, *args: Any, **kwargs: Any
    ) -> dict[str, Any]:
        """The module's state; outside ``fit`` too, with the entries ``fit``'s checkpoints hold.

        Loss modules with parameters (``<student>._loss_modules.*``) and, when
        ``expose_minimal_state_dict`` is False, the teacher, so checkpoints saved during and
        after ``fit`` have the same keys.
        """
        state = super().state_dict(*args, **kwargs)
        if isinstance(self.kd_student, DistillationModel) or args:
            return state
        prefix = kwargs.get("prefix", "") + (
            f"{self._kd_student_name}." if self._kd_student_name else ""
        )
        keep_vars = kwargs.get("keep_vars", False)
        losses = _losses_with_parameters(self._kd_config)
        if losses:
            state.update(
                nn.ModuleList(losses).state_dict(
                    prefix=f"{prefix}{LOSS_MODULES_KEY}.", keep_vars=keep_vars
                )
            )
        if not self._kd_config["expose_minimal_state_dict"]:
            state.update(
                self._kd_config["teacher_model"].state_dict(
                    prefix=f"{prefix}{TEACHER_KEY}.", keep_vars=keep_vars
                )
            )
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
        """Load a checkpoint with or without teacher / loss-module entries."""
        prefix = f"{self._kd_student_name}." if self._kd_student_name else ""
        teacher_prefix, loss_prefix = f"{prefix}{TEACHER_KEY}.", f"{prefix}{LOSS_MODULES_KEY}."
        student = self.kd_student
        if isinstance(student, DistillationModel):
            has_teacher = any(k.startswith(teacher_prefix) for k in state_dict)
            has_losses = any(k.startswith(loss_prefix) for k in state_dict)
            with (
                student.hide_teacher_model(enable=not has_teacher),
                student.hide_loss_modules(enable=not has_losses),
            ):
                return super().load_state_dict(state_dict, *args, **kwargs)
        # outside fit: teacher and loss-module entries go to the objects kept for the next fit
        teacher_state = _strip(state_dict, teacher_prefix)
        if teacher_state:
            self._kd_config["teacher_model"].load_state_dict(teacher_state)
        loss_state = _strip(state_dict, loss_prefix)
        if loss_state:
            nn.ModuleList(_losses_with_parameters(self._kd_config)).load_state_dict(loss_state)
        own = {
            k: v for k, v in state_dict.items() if not k.startswith((teacher_prefix, loss_prefix))
        }
        return super().load_state_dict(own, *args, **kwargs)

    def __reduce_ex__(self, protocol: Any) -> tuple:
        # the generated class cannot be found by name: rebuild it from the module's class
        return _CLASSES.reduce_instance(self)


class _DistillDuringFit(L.Callback):
    """Converts the student when ``fit`` sets up, and exports it when ``fit`` ends or fails."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and isinstance(pl_module, KDModule):
            pl_module.convert_student_()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if isinstance(pl_module, KDModule):
            pl_module.export_student_()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(pl_module, KDModule):
            pl_module.export_student_()


def _strip(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _losses_with_parameters(config: Mapping[str, Any]) -> list[nn.Module]:
    """The losses ``convert`` registers as ``_loss_modules``, in the same order."""
    criterion = config["criterion"]
    losses = criterion.values() if isinstance(criterion, Mapping) else [criterion]
    return [loss for loss in losses if any(True for _ in loss.parameters())]


def _student_only(name: str, module_cls: type) -> Callable:
    """Wrap an evaluation step so the student runs without its teacher."""
    original = getattr(module_cls, name)

    def step(self: KDModule, *args: Any, **kwargs: Any) -> Any:
        student = self.kd_student
        if not isinstance(student, DistillationModel):
            return original(self, *args, **kwargs)
        with student.only_student_forward():
            return original(self, *args, **kwargs)

    step.__name__ = step.__qualname__ = name
    step.__doc__ = original.__doc__
    return step


def _namespace(module_cls: type) -> dict[str, Any]:
    namespace: dict[str, Any] = {
        "__doc__": f"{module_cls.__name__} distilled by kdistill (see KDModule).",
    }
    for name in _EVAL_STEPS:  # only the steps the module defines: Lightning checks which
        if getattr(module_cls, name) is not getattr(L.LightningModule, name):
            namespace[name] = _student_only(name, module_cls)
    return namespace


_CLASSES = SubclassFactory(
    KDModule,
    _namespace,
    name=lambda cls: f"KD{cls.__name__}",
    qualname=lambda cls: f"KD{cls.__qualname__}",
)


def distill(
    module: L.LightningModule,
    *,
    student: str = "model",
    teacher_model: Any,
    criterion: Any,
    loss_balancer: DistillationLossBalancer | None = None,
    expose_minimal_state_dict: bool = True,
) -> KDModule:
    """Make ``module`` train its submodule ``student`` by distillation, **in place**.

    The config is checked (and a teacher factory called) now, and the module becomes a
    ``KDModule`` (``isinstance(module, type_before)`` still holds). The student is converted
    with ``kdistill.convert`` (mode ``"kd_loss"``) only while ``Trainer.fit`` runs: before and
    after ``fit`` (also when it raises), ``module.<student>`` is the plain student, trained, and
    ``module.parameters()`` holds no teacher. See ``KDModule`` for what changes during ``fit``.
    ``module.training_step`` must call the student once per step.

    Args:
        module: A LightningModule with automatic optimization.
        student: Dotted name of the student network inside ``module`` (e.g. ``"net"``).
        teacher_model: The teacher: an ``nn.Module``, a class or any callable that builds it.
        criterion: A loss or ``{(student_layer, teacher_layer): loss}`` (layer names inside the
            student and the teacher).
        loss_balancer: Combines ``training_step``'s loss with the KD losses; ``None`` trains on
            the KD loss alone.
        expose_minimal_state_dict: Leave the teacher out of checkpoints (default).

    Returns:
        ``module`` itself, now a ``KDModule``.

    Raises:
        TypeError: ``module`` is not a LightningModule.
        ValueError: Unknown ``student`` name, manual optimization, or an invalid KD config.
        RuntimeError: ``module`` was already distilled.

    Example:
        >>> import torch, lightning as L, kdistill as mtd
        >>> class Classifier(L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = torch.nn.Linear(4, 3)
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         return torch.nn.functional.cross_entropy(self.net(x), y)
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> module = distill(Classifier(), student="net", teacher_model=torch.nn.Linear(4, 3),
        ...                  criterion=mtd.LogitsDistillationLoss(temperature=2.0),
        ...                  loss_balancer=mtd.StaticLossBalancer(kd_loss_weight=0.5))
        >>> isinstance(module, KDModule) and isinstance(module, Classifier)
        True
        >>> type(module.net) is torch.nn.Linear  # converted only while Trainer.fit runs
        True
    """
    if not isinstance(module, L.LightningModule):
        raise TypeError(
            f"`module` must be a lightning.LightningModule, got {type(module).__name__}."
        )
    if isinstance(module, KDModule):
        raise RuntimeError(
            f"{type(module).__name__} is already distilled; build a fresh module to distill again."
        )
    if not module.automatic_optimization:
        raise ValueError(
            "`module` uses manual optimization, so distill cannot add the KD loss to its "
            "backward: convert the student with kdistill.convert and call "
            "`student.compute_kd_loss(student_loss=...)` in your training_step instead."
        )
    names = [name for name, _ in module.named_modules() if name]
    if student not in names:
        raise ValueError(
            f"`student` {student!r} is not a submodule of {type(module).__name__}; "
            f"submodules: {names[:20]}."
        )
    config = {
        "teacher_model": teacher_model,
        "criterion": criterion,
        "loss_balancer": loss_balancer,
        "expose_minimal_state_dict": expose_minimal_state_dict,
    }
    # check everything (and build the teacher once) now; fit converts again
    converted = convert(module.get_submodule(student), mode=[("kd_loss", config)])
    config["teacher_model"] = converted.teacher_model
    export(converted)
    module.__class__ = _CLASSES.get(type(module))
    kd_module = cast(KDModule, module)
    kd_module._kd_student_name = student
    kd_module._kd_config = config
    return kd_module
