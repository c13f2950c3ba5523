"""kdistill: knowledge distillation for PyTorch, with the API of ModelOpt's ``distill``.

``import kdistill as mtd`` (and ``import kdistill as mto`` for save/restore) runs code written
for ``modelopt.torch.distill`` / ``modelopt.torch.opt``.
"""

from ._serialization import add_safe_factories as add_safe_factories
from ._serialization import clear_safe_factories as clear_safe_factories
from ._serialization import get_safe_factories as get_safe_factories
from ._serialization import safe_factory as safe_factory
from ._version import __version__ as __version__
from .balancers import DistillationLossBalancer as DistillationLossBalancer
from .balancers import DynamicLossBalancer as DynamicLossBalancer
from .balancers import ScheduledLossBalancer as ScheduledLossBalancer
from .balancers import StaticLossBalancer as StaticLossBalancer
from .balancers import get_balancer as get_balancer
from .balancers import list_balancers as list_balancers
from .balancers import register_balancer as register_balancer
from .cache import CachedTeacher as CachedTeacher
from .cache import TeacherCache as TeacherCache
from .checkpoint import ModeloptStateManager as ModeloptStateManager
from .checkpoint import mode_state as mode_state
from .checkpoint import restore as restore
from .checkpoint import restore_from_mode_state as restore_from_mode_state
from .checkpoint import save as save
from .config import ExportStudentConfig as ExportStudentConfig
from .config import KDLossConfig as KDLossConfig
from .config import LayerwiseKDConfig as LayerwiseKDConfig
from .conversion import convert as convert
from .conversion import export as export
from .losses import AttentionTransferLoss as AttentionTransferLoss
from .losses import CosineLoss as CosineLoss
from .losses import DKDLoss as DKDLoss
from .losses import EnsembleLogitsDistillationLoss as EnsembleLogitsDistillationLoss
from .losses import HintLoss as HintLoss
from .losses import HybridULDLoss as HybridULDLoss
from .losses import JSDLoss as JSDLoss
from .losses import LMHeadCrossTokenizerLoss as LMHeadCrossTokenizerLoss
from .losses import LMHeadDistillationLoss as LMHeadDistillationLoss
from .losses import LogitsDistillationLoss as LogitsDistillationLoss
from .losses import MFTLoss as MFTLoss
from .losses import MGDLoss as MGDLoss
from .losses import PKTLoss as PKTLoss
from .losses import ReverseKLLoss as ReverseKLLoss
from .losses import RKDLoss as RKDLoss
from .losses import SimilarityPreservingLoss as SimilarityPreservingLoss
from .losses import SkewKLLoss as SkewKLLoss
from .losses import SkewReverseKLLoss as SkewReverseKLLoss
from .losses import TopKLogitsKLLoss as TopKLogitsKLLoss
from .losses import TopKTeacher as TopKTeacher
from .losses import TVDLoss as TVDLoss
from .losses import ULDLoss as ULDLoss
from .losses import get_loss as get_loss
from .losses import list_losses as list_losses
from .losses import register_loss as register_loss
from .model import DistillationModel as DistillationModel
from .modes import list_modes as list_modes
from .teachers import TeacherDict as TeacherDict

# ModelOpt's names for the mode state (``modelopt.torch.opt``), kept for migrating users.
modelopt_state = mode_state
restore_from_modelopt_state = restore_from_mode_state

__all__ = [
    "AttentionTransferLoss",
    "CachedTeacher",
    "CosineLoss",
    "DKDLoss",
    "DistillationLossBalancer",
    "DistillationModel",
    "DynamicLossBalancer",
    "EnsembleLogitsDistillationLoss",
    "ExportStudentConfig",
    "HintLoss",
    "HybridULDLoss",
    "JSDLoss",
    "KDLossConfig",
    "LMHeadCrossTokenizerLoss",
    "LMHeadDistillationLoss",
    "LayerwiseKDConfig",
    "LogitsDistillationLoss",
    "MFTLoss",
    "MGDLoss",
    "ModeloptStateManager",
    "PKTLoss",
    "RKDLoss",
    "ReverseKLLoss",
    "ScheduledLossBalancer",
    "SimilarityPreservingLoss",
    "SkewKLLoss",
    "SkewReverseKLLoss",
    "StaticLossBalancer",
    "TVDLoss",
    "TeacherCache",
    "TeacherDict",
    "TopKLogitsKLLoss",
    "TopKTeacher",
    "ULDLoss",
    "__version__",
    "add_safe_factories",
    "clear_safe_factories",
    "convert",
    "export",
    "get_balancer",
    "get_loss",
    "get_safe_factories",
    "list_balancers",
    "list_losses",
    "list_modes",
    "mode_state",
    "modelopt_state",
    "register_balancer",
    "register_loss",
    "restore",
    "restore_from_mode_state",
    "restore_from_modelopt_state",
    "safe_factory",
    "save",
]
