"""Loss balancers: reduce the dict of KD losses (and the student's own loss) to one scalar.

The interface follows ModelOpt 0.47 ``modelopt/torch/distill/loss_balancers.py``. Balancers hold
no parameters, so a checkpoint records them by registered name and constructor arguments.
"""

import abc
from collections.abc import Callable, Sequence

from torch import Tensor, nn

from ._registry import Registry

__all__ = [
    "STUDENT_LOSS_KEY",
    "DistillationLossBalancer",
    "StaticLossBalancer",
    "get_balancer",
    "list_balancers",
    "register_balancer",
]

STUDENT_LOSS_KEY = "student_loss"

BALANCERS: Registry[type[nn.Module]] = Registry("loss balancer")


def register_balancer(name: str, cls: type["DistillationLossBalancer"]) -> type:
    """Register a balancer class under ``name`` (duplicates raise ``ValueError``) and return it."""
    if not (isinstance(cls, type) and issubclass(cls, DistillationLossBalancer)):
        raise TypeError(f"`cls` must subclass DistillationLossBalancer, got {cls!r}.")
    return BALANCERS.register(name, cls)


def get_balancer(name: str) -> type["DistillationLossBalancer"]:
    """Return the balancer class registered under ``name``."""
    return BALANCERS.get(name)  # type: ignore[return-value]


def list_balancers() -> list[str]:
    """Names of every registered balancer, sorted."""
    return BALANCERS.names()


class DistillationLossBalancer(nn.Module, abc.ABC):
    """Interface of loss balancers: ``forward(loss_dict) -> Tensor``.

    ``loss_dict`` maps ``f"{LossClass}_{i}"`` to each KD loss and ``"student_loss"`` to the
    student's own loss when one was given. Subclasses may not hold parameters.
    """

    def __init__(self) -> None:
        super().__init__()
        self._student_loss_reduction_fn: Callable[[Tensor], Tensor] | None = None

    def set_student_loss_reduction_fn(self, fn: Callable[[Tensor], Tensor] | None) -> None:
        """Set a function applied to the student loss before balancing (e.g. a masked mean)."""
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
        weights = (
            [kd_loss_weight] if isinstance(kd_loss_weight, int | float) else list(kd_loss_weight)
        )
        if not weights or not all(
            isinstance(w, int | float) and not isinstance(w, bool) for w in weights
        ):
            raise TypeError(
                f"`kd_loss_weight` must be a number or a non-empty list of numbers, "
                f"got {kd_loss_weight!r}."
            )
        if any(w < 0 for w in weights):
            raise ValueError(f"`kd_loss_weight` must be non-negative, got {kd_loss_weight!r}.")
        if sum(weights) > 1 + 1e-9:
            raise ValueError(
                f"`kd_loss_weight` must sum to at most 1 (the rest weighs the student loss), "
                f"got {kd_loss_weight!r} summing to {sum(weights)}."
            )
        self.kd_loss_weight = (
            kd_loss_weight
            if isinstance(kd_loss_weight, int | float)
            else [float(w) for w in weights]
        )
        self._weights = [float(w) for w in weights]
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
                f"StaticLossBalancer has {len(self._weights)} weight(s) but got "
                f"{len(kd_losses)} KD loss(es): {list(kd_losses)}."
            )
        total = sum(w * loss for w, loss in zip(self._weights, kd_losses.values(), strict=True))
        if self._student_weight > 0:
            if student_loss is None:
                raise ValueError(
                    f"StaticLossBalancer gives the student loss weight {self._student_weight:g} "
                    "(1 − sum of kd_loss_weight), but no `student_loss` was passed to "
                    "`compute_kd_loss`. Pass `student_loss=...` or make the weights sum to 1."
                )
            total = total + self._student_weight * student_loss
        return total  # type: ignore[return-value]


register_balancer("static", StaticLossBalancer)
