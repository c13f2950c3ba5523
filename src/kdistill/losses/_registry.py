"""The loss registry: every kdistill loss registers here by name, so checkpoints can name it.

Registration happens at the definition, with the loss's contract recipe beside it::

    @register_loss("jsd", recipe=LossRecipe(lambda: JSDLoss(beta=0.3)))
    class JSDLoss(LogitDivergenceLoss): ...

The call form ``register_loss("jsd", JSDLoss)`` works too.
"""

from collections.abc import Callable
from typing import TypeVar, overload

from torch import nn

from .._recipes import ContractOptOut, LossRecipe
from .._registry import Registry

__all__ = [
    "LOSSES",
    "get_loss",
    "get_loss_recipe",
    "list_losses",
    "register_loss",
    "register_loss_recipe",
]

LOSSES: Registry[type[nn.Module], LossRecipe | ContractOptOut] = Registry(
    "loss", nn.Module, (LossRecipe, ContractOptOut)
)

L = TypeVar("L", bound=type[nn.Module])


@overload
def register_loss(
    name: str, cls: None = None, *, recipe: LossRecipe | ContractOptOut | None = None
) -> Callable[[L], L]: ...
@overload
def register_loss(name: str, cls: L, *, recipe: LossRecipe | ContractOptOut | None = None) -> L: ...
def register_loss(
    name: str, cls: L | None = None, *, recipe: LossRecipe | ContractOptOut | None = None
) -> L | Callable[[L], L]:
    """Register a loss class under ``name``; as a decorator, or called with the class.

    The decorator form, used by every kdistill loss, keeps the contract recipe beside the class
    (the recipe's ``make_loss`` is a lambda: the class name is bound after the decorator runs)::

        @register_loss("l1", recipe=LossRecipe(lambda: L1Loss(), feature_inputs(2, 4), "features"))
        class L1Loss(nn.Module):
            def forward(self, student_feats, teacher_feats):
                return (student_feats - teacher_feats.detach()).abs().mean()

    A registered loss can be saved in a checkpoint: ``save`` records its name and constructor
    arguments, read back from attributes named like the ``__init__`` parameters (or from a
    ``get_config()`` method returning a JSON-able dict). The contract suite
    (``kdistill.testing.LossContract``) tests every registered loss through its ``recipe``; a
    loss registered without one fails that suite until a recipe is given (here or with
    ``kdistill.testing.register_loss_recipe``), or it opts out with ``ContractOptOut("why")``.

    Args:
        name: The name checkpoints and ``get_loss`` use; duplicates raise ``ValueError``.
        cls: The ``nn.Module`` subclass; omit it to use ``register_loss`` as a decorator.
        recipe: How the contract suite builds a small instance and inputs for it.

    Returns:
        ``cls`` (call form), or a decorator that registers and returns the class.

    Raises:
        TypeError: ``cls`` is not an ``nn.Module`` subclass, or ``recipe`` is of a wrong type.
        ValueError: ``name`` is already registered.

    Example:
        >>> from kdistill import LogitsDistillationLoss, get_loss
        >>> get_loss("logits_distillation") is LogitsDistillationLoss
        True
    """
    if cls is None:
        return LOSSES.decorator(name, recipe)
    return LOSSES.register(name, cls, recipe)


def register_loss_recipe(
    name: str, recipe: LossRecipe | ContractOptOut
) -> LossRecipe | ContractOptOut:
    """Give the contract suite a recipe for a loss registered without one; returns ``recipe``.

    Raises:
        TypeError: ``recipe`` is not a ``LossRecipe`` or ``ContractOptOut``.
        ValueError: ``name`` is not a registered loss, or already has a recipe.
    """
    return LOSSES.add_recipe(name, recipe)


def get_loss_recipe(name: str) -> LossRecipe | ContractOptOut | None:
    """The contract recipe of the loss registered under ``name`` (``None`` when it has none).

    Raises:
        ValueError: ``name`` is not a registered loss.
    """
    return LOSSES.recipe(name)


def get_loss(name: str) -> type[nn.Module]:
    """Return the loss class registered under ``name``.

    Raises:
        ValueError: ``name`` is not registered; the message lists close matches.
    """
    return LOSSES.get(name)


def list_losses() -> list[str]:
    """Names of every registered loss, sorted."""
    return LOSSES.names()
