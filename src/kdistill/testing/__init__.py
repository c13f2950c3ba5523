"""Helpers for testing kdistill and code built on it: tiny models and contract suites."""

from .contracts import BalancerContract as BalancerContract
from .contracts import BalancerRecipe as BalancerRecipe
from .contracts import ContractOptOut as ContractOptOut
from .contracts import LossContract as LossContract
from .contracts import LossInputs as LossInputs
from .contracts import LossRecipe as LossRecipe
from .contracts import balancer_recipe as balancer_recipe
from .contracts import cross_vocab_logit_inputs as cross_vocab_logit_inputs
from .contracts import ensemble_logit_inputs as ensemble_logit_inputs
from .contracts import feature_inputs as feature_inputs
from .contracts import labelled_logit_inputs as labelled_logit_inputs
from .contracts import logit_inputs as logit_inputs
from .contracts import loss_recipe as loss_recipe
from .contracts import register_balancer_recipe as register_balancer_recipe
from .contracts import register_loss_recipe as register_loss_recipe
from .models import TinyCNN as TinyCNN
from .models import TinyMLP as TinyMLP
from .models import tiny_cnn as tiny_cnn
from .models import tiny_mlp as tiny_mlp

__all__ = [
    "BalancerContract",
    "BalancerRecipe",
    "ContractOptOut",
    "LossContract",
    "LossInputs",
    "LossRecipe",
    "TinyCNN",
    "TinyMLP",
    "balancer_recipe",
    "cross_vocab_logit_inputs",
    "ensemble_logit_inputs",
    "feature_inputs",
    "labelled_logit_inputs",
    "logit_inputs",
    "loss_recipe",
    "register_balancer_recipe",
    "register_loss_recipe",
    "tiny_cnn",
    "tiny_mlp",
]
