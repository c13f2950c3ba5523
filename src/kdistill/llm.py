"""Memory-efficient distillation of causal language models (the ``LMHeadDistillationLoss`` recipe).

A plain logit KD step materializes ``[B, T, V]`` logits for student and teacher (plus float32
copies and gradients): tens of GB at V = 128k. This recipe never does. ``convert_causal_lm``
converts the student with one ``LMHeadDistillationLoss`` on the models' outputs and makes both
models skip their lm_head while distilling, so their outputs' ``logits`` are the final-norm hidden
states ``[B, T, D]``. The loss then applies the two lm_heads chunk by chunk, and with ``labels``
also gives the student's next-token cross-entropy from the same chunks (one pass: CE + KD)::

    model = convert_causal_lm(student, teacher, loss_balancer=mtd.StaticLossBalancer(0.5))
    out = model(input_ids=ids, attention_mask=attention_mask)  # no `labels` here
    loss = compute_causal_lm_loss(model, labels)  # 0.5 * KD + 0.5 * CE
    loss.backward()
    ...
    student = export_causal_lm(model)  # plain student, lm_head back, teacher's too

Works with any model whose output projection is a submodule (``lm_head`` by default, e.g. every
Hugging Face ``*ForCausalLM``) with a ``weight`` [V, D] and optional ``bias``; this module imports
nothing from ``transformers``.

Checkpoints: ``kdistill.save(model, f)`` records the loss by its configuration; restore with
``restore_causal_lm(student, f, teacher_model=teacher)``, which also skips the lm_heads and binds
them to the loss again. A plain ``kdistill.restore`` gives a model whose lm_heads compute full
logits and whose (head-less) loss works on those logits: correct, but not memory-efficient.
``kdistill.export`` alone leaves the stand-in module in place of the student's lm_head; it computes
logits again once the model is exported, but ``export_causal_lm`` puts the original module back.
"""

from typing import Any, Literal, cast, overload

from torch import Tensor, nn

from .balancers import STUDENT_LOSS_KEY, DistillationLossBalancer
from .checkpoint import FileLike, restore
from .conversion import convert, export
from .losses.lm_head import LMHeadDistillationLoss
from .model import DistillationModel

__all__ = [
    "compute_causal_lm_loss",
    "convert_causal_lm",
    "export_causal_lm",
    "is_causal_lm_recipe",
    "restore_causal_lm",
]


class _SkippedLMHead(nn.Module):
    """Stands in for an lm_head while its owner distills: returns the hidden states unchanged.

    It registers the original head's ``weight`` (and ``bias``) under the same names, so the
    model's ``state_dict`` keys and its parameters are exactly as before. Once ``owner`` is no
    longer a ``DistillationModel`` (exported), it applies the original head again.
    """

    original: nn.Module  # the replaced head; plain attributes (see __init__)
    owner: nn.Module

    def __init__(self, head: nn.Module, owner: nn.Module) -> None:
        super().__init__()
        self.weight = head.weight
        if getattr(head, "bias", None) is not None:
            self.bias = head.bias
        # plain attributes, not submodules: no duplicate parameters or state_dict keys
        object.__setattr__(self, "original", head)
        object.__setattr__(self, "owner", owner)

    def forward(self, hidden_states: Tensor) -> Tensor:
        """``hidden_states`` while distilling, else the original head's output."""
        if isinstance(self.owner, DistillationModel):
            return hidden_states
        return self.original(hidden_states)


def _get_head(model: nn.Module, name: str, role: str) -> nn.Module:
    try:
        head = model.get_submodule(name)
    except AttributeError:
        raise ValueError(
            f"The {role} has no submodule {name!r} to use as its lm_head. Pass the name of its "
            "output projection as `lm_head_name=`."
        ) from None
    if isinstance(head, _SkippedLMHead):
        return head.original
    keys = set(head.state_dict())
    if not keys or not keys <= {"weight", "bias"}:
        raise TypeError(
            f"The {role}'s lm_head {name!r} ({type(head).__name__}) must be a linear projection "
            f"holding only `weight` [V, D] and optionally `bias` [V], got state {sorted(keys)}."
        )
    return head


def _set_head(model: nn.Module, name: str, head: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, head)


def _lm_head_losses(model: DistillationModel) -> list[LMHeadDistillationLoss]:
    return [p.loss for p in model.kd_pairs if isinstance(p.loss, LMHeadDistillationLoss)]


def is_causal_lm_recipe(model: Any) -> bool:
    """Whether ``model`` is a ``convert_causal_lm`` model (its lm_heads skipped while distilling).

    Such a model's outputs hold final hidden states, not logits: integrations must not let it
    compute its own loss, and use ``compute_causal_lm_loss`` instead.
    """
    return isinstance(model, DistillationModel) and any(
        isinstance(module, _SkippedLMHead) for module in model.modules()
    )


def _skip_heads_(model: DistillationModel, lm_head_name: str) -> None:
    """Swap both models' lm_heads for stand-ins and bind the originals to the loss."""
    losses = _lm_head_losses(model)
    if len(losses) != 1:
        raise ValueError(
            f"The model must have exactly one LMHeadDistillationLoss in its criterion, found "
            f"{len(losses)}. Convert it with kdistill.llm.convert_causal_lm."
        )
    teacher = model.teacher_model
    student_head = _get_head(model, lm_head_name, "student")
    teacher_head = _get_head(teacher, lm_head_name, "teacher")
    losses[0].bind_lm_heads_(student_head, teacher_head)
    _set_head(model, lm_head_name, _SkippedLMHead(student_head, model))
    _set_head(teacher, lm_head_name, _SkippedLMHead(teacher_head, model))


def convert_causal_lm(
    student: nn.Module,
    teacher: nn.Module,
    loss: LMHeadDistillationLoss | None = None,
    *,
    loss_balancer: DistillationLossBalancer | None = None,
    lm_head_name: str = "lm_head",
) -> DistillationModel:
    """Convert a causal LM student for lm_head-chunked logit distillation, in place.

    The student becomes a ``DistillationModel`` (as with ``kdistill.convert``) whose criterion is
    ``{("", ""): loss}``; both models' lm_heads are replaced by stand-ins that return the final
    hidden states, and bound to ``loss``. The teacher is modified too (until
    ``export_causal_lm``), and frozen as by ``convert``.

    Args:
        student: The student causal LM (e.g. a ``transformers`` ``LlamaForCausalLM``).
        teacher: The teacher causal LM; its hidden size may differ from the student's.
        loss: An ``LMHeadDistillationLoss`` (its lm_heads, if any, are replaced by the models');
            None builds ``LMHeadDistillationLoss(compute_student_loss=True)``.
        loss_balancer: Combines the KD loss with the student's cross-entropy in
            ``compute_causal_lm_loss`` (e.g. ``StaticLossBalancer(0.5)``); None for KD only.
        lm_head_name: Name of the output projection in both models.

    Returns:
        ``student``, converted.

    Raises:
        TypeError: ``loss`` is not an ``LMHeadDistillationLoss``, or a head is not linear.
        ValueError: A model has no ``lm_head_name`` submodule; vocabulary sizes differ (see
            ``vocab_alignment``); or anything ``kdistill.convert`` rejects.

    Example:
        >>> import torch, kdistill as mtd
        >>> class TinyLM(torch.nn.Module):
        ...     def __init__(self, hidden: int) -> None:
        ...         super().__init__()
        ...         self.embed = torch.nn.Embedding(32, hidden)
        ...         self.lm_head = torch.nn.Linear(hidden, 32)
        ...     def forward(self, ids):
        ...         return self.lm_head(self.embed(ids))
        >>> model = convert_causal_lm(
        ...     TinyLM(8), TinyLM(16), loss_balancer=mtd.StaticLossBalancer(0.5))
        >>> ids = torch.randint(0, 32, (2, 5))
        >>> model(ids).shape  # final hidden states, not [2, 5, 32] logits
        torch.Size([2, 5, 8])
        >>> compute_causal_lm_loss(model, labels=ids).backward()  # 0.5 * KD + 0.5 * CE
        >>> export_causal_lm(model)(ids).shape
        torch.Size([2, 5, 32])
    """
    if loss is None:
        loss = LMHeadDistillationLoss(compute_student_loss=True)
    if not isinstance(loss, LMHeadDistillationLoss):
        raise TypeError(
            f"`loss` must be an LMHeadDistillationLoss (or None), got {type(loss).__name__}. Use "
            "kdistill.convert for other losses."
        )
    # check the heads before anything changes
    loss.bind_lm_heads_(
        _get_head(student, lm_head_name, "student"), _get_head(teacher, lm_head_name, "teacher")
    )
    config = {"teacher_model": teacher, "criterion": loss, "loss_balancer": loss_balancer}
    model = cast(DistillationModel, convert(student, mode=[("kd_loss", config)]))
    _skip_heads_(model, lm_head_name)
    return model


@overload
def compute_causal_lm_loss(
    model: DistillationModel,
    labels: Tensor | None = ...,
    *,
    mask: Tensor | None = ...,
    num_items_in_batch: int | Tensor | None = ...,
    skip_balancer: Literal[True],
) -> dict[str, Tensor]: ...
@overload
def compute_causal_lm_loss(
    model: DistillationModel,
    labels: Tensor | None = ...,
    *,
    mask: Tensor | None = ...,
    num_items_in_batch: int | Tensor | None = ...,
    skip_balancer: Literal[False] = ...,
) -> Tensor: ...
@overload
def compute_causal_lm_loss(
    model: DistillationModel,
    labels: Tensor | None = ...,
    *,
    mask: Tensor | None = ...,
    num_items_in_batch: int | Tensor | None = ...,
    skip_balancer: bool = ...,
) -> Tensor | dict[str, Tensor]: ...
def compute_causal_lm_loss(
    model: DistillationModel,
    labels: Tensor | None = None,
    *,
    mask: Tensor | None = None,
    num_items_in_batch: int | Tensor | None = None,
    skip_balancer: bool = False,
) -> Tensor | dict[str, Tensor]:
    """The KD loss (and student cross-entropy) of the last forward of a ``convert_causal_lm`` model.

    Args:
        model: A model from ``convert_causal_lm``, after a forward (run it without ``labels``).
        labels: ``[B, T]`` token ids as given to a causal LM (shifted inside); ``-100`` is ignored.
            With a loss built with ``compute_student_loss=True`` they also give the student loss.
        mask: ``[B, T]`` bool positions to keep, aligned with the inputs.
        num_items_in_batch: Global kept-token count for gradient accumulation (see the loss).
        skip_balancer: Return ``{"student_loss": ce, "LMHeadDistillationLoss_0": kd}`` (the
            student loss only when computed) instead of one scalar.

    Returns:
        The balanced total, the KD loss alone (no balancer, no student loss), or the dict.

    Raises:
        ValueError: A student loss was computed but there is no balancer to combine it.
    """
    loss_kwargs: dict[str, Any] = {"labels": labels, "mask": mask}
    if num_items_in_batch is not None:
        loss_kwargs["num_items_in_batch"] = num_items_in_batch
    (loss,) = _lm_head_losses(model)
    with_ce = loss.compute_student_loss and labels is not None
    if with_ce:  # the loss then returns (kd, ce) from the same chunks
        loss_kwargs["return_student_loss"] = True
    losses = model.compute_kd_loss(skip_balancer=True, **loss_kwargs)
    if with_ce:
        ((key, (kd, ce)),) = losses.items()
        losses = {STUDENT_LOSS_KEY: ce, key: kd}
    if skip_balancer:
        return losses
    if model.loss_balancer is not None:
        return model.loss_balancer(losses)
    if STUDENT_LOSS_KEY in losses:
        raise ValueError(
            "The loss computed the student's cross-entropy but the model has no loss balancer to "
            "combine it with the KD loss: pass loss_balancer=StaticLossBalancer(...) to "
            "convert_causal_lm, or call with skip_balancer=True."
        )
    return next(iter(losses.values()))


def export_causal_lm(model: DistillationModel, lm_head_name: str = "lm_head") -> nn.Module:
    """Put both models' lm_heads back and return the plain student (``kdistill.export``).

    Raises:
        RuntimeError: ``model`` is not a ``DistillationModel``.
    """
    if not isinstance(model, DistillationModel):
        raise RuntimeError(
            f"export_causal_lm expects a model from convert_causal_lm, got {type(model).__name__}."
        )
    for owner in (model, model.teacher_model):
        head = owner.get_submodule(lm_head_name)
        if isinstance(head, _SkippedLMHead):
            _set_head(owner, lm_head_name, head.original)
    return export(model)


def restore_causal_lm(
    student: nn.Module, f: FileLike, teacher_model: Any = None, lm_head_name: str = "lm_head"
) -> DistillationModel:
    """``kdistill.restore`` a ``convert_causal_lm`` checkpoint and skip the lm_heads again.

    Args:
        student: A fresh instance of the student's architecture.
        f: The file written by ``kdistill.save``.
        teacher_model: The teacher (required: ``convert_causal_lm`` takes a module instance,
            and checkpoints never hold the teacher).
        lm_head_name: Name of the output projection in both models.

    Returns:
        The restored ``DistillationModel``, ready to train on.

    Raises:
        ValueError: No ``teacher_model``, or the checkpoint holds no distillation mode.
    """
    if teacher_model is None:
        raise ValueError(
            "restore_causal_lm needs `teacher_model=`: the recipe's teacher is a module "
            "instance, and checkpoints never hold the teacher."
        )
    model = restore(student, f, teacher_model=teacher_model)
    if not isinstance(model, DistillationModel):
        raise ValueError(
            "The checkpoint holds no distillation mode (an exported student?): load it with "
            "kdistill.restore instead."
        )
    _skip_heads_(model, lm_head_name)
    return model
