"""Scoring completions: the teacher grades every completion token, the student matches it.

``completion_kd_loss(student, teacher, completions, loss)`` runs the teacher once on
prompt + completion under ``no_grad`` (eval mode), then the student (with grad, in its own mode),
and takes ``loss`` (an ``LMHeadDistillationLoss``) **only at the positions that predict a
completion token** (``Completions.target_mask``): prompt and padding positions are dropped before
the loss, so they neither count nor cost a vocabulary projection.

With a loss bound to the two models' lm_heads, both forwards run with the lm_head skipped
(``skip_lm_head``): the models return final hidden states ``[B, T, D]`` and the loss projects the
kept positions chunk by chunk, so no ``[B, T, V]`` logits exist. With an unbound loss the models'
own logits are used (models without an lm_head, or with a logit transform after it).
"""

from typing import Any

import torch
from torch import Tensor, nn

from ..losses._utils import extract_logits
from ..losses.lm_head import LMHeadDistillationLoss
from ._model_utils import eval_mode, forward_parameters, lm_head_name_of, skip_lm_head, takes
from .completions import Completions

__all__ = ["completion_kd_loss", "model_inputs"]


def model_inputs(model: nn.Module, completions: Completions) -> dict[str, Any]:
    """Keyword inputs for scoring ``completions`` with ``model`` (besides the ids).

    ``attention_mask`` and ``position_ids`` (counted over real tokens, as during generation:
    left padding does not shift the prompts' positions) when ``model.forward`` takes them, and
    ``use_cache=False`` when it has that argument.

    Raises:
        ValueError: The prompts are left-padded but the model takes no ``attention_mask``.
    """
    params = forward_parameters(model)
    kwargs: dict[str, Any] = {}
    if takes(params, "attention_mask"):
        kwargs["attention_mask"] = completions.attention_mask
    elif not bool(completions.attention_mask[:, : completions.prompt_length].all()):
        raise ValueError(
            f"The prompts are left-padded but {type(model).__name__}.forward takes no "
            "`attention_mask`, so the padding would be read as text. Use prompts of equal "
            "length, or a model whose forward takes `attention_mask`."
        )
    if takes(params, "position_ids"):
        kwargs["position_ids"] = completions.position_ids
    if params is None or "use_cache" in params:
        kwargs["use_cache"] = False
    return kwargs


def _device_of(model: nn.Module) -> torch.device | None:
    param = next(model.parameters(), None)
    return None if param is None else param.device


def completion_kd_loss(
    student: nn.Module,
    teacher: nn.Module,
    completions: Completions,
    loss: LMHeadDistillationLoss,
    *,
    num_items_in_batch: int | Tensor | None = None,
) -> Tensor:
    """The distillation loss of ``student`` to ``teacher`` over the completion tokens only.

    For every position ``t`` whose next token is a completion token (``target_mask``), with
    ``p_T`` and ``p_S`` the two models' next-token distributions given the same prefix:
    ``loss = Σ_t T² · D(p_T(·|x, y<t), p_S(·|x, y<t)) / N`` (``D`` and ``T`` the loss's divergence
    and temperature, ``N`` the number of completion tokens or ``num_items_in_batch``).

    Args:
        student: The student causal LM (its train/eval mode is left as it is).
        teacher: The teacher causal LM (run in eval mode under ``no_grad``; mode restored).
        completions: The batch to score (moved to the student's device).
        loss: An ``LMHeadDistillationLoss``, bound to the students' and teacher's lm_heads (the
            memory-efficient path) or unbound (the models return logits).
        num_items_in_batch: Divide the token sum by this global count (gradient accumulation /
            data parallelism) instead of this batch's completion tokens.

    Returns:
        The scalar loss, differentiable with respect to the student's parameters.

    Raises:
        TypeError: ``loss`` is not an ``LMHeadDistillationLoss``.
        ValueError: The loss's lm_heads are not the models' submodules, or left-padded prompts
            for a model without ``attention_mask``.
    """
    if not isinstance(loss, LMHeadDistillationLoss):
        raise TypeError(f"`loss` must be an LMHeadDistillationLoss, got {type(loss).__name__}.")
    device = _device_of(student)
    if device is not None:
        completions = completions.to(device)
    ids = completions.input_ids
    student_head, teacher_head = loss.student_lm_head, loss.teacher_lm_head
    with torch.no_grad(), eval_mode(teacher):
        kwargs = model_inputs(teacher, completions)
        if teacher_head is None:
            teacher_out = teacher(ids, **kwargs)
        else:
            with skip_lm_head(teacher, lm_head_name_of(teacher, teacher_head)):
                teacher_out = teacher(ids, **kwargs)
    kwargs = model_inputs(student, completions)
    if student_head is None:
        student_out = student(ids, **kwargs)
    else:
        with skip_lm_head(student, lm_head_name_of(student, student_head)):
            student_out = student(ids, **kwargs)
    targets = completions.target_mask  # [B, T]
    hidden_s = extract_logits(student_out, "student")[targets]  # [N, D_s] (or [N, V])
    hidden_t = extract_logits(teacher_out, "teacher")[targets]  # [N, D_t] (or [N, V])
    return loss(hidden_s, hidden_t, num_items_in_batch=num_items_in_batch)
