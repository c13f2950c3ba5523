"""Loss balancers: reduce the dict of KD losses (and the student's own loss) to one scalar.

The interface follows ModelOpt 0.47 ``modelopt/torch/distill/loss_balancers.py``. Balancers hold
no parameters, so a checkpoint records them by registered name and constructor arguments (a
``ScheduledLossBalancer`` records its current step that way too).

- ``DynamicLossBalancer``: detached magnitude matching, after Megatron-LM / ModelOpt's
  ``LogitsAndIntermediatesLossBalancer`` (Apache-2.0), generalised to any reference term.
- ``ScheduledLossBalancer``: ``StaticLossBalancer`` weights times a warm-up / cosine schedule.
"""

import abc
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar, cast, overload

from torch import Tensor, nn

from ._recipes import BalancerRecipe, ContractOptOut
from ._registry import Registry
from ._validation import (
    MAX_SCALE,
    check_choice,
    check_float_list,
    check_int,
    check_non_negative,
    check_positive,
    check_unit_interval,
)

__all__ = [
    "STUDENT_LOSS_KEY",
    "DistillationLossBalancer",
    "DynamicLossBalancer",
    "ScheduledLossBalancer",
    "StaticLossBalancer",
    "get_balancer",
    "get_balancer_recipe",
    "list_balancers",
    "register_balancer",
    "register_balancer_recipe",
    "sum_losses",
]

STUDENT_LOSS_KEY = "student_loss"

B = TypeVar("B", bound=type["DistillationLossBalancer"])


@overload
def register_balancer(
    name: str, cls: None = None, *, recipe: BalancerRecipe | ContractOptOut | None = None
) -> Callable[[B], B]: ...
@overload
def register_balancer(
    name: str, cls: B, *, recipe: BalancerRecipe | ContractOptOut | None = None
) -> B: ...
def register_balancer(
    name: str, cls: B | None = None, *, recipe: BalancerRecipe | ContractOptOut | None = None
) -> B | Callable[[B], B]:
    """Register a balancer class under ``name``; as a decorator, or called with the class.

    Like ``register_loss``: duplicates raise ``ValueError``, and ``recipe`` tells the contract
    suite (``kdistill.testing.BalancerContract``) how to build one (a balancer without a recipe
    fails that suite unless it opts out with ``ContractOptOut("why")``).

    Args:
        name: The name checkpoints and ``get_balancer`` use.
        cls: A ``DistillationLossBalancer`` subclass; omit it to use this as a decorator.
        recipe: How the contract suite builds the balancer and the loss dict it combines.

    Returns:
        ``cls``, or a decorator that registers and returns the class.

    Example:
        >>> get_balancer("static") is StaticLossBalancer
        True
    """
    if cls is None:
        return BALANCERS.decorator(name, recipe)
    return BALANCERS.register(name, cls, recipe)


def register_balancer_recipe(
    name: str, recipe: BalancerRecipe | ContractOptOut
) -> BalancerRecipe | ContractOptOut:
    """Give the contract suite a recipe for a balancer registered without one; returns it.

    Raises:
        TypeError: ``recipe`` is not a ``BalancerRecipe`` or ``ContractOptOut``.
        ValueError: ``name`` is not a registered balancer, or already has a recipe.
    """
    return BALANCERS.add_recipe(name, recipe)


def get_balancer_recipe(name: str) -> BalancerRecipe | ContractOptOut | None:
    """The contract recipe of the balancer registered under ``name`` (``None`` when none).

    Raises:
        ValueError: ``name`` is not a registered balancer.
    """
    return BALANCERS.recipe(name)


def get_balancer(name: str) -> type["DistillationLossBalancer"]:
    """Return the balancer class registered under ``name``."""
    return BALANCERS.get(name)


def list_balancers() -> list[str]:
    """Names of every registered balancer, sorted."""
    return BALANCERS.names()


def sum_losses(losses: Iterable[Tensor]) -> Tensor:
    """``l₀ + l₁ + … + lₙ₋₁``: the sum of loss terms, added in order from the first.

    Python's ``sum`` starts from the int ``0``, which adds an op and a backward node per step;
    this starts from the first term, so one term comes back as it is.

    Raises:
        ValueError: ``losses`` is empty.
    """
    iterator = iter(losses)
    try:
        total = next(iterator)
    except StopIteration:
        raise ValueError("sum_losses() got no loss term to add.") from None
    for loss in iterator:
        total = total + loss
    return total


class DistillationLossBalancer(nn.Module, abc.ABC):
    """Interface of loss balancers: ``forward(loss_dict) -> Tensor``.

    ``loss_dict`` maps ``f"{LossClass}_{i}"`` to each KD loss and ``"student_loss"`` to the
    student's own loss when one was given. Subclasses may not hold parameters.
    """

    def __init__(self) -> None:
        super().__init__()
        self._student_loss_reduction_fn: Callable[[Tensor], Tensor] | None = None

    def set_student_loss_reduction_fn(self, fn: Callable[[Tensor], Tensor] | None) -> None:
        """Set a function applied to the student loss before balancing (e.g. a masked mean).

        Raises:
            TypeError: ``fn`` is neither callable nor None.
        """
        if fn is not None and not callable(fn):
            raise TypeError(f"`fn` must be a callable or None, got {type(fn).__name__}.")
        self._student_loss_reduction_fn = fn

    def _pop_student_loss(self, loss_dict: dict[str, Tensor]) -> tuple[Tensor | None, dict]:
        """Split ``loss_dict`` into the (reduced) student loss and the KD losses."""
        kd_losses = {k: v for k, v in loss_dict.items() if k != STUDENT_LOSS_KEY}
        student_loss = loss_dict.get(STUDENT_LOSS_KEY)
        if student_loss is not None and self._student_loss_reduction_fn is not None:
            student_loss = self._student_loss_reduction_fn(student_loss)
        return student_loss, kd_losses

    @abc.abstractmethod
    def forward(self, loss_dict: dict[str, Tensor]) -> Tensor:
        """Combine ``loss_dict`` into the total loss."""


BALANCERS: Registry[type[DistillationLossBalancer], BalancerRecipe | ContractOptOut] = Registry(
    "loss balancer", DistillationLossBalancer, (BalancerRecipe, ContractOptOut)
)


def _check_weights(name: str, value: Any, max_value: float) -> float | list[float]:
    """One number or a non-empty list of numbers, each finite and in ``[0, max_value]``.

    Returns a float for a number and a list of floats for a list (bools are refused).
    """
    if isinstance(value, numbers.Real):  # bools too: the shared check refuses them
        return check_non_negative(name, value, max_value=max_value)
    return check_float_list(name, value, non_negative=True, max_abs=max_value)


@register_balancer("static", recipe=BalancerRecipe(lambda: StaticLossBalancer()))
class StaticLossBalancer(DistillationLossBalancer):
    """Fixed weights: ``total = Σ wᵢ·kdᵢ + (1 − Σw)·student_loss``.

    Args:
        kd_loss_weight: One weight for a single KD loss, or one weight per KD loss in criterion
            order. Weights are ≥ 0 and sum to at most 1; the remainder weighs the student loss.

    Raises:
        ValueError: A negative weight, a sum above 1, or (at compute time) a remainder above 0
            with no ``student_loss`` given.

    Example:
        >>> import torch
        >>> balancer = StaticLossBalancer(kd_loss_weight=0.25)
        >>> losses = {"student_loss": torch.tensor(4.0), "KDLoss_0": torch.tensor(8.0)}
        >>> float(balancer(losses))
        5.0
    """

    def __init__(self, kd_loss_weight: float | Sequence[float] = 0.5) -> None:
        super().__init__()
        checked = _check_weights("kd_loss_weight", kd_loss_weight, max_value=1.0)
        weights = checked if isinstance(checked, list) else [checked]
        if sum(weights) > 1 + 1e-9:
            raise ValueError(
                f"`kd_loss_weight` must sum to at most 1 (the rest weighs the student loss), "
                f"got {kd_loss_weight!r} summing to {sum(weights)}."
            )
        self.kd_loss_weight = checked
        self._weights = weights
        self._student_weight = max(0.0, 1.0 - sum(self._weights))

    @property
    def num_weights(self) -> int:
        """How many KD losses this balancer expects."""
        return len(self._weights)

    def forward(self, loss_dict: dict[str, Tensor]) -> Tensor:
        """Return ``Σ wᵢ·kdᵢ + (1 − Σw)·student_loss`` for the losses in ``loss_dict``."""
        student_loss, kd_losses = self._pop_student_loss(loss_dict)
        if len(kd_losses) != len(self._weights):
            raise ValueError(
                f"{type(self).__name__} has {len(self._weights)} weight(s) but got "
                f"{len(kd_losses)} KD loss(es): {list(kd_losses)}."
            )
        weights, student_weight = self._current_weights()
        total = sum_losses([w * loss for w, loss in zip(weights, kd_losses.values(), strict=True)])
        if student_weight > 0:
            if student_loss is None:
                raise ValueError(
                    f"{type(self).__name__} gives the student loss weight {student_weight:g} "
                    "(1 − sum of kd_loss_weight), but no `student_loss` was passed to "
                    "`compute_kd_loss`. Pass `student_loss=...` or make the weights sum to 1."
                )
            total = total + student_weight * student_loss
        return total

    def _current_weights(self) -> tuple[list[float], float]:
        """The KD weights and the student loss weight used by the next ``forward``."""
        return self._weights, self._student_weight


@register_balancer(
    "dynamic",
    recipe=BalancerRecipe(lambda: DynamicLossBalancer(kd_loss_weight=[0.5, 2.0]), num_kd_losses=2),
)
class DynamicLossBalancer(DistillationLossBalancer):
    """Rescale every loss term to the magnitude of a reference term, then apply fixed weights.

    ``total = Σᵢ wᵢ · rᵢ · kdᵢ + w_s · r_s · student_loss`` with the detached ratio
    ``r = |reference| / |term|`` (1 for the reference itself; the ratio carries no gradient, so
    each term keeps its own gradient direction, only its scale changes). With the default
    ``reference="student_loss"`` every KD term is brought to the student loss's magnitude, so the
    weights say how much each term matters whatever its natural scale (a KL in nats next to an
    MSE of hidden states). ``reference=i`` uses the i-th KD loss (criterion order) instead, like
    Megatron's logits-and-intermediates balancer, which scales intermediate losses to the logit
    loss. Terms are expected to be scalars.

    Args:
        kd_loss_weight: One weight for every KD loss, or one weight per KD loss in criterion order.
        student_loss_weight: Weight of the student loss; 0 means it is ignored (and may be
            omitted), as is needed when there is none.
        reference: ``"student_loss"`` or the index of the KD loss that sets the magnitude.
        eps: Floor of ``|term|`` in the ratio, so a zero term stays zero instead of dividing by 0.

    Raises:
        ValueError: Negative weights, an unknown reference, or (at compute time) a missing
            student loss it needs or a weight count that does not match the KD losses.

    Example:
        >>> import torch
        >>> balancer = DynamicLossBalancer(kd_loss_weight=0.5)
        >>> losses = {"student_loss": torch.tensor(2.0), "KDLoss_0": torch.tensor(40.0)}
        >>> float(balancer(losses))  # 0.5 · 40 · (2 / 40) + 1 · 2
        3.0
    """

    def __init__(
        self,
        kd_loss_weight: float | Sequence[float] = 1.0,
        student_loss_weight: float = 1.0,
        reference: str | int = STUDENT_LOSS_KEY,
        eps: float = 1e-12,
    ) -> None:
        super().__init__()
        self.kd_loss_weight = _check_weights("kd_loss_weight", kd_loss_weight, MAX_SCALE)
        self.student_loss_weight = check_non_negative(
            "student_loss_weight", student_loss_weight, max_value=MAX_SCALE
        )
        if reference != STUDENT_LOSS_KEY and (
            isinstance(reference, bool)
            or not isinstance(reference, numbers.Integral)
            or reference < 0
        ):
            raise ValueError(
                f"`reference` must be {STUDENT_LOSS_KEY!r} or the index (int >= 0) of a KD loss in "
                f"criterion order, got {reference!r}."
            )
        self.reference = reference if reference == STUDENT_LOSS_KEY else int(reference)
        self.eps = check_positive("eps", eps, max_value=1.0)

    @property
    def num_weights(self) -> int | None:
        """How many KD losses this balancer expects (``None``: one weight shared by all)."""
        return None if isinstance(self.kd_loss_weight, float) else len(self.kd_loss_weight)

    def forward(self, loss_dict: dict[str, Tensor]) -> Tensor:
        """Return the weighted sum of the magnitude-matched terms of ``loss_dict``."""
        student_loss, kd_losses = self._pop_student_loss(loss_dict)
        kd_values = list(kd_losses.values())
        if not kd_values:
            raise ValueError("DynamicLossBalancer got no KD loss to balance.")
        if isinstance(self.kd_loss_weight, float):
            weights = [self.kd_loss_weight] * len(kd_values)
        elif len(self.kd_loss_weight) != len(kd_values):
            raise ValueError(
                f"DynamicLossBalancer has {len(self.kd_loss_weight)} weight(s) but got "
                f"{len(kd_values)} KD loss(es): {list(kd_losses)}."
            )
        else:
            weights = self.kd_loss_weight
        needs_student = self.reference == STUDENT_LOSS_KEY or self.student_loss_weight > 0
        if needs_student and student_loss is None:
            raise ValueError(
                "DynamicLossBalancer needs the student loss (as reference or with "
                f"student_loss_weight={self.student_loss_weight:g}), but none was passed to "
                "`compute_kd_loss`. Pass `student_loss=...`, or use `reference=0` with "
                "`student_loss_weight=0`."
            )
        if isinstance(self.reference, str):  # STUDENT_LOSS_KEY: given, checked just above
            reference = cast(Tensor, student_loss)
        elif self.reference < len(kd_values):
            reference = kd_values[self.reference]
        else:
            raise ValueError(
                f"DynamicLossBalancer `reference`={self.reference} but there are only "
                f"{len(kd_values)} KD loss(es): {list(kd_losses)}."
            )
        magnitude = reference.detach().abs()

        def matched(term: Tensor) -> Tensor:
            if term is reference:
                return term
            return term * (magnitude / term.detach().abs().clamp(min=self.eps))

        total = sum_losses(w * matched(loss) for w, loss in zip(weights, kd_values, strict=True))
        if self.student_loss_weight > 0:  # then the student loss was given (checked above)
            total = total + self.student_loss_weight * matched(cast(Tensor, student_loss))
        return total


_SCHEDULES = ("constant", "linear_warmup", "cosine")


@register_balancer(
    "scheduled",
    recipe=BalancerRecipe(
        lambda: ScheduledLossBalancer(
            [0.3, 0.2], schedule="cosine", warmup_steps=2, total_steps=10, start_factor=0.1
        ),
        num_kd_losses=2,
    ),
)
class ScheduledLossBalancer(StaticLossBalancer):
    """``StaticLossBalancer`` whose KD weights follow a schedule over training steps.

    At step t the KD weights are ``f(t)·wᵢ`` and the student loss gets ``1 − f(t)·Σw``:
    ``total = Σ f(t)·wᵢ·kdᵢ + (1 − f(t)·Σw)·student_loss``. The factor f is

    - ``"constant"``: 1 (then this is ``StaticLossBalancer``);
    - ``"linear_warmup"``: ``start_factor + (1 − start_factor)·t / warmup_steps`` for
      t < ``warmup_steps``, then 1 (e.g. DKD's warm-up);
    - ``"cosine"``: the same warm-up, then ``final_factor + (1 − final_factor)·(1 + cos(π·u))/2``
      with ``u = (t − warmup_steps) / (total_steps − warmup_steps)`` clipped to [0, 1], i.e. KD
      annealed away towards the end of training.

    Call ``step()`` once per optimizer step. The current step is a constructor argument, so
    ``kdistill.save`` / ``restore`` resume the schedule where it stopped.

    Args:
        kd_loss_weight: Peak weight(s), as in ``StaticLossBalancer`` (sum at most 1).
        schedule: ``"constant"``, ``"linear_warmup"`` or ``"cosine"``.
        warmup_steps: Steps of linear warm-up (``"linear_warmup"`` / ``"cosine"``).
        total_steps: Last step of the cosine decay (required for ``"cosine"``).
        start_factor: f at step 0 of the warm-up, in [0, 1].
        final_factor: f at the end of the cosine decay, in [0, 1].
        current_step: Step to start from (restored checkpoints pass it back).

    Example:
        >>> import torch
        >>> balancer = ScheduledLossBalancer(0.5, schedule="linear_warmup", warmup_steps=4)
        >>> losses = {"student_loss": torch.tensor(1.0), "KDLoss_0": torch.tensor(3.0)}
        >>> float(balancer(losses))  # f = 0: only the student loss
        1.0
        >>> for _ in range(2):
        ...     balancer.step()
        >>> float(balancer(losses))  # f = 0.5: weights 0.25 and 0.75
        1.5
    """

    def __init__(
        self,
        kd_loss_weight: float | Sequence[float] = 0.5,
        schedule: str = "linear_warmup",
        warmup_steps: int = 0,
        total_steps: int | None = None,
        start_factor: float = 0.0,
        final_factor: float = 0.0,
        current_step: int = 0,
    ) -> None:
        super().__init__(kd_loss_weight)
        schedule = check_choice("schedule", schedule, _SCHEDULES)
        warmup_steps = check_int("warmup_steps", warmup_steps, min_value=0)
        current_step = check_int("current_step", current_step, min_value=0)
        start_factor = check_unit_interval("start_factor", start_factor)
        final_factor = check_unit_interval("final_factor", final_factor)
        if total_steps is not None:
            total_steps = check_int("total_steps", total_steps, min_value=1)
        if schedule == "cosine" and (total_steps is None or total_steps <= warmup_steps):
            raise ValueError(
                f"schedule='cosine' needs `total_steps` (an int > warmup_steps={warmup_steps}), "
                f"got {total_steps!r}."
            )
        if schedule == "constant" and warmup_steps:
            raise ValueError(
                f"schedule='constant' has no warm-up, got warmup_steps={warmup_steps}: use "
                "schedule='linear_warmup'."
            )
        self.schedule = schedule
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.start_factor = start_factor
        self.final_factor = final_factor
        self.current_step = current_step

    def get_config(self) -> dict:
        """Constructor arguments as JSON values, including the current step."""
        return {
            "kd_loss_weight": self.kd_loss_weight,
            "schedule": self.schedule,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "start_factor": self.start_factor,
            "final_factor": self.final_factor,
            "current_step": self.current_step,
        }

    def step(self) -> None:
        """Advance the schedule by one step (call once per optimizer step)."""
        self.current_step += 1

    @property
    def factor(self) -> float:
        """The schedule's factor f(current_step), in [0, 1]."""
        t = self.current_step
        if self.schedule == "constant":
            return 1.0
        if t < self.warmup_steps:
            return self.start_factor + (1 - self.start_factor) * t / self.warmup_steps
        if self.schedule == "linear_warmup":
            return 1.0
        assert self.total_steps is not None, "validated in __init__"
        progress = min((t - self.warmup_steps) / (self.total_steps - self.warmup_steps), 1.0)
        return self.final_factor + (1 - self.final_factor) * (1 + math.cos(math.pi * progress)) / 2

    def _current_weights(self) -> tuple[list[float], float]:
        factor = self.factor
        weights = [factor * w for w in self._weights]
        return weights, max(0.0, 1.0 - sum(weights))
