"""Distillation losses and the loss registry."""

from ._logit_loss import LogitDivergenceLoss as LogitDivergenceLoss
from ._registry import get_loss as get_loss
from ._registry import get_loss_recipe as get_loss_recipe
from ._registry import list_losses as list_losses
from ._registry import register_loss as register_loss
from ._registry import register_loss_recipe as register_loss_recipe
from .cross_tokenizer import HybridULDLoss as HybridULDLoss
from .cross_tokenizer import ULDLoss as ULDLoss
from .dkd import DKDLoss as DKDLoss
from .ensemble import EnsembleLogitsDistillationLoss as EnsembleLogitsDistillationLoss
from .features import AttentionTransferLoss as AttentionTransferLoss
from .features import CosineLoss as CosineLoss
from .features import HintLoss as HintLoss
from .features import MGDLoss as MGDLoss
from .features import PKTLoss as PKTLoss
from .features import RKDLoss as RKDLoss
from .features import SimilarityPreservingLoss as SimilarityPreservingLoss
from .lm_head import LMHeadDistillationLoss as LMHeadDistillationLoss
from .lm_head_cross_tokenizer import LMHeadCrossTokenizerLoss as LMHeadCrossTokenizerLoss
from .logits import JSDLoss as JSDLoss
from .logits import LogitsDistillationLoss as LogitsDistillationLoss
from .logits import ReverseKLLoss as ReverseKLLoss
from .logits import SkewKLLoss as SkewKLLoss
from .logits import SkewReverseKLLoss as SkewReverseKLLoss
from .logits import TVDLoss as TVDLoss
from .mft import MFTLoss as MFTLoss
from .topk import TopKLogitsKLLoss as TopKLogitsKLLoss
from .topk import TopKTeacher as TopKTeacher

__all__ = [
    "AttentionTransferLoss",
    "CosineLoss",
    "DKDLoss",
    "EnsembleLogitsDistillationLoss",
    "HintLoss",
    "HybridULDLoss",
    "JSDLoss",
    "LMHeadCrossTokenizerLoss",
    "LMHeadDistillationLoss",
    "LogitDivergenceLoss",
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
    "ULDLoss",
    "get_loss",
    "get_loss_recipe",
    "list_losses",
    "register_loss",
    "register_loss_recipe",
]
