"""``DistillationModel``: a student that also runs a frozen teacher and computes KD losses.

``convert`` turns a student instance into one in place by swapping its class for a generated
subclass of both ``DistillationModel`` and the student's class (so ``isinstance`` still holds).
Design follows ModelOpt 0.47 ``modelopt/torch/distill/distillation_model.py``: forward hooks
capture the paired layers' outputs, the teacher runs under ``no_grad`` in eval mode, and
``state_dict`` can hide the teacher. Everything ``convert`` adds lives in one state object
(``_KDState``), set once and removed by ``export``.

Inner API for integrations (``hf``, ``lightning``, ``llm``, ``checkpoint``, ``cache``): the
properties ``kd_pairs``, ``kd_modes``, ``original_cls``, ``teacher_model``, ``loss_modules``,
``loss_balancer``, ``expose_minimal_state_dict``, the methods ``accepted_loss_kwargs``,
``align_teacher_`` and ``as_student``, and the teacher protocol ``set_kd_uses_`` /
``kd_teacher_names`` (see ``DistillationModel``).

Several named teachers are one ``TeacherDict`` module (``kdistill.teachers``), so nothing here
depends on their number: hooks are registered by dotted name (``"big.blocks.11"``) as for one
teacher. A pair whose teacher side is a tuple of layer names hands its loss the tuple of those
layers' outputs.
"""

import contextlib
import inspect
import itertools
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ._dynamic import SubclassFactory
from .balancers import STUDENT_LOSS_KEY, DistillationLossBalancer

__all__ = [
    "KD_USE_INPUTS",
    "KD_USE_OUTPUT",
    "LOSS_MODULES_KEY",
    "TEACHER_KEY",
    "DistillationModel",
    "KDPair",
    "distillation_class",
]

TEACHER_KEY = "_teacher_model"
LOSS_MODULES_KEY = "_loss_modules"
_OUR_CHILDREN_REVERSED = (LOSS_MODULES_KEY, TEACHER_KEY)

KD_USE_OUTPUT = "output"
"""A teacher layer whose output a distillation model captures (see ``set_kd_uses_``)."""
KD_USE_INPUTS = "inputs"
"""A teacher layer whose inputs are captured too (``layerwise_kd``)."""


class _Capture:
    """Stores one module's latest output (and, for ``layerwise_kd``, its inputs).

    Used as a forward hook on a paired layer, or filled by ``DistillationModel.forward`` for a
    model's root. A picklable object rather than a closure, so converted models pickle and
    deepcopy; captured tensors are never pickled.
    """

    def __init__(self, side: str, layer: str, keep_inputs: bool = False) -> None:
        self.side = side  # "student" or "teacher"
        self.layer = layer
        self.keep_inputs = keep_inputs
        self.output: Any = None
        self.inputs: tuple[tuple, dict] | None = None
        self.warn_on_overwrite = False  # the owner's training mode
        self.warned = False

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.store(output)
        if self.keep_inputs:
            self.inputs = (args, kwargs)

    def store(self, output: Any) -> None:
        """Keep ``output``; warn (once, in training) if an unconsumed one is overwritten."""
        if self.output is not None and self.warn_on_overwrite and not self.warned:
            self.warned = True
            name = repr(self.layer) if self.layer else "'' (the model's output)"
            warnings.warn(
                f"{self.side.capitalize()} layer {name}: a new output was captured before "
                "compute_kd_loss() consumed the previous one, which is overwritten. Call "
                "compute_kd_loss() after every training forward (harmless only when activation "
                "checkpointing re-runs the layer during backward). Warned once per layer.",
                stacklevel=2,
            )
        self.output = output

    def clear(self) -> None:
        self.output = None
        self.inputs = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "output": None, "inputs": None}


class _InjectTeacherInputs:
    """Forward pre-hook giving a student layer its teacher layer's inputs (layerwise KD)."""

    def __init__(self, teacher_capture: _Capture, student_layer: str) -> None:
        self.teacher_capture = teacher_capture
        self.student_layer = student_layer
        self.warned = False

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        inputs = self.teacher_capture.inputs
        if inputs is None and module.training and not self.warned:
            self.warned = True
            warnings.warn(
                f"Teacher layer {self.teacher_capture.layer!r} has no intermediate input stored "
                f"for student layer {self.student_layer!r} (layerwise_kd), so the student layer "
                "runs on its own inputs. Run the teacher first (outside only_student_forward). "
                "Warned once per layer.",
                stacklevel=2,
            )
        return inputs  # None keeps the student's own inputs


@dataclass(frozen=True)
class KDPair:
    """One criterion entry of a ``DistillationModel`` (read-only; see ``kd_pairs``).

    Attributes:
        student_layer: Dotted name of the student layer (``""``: the model's output).
        teacher_layer: Dotted name of the teacher layer, or a tuple of them (the loss then
            receives the tuple of their outputs, in this order).
        loss: The loss module, called as ``loss(student_out, teacher_out, **kwargs)``.
        key: Its name in ``compute_kd_loss``'s dict: ``f"{type(loss).__name__}_{i}"``.
        accepted_kwargs: Keyword names the loss's ``forward`` accepts; ``None`` for any
            (``**kwargs``).
    """

    student_layer: str
    teacher_layer: str | tuple[str, ...]
    loss: nn.Module
    key: str
    accepted_kwargs: frozenset[str] | None

    def kwargs_for(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The subset of ``kwargs`` that this pair's loss ``forward`` accepts."""
        if self.accepted_kwargs is None:
            return dict(kwargs)
        return {k: v for k, v in kwargs.items() if k in self.accepted_kwargs}


def _accepted_kwargs(fn: Callable) -> frozenset[str] | None:
    """Keyword names ``fn`` accepts; ``None`` when it takes ``**kwargs``.

    A callable without an inspectable signature (some builtins) is taken to accept none.
    """
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return frozenset()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


@dataclass(eq=False)
class _KDState:
    """Everything ``convert`` adds to a model; set once by ``setup_``, removed by ``teardown_``."""

    teacher: nn.Module
    pairs: tuple[KDPair, ...]
    # (student, teacher) per pair; a tuple of teacher captures for a tuple teacher side
    pair_captures: tuple[tuple[_Capture, "_Capture | tuple[_Capture, ...]"], ...]
    captures: tuple[_Capture, ...]  # each capture once
    student_root: _Capture | None  # filled by forward() (a hook on self would also fire for
    teacher_root: _Capture | None  # only_teacher_forward, which returns the teacher's output)
    layerwise: bool
    loss_modules: nn.ModuleList
    balancer: DistillationLossBalancer | None
    expose_minimal: bool
    handles: list[RemovableHandle]
    modes: tuple[tuple[str, Any], ...]
    # flags convert changed, restored by export
    frozen_student: list[nn.Parameter]
    teacher_requires_grad: list[tuple[nn.Parameter, bool]]
    teacher_training: list[tuple[nn.Module, bool]]
    teacher_only_modules: list[nn.Module] | None  # None: no module shared with the student
    only_teacher: bool = False
    only_student: bool = False


class DistillationModel(nn.Module):
    """A student with a frozen teacher attached; created by ``kdistill.convert``, never directly.

    ``forward`` runs the teacher (no grad, eval mode) and then the student on the same inputs and
    returns the student's output; ``compute_kd_loss`` turns the captured layer outputs into the
    loss. ``export`` (or ``kdistill.export``) gives the plain student back.

    If a forward raises (in the teacher or the student), everything captured is dropped, so the
    next ``compute_kd_loss`` raises "nothing captured" instead of mixing two batches.

    Several teachers: with ``teacher_model={name: teacher}`` the teacher is a
    ``kdistill.TeacherDict`` whose children are the named teachers; each runs on the same inputs
    (in the dict's order, all under ``no_grad`` in eval mode, before the student), and criterion
    names such as ``"big"`` or ``"big.blocks.11"`` resolve in it as for one teacher.

    Teacher protocol: a teacher module may define ``set_kd_uses_(uses)``. ``convert`` calls it
    with ``{teacher_layer: frozenset of KD_USE_OUTPUT / KD_USE_INPUTS}`` (what the model reads
    from each teacher layer; ``""`` is the teacher's output), and ``export`` with ``None``.
    ``kdistill.CachedTeacher`` uses it to refuse layers its cache cannot serve. A teacher that
    holds several named teachers (``TeacherDict``, a ``CachedTeacher`` of several) exposes their
    names as ``kd_teacher_names`` (a tuple of str); ``convert`` then checks the criterion as for
    several teachers (no ``""`` teacher side, unknown names said per teacher).

    Attributes:
        original_cls: The student's own class (ModelOpt's name), a class attribute.
    """

    original_cls: type[nn.Module]
    _kd: _KDState

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            "DistillationModel is not built directly: use "
            "kdistill.convert(student, mode=[('kd_loss', config)])."
        )

    # ------------------------------------------------------------------ set-up and teardown
    def setup_(
        self,
        teacher: nn.Module,
        criterion: Mapping[tuple[str, str | tuple[str, ...]], nn.Module],
        balancer: DistillationLossBalancer | None,
        expose_minimal_state_dict: bool,
        layerwise: bool,
        mode: tuple[str, Any],
    ) -> None:
        """Attach teacher, losses and hooks. Called by the modes on validated inputs only.

        Layer names must already be checked against both models. On failure nothing stays
        changed (no hook, no frozen parameter, no teacher attached).
        """
        student_modules = dict(self.named_modules())
        teacher_modules = dict(teacher.named_modules())
        shared = _shared_with(self, teacher)
        if shared:
            warnings.warn(
                f"The teacher shares {_describe_shared(shared)} with the student. They stay "
                "trainable and follow the student's train/eval mode (the teacher still runs "
                "under no_grad); if they should be frozen, freeze them yourself "
                "(requires_grad_(False)). Tied frozen embeddings are a legitimate use.",
                stacklevel=4,
            )
        student_param_ids = {id(p) for p in self.parameters()}
        student_module_ids = {id(m) for m in self.modules()}

        captures: dict[tuple[str, str], _Capture] = {}

        def capture(side: str, layer: str, keep_inputs: bool = False) -> _Capture:
            key = (side, layer)
            if key not in captures:
                captures[key] = _Capture(side, layer, keep_inputs)
            captures[key].keep_inputs |= keep_inputs
            return captures[key]

        pairs, pair_captures, injected = [], [], []
        for i, ((s_name, t_side), loss) in enumerate(criterion.items()):
            s_cap = capture("student", s_name)
            t_cap: _Capture | tuple[_Capture, ...]
            if isinstance(t_side, tuple):  # config refuses tuples for layerwise_kd
                t_cap = tuple(capture("teacher", t_name) for t_name in t_side)
            else:
                keep_inputs = layerwise and s_name != ""
                t_cap = capture("teacher", t_side, keep_inputs)
                if keep_inputs:
                    injected.append((s_name, t_cap))
            key = f"{type(loss).__name__}_{i}"
            pairs.append(KDPair(s_name, t_side, loss, key, _accepted_kwargs(loss.forward)))
            pair_captures.append((s_cap, t_cap))
        uses: dict[str, set[str]] = {}
        for (side, layer), cap in captures.items():
            if side == "teacher":
                uses[layer] = {KD_USE_OUTPUT} | ({KD_USE_INPUTS} if cap.keep_inputs else set())

        handles: list[RemovableHandle] = []
        set_uses = getattr(teacher, "set_kd_uses_", None)
        try:
            for (side, layer), cap in captures.items():
                if layer == "":
                    continue  # roots are captured by forward()
                module = (student_modules if side == "student" else teacher_modules)[layer]
                handles.append(module.register_forward_hook(cap, with_kwargs=True))
            for s_name, t_cap in injected:
                handles.append(
                    student_modules[s_name].register_forward_pre_hook(
                        _InjectTeacherInputs(t_cap, s_name), with_kwargs=True
                    )
                )
            if callable(set_uses):
                set_uses({layer: frozenset(u) for layer, u in uses.items()})
        except BaseException:
            for handle in handles:  # a failed set-up leaves no hook behind
                handle.remove()
            raise

        # Flags convert changes (restored by export). Shared parameters and modules are the
        # student's: never frozen, and they follow the student's mode.
        teacher_requires_grad = [
            (p, p.requires_grad) for p in teacher.parameters() if id(p) not in student_param_ids
        ]
        teacher_training = [
            (m, m.training) for m in teacher.modules() if id(m) not in student_module_ids
        ]
        frozen_student: list[nn.Parameter] = []
        if layerwise:
            trained = [s for s, _ in criterion if s]
            for name, param in self.named_parameters():
                inside = any(name.startswith(prefix + ".") for prefix in trained)
                if param.requires_grad and not inside:
                    frozen_student.append(param)
        for param, _ in teacher_requires_grad:
            param.requires_grad_(False)
        for param in frozen_student:
            param.requires_grad_(False)
        for module, _ in teacher_training:
            module.training = False
        # losses with parameters, in criterion order, so `_loss_modules.i` keys are stable
        loss_modules = nn.ModuleList(
            [p.loss for p in pairs if any(True for _ in p.loss.parameters())]
        )
        all_captures = tuple(captures.values())
        for cap in all_captures:
            cap.warn_on_overwrite = self.training
        state = _KDState(
            teacher=teacher,
            pairs=tuple(pairs),
            pair_captures=tuple(pair_captures),
            captures=all_captures,
            student_root=captures.get(("student", "")),
            teacher_root=captures.get(("teacher", "")),
            layerwise=layerwise,
            loss_modules=loss_modules,
            balancer=balancer,
            expose_minimal=expose_minimal_state_dict,
            handles=handles,
            modes=(mode,),
            frozen_student=frozen_student,
            teacher_requires_grad=teacher_requires_grad,
            teacher_training=teacher_training,
            teacher_only_modules=[m for m, _ in teacher_training] if shared else None,
        )
        object.__setattr__(self, "_kd", state)  # outside nn.Module's registration
        self._modules[TEACHER_KEY] = teacher
        self._modules[LOSS_MODULES_KEY] = loss_modules

    def teardown_(self) -> None:
        """Remove hooks, teacher, loss modules and the state; restore the flags convert set."""
        kd = self._kd
        for handle in kd.handles:
            handle.remove()
        for capture in kd.captures:
            capture.clear()
        set_uses = getattr(kd.teacher, "set_kd_uses_", None)
        if callable(set_uses):
            set_uses(None)
        for param in kd.frozen_student:
            param.requires_grad_(True)
        for param, flag in kd.teacher_requires_grad:
            param.requires_grad_(flag)
        for module, flag in kd.teacher_training:
            module.training = flag
        self._modules.pop(TEACHER_KEY, None)
        self._modules.pop(LOSS_MODULES_KEY, None)
        del self.__dict__["_kd"]
        self.__class__ = self.original_cls  # type: ignore[assignment]  # the point of teardown

    # ------------------------------------------------------------------ inner API
    @property
    def teacher_model(self) -> nn.Module:
        """The frozen teacher (a ``TeacherDict`` of the named teachers for a dict teacher)."""
        return self._kd.teacher

    @property
    def loss_modules(self) -> nn.ModuleList:
        """The losses that have parameters, in criterion order (saved as ``_loss_modules.i``)."""
        return self._kd.loss_modules

    @property
    def loss_balancer(self) -> DistillationLossBalancer | None:
        """The loss balancer, or ``None``."""
        return self._kd.balancer

    @property
    def kd_pairs(self) -> tuple[KDPair, ...]:
        """The criterion pairs, in order (layer names, loss, loss-dict key, accepted kwargs)."""
        return self._kd.pairs

    @property
    def kd_modes(self) -> tuple[tuple[str, Any], ...]:
        """The applied modes as ``(mode_name, validated_config)``, in order (for ``save``)."""
        return self._kd.modes

    @property
    def expose_minimal_state_dict(self) -> bool:
        """Whether ``state_dict()`` leaves out the teacher."""
        return self._kd.expose_minimal

    def accepted_loss_kwargs(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The subset of ``kwargs`` that at least one pair's loss accepts."""
        accepted: dict[str, Any] = {}
        for pair in self._kd.pairs:
            accepted.update(pair.kwargs_for(kwargs))
        return accepted

    def align_teacher_(self) -> None:
        """Move the teacher to the device and dtype of the student's first floating parameter.

        Integrations call it after the student was moved (e.g. by a Trainer), so the teacher
        follows it.
        """
        with self.hide_teacher_model():
            reference = next((p for p in self.parameters() if p.is_floating_point()), None)
        if reference is not None:
            self._kd.teacher.to(device=reference.device, dtype=reference.dtype)

    @contextlib.contextmanager
    def as_student(self) -> Iterator[nn.Module]:
        """Within the context, the model poses as a plain instance of ``original_cls``.

        Teacher and loss modules are hidden and the class is the student's, so code that
        inspects the class (e.g. Hugging Face's ``save_pretrained`` writing ``architectures``)
        sees the student. Do not run forward inside; the class is restored on exit.
        """
        distillation_cls = type(self)
        with self._hide_children(TEACHER_KEY, LOSS_MODULES_KEY):
            self.__class__ = self.original_cls  # type: ignore[assignment]  # posing as the student
            try:
                yield self
            finally:
                self.__class__ = distillation_cls

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
        kd = self._kd
        previous = getattr(kd, attr)
        setattr(kd, attr, previous or enable)
        try:
            yield
        finally:
            setattr(kd, attr, previous)

    def only_teacher_forward(self, enable: bool = True) -> contextlib.AbstractContextManager:
        """Within the context, ``forward`` runs only the teacher and returns its output."""
        return self._flag("only_teacher", enable)

    def only_student_forward(self, enable: bool = True) -> contextlib.AbstractContextManager:
        """Within the context, ``forward`` runs only the student (no teacher outputs captured)."""
        return self._flag("only_student", enable)

    # ------------------------------------------------------------------ nn.Module overrides
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the teacher (no grad, eval mode) then the student; return the student's output."""
        kd = self._kd
        try:
            if not kd.only_student:
                teacher = kd.teacher
                if teacher.training:  # someone called teacher.train(); KD needs eval (dropout off)
                    self._teacher_eval()
                with torch.no_grad():
                    teacher_output = teacher(*args, **kwargs)
                if kd.teacher_root is not None:
                    kd.teacher_root.store(teacher_output)
                if kd.only_teacher:
                    return teacher_output
            # Hide our extra children so students that iterate over theirs (nn.Sequential) still
            # work. Fast path when they are the last two children (as convert leaves them):
            # popping and re-adding them keeps the order, so no reordering is needed.
            modules = self._modules
            if tuple(itertools.islice(reversed(modules), 2)) == _OUR_CHILDREN_REVERSED:
                teacher_module = modules.pop(TEACHER_KEY)
                loss_modules = modules.pop(LOSS_MODULES_KEY)
                try:
                    output = super().forward(*args, **kwargs)
                finally:
                    modules[TEACHER_KEY], modules[LOSS_MODULES_KEY] = teacher_module, loss_modules
            else:
                with self._hide_children(TEACHER_KEY, LOSS_MODULES_KEY):
                    output = super().forward(*args, **kwargs)
            if kd.student_root is not None:
                kd.student_root.store(output)
            if kd.layerwise:
                for capture in kd.captures:  # teacher inputs are used up by the student run
                    capture.inputs = None
            return output
        except BaseException:
            self._clear_captures()  # never pair a later student output with this teacher's
            raise

    def _teacher_eval(self) -> None:
        """Put the teacher in eval mode, except modules it shares with the student."""
        kd = self._kd
        if kd.teacher_only_modules is None:
            kd.teacher.eval()
        else:
            for module in kd.teacher_only_modules:
                module.training = False

    def train(self, mode: bool = True) -> "DistillationModel":
        """Set train/eval mode on the student (the teacher stays in eval); clears captures."""
        super().train(mode)
        self._teacher_eval()
        self._clear_captures()
        for capture in self._kd.captures:
            capture.warn_on_overwrite = mode
        return self

    def state_dict(  # type: ignore[override]  # forwards torch's overloads through *args
        self, *args: Any, **kwargs: Any
    ) -> dict[str, Any]:
        """The student's state (plus ``_loss_modules.*``); the teacher only if not hidden."""
        with self.hide_teacher_model(enable=self._kd.expose_minimal):
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
        return _CLASSES.reduce_instance(self)

    # ------------------------------------------------------------------ losses
    def _clear_captures(self) -> None:
        for capture in self._kd.captures:
            capture.clear()

    @overload
    def compute_kd_loss(
        self,
        student_loss: Tensor | None = ...,
        loss_reduction_fn: Callable[[Tensor], Tensor] | None = ...,
        *,
        skip_balancer: Literal[True],
        **loss_kwargs: Any,
    ) -> dict[str, Tensor]: ...
    @overload
    def compute_kd_loss(
        self,
        student_loss: Tensor | None = ...,
        loss_reduction_fn: Callable[[Tensor], Tensor] | None = ...,
        skip_balancer: Literal[False] = ...,
        **loss_kwargs: Any,
    ) -> Tensor: ...
    @overload
    def compute_kd_loss(
        self,
        student_loss: Tensor | None = ...,
        loss_reduction_fn: Callable[[Tensor], Tensor] | None = ...,
        skip_balancer: bool = ...,
        **loss_kwargs: Any,
    ) -> Tensor | dict[str, Tensor]: ...
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
        kd = self._kd
        captured = [(s.output, _teacher_output(t)) for s, t in kd.pair_captures]
        for capture in kd.captures:
            capture.clear()
        if any(s is None or t is None for s, t in captured):
            missing = [
                f"({p.student_layer!r}, {p.teacher_layer!r}): "
                + " and ".join(
                    side for side, out in (("student", s), ("teacher", t)) if out is None
                )
                for p, (s, t) in zip(kd.pairs, captured, strict=True)
                if s is None or t is None
            ]
            raise RuntimeError(
                f"No captured output for pair(s) {'; '.join(missing)}. Run a forward pass of the "
                "model (outside only_student_forward / only_teacher_forward) before "
                "compute_kd_loss(), once per call."
            )
        if loss_kwargs:
            unused = loss_kwargs.keys() - self.accepted_loss_kwargs(loss_kwargs).keys()
            if unused:
                raise TypeError(
                    f"compute_kd_loss() got keyword(s) {sorted(unused)} that no loss accepts. "
                    f"Losses: {[type(p.loss).__name__ for p in kd.pairs]}."
                )
        balancer = kd.balancer
        if student_loss is not None and balancer is None and not skip_balancer:
            raise ValueError(
                "compute_kd_loss() got `student_loss` but the model has no loss balancer to "
                "combine it with the KD loss. Convert with "
                "`loss_balancer=StaticLossBalancer(...)`, or add the losses yourself."
            )
        loss_dict: dict[str, Tensor] = {}
        if student_loss is not None:
            loss_dict[STUDENT_LOSS_KEY] = student_loss
        for pair, (student_out, teacher_out) in zip(kd.pairs, captured, strict=True):
            kwargs = pair.kwargs_for(loss_kwargs) if loss_kwargs else {}
            loss = pair.loss(student_out, teacher_out, **kwargs)
            if loss_reduction_fn is not None:
                loss = loss_reduction_fn(loss)
            loss_dict[pair.key] = loss
        if skip_balancer:
            return loss_dict
        if balancer is None:
            return next(iter(loss_dict.values()))
        return balancer(loss_dict)


def _teacher_output(capture: _Capture | tuple[_Capture, ...]) -> Any:
    """A pair's teacher output: one capture's, or the tuple of several (``None`` if any lacks)."""
    if isinstance(capture, _Capture):
        return capture.output
    outputs = tuple(c.output for c in capture)
    return None if any(o is None for o in outputs) else outputs


def _shared_with(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Teacher module and parameter names that are also the student's (top-most names only)."""
    student_modules = {id(m) for m in student.modules()}
    student_params = {id(p) for p in student.parameters()}
    names: list[str] = []
    for name, module in teacher.named_modules():
        if id(module) in student_modules and not any(
            name.startswith(prefix + ".") or prefix == "" for prefix in names
        ):
            names.append(name)
    for name, param in teacher.named_parameters():
        owner = name.rpartition(".")[0]
        covered = any(owner == p or owner.startswith(p + ".") or p == "" for p in names)
        if id(param) in student_params and not covered:
            names.append(name)
    return names


def _describe_shared(names: list[str]) -> str:
    shown = ", ".join(repr(n or "<root>") for n in names[:10])
    more = f" and {len(names) - 10} more" if len(names) > 10 else ""
    return f"modules/parameters {shown}{more} (teacher names)"


_SEQUENCE_DUNDERS = ("__len__", "__iter__", "__getitem__")


def _hidden_dunder(name: str, student_cls: type) -> Callable:
    """Wrap a container dunder (e.g. ``nn.Sequential.__len__``) so it ignores our children."""
    original = getattr(student_cls, name)

    def method(self: DistillationModel, *args: Any) -> Any:
        with self._hide_children(TEACHER_KEY, LOSS_MODULES_KEY):
            result = original(self, *args)
            return iter(list(result)) if name == "__iter__" else result

    method.__name__ = method.__qualname__ = name
    return method


def _namespace(student_cls: type) -> dict[str, Any]:
    """Class attributes of a generated distillation class: forward with the student's signature."""

    def forward(self: DistillationModel, *args: Any, **kwargs: Any) -> Any:
        return DistillationModel.forward(self, *args, **kwargs)

    # functions declare no __signature__ attribute, but inspect.signature reads it
    forward.__signature__ = inspect.signature(student_cls.forward)  # type: ignore[attr-defined]
    forward.__doc__ = DistillationModel.forward.__doc__
    forward.__qualname__ = f"DistillationModel[{student_cls.__qualname__}].forward"
    namespace: dict[str, Any] = {
        "forward": forward,
        "__doc__": f"{student_cls.__name__} converted for distillation (see DistillationModel).",
    }
    for name in _SEQUENCE_DUNDERS:
        if getattr(student_cls, name, None) is not None and name not in vars(nn.Module):
            namespace[name] = _hidden_dunder(name, student_cls)
    return namespace


# Same name as the student's class, so what tools record by class name (e.g. Hugging Face's
# config.json `architectures`) stays the student's; `type(model) is not StudentCls` still holds.
_CLASSES = SubclassFactory(
    DistillationModel,
    _namespace,
    name=lambda cls: cls.__name__,
    qualname=lambda cls: f"DistillationModel[{cls.__qualname__}]",
)


def distillation_class(student_cls: type[nn.Module]) -> type[DistillationModel]:
    """The generated subclass of ``(DistillationModel, student_cls)``.

    Its ``forward`` is a new function (never a shared one) carrying the student's signature, which
    tools like Hugging Face's ``Trainer`` inspect.
    """
    return _CLASSES.get(student_cls)
