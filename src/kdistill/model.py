"""``DistillationModel``: a student that also runs a frozen teacher and computes KD losses.

``convert`` turns a student instance into one in place by swapping its class for a generated
subclass of both ``DistillationModel`` and the student's class (so ``isinstance`` still holds).
Design follows ModelOpt 0.47 ``modelopt/torch/distill/distillation_model.py``: forward hooks
capture the paired layers' outputs, the teacher runs under ``no_grad`` in eval mode, and
``state_dict`` can hide the teacher.
"""

import contextlib
import inspect
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .balancers import STUDENT_LOSS_KEY, DistillationLossBalancer

__all__ = ["DistillationModel"]

TEACHER_KEY = "_teacher_model"
LOSS_MODULES_KEY = "_loss_modules"
_OUR_CHILDREN_REVERSED = (LOSS_MODULES_KEY, TEACHER_KEY)
# Attributes set by ``DistillationModel.setup_`` and removed by ``teardown_``.
_STATE_ATTRS = (
    "_kd_pairs",
    "_kd_teacher",
    "_kd_loss_modules",
    "_kd_balancer",
    "_kd_expose_minimal",
    "_kd_only_teacher",
    "_kd_only_student",
    "_kd_handles",
    "_kd_root_captures",
    "_kd_frozen",
    "_kd_modes",
)


class _Capture:
    """Forward hook storing a module's latest output (and, when asked, its inputs).

    A picklable object rather than a closure, so converted models pickle and deepcopy; captured
    tensors are never pickled.
    """

    def __init__(self, keep_inputs: bool = False) -> None:
        self.keep_inputs = keep_inputs
        self.output: Any = None
        self.inputs: tuple[tuple, dict] | None = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.output = output
        if self.keep_inputs:
            self.inputs = (args, kwargs)

    def take(self) -> Any:
        """Return the captured output and forget everything captured."""
        output, self.output, self.inputs = self.output, None, None
        return output

    def clear(self) -> None:
        self.output = None
        self.inputs = None

    def __getstate__(self) -> dict:
        return {"keep_inputs": self.keep_inputs, "output": None, "inputs": None}


class _InjectTeacherInputs:
    """Forward pre-hook giving a student layer its teacher layer's inputs (layerwise KD)."""

    def __init__(self, teacher_capture: _Capture) -> None:
        self.teacher_capture = teacher_capture

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        inputs, self.teacher_capture.inputs = self.teacher_capture.inputs, None
        return inputs  # None (e.g. under only_student_forward) keeps the student's own inputs


@dataclass
class _Pair:
    """One criterion entry: the two layer names, the loss, and the hooks' captures."""

    student_layer: str
    teacher_layer: str
    loss: nn.Module
    student_capture: _Capture
    teacher_capture: _Capture
    loss_kwarg_names: frozenset[str]
    loss_takes_any_kwarg: bool
    key: str  # name in the loss dict: f"{LossClass}_{i}"

    def kwargs_for(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The subset of ``kwargs`` that this pair's loss ``forward`` accepts."""
        if self.loss_takes_any_kwarg:
            return kwargs
        return {k: v for k, v in kwargs.items() if k in self.loss_kwarg_names}


def _accepted_kwargs(fn: Callable) -> tuple[frozenset[str], bool]:
    """Keyword names ``fn`` accepts (beyond its first two inputs), and whether it has ``**kw``.

    A callable without an inspectable signature (some builtins) is taken to accept none.
    """
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return frozenset(), False
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    names = frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return names, var_kw


def _new_instance(student_cls: type[nn.Module]) -> "DistillationModel":
    """Unpickling helper: an empty instance of ``student_cls``'s generated distillation class."""
    return object.__new__(distillation_class(student_cls))


class DistillationModel(nn.Module):
    """A student with a frozen teacher attached; created by ``kdistill.convert``, never directly.

    ``forward`` runs the teacher (no grad, eval mode) and then the student on the same inputs and
    returns the student's output; ``compute_kd_loss`` turns the captured layer outputs into the
    loss. ``export`` (or ``kdistill.export``) gives the plain student back.
    """

    _kd_student_cls: type[nn.Module]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            "DistillationModel is not built directly: use "
            "kdistill.convert(student, mode=[('kd_loss', config)])."
        )

    # ------------------------------------------------------------------ set-up and teardown
    def setup_(
        self,
        teacher: nn.Module,
        criterion: dict[tuple[str, str], nn.Module],
        balancer: DistillationLossBalancer | None,
        expose_minimal_state_dict: bool,
        layerwise: bool,
    ) -> None:
        """Attach teacher, losses and hooks. Called by the modes on validated inputs only."""
        handles: list[RemovableHandle] = []
        try:
            pairs, root_captures = self._register_pairs(teacher, criterion, layerwise, handles)
        except BaseException:
            for handle in handles:  # a failed set-up leaves no hook behind
                handle.remove()
            raise
        teacher.requires_grad_(False)
        teacher.eval()
        frozen: list[str] = []
        if layerwise:
            trained = [s for s, _ in criterion if s]
            for name, param in self.named_parameters():
                inside = any(name.startswith(prefix + ".") for prefix in trained)
                if param.requires_grad and not inside:
                    param.requires_grad_(False)
                    frozen.append(name)
        # losses with parameters, in criterion order, so `_loss_modules.i` keys are stable
        loss_modules = nn.ModuleList(
            [p.loss for p in pairs if any(True for _ in p.loss.parameters())]
        )
        set_attr = object.__setattr__  # keep these out of nn.Module's registration
        set_attr(self, "_kd_pairs", pairs)
        set_attr(self, "_kd_teacher", teacher)
        set_attr(self, "_kd_loss_modules", loss_modules)
        set_attr(self, "_kd_balancer", balancer)
        set_attr(self, "_kd_expose_minimal", expose_minimal_state_dict)
        set_attr(self, "_kd_only_teacher", False)
        set_attr(self, "_kd_only_student", False)
        set_attr(self, "_kd_handles", handles)
        set_attr(self, "_kd_root_captures", root_captures)
        set_attr(self, "_kd_frozen", frozen)
        set_attr(self, "_kd_modes", [])
        self._modules[TEACHER_KEY] = teacher
        self._modules[LOSS_MODULES_KEY] = loss_modules

    def _register_pairs(
        self,
        teacher: nn.Module,
        criterion: dict[tuple[str, str], nn.Module],
        layerwise: bool,
        handles: list[RemovableHandle],
    ) -> tuple[list[_Pair], list[_Capture]]:
        """Hook every criterion pair (appending to ``handles``); return pairs and root captures."""
        pairs: list[_Pair] = []
        root_captures: list[_Capture] = []
        for i, ((s_name, t_name), loss) in enumerate(criterion.items()):
            names, var_kw = _accepted_kwargs(loss.forward)
            s_cap, t_cap = _Capture(), _Capture(keep_inputs=layerwise and s_name != "")
            # a hook even on the teacher's root: teachers such as CachedTeacher inspect them
            teacher_layer = teacher.get_submodule(t_name)
            handles.append(teacher_layer.register_forward_hook(t_cap, with_kwargs=True))
            if s_name == "":
                root_captures.append(s_cap)  # filled by forward(): a hook on self would also
                # fire for only_teacher_forward, which returns the teacher's output
            else:
                student_layer = self.get_submodule(s_name)
                handles.append(student_layer.register_forward_hook(s_cap, with_kwargs=True))
                if layerwise:
                    handles.append(
                        student_layer.register_forward_pre_hook(
                            _InjectTeacherInputs(t_cap), with_kwargs=True
                        )
                    )
            key = f"{type(loss).__name__}_{i}"
            pairs.append(_Pair(s_name, t_name, loss, s_cap, t_cap, names, var_kw, key))
        return pairs, root_captures

    def teardown_(self) -> None:
        """Remove hooks, teacher, loss modules and every attribute ``setup_`` added."""
        for handle in self._kd_handles:
            handle.remove()
        params = dict(self.named_parameters())
        for name in self._kd_frozen:
            if name in params:
                params[name].requires_grad_(True)
        self._modules.pop(TEACHER_KEY, None)
        self._modules.pop(LOSS_MODULES_KEY, None)
        for attr in _STATE_ATTRS:
            self.__dict__.pop(attr, None)
        self.__class__ = self._kd_student_cls

    # ------------------------------------------------------------------ properties
    @property
    def teacher_model(self) -> nn.Module:
        """The frozen teacher."""
        return self._kd_teacher

    @property
    def loss_modules(self) -> nn.ModuleList:
        """The losses that have parameters, in criterion order (saved as ``_loss_modules.i``)."""
        return self._kd_loss_modules

    @property
    def loss_balancer(self) -> DistillationLossBalancer | None:
        """The loss balancer, or ``None``."""
        return self._kd_balancer

    # ------------------------------------------------------------------ context managers
    @contextlib.contextmanager
    def _hide_children(self, *names: str) -> Iterator[None]:
        """Temporarily remove children from ``_modules``, restoring them (and their order)."""
        modules = self._modules
        order = list(modules)
        hidden = {name: modules.pop(name) for name in names if name in modules}
        try:
            yield
        finally:
            modules.update(hidden)
            if hidden and list(modules) != order:
                rank = {name: i for i, name in enumerate(order)}
                items = sorted(modules.items(), key=lambda kv: rank.get(kv[0], len(rank)))
                modules.clear()
                modules.update(items)

    @contextlib.contextmanager
    def hide_teacher_model(self, enable: bool = True) -> Iterator[None]:
        """Hide the teacher from ``state_dict``, ``parameters``, ``modules`` etc. Re-entrant."""
        with self._hide_children(*((TEACHER_KEY,) if enable else ())):
            yield

    @contextlib.contextmanager
    def hide_loss_modules(self, enable: bool = True) -> Iterator[None]:
        """Hide the loss modules (``_loss_modules``) the same way. Re-entrant."""
        with self._hide_children(*((LOSS_MODULES_KEY,) if enable else ())):
            yield

    @contextlib.contextmanager
    def _flag(self, attr: str, enable: bool) -> Iterator[None]:
        previous = getattr(self, attr)
        object.__setattr__(self, attr, previous or enable)
        try:
            yield
        finally:
            object.__setattr__(self, attr, previous)

    def only_teacher_forward(self, enable: bool = True) -> contextlib.AbstractContextManager:
        """Within the context, ``forward`` runs only the teacher and returns its output."""
        return self._flag("_kd_only_teacher", enable)

    def only_student_forward(self, enable: bool = True) -> contextlib.AbstractContextManager:
        """Within the context, ``forward`` runs only the student (no teacher outputs captured)."""
        return self._flag("_kd_only_student", enable)

    # ------------------------------------------------------------------ nn.Module overrides
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the teacher (no grad, eval mode) then the student; return the student's output."""
        if not self._kd_only_student:
            teacher = self._kd_teacher
            if teacher.training:  # someone called teacher.train(); KD needs eval (dropout off)
                teacher.eval()
            with torch.no_grad():
                teacher_output = teacher(*args, **kwargs)
            if self._kd_only_teacher:
                return teacher_output
        # Hide our extra children so students that iterate over theirs (nn.Sequential) still work.
        # Fast path when they are the last two children (as convert leaves them): popping and
        # re-adding them keeps the order, so no context manager or reordering is needed.
        modules = self._modules
        if tuple(itertools.islice(reversed(modules), 2)) == _OUR_CHILDREN_REVERSED:
            teacher_module, loss_modules = modules.pop(TEACHER_KEY), modules.pop(LOSS_MODULES_KEY)
            try:
                output = super().forward(*args, **kwargs)
            finally:
                modules[TEACHER_KEY], modules[LOSS_MODULES_KEY] = teacher_module, loss_modules
        else:
            with self._hide_children(TEACHER_KEY, LOSS_MODULES_KEY):
                output = super().forward(*args, **kwargs)
        for capture in self._kd_root_captures:
            capture.output = output
        return output

    def train(self, mode: bool = True) -> "DistillationModel":
        """Set train/eval mode on the student (the teacher stays in eval); clears captures."""
        super().train(mode)
        self._kd_teacher.eval()
        self._clear_captures()
        return self

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The student's state (plus ``_loss_modules.*``); the teacher only if not hidden."""
        with self.hide_teacher_model(enable=self._kd_expose_minimal):
            return super().state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        """Load our own state dict or a plain student one (without teacher / loss keys)."""
        keys = list(state_dict)
        has_teacher = any(k.startswith(TEACHER_KEY + ".") for k in keys)
        has_losses = any(k.startswith(LOSS_MODULES_KEY + ".") for k in keys)
        with (
            self.hide_teacher_model(enable=not has_teacher),
            self.hide_loss_modules(enable=not has_losses),
        ):
            return super().load_state_dict(state_dict, *args, **kwargs)

    def __reduce_ex__(self, protocol: Any) -> tuple:
        # The generated class cannot be found by name, so rebuild it from the student's class.
        return (_new_instance, (self._kd_student_cls,), self.__dict__.copy())

    # ------------------------------------------------------------------ losses
    def _clear_captures(self) -> None:
        for pair in self._kd_pairs:
            pair.student_capture.clear()
            pair.teacher_capture.clear()

    def compute_kd_loss(
        self,
        student_loss: Tensor | None = None,
        loss_reduction_fn: Callable[[Tensor], Tensor] | None = None,
        skip_balancer: bool = False,
        **loss_kwargs: Any,
    ) -> Tensor | dict[str, Tensor]:
        """Compute the KD losses from the outputs captured by the last forward.

        For each criterion pair ``i`` (in order), the captured outputs are taken (and cleared),
        ``loss(student_out, teacher_out, **kwargs)`` is computed with the ``loss_kwargs`` its
        ``forward`` accepts, ``loss_reduction_fn`` is applied if given, and the result is stored
        under ``f"{LossClass}_{i}"``; ``student_loss`` goes under ``"student_loss"``.

        Args:
            student_loss: The student's own (task) loss, combined by the balancer.
            loss_reduction_fn: Applied to each KD loss, e.g. a masked mean of a ``"none"`` loss.
            skip_balancer: Return the dict of losses instead of one scalar.
            **loss_kwargs: Extra keyword inputs (e.g. ``labels=``), routed by loss signature.

        Returns:
            The dict when ``skip_balancer``; the single KD loss when there is no balancer;
            otherwise ``loss_balancer(loss_dict)``.

        Raises:
            RuntimeError: Nothing was captured (run a forward first).
            TypeError: A keyword in ``loss_kwargs`` is accepted by no loss.
            ValueError: ``student_loss`` was given but there is no balancer to combine it.
        """
        captured = [(p, p.student_capture.take(), p.teacher_capture.take()) for p in self._kd_pairs]
        if any(s is None or t is None for _, s, t in captured):
            missing = [
                f"({p.student_layer!r}, {p.teacher_layer!r}): "
                + " and ".join(
                    side for side, out in (("student", s), ("teacher", t)) if out is None
                )
                for p, s, t in captured
                if s is None or t is None
            ]
            raise RuntimeError(
                f"No captured output for pair(s) {'; '.join(missing)}. Run a forward pass of the "
                "model (outside only_student_forward / only_teacher_forward) before "
                "compute_kd_loss(), once per call."
            )
        unused = loss_kwargs and (
            loss_kwargs.keys() - {k for p in self._kd_pairs for k in p.kwargs_for(loss_kwargs)}
        )
        if unused:
            raise TypeError(
                f"compute_kd_loss() got keyword(s) {sorted(unused)} that no loss accepts. "
                f"Losses: {[type(p.loss).__name__ for p in self._kd_pairs]}."
            )
        if student_loss is not None and self._kd_balancer is None and not skip_balancer:
            raise ValueError(
                "compute_kd_loss() got `student_loss` but the model has no loss balancer to "
                "combine it with the KD loss. Convert with "
                "`loss_balancer=StaticLossBalancer(...)`, or add the losses yourself."
            )
        loss_dict: dict[str, Tensor] = {}
        if student_loss is not None:
            loss_dict[STUDENT_LOSS_KEY] = student_loss
        for pair, student_out, teacher_out in captured:
            loss = pair.loss(student_out, teacher_out, **pair.kwargs_for(loss_kwargs))
            if loss_reduction_fn is not None:
                loss = loss_reduction_fn(loss)
            loss_dict[pair.key] = loss
        if skip_balancer:
            return loss_dict
        if self._kd_balancer is None:
            return next(iter(loss_dict.values()))
        return self._kd_balancer(loss_dict)


_SEQUENCE_DUNDERS = ("__len__", "__iter__", "__getitem__")
_CLASS_CACHE: dict[type[nn.Module], type[DistillationModel]] = {}


def _hidden_dunder(name: str, student_cls: type) -> Callable:
    """Wrap a container dunder (e.g. ``nn.Sequential.__len__``) so it ignores our children."""
    original = getattr(student_cls, name)

    def method(self: DistillationModel, *args: Any) -> Any:
        with self._hide_children(TEACHER_KEY, LOSS_MODULES_KEY):
            result = original(self, *args)
            return iter(list(result)) if name == "__iter__" else result

    method.__name__ = method.__qualname__ = name
    return method


def distillation_class(student_cls: type[nn.Module]) -> type[DistillationModel]:
    """The generated subclass of ``(DistillationModel, student_cls)``, created once per class.

    Its ``forward`` is a new function (never a shared one) carrying the student's signature, which
    tools like Hugging Face's ``Trainer`` inspect.
    """
    if student_cls in _CLASS_CACHE:
        return _CLASS_CACHE[student_cls]

    def forward(self: DistillationModel, *args: Any, **kwargs: Any) -> Any:
        return DistillationModel.forward(self, *args, **kwargs)

    forward.__signature__ = inspect.signature(student_cls.forward)  # type: ignore[attr-defined]
    forward.__doc__ = DistillationModel.forward.__doc__
    namespace: dict[str, Any] = {
        "forward": forward,
        "_kd_student_cls": student_cls,
        "__module__": DistillationModel.__module__,
        "__doc__": f"{student_cls.__name__} converted for distillation (see DistillationModel).",
    }
    for name in _SEQUENCE_DUNDERS:
        if getattr(student_cls, name, None) is not None and name not in vars(nn.Module):
            namespace[name] = _hidden_dunder(name, student_cls)
    # Same name as the student's class, so what tools record by class name (e.g. Hugging Face's
    # config.json `architectures`) stays the student's; `type(model) is not StudentCls` still holds.
    cls = type(student_cls.__name__, (DistillationModel, student_cls), namespace)
    cls.__qualname__ = f"DistillationModel[{student_cls.__qualname__}]"
    forward.__qualname__ = f"{cls.__qualname__}.forward"
    _CLASS_CACHE[student_cls] = cls
    return cls
