"""Distillation losses and the loss registry."""

from ._registry import get_loss as get_loss
from ._registry import list_losses as list_losses
from ._registry import register_loss as register_loss
from .features import MGDLoss as MGDLoss
from .logits import LogitsDistillationLoss as LogitsDistillationLoss
from .logits import MFTLoss as MFTLoss

__all__ = [
    "LogitsDistillationLoss",
    "MFTLoss",
    "MGDLoss",
    "get_loss",
    "list_losses",
    "register_loss",
]
