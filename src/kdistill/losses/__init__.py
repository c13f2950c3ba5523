"""Distillation losses and the loss registry."""

from ._registry import get_loss as get_loss
from ._registry import list_losses as list_losses
from ._registry import register_loss as register_loss
from .ensemble import EnsembleLogitsDistillationLoss as EnsembleLogitsDistillationLoss
from .features import AttentionTransferLoss as AttentionTransferLoss
from .features import CosineLoss as CosineLoss
from .features import HintLoss as HintLoss
from .features import MGDLoss as MGDLoss
from .features import PKTLoss as PKTLoss
from .features import RKDLoss as RKDLoss
from .features import SimilarityPreservingLoss as SimilarityPreservingLoss
from .lm_head import LMHeadDistillationLoss as LMHeadDistillationLoss
from .logits import DKDLoss as DKDLoss
from .logits import JSDLoss as JSDLoss
from .logits import LogitsDistillationLoss as LogitsDistillationLoss
from .logits import MFTLoss as MFTLoss
from .logits import ReverseKLLoss as ReverseKLLoss
from .logits import SkewKLLoss as SkewKLLoss
from .logits import SkewReverseKLLoss as SkewReverseKLLoss
from .logits import TopKLogitsKLLoss as TopKLogitsKLLoss
from .logits import TopKTeacher as TopKTeacher
from .logits import TVDLoss as TVDLoss

__all__ = [
    "AttentionTransferLoss",
    "CosineLoss",
    "DKDLoss",
    "EnsembleLogitsDistillationLoss",
    "HintLoss",
    "JSDLoss",
    "LMHeadDistillationLoss",
    "LogitsDistillationLoss",
    "MFTLoss",
    "MGDLoss",
    "PKTLoss",
    "RKDLoss",
    "ReverseKLLoss",
    "SimilarityPreservingLoss",
    "SkewKLLoss",
    "SkewReverseKLLoss",
    "TVDLoss",
    "TopKLogitsKLLoss",
    "TopKTeacher",
    "get_loss",
    "list_losses",
    "register_loss",
]
