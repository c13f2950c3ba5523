"""Lightning integration: ``distill`` turns a ``LightningModule`` into a ``KDModule``.

``distill(module, student="net", teacher_model=..., criterion=...)`` converts the student network
``module.net`` with ``kdistill.convert`` (so calling it also runs the frozen teacher) and, like
``convert`` does for models, swaps the module's class for a generated subclass of ``KDModule`` and
the module's own class. Every hook of the module keeps working; ``training_step`` then returns
the balanced KD loss and logs each component with ``self.log``.

Install the extra: ``pip install "kdistill[lightning]"``. This module is never imported by
``kdistill``.
"""

from collections.abc import Callable, Mapping
from typing import Any

try:
    import lightning as L
except ModuleNotFoundError as err:  # only a missing lightning, never a bug inside it
    if err.name != "lightning":
        raise
    raise ImportError(
        'kdistill.lightning needs lightning: pip install "kdistill[lightning]"'
    ) from err

from torch import Tensor

from .balancers import STUDENT_LOSS_KEY, DistillationLossBalancer
from .conversion import convert
from .model import LOSS_MODULES_KEY, TEACHER_KEY, DistillationModel

__all__ = ["KDModule", "distill"]

_EVAL_STEPS = ("validation_step", "test_step", "predict_step")


class KDModule(L.LightningModule):
    """Mixin of LightningModules converted by ``distill`` (never built directly).

    - ``training_step`` runs the module's own step (whose call of the student also runs the
      teacher), takes the loss it returns (a tensor, or the ``"loss"`` of a dict) as the student
      loss, and returns ``loss_balancer({"student_loss": loss, **kd_terms})``, or the KD loss
      alone when there is no balancer (ModelOpt's convention). It logs ``kd_loss`` (the sum of
      the KD terms), ``student_loss``, ``total_loss`` and each term ``f"{LossClass}_{i}"``.
    - ``validation_step`` / ``test_step`` / ``predict_step`` (when the module defines them) run
      the student alone: the teacher costs nothing outside training.
    - ``configure_optimizers`` sees the module without the teacher, so ``self.parameters()``
      there never includes it.
    - Checkpoints hold no teacher weights (``state_dict`` omits them) and load back both into
      the distilled module and into the plain module class (``MyModule.load_from_checkpoint``).
    """

    _kd_student_name: str
    _kd_module_cls: type[L.LightningModule]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            "KDModule is not built directly: use kdistill.lightning.distill(module, student=..., "
            "teacher_model=..., criterion=...)."
        )

    @property
    def kd_student(self) -> DistillationModel:
        """The converted student network (holding the teacher and the KD losses)."""
        return self.get_submodule(self._kd_student_name)

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """The module's own step, with its loss replaced by the balanced KD loss."""
        output = super().training_step(*args, **kwargs)
        student_loss = output.get("loss") if isinstance(output, Mapping) else output
        if student_loss is not None and not isinstance(student_loss, Tensor):
            raise TypeError(
                f"{self._kd_module_cls.__name__}.training_step must return a loss tensor, a dict "
                f"with 'loss', or None; got {type(output).__name__}."
            )
        student = self.kd_student
        kd_terms = student.compute_kd_loss(skip_balancer=True)
        balancer = student.loss_balancer
        if balancer is None:
            total = sum(kd_terms.values())
        else:
            losses = dict(kd_terms)
            if student_loss is not None:
                losses = {STUDENT_LOSS_KEY: student_loss, **kd_terms}
            total = balancer(losses)
        logged = {"kd_loss": sum(kd_terms.values()), **kd_terms, "total_loss": total}
        if student_loss is not None:
            logged["student_loss"] = student_loss
        for name, value in logged.items():
            self.log(name, value.detach(), prog_bar=name == "kd_loss")
        return {**output, "loss": total} if isinstance(output, Mapping) else total

    def configure_optimizers(self) -> Any:
        """The module's optimizers, built while the teacher is hidden from ``parameters()``."""
        with self.kd_student.hide_teacher_model():
            return super().configure_optimizers()

    def load_state_dict(self, state_dict: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
        """Load a checkpoint with or without teacher / loss-module entries."""
        prefix = f"{self._kd_student_name}." if self._kd_student_name else ""
        has_teacher = any(k.startswith(f"{prefix}{TEACHER_KEY}.") for k in state_dict)
        has_losses = any(k.startswith(f"{prefix}{LOSS_MODULES_KEY}.") for k in state_dict)
        student = self.kd_student
        with (
            student.hide_teacher_model(enable=not has_teacher),
            student.hide_loss_modules(enable=not has_losses),
        ):
            return super().load_state_dict(state_dict, *args, **kwargs)

    def __reduce_ex__(self, protocol: Any) -> tuple:
        # the generated class cannot be found by name: rebuild it from the module's class
        return (_new_instance, (self._kd_module_cls,), self.__dict__.copy())


_CLASS_CACHE: dict[type[L.LightningModule], type[KDModule]] = {}


def _student_only(name: str, module_cls: type) -> Callable:
    """Wrap an evaluation step so the student runs without its teacher."""
    original = getattr(module_cls, name)

    def step(self: KDModule, *args: Any, **kwargs: Any) -> Any:
        with self.kd_student.only_student_forward():
            return original(self, *args, **kwargs)

    step.__name__ = step.__qualname__ = name
    step.__doc__ = original.__doc__
    return step


def _kd_class(module_cls: type[L.LightningModule]) -> type[KDModule]:
    """The generated subclass of ``(KDModule, module_cls)``, created once per class."""
    if module_cls not in _CLASS_CACHE:
        namespace: dict[str, Any] = {
            "_kd_module_cls": module_cls,
            "__module__": KDModule.__module__,
            "__doc__": f"{module_cls.__name__} distilled by kdistill (see KDModule).",
        }
        for name in _EVAL_STEPS:  # only the steps the module defines: Lightning checks which
            if getattr(module_cls, name) is not getattr(L.LightningModule, name):
                namespace[name] = _student_only(name, module_cls)
        _CLASS_CACHE[module_cls] = type(
            f"KD{module_cls.__name__}", (KDModule, module_cls), namespace
        )
    return _CLASS_CACHE[module_cls]


def _new_instance(module_cls: type[L.LightningModule]) -> KDModule:
    """Unpickling helper: an empty instance of ``module_cls``'s generated class."""
    return object.__new__(_kd_class(module_cls))


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

    The submodule is converted with ``kdistill.convert`` (mode ``"kd_loss"``) and the module
    becomes a ``KDModule`` (``isinstance(module, type_before)`` still holds); see ``KDModule``
    for what changes. ``module.training_step`` must call the student once per step.

    Args:
        module: A LightningModule with automatic optimization.
        student: Dotted name of the student network inside ``module`` (e.g. ``"net"``).
        teacher_model: The teacher: an ``nn.Module``, a class or an importable factory.
        criterion: A loss or ``{(student_layer, teacher_layer): loss}`` (layer names inside the
            student and the teacher).
        loss_balancer: Combines ``training_step``'s loss with the KD losses; ``None`` trains on
            the KD loss alone.
        expose_minimal_state_dict: Leave the teacher out of checkpoints (default).

    Returns:
        ``module``, now a ``KDModule``.

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
    convert(module.get_submodule(student), mode=[("kd_loss", config)])
    module.__class__ = _kd_class(type(module))
    module._kd_student_name = student
    return module
