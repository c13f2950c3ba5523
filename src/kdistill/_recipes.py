"""Contract recipes: how the contract suites build a small instance of a loss or balancer.

A recipe is declared where the loss or balancer is registered (``@register_loss("jsd",
recipe=LossRecipe(...))``), so the contract suites in ``kdistill.testing`` need not import every
loss. This module holds only torch-level data (no pytest); ``kdistill.testing`` re-exports it.
"""

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # annotations only: balancers.py imports this module
    from .balancers import DistillationLossBalancer

__all__ = [
    "BalancerRecipe",
    "ContractOptOut",
    "LossInputs",
    "LossRecipe",
    "cross_vocab_logit_inputs",
    "ensemble_logit_inputs",
    "feature_inputs",
    "labelled_logit_inputs",
    "logit_inputs",
]


@dataclass(frozen=True)
class LossInputs:
    """Inputs of one loss call: ``loss(student, teacher, labels=labels)``.

    Attributes:
        student: Student logits ``[B, T, C]`` or features.
        teacher: Teacher logits or features, or a tuple of them (losses of several teachers,
            e.g. ``EnsembleLogitsDistillationLoss``).
        labels: Optional integer labels ``[B, T]`` (logit losses that need them).
    """

    student: Tensor
    teacher: Tensor | tuple[Tensor, ...]
    labels: Tensor | None = None

    @property
    def teachers(self) -> tuple[Tensor, ...]:
        """The teacher tensors as a tuple (one for a single teacher)."""
        return self.teacher if isinstance(self.teacher, tuple) else (self.teacher,)

    def map(
        self, fn: Callable[[Tensor], Tensor], teacher_fn: Callable[[Tensor], Tensor] | None = None
    ) -> "LossInputs":
        """Apply ``fn`` to the student and to every teacher tensor (``teacher_fn`` there if given).

        Labels are unchanged.
        """
        return replace(self, student=fn(self.student), teacher=self.map_teacher(teacher_fn or fn))

    def map_teacher(self, fn: Callable[[Tensor], Tensor]) -> Tensor | tuple[Tensor, ...]:
        """``fn`` applied to the teacher tensor, or to each one of a tuple (same structure)."""
        if isinstance(self.teacher, tuple):
            return tuple(fn(t) for t in self.teacher)
        return fn(self.teacher)


def logit_inputs(generator: torch.Generator) -> LossInputs:
    """Random float32 student and teacher logits ``[2, 3, 5]`` (B=2, T=3, C=5)."""
    student = torch.randn(2, 3, 5, generator=generator)
    return LossInputs(student, torch.randn(2, 3, 5, generator=generator))


def labelled_logit_inputs(generator: torch.Generator) -> LossInputs:
    """``logit_inputs`` plus integer labels ``[2, 3]`` in ``[0, 5)``."""
    inputs = logit_inputs(generator)
    return replace(inputs, labels=torch.randint(0, 5, (2, 3), generator=generator))


def cross_vocab_logit_inputs(
    student_classes: int, teacher_classes: int
) -> Callable[[torch.Generator], LossInputs]:
    """An input maker of float32 logits over two vocabularies: ``[2, 3, C_s]`` and ``[2, 3, C_t]``.

    For losses between tokenizers (``ULDLoss``, ``HybridULDLoss``), whose recipes then set
    ``zero_when_equal=False``: no student input equals a teacher input of another size.

    Example:
        >>> make = cross_vocab_logit_inputs(5, 8)
        >>> inputs = make(torch.Generator().manual_seed(0))
        >>> tuple(inputs.student.shape), tuple(inputs.teacher.shape)
        ((2, 3, 5), (2, 3, 8))
    """

    def make(generator: torch.Generator) -> LossInputs:
        student = torch.randn(2, 3, student_classes, generator=generator)
        return LossInputs(student, torch.randn(2, 3, teacher_classes, generator=generator))

    return make


def ensemble_logit_inputs(num_teachers: int) -> Callable[[torch.Generator], LossInputs]:
    """An input maker of student logits ``[2, 3, 5]`` and a tuple of K teachers, each the same.

    For losses of several teachers (``EnsembleLogitsDistillationLoss``).

    Example:
        >>> inputs = ensemble_logit_inputs(2)(torch.Generator().manual_seed(0))
        >>> len(inputs.teachers), tuple(inputs.teachers[1].shape)
        (2, (2, 3, 5))
    """

    def make(generator: torch.Generator) -> LossInputs:
        student = torch.randn(2, 3, 5, generator=generator)
        teachers = tuple(torch.randn(2, 3, 5, generator=generator) for _ in range(num_teachers))
        return LossInputs(student, teachers)

    return make


def feature_inputs(
    *student_shape: int, teacher_shape: tuple[int, ...] | None = None
) -> Callable[[torch.Generator], LossInputs]:
    """An input maker of random float32 features (the teacher's shape defaults to the student's).

    Example:
        >>> make = feature_inputs(2, 4, teacher_shape=(2, 8))
        >>> tuple(make(torch.Generator().manual_seed(0)).teacher.shape)
        (2, 8)
    """

    def make(generator: torch.Generator) -> LossInputs:
        student = torch.randn(*student_shape, generator=generator)
        teacher = torch.randn(*(teacher_shape or student_shape), generator=generator)
        return LossInputs(student, teacher)

    return make


@dataclass(frozen=True)
class LossRecipe:
    """How the contract builds a small instance of a loss and inputs for it.

    Attributes:
        make_loss: Zero-argument callable returning a fresh loss instance (logit losses with
            their default ``"batchmean"`` reduction: the masking check compares against the
            loss over the kept positions).
        make_inputs: ``generator -> LossInputs``: small float32 inputs (logit losses:
            ``[B, T, C]`` with labels ``[B, T]`` when needed).
        kind: ``"logits"`` (also checks shift invariance and masking) or ``"features"``.
        zero_when_equal: The loss is 0 when the student input equals the teacher input (every
            teacher input, for a tuple of teachers).
        non_negative: The loss is never negative.
        random: The loss draws random numbers; the contract reseeds the global RNG before each
            call it compares.

    Example:
        >>> from kdistill import JSDLoss
        >>> recipe = LossRecipe(lambda: JSDLoss(beta=0.3), kind="logits")
        >>> recipe.kind, type(recipe.make_loss()).__name__
        ('logits', 'JSDLoss')
    """

    make_loss: Callable[[], nn.Module]
    make_inputs: Callable[[torch.Generator], LossInputs] = logit_inputs
    kind: Literal["logits", "features"] = "logits"
    zero_when_equal: bool = True
    non_negative: bool = True
    random: bool = False

    def __post_init__(self) -> None:
        if not callable(self.make_loss) or not callable(self.make_inputs):
            raise TypeError(
                f"LossRecipe `make_loss` and `make_inputs` must be callables, got "
                f"{type(self.make_loss).__name__} and {type(self.make_inputs).__name__}."
            )
        if self.kind not in ("logits", "features"):
            raise ValueError(
                f"LossRecipe `kind` must be 'logits' or 'features', got {self.kind!r}."
            )


@dataclass(frozen=True)
class BalancerRecipe:
    """How the contract builds a balancer and the loss dict it combines.

    Attributes:
        make_balancer: Zero-argument callable returning a fresh balancer.
        num_kd_losses: How many KD losses the balancer expects.
        with_student_loss: Whether the loss dict holds a ``"student_loss"``.
    """

    make_balancer: Callable[[], "DistillationLossBalancer"]
    num_kd_losses: int = 1
    with_student_loss: bool = True

    def __post_init__(self) -> None:
        if not callable(self.make_balancer):
            raise TypeError(
                f"BalancerRecipe `make_balancer` must be a callable, got "
                f"{type(self.make_balancer).__name__}."
            )


@dataclass(frozen=True)
class ContractOptOut:
    """The documented way to register a loss or balancer that the generic contract cannot test.

    Pass it as ``recipe=ContractOptOut("why")``: the contract suite then reports the name as
    skipped, with the reason, instead of failing for a missing recipe. Test such a loss with its
    own tests.

    Attributes:
        reason: Why the generic contract does not apply (shown in the skip message).
    """

    reason: str

    def __post_init__(self) -> None:
        if not isinstance(self.reason, str) or not self.reason.strip():
            raise ValueError(
                "ContractOptOut needs a `reason`: say why the generic contract cannot test it."
            )
