"""On-policy distillation of causal LMs: the student samples, the teacher grades every token.

Torch only (no ``transformers`` import); works with Hugging Face models through their
``generate`` and with any causal LM that returns logits. The pieces:

- ``sample_completions`` / ``SamplingConfig``: completions for a batch of prompts (temperature,
  top-k, top-p, EOS and padding, eval mode while sampling, a ``torch.Generator``);
- ``Completions``: prompt + completion ids, attention mask and completion mask;
- ``completion_kd_loss``: the teacher scores prompt + completion once under ``no_grad`` and an
  ``LMHeadDistillationLoss`` is taken over the completion tokens only, chunked through the
  lm_heads (``skip_lm_head``), so no ``[B, T, V]`` logits are built;
- ``OnPolicyDistiller``: GKD's mixing of on-policy (probability ``lmbda``), dataset and
  teacher-generated (``seq_kd``) completions, one call per training step (``choose_source``
  and ``gkd_completions`` are its two halves);
- ``PromptCollator``: TRL-style rows (``"prompt"``, optional ``"completion"``; text or chat
  messages) to left-padded prompt tensors.

``kdistill.hf.OnPolicyKDTrainer`` is the ``transformers.Trainer`` built on these.
"""

from ._model_utils import find_lm_head as find_lm_head
from ._model_utils import skip_lm_head as skip_lm_head
from .completions import Completions as Completions
from .completions import pack_tokens as pack_tokens
from .data import PromptCollator as PromptCollator
from .distiller import CompletionSource as CompletionSource
from .distiller import OnPolicyDistiller as OnPolicyDistiller
from .distiller import OnPolicyStep as OnPolicyStep
from .distiller import choose_source as choose_source
from .distiller import gkd_completions as gkd_completions
from .sampling import SamplingConfig as SamplingConfig
from .sampling import filter_logits as filter_logits
from .sampling import sample_completions as sample_completions
from .scoring import completion_kd_loss as completion_kd_loss

__all__ = [
    "CompletionSource",
    "Completions",
    "OnPolicyDistiller",
    "OnPolicyStep",
    "PromptCollator",
    "SamplingConfig",
    "choose_source",
    "completion_kd_loss",
    "filter_logits",
    "find_lm_head",
    "gkd_completions",
    "pack_tokens",
    "sample_completions",
    "skip_lm_head",
]
