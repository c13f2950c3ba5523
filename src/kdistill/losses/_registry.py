"""The loss registry: every kdistill loss registers here by name, so checkpoints can name it."""

from torch import nn

from .._registry import Registry

__all__ = ["LOSSES", "get_loss", "list_losses", "register_loss"]

LOSSES: Registry[type[nn.Module]] = Registry("loss")


def register_loss(name: str, cls: type[nn.Module]) -> type[nn.Module]:
    """Register a loss class under ``name`` (duplicates raise ``ValueError``) and return it.

    A registered loss can be saved in a checkpoint: ``save`` records its name and constructor
    arguments, read back from attributes named like the ``__init__`` parameters (or from a
    ``get_config()`` method returning a JSON-able dict).

    Example:
        >>> from kdistill import LogitsDistillationLoss, get_loss
        >>> get_loss("logits_distillation") is LogitsDistillationLoss
        True
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"`cls` must be an nn.Module subclass, got {cls!r}.")
    return LOSSES.register(name, cls)


def get_loss(name: str) -> type[nn.Module]:
    """Return the loss class registered under ``name``.

    Raises:
        ValueError: ``name`` is not registered; the message lists close matches.
    """
    return LOSSES.get(name)


def list_losses() -> list[str]:
    """Names of every registered loss, sorted."""
    return LOSSES.names()
