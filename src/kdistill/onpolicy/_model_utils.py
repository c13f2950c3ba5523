"""Small model utilities of the on-policy core: eval mode, forward signatures, lm_head skipping.

``skip_lm_head`` is how the scoring gets final hidden states ``[B, T, D]`` instead of logits
``[B, T, V]`` from an unmodified causal LM: for the duration of one forward its lm_head is swapped
for a pass-through stand-in that holds the same parameters (so ``parameters()``, DDP's
bookkeeping and weight tying are unchanged), and the original module is put back on exit, also
on an exception. Outside the context the model is exactly as the user built it (``generate``
works), unlike ``kdistill.llm.convert_causal_lm``, which keeps the heads skipped while the model
is converted.
"""

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn

__all__ = [
    "LOGIT_TRANSFORM_ATTRIBUTES",
    "eval_mode",
    "find_lm_head",
    "forward_parameters",
    "lm_head_name_of",
    "skip_lm_head",
    "takes",
]

# Hugging Face config attributes of models that transform the lm_head's output before the
# softmax (Gemma-2 softcapping, Cohere / Granite / Falcon-H1 / MiniCPM scaling): skipping the
# lm_head would skip the transform too, so such models take the full-logits path.
LOGIT_TRANSFORM_ATTRIBUTES: tuple[str, ...] = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "lm_head_multiplier",
    "output_multiplier",
)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Within the context ``model`` is in eval mode; each submodule's own mode is restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def forward_parameters(model: nn.Module) -> frozenset[str] | None:
    """Names ``model.forward`` takes by keyword; None when it takes ``**kwargs`` (anything)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return frozenset()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def takes(params: frozenset[str] | None, name: str) -> bool:
    """Whether a forward with keyword names ``params`` (``forward_parameters``) takes ``name``."""
    return params is None or name in params


def _logit_transform(model: nn.Module) -> str | None:
    """``"attr=value"`` for a config that transforms the logits after the lm_head, else None."""
    config = getattr(model, "config", None)
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        config = get_text_config()
    for attr in LOGIT_TRANSFORM_ATTRIBUTES:
        value = getattr(config, attr, None)
        if value is not None and not (attr != "final_logit_softcapping" and value == 1):
            return f"{attr}={value!r}"
    return None


def find_lm_head(model: nn.Module, lm_head_name: str = "lm_head") -> tuple[nn.Module | None, str]:
    """The model's output projection when the chunked (hidden-state) path can use it.

    Usable means: a submodule ``lm_head_name`` whose state is only a 2-D ``weight`` ``[V, D]`` and
    optionally a ``bias`` ``[V]`` (an ``nn.Linear``, tied to the embedding or not), and no
    logit transform after it in the model's config (``LOGIT_TRANSFORM_ATTRIBUTES``).

    Args:
        model: The causal LM.
        lm_head_name: Dotted name of the output projection.

    Returns:
        ``(head, "")`` when usable, else ``(None, reason)`` with a reason fit for a log line.
    """
    try:
        head = model.get_submodule(lm_head_name)
    except AttributeError:
        return None, f"{type(model).__name__} has no submodule {lm_head_name!r}"
    weight = getattr(head, "weight", None)
    bias = getattr(head, "bias", None)
    keys = set(head.state_dict())
    if (
        not isinstance(weight, Tensor)
        or weight.ndim != 2
        or not keys <= {"weight", "bias"}
        or (bias is not None and (not isinstance(bias, Tensor) or bias.shape != weight.shape[:1]))
    ):
        return None, (
            f"{type(model).__name__}.{lm_head_name} ({type(head).__name__}) is not a linear "
            "projection holding only `weight` [V, D] and an optional `bias` [V]"
        )
    transform = _logit_transform(model)
    if transform is not None:
        return None, (
            f"{type(model).__name__} transforms its logits after the lm_head ({transform}), "
            "which the chunked loss does not apply"
        )
    return head, ""


def lm_head_name_of(model: nn.Module, head: nn.Module) -> str:
    """The dotted name of ``head`` inside ``model``.

    Raises:
        ValueError: ``head`` is not a submodule of ``model``.
    """
    for name, module in model.named_modules():
        if module is head and name:
            return name
    raise ValueError(
        f"The lm_head the loss is bound to ({type(head).__name__}) is not a submodule of "
        f"{type(model).__name__}: bind the loss to the models' own lm_heads."
    )


class _PassThroughHead(nn.Module):
    """Stands in for an lm_head during one forward: returns its input (the final hidden states).

    Registers the original head's ``weight`` (and ``bias``) under the same names, so the model's
    parameters and ``state_dict`` keys are unchanged while it is in place.
    """

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.weight = head.weight
        if getattr(head, "bias", None) is not None:
            self.bias = head.bias
        # a plain attribute, not a submodule: no duplicate parameters
        self.original: nn.Module
        object.__setattr__(self, "original", head)

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """The hidden states, unchanged."""
        return hidden_states


@contextlib.contextmanager
def skip_lm_head(model: nn.Module, lm_head_name: str = "lm_head") -> Iterator[nn.Module]:
    """Within the context, ``model``'s lm_head returns its input: outputs hold hidden states.

    A Hugging Face causal LM then returns ``logits`` of shape ``[B, T, D]`` (the final-norm
    hidden states) instead of ``[B, T, V]``; call it without ``labels`` inside (its own loss
    would be computed on hidden states). Re-entrant; restores the original module on exit.

    Args:
        model: The causal LM.
        lm_head_name: Dotted name of its output projection.

    Yields:
        The original lm_head (to bind to an ``LMHeadDistillationLoss``).

    Example:
        >>> import torch
        >>> lm = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10))
        >>> with skip_lm_head(lm, "1") as head:
        ...     lm(torch.tensor([[1, 2]])).shape, head.out_features
        (torch.Size([1, 2, 4]), 10)
        >>> lm(torch.tensor([[1, 2]])).shape
        torch.Size([1, 2, 10])
    """
    head = model.get_submodule(lm_head_name)
    if isinstance(head, _PassThroughHead):  # nested: already skipped
        yield head.original
        return
    parent_name, _, attr = lm_head_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, _PassThroughHead(head))
    try:
        yield head
    finally:
        setattr(parent, attr, head)
