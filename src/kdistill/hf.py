"""Hugging Face ``transformers.Trainer`` integration: ``KDTrainer`` and ``OnPolicyKDTrainer``.

``KDTrainer`` is a ``Trainer`` whose model is the student converted with ``kdistill.convert``: each
step runs the frozen teacher and the student on the same batch and optimizes the KD loss (alone, the
ModelOpt ``KDTrainer`` convention) or, with a loss balancer, the balanced sum of the student's own
cross-entropy and the KD losses. Every component is logged through the Trainer's own ``log``.

Install the extra: ``pip install "kdistill[hf]"``. This module is never imported by ``kdistill``.
"""

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

try:
    import transformers
except ModuleNotFoundError as err:  # only a missing transformers, never a bug inside it
    if err.name != "transformers":
        raise
    raise ImportError(
        'kdistill.hf needs transformers and accelerate: pip install "kdistill[hf]"'
    ) from err

import torch
from torch import Tensor, nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ._validation import check_bool, check_int, check_positive, check_unit_interval
from .balancers import STUDENT_LOSS_KEY, DistillationLossBalancer, sum_losses
from .conversion import convert, export
from .llm import compute_causal_lm_loss, is_causal_lm_recipe
from .losses import EnsembleLogitsDistillationLoss, LMHeadDistillationLoss, LogitsDistillationLoss
from .model import LOSS_MODULES_KEY, TEACHER_KEY, DistillationModel
from .onpolicy import (
    Completions,
    CompletionSource,
    PromptCollator,
    SamplingConfig,
    choose_source,
    find_lm_head,
    gkd_completions,
    skip_lm_head,
)

__all__ = [
    "IGNORE_INDEX",
    "KDTrainer",
    "OnPolicyKDTrainer",
    "chunked_criterion",
    "default_criterion",
    "default_multi_teacher_criterion",
    "next_token_mask",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value Hugging Face models ignore in their loss (and ``KDTrainer`` in the KD loss)."""


def default_criterion() -> nn.Module:
    """The default ``KDTrainer`` criterion: token-level forward KL, summed over kept tokens.

    ``LogitsDistillationLoss(temperature=1, reduction="sum")`` on the model outputs; ``KDTrainer``
    divides the sum by the number of target tokens (see ``KDTrainer``), which makes it the mean KL
    per target token, correct under gradient accumulation and data parallelism.
    """
    return LogitsDistillationLoss(temperature=1.0, reduction="sum")


def chunked_criterion(student_lm_head: nn.Module, teacher_lm_head: nn.Module) -> nn.Module:
    """The default ``KDTrainer`` criterion for causal LMs with an lm_head: the same loss, chunked.

    ``LMHeadDistillationLoss`` (token-level forward KL at temperature 1) bound to the two
    lm_heads, taking the labels already shifted, and giving the student's cross-entropy from
    the same chunks. ``KDTrainer`` runs both models with their lm_heads skipped, so the loss gets
    final hidden states and no ``[B, T, V]`` logits exist; its value and gradients are those of
    ``default_criterion()`` on full logits (and Hugging Face's cross-entropy).
    """
    return LMHeadDistillationLoss(
        student_lm_head, teacher_lm_head, shift_labels=False, compute_student_loss=True
    )


def default_multi_teacher_criterion(
    teacher_names: Any,
) -> dict[tuple[str, tuple[str, ...]], nn.Module]:
    """The default ``KDTrainer`` criterion for several named teachers.

    The forward KL to each teacher, uniformly weighted: ``Σ_k (1/K)·KL(p_k ‖ q)`` per token, as
    one term ``{("", names): EnsembleLogitsDistillationLoss(combine="losses",
    reduction="sum")}``, normalized by the target tokens like ``default_criterion()``.

    Args:
        teacher_names: The teachers' names, in order (e.g. ``list(teacher_model)``).
    """
    names = tuple(teacher_names)
    loss = EnsembleLogitsDistillationLoss(temperature=1.0, combine="losses", reduction="sum")
    return {("", names): loss}


def _teacher_names(teacher_model: Any) -> tuple[str, ...] | None:
    """The names of several teachers (a dict, a ``TeacherDict``), or None for one teacher."""
    if isinstance(teacher_model, Mapping):
        return tuple(teacher_model)
    if isinstance(teacher_model, nn.Module):  # a TeacherDict, a CachedTeacher of several
        names = getattr(teacher_model, "kd_teacher_names", None)
        return None if names is None else tuple(names)
    return None


def _default_criterion_for(teacher_model: Any) -> Any:
    """``default_criterion()``, or the multi-teacher one for a dict (or ``TeacherDict``)."""
    names = _teacher_names(teacher_model)
    return default_criterion() if names is None else default_multi_teacher_criterion(names)


def next_token_mask(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Positions of a causal LM whose logits predict a real label (Hugging Face's label shift).

    The logits at position ``t`` predict ``labels[:, t + 1]``, so position ``t`` is kept when
    ``labels[:, t + 1] != ignore_index``; the last position predicts nothing and is dropped. The
    mask counts exactly the tokens that the model's own cross-entropy averages over.

    Args:
        labels: ``[B, T]`` integer labels (``ignore_index`` marks padding / prompt tokens).
        ignore_index: Label value that is not a target.

    Returns:
        ``[B, T]`` bool mask aligned with the logits ``[B, T, V]``.

    Example:
        >>> next_token_mask(torch.tensor([[5, 6, -100, 7]])).tolist()
        [[True, False, True, False]]
    """
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[..., :-1] = labels[..., 1:] != ignore_index
    return mask


def _shift_labels(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``[B, T]`` labels aligned with the logits: position ``t`` holds ``labels[:, t + 1]``."""
    shifted = torch.full_like(labels, ignore_index)
    shifted[..., :-1] = labels[..., 1:]
    return shifted


def _student_only(state_dict: dict[str, Any] | None) -> dict[str, Any] | None:
    """Drop teacher and loss-module entries from a full state dict (FSDP / DeepSpeed saves)."""
    if state_dict is None:
        return None
    prefixes = (TEACHER_KEY + ".", LOSS_MODULES_KEY + ".")
    return {k: v for k, v in state_dict.items() if not k.startswith(prefixes)}


def _check_label_alignment(model: Any, criterion: Any) -> None:
    """Refuse losses that shift labels themselves: KDTrainer passes them aligned already."""
    if is_causal_lm_recipe(model):
        return  # the recipe's loss gets the model's labels and shifts them itself
    if isinstance(model, DistillationModel):
        losses = [pair.loss for pair in model.kd_pairs]
    else:
        losses = list(criterion.values()) if isinstance(criterion, Mapping) else [criterion]
    shifting = [type(loss).__name__ for loss in losses if getattr(loss, "shift_labels", False)]
    if shifting:
        raise ValueError(
            f"{shifting} shift `labels` themselves (shift_labels=True), but KDTrainer passes "
            "`labels` and `mask` already aligned with the logits (next-token shift done once). "
            "Construct them with shift_labels=False."
        )


def _check_model(model: Any, teacher_model: Any, criterion: Any, loss_balancer: Any) -> nn.Module:
    """Refuse a converted model with KD arguments, a non-module, and a missing teacher.

    Returns:
        ``model``, checked.
    """
    if isinstance(model, DistillationModel):
        given = [
            name
            for name, value in (
                ("teacher_model", teacher_model),
                ("criterion", criterion),
                ("loss_balancer", loss_balancer),
            )
            if value is not None
        ]
        if given:
            raise ValueError(
                f"`model` is already a DistillationModel, so {given} must not be given: its "
                "teacher, criterion and balancer were set by kdistill.convert. Pass the plain "
                "student instead, or drop these arguments."
            )
    elif not isinstance(model, nn.Module):
        raise TypeError(
            f"`model` must be the student nn.Module (e.g. an AutoModelForCausalLM), got "
            f"{type(model).__name__}."
        )
    elif teacher_model is None:
        raise ValueError(
            "KDTrainer needs `teacher_model`: an nn.Module, or a class / factory that builds it."
        )
    return model


def _inside_forward(wrapper: nn.Module, module: nn.Module, fn: Callable[[], Any]) -> Any:
    """Run ``fn()`` as the forward of ``module`` called through its ``wrapper`` (DDP, FSDP...).

    The chunked loss uses the student's lm_head weight after the forward. DDP (with
    ``find_unused_parameters``, Trainer's default for Hugging Face models) would mark that
    weight unused in the forward and then see its gradient arrive: "marked ready twice". Run
    inside the wrapper's forward, the loss is part of the forward's output, so the wrapper sees
    every parameter it uses (and sharded wrappers gather them). TRL's ``_ForwardRedirection``
    does the same.
    """
    if wrapper is module:
        return fn()
    had_own = "forward" in module.__dict__
    original = module.__dict__.get("forward")

    def redirected(*args: Any, **kwargs: Any) -> Any:
        restore()
        return fn()

    def restore() -> None:
        if had_own:
            module.__dict__["forward"] = original
        else:
            module.__dict__.pop("forward", None)

    module.__dict__["forward"] = redirected
    try:
        return wrapper()
    finally:
        restore()


@dataclass
class _KDTerms:
    """One micro-batch's loss terms, before Trainer's scaling."""

    kd: dict[str, Tensor]  # f"{LossClass}_{i}" -> KD term
    student_loss: Tensor | None  # the student's own loss (cross-entropy), if computed
    outputs: Any  # the student's outputs
    loss_kwargs: dict[str, Any]  # what the losses received (mask, labels, num_items_in_batch)
    logits_shape: torch.Size  # [B, T, V] of the outputs' logits (empty if none)


class KDTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that distills ``teacher_model`` into ``model`` (the student).

    The student you pass stays yours: ``train``, ``evaluate`` and ``predict`` convert it in place
    with ``kdistill.convert`` (mode ``"kd_loss"``) when they start and export it again when they
    return or raise, so outside these calls ``model`` (and ``trainer.model``, the same object) is
    the plain student, trained: its class, its parameters only (no teacher), ready for
    ``generate`` or ``save_pretrained``. The configuration is checked, and a teacher factory
    called, once, in ``__init__``; the optimizer and its state carry over between ``train``
    calls (the student's parameters are the same objects). A model you converted yourself
    (or one from ``kdistill.llm.convert_causal_lm``) is used as is and stays converted.

    Each step runs the teacher (frozen, eval mode, no grad) and the student on the batch, then
    computes:

    - the KD terms ``{f"{LossClass}_{i}": value}`` of the criterion pairs, for causal LMs on the
      positions whose next-token label is not ``-100`` (``next_token_mask``; without labels, on
      the ``attention_mask`` positions). Losses receive ``mask`` (``[B, T]``) and ``labels``
      (shifted to align with the logits) when their ``forward`` accepts them;
    - ``ce_loss``: the student's own loss (Hugging Face's cross-entropy) when labels are given.

    The training loss is the KD loss alone when there is no balancer (ModelOpt's convention; the
    cross-entropy is then only logged), else ``loss_balancer({"student_loss": ce, **kd_terms})``.

    Normalization: when Trainer counts the target tokens of the whole optimizer step
    (``num_items_in_batch``: all gradient accumulation micro-batches and, with
    ``average_tokens_across_devices``, all ranks; it does for every model whose ``forward`` takes
    ``**kwargs``, e.g. all causal LMs), a KD loss with ``reduction="sum"`` (the default criterion)
    is divided by that count, exactly like Hugging Face's cross-entropy, so accumulation and data
    parallelism give the loss of the full batch. A loss whose ``forward`` takes
    ``num_items_in_batch`` (``LMHeadDistillationLoss``) receives it and divides by it itself; any
    other loss is taken as a per-micro-batch mean. Without a count, every term is a micro-batch
    mean and Trainer divides by the accumulation steps. Losses that shift labels themselves must
    be built with ``shift_labels=False``: the labels they receive are aligned with the logits.

    Memory: for causal LMs with an ``lm_head`` (every Hugging Face ``*ForCausalLM``, tied
    embeddings included) and no ``criterion`` of yours, the default is the **chunked path**: the
    criterion is ``chunked_criterion`` (the default forward KL as an ``LMHeadDistillationLoss``
    bound to the two lm_heads), both models run with their lm_heads skipped (``skip_lm_head``,
    only during that forward) and without ``labels``, and the loss projects the final hidden
    states chunk by chunk, giving the KD term and ``ce_loss`` from the same chunks: no
    ``[B, T, V]`` logits are ever built, for the same loss and gradients. Its outputs therefore
    hold no ``logits`` (``predict`` returns none). The full-logits path (``default_criterion``
    on the model outputs) is used for a criterion of yours, models without a usable lm_head
    (none, or a logit transform after it such as Gemma-2's softcapping), non-causal models, and
    ``chunked=False``; the choice is logged once (``logging.INFO``) and readable as
    ``trainer.chunked``. A model from ``kdistill.llm.convert_causal_lm`` (no teacher or
    criterion) is used as is: its recipe loss gives the KD term and ``ce_loss``.

    Logging: ``loss`` (the total), ``kd_loss`` (sum of the KD terms), ``ce_loss`` and each KD term
    are averaged over the steps since the last log and passed to ``Trainer.log`` at
    ``logging_steps``; ``evaluate`` reports ``eval_loss`` and ``eval_<component>``.

    Saving (``save_model``, checkpoints): only the student, in its own class, loadable with
    ``AutoModelForCausalLM.from_pretrained`` without kdistill. The teacher follows the student's
    device and dtype and is never given to the optimizer.

    Args:
        model: The student (any ``transformers`` model), or a model already converted with
            ``kdistill.convert`` (then ``teacher_model``, ``criterion`` and ``loss_balancer``
            must be ``None``).
        teacher_model: The teacher: an ``nn.Module``, a class, or an importable factory (see
            ``kdistill.convert``), or a dict ``{name: teacher}`` of several. Its vocabulary must
            match the student's for logit losses.
        criterion: A loss or ``{(student_layer, teacher_layer): loss}``; default
            ``default_criterion()`` (token-level forward KL), or for several teachers
            ``default_multi_teacher_criterion(names)`` (the mean of the per-teacher forward
            KLs).
        loss_balancer: Combines the student's loss and the KD losses; ``None`` trains on KD alone.
        args: The ``transformers.TrainingArguments``.
        chunked: Use the chunked path where it applies (see "Memory"); False always computes
            full logits.
        **trainer_kwargs: Everything else ``transformers.Trainer`` takes (``train_dataset``,
            ``eval_dataset``, ``data_collator``, ``callbacks``, ...).

    Raises:
        ValueError: No teacher, a converted model with KD arguments, or ``compute_loss_func`` /
            label smoothing (which would silently replace the KD loss).
        TypeError: ``model`` is not an ``nn.Module``.

    Example:
        >>> import tempfile
        >>> from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments
        >>> config = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16,
        ...                      num_hidden_layers=1, num_attention_heads=2)
        >>> student, teacher = LlamaForCausalLM(config), LlamaForCausalLM(config)
        >>> data = [{"input_ids": torch.arange(6), "labels": torch.arange(6)}] * 4
        >>> args = TrainingArguments(tempfile.mkdtemp(), max_steps=1, report_to=[], use_cpu=True,
        ...                          per_device_train_batch_size=2, save_strategy="no",
        ...                          disable_tqdm=True)
        >>> trainer = KDTrainer(model=student, teacher_model=teacher, args=args,
        ...                     train_dataset=data)
        >>> output = trainer.train()  # prints the final log line
        {'train_runtime': ...}
        >>> output.training_loss >= 0
        True
    """

    model: nn.Module  # Trainer allows None; __init__ refuses it

    def __init__(
        self,
        model: nn.Module | None = None,
        teacher_model: Any = None,
        criterion: Any = None,
        loss_balancer: DistillationLossBalancer | None = None,
        args: transformers.TrainingArguments | None = None,
        *,
        chunked: bool = True,
        **trainer_kwargs: Any,
    ) -> None:
        check_bool("chunked", chunked)
        if trainer_kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                "KDTrainer computes its own loss, so `compute_loss_func` would be ignored: put a "
                "custom loss in `criterion` (KD) or in the model (student loss) instead."
            )
        if args is not None and args.label_smoothing_factor != 0:
            raise ValueError(
                f"KDTrainer does not apply `label_smoothing_factor` "
                f"(got {args.label_smoothing_factor}): the student's loss comes from the model. "
                "Set it to 0; distillation already softens the targets."
            )
        model = _check_model(model, teacher_model, criterion, loss_balancer)
        _check_label_alignment(model, criterion)
        self._kd_config: dict[str, Any] | None = None  # None: the user's converted model
        if not isinstance(model, DistillationModel):
            config = {
                "teacher_model": teacher_model,
                "criterion": self._full_logits_criterion(teacher_model)
                if criterion is None
                else criterion,
                "loss_balancer": loss_balancer,
            }
            # check everything (and build the teacher once) now; convert again in train()
            converted = cast(DistillationModel, convert(model, mode=[("kd_loss", config)]))
            config["teacher_model"] = converted.teacher_model
            export(converted)
            self._kd_config = config
        super().__init__(model=model, args=args, **trainer_kwargs)
        student_cls = model.original_cls if isinstance(model, DistillationModel) else type(model)
        # Causal LMs predict labels[t + 1] at position t. Trainer infers this from `loss_type`,
        # which some models (e.g. GPT-2) leave unset; the class name is the reliable signal.
        self._kd_shift_labels = not self._is_encoder_decoder() and (
            getattr(self, "_loss_shifts_labels", False)
            or student_cls.__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
        )
        self._loss_shifts_labels = self._kd_shift_labels  # so Trainer counts tokens the same way
        self._kd_recipe = is_causal_lm_recipe(model)
        self._kd_chunked = self._choose_chunked(chunked, criterion)
        self._kd_train_sums: dict[str, Tensor] = {}
        self._kd_eval_sums: dict[str, Tensor] = {}
        self._kd_eval_count = 0
        self._kd_last_logged_step = 0

    def _choose_chunked(self, chunked: bool, criterion: Any) -> bool:
        """Pick the chunked or the full-logits path (see the class docstring); log the choice."""
        if self._kd_config is None:
            why = "the model was converted by the caller (its own criterion is used)"
        elif not chunked:
            why = "chunked=False"
        elif criterion is not None:
            why = "a criterion was given"
        elif not self._kd_shift_labels:
            why = f"{type(self.model).__name__} is not a causal LM"
        elif _teacher_names(self._kd_config["teacher_model"]) is not None:
            why = "there are several teachers (the chunked path takes one)"
        else:
            student_head, why_student = find_lm_head(self.model)
            teacher_head, why_teacher = find_lm_head(self._kd_config["teacher_model"])
            why = why_student or why_teacher
            if student_head is not None and teacher_head is not None and not why:
                self._kd_config["criterion"] = self._chunked_criterion(student_head, teacher_head)
                logger.info(
                    "KDTrainer: chunked lm_head path (KD and cross-entropy from lm_head chunks, "
                    "no [B, T, V] logits)."
                )
                return True
        logger.info("KDTrainer: full-logits path ([B, T, V] logits), because %s.", why)
        return False

    def _full_logits_criterion(self, teacher_model: Any) -> Any:
        """The criterion when none is given and the full-logits path is used."""
        return _default_criterion_for(teacher_model)

    def _chunked_criterion(self, student_head: nn.Module, teacher_head: nn.Module) -> nn.Module:
        """The criterion when none is given and the chunked path is used."""
        return chunked_criterion(student_head, teacher_head)

    def _wants_student_loss(self) -> bool:
        """Whether each step also computes the student's cross-entropy (trained or logged)."""
        return True

    @property
    def chunked(self) -> bool:
        """Whether the loss goes through the lm_heads in chunks (no ``[B, T, V]`` logits)."""
        return self._kd_chunked

    # ------------------------------------------------------------------ converting around calls
    @contextlib.contextmanager
    def distilling(self) -> Iterator[DistillationModel]:
        """Within the context, the student is converted (what ``train`` etc. do around the call).

        For calling ``compute_loss`` or ``training_step`` yourself; re-entrant. The student is
        exported again on exit, also on an exception.

        Yields:
            The converted student (``self.model``).
        """
        if self._kd_config is None or isinstance(self.model, DistillationModel):
            self.distillation_model.align_teacher_()
            yield self.distillation_model  # the user's converted model, or a nested call
            return
        model = cast(DistillationModel, convert(self.model, mode=[("kd_loss", self._kd_config)]))
        model.align_teacher_()
        try:
            yield model
        finally:
            export(model)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train`` with the student converted for the call (see the class docstring)."""
        with self.distilling():
            return super().train(*args, **kwargs)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """``Trainer.evaluate`` with the student converted for the call (KD terms reported)."""
        with self.distilling():
            return super().evaluate(*args, **kwargs)

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.predict`` with the student converted for the call."""
        with self.distilling():
            return super().predict(*args, **kwargs)

    # ------------------------------------------------------------------ loss
    @property
    def distillation_model(self) -> DistillationModel:
        """The converted student (unwrapped from DDP / compile wrappers).

        It exists only inside ``train``, ``evaluate`` and ``predict``, unless you passed a
        converted model.

        Raises:
            RuntimeError: The student is not converted at the moment.
        """
        model = self.model  # Trainer keeps the core model here, whatever wraps it
        if not isinstance(model, DistillationModel):
            raise RuntimeError(
                "The student is converted only during train(), evaluate() and predict()."
            )
        return model

    def _kd_loss_kwargs(
        self,
        inputs: dict[str, Any],
        logits_shape: torch.Size,
        num_items_in_batch: Tensor | int | None,
    ) -> dict[str, Any]:
        """``mask``, aligned ``labels`` and ``num_items_in_batch`` for the losses that take them."""
        labels = inputs.get("labels")
        candidates: dict[str, Any] = {}
        if num_items_in_batch is not None:
            candidates["num_items_in_batch"] = num_items_in_batch
        if "shift_labels" in inputs:  # padding-free collators give aligned labels themselves
            labels = inputs["shift_labels"]
            candidates["mask"] = labels != IGNORE_INDEX
        elif labels is not None:
            if self._kd_shift_labels:
                candidates["mask"] = next_token_mask(labels)
                labels = _shift_labels(labels)
            else:
                candidates["mask"] = labels != IGNORE_INDEX
        elif inputs.get("attention_mask") is not None:
            candidates["mask"] = inputs["attention_mask"].to(torch.bool)
        if labels is not None:
            candidates["labels"] = labels
        if "mask" in candidates and tuple(candidates["mask"].shape) != tuple(logits_shape[:-1]):
            del candidates["mask"]  # not a token-level output (e.g. sequence classification)
        return self.distillation_model.accepted_loss_kwargs(candidates)

    def _is_encoder_decoder(self) -> bool:
        return bool(getattr(getattr(self.model, "config", None), "is_encoder_decoder", False))

    def _kd_terms(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Tensor | int | None
    ) -> _KDTerms:
        """Run teacher and student on the batch and compute the unscaled loss terms."""
        forward_inputs = dict(inputs)
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            forward_inputs["num_items_in_batch"] = num_items_in_batch
        if self._kd_recipe:
            # lm_heads skipped: the outputs' `logits` are hidden states, so the model must not
            # compute its own loss; the recipe's loss gives KD and CE from the same chunks
            labels = forward_inputs.pop("labels", None)
            outputs = model(**forward_inputs)
            mask = inputs.get("attention_mask") if labels is None else None
            loss_kwargs: dict[str, Any] = (
                {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
            )
            kd_terms = compute_causal_lm_loss(
                self.distillation_model,
                labels,
                mask=None if mask is None else mask.to(torch.bool),
                skip_balancer=True,
                **loss_kwargs,
            )
            student_loss = kd_terms.pop(STUDENT_LOSS_KEY, None)
            return _KDTerms(kd_terms, student_loss, outputs, loss_kwargs, torch.Size())
        if self._kd_chunked:
            return self._chunked_kd_terms(model, inputs, forward_inputs, num_items_in_batch)
        if not self._wants_student_loss():
            forward_inputs.pop("labels", None)
        outputs = model(**forward_inputs)
        has_labels = forward_inputs.get("labels") is not None
        student_loss = outputs.get("loss") if has_labels and isinstance(outputs, dict) else None
        logits = outputs.get("logits") if isinstance(outputs, dict) else None
        logits_shape = logits.shape if isinstance(logits, Tensor) else torch.Size()
        loss_kwargs = self._kd_loss_kwargs(inputs, logits_shape, num_items_in_batch)
        kd_terms = self.distillation_model.compute_kd_loss(skip_balancer=True, **loss_kwargs)
        return _KDTerms(kd_terms, student_loss, outputs, loss_kwargs, logits_shape)

    def _chunked_kd_terms(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        forward_inputs: dict[str, Any],
        num_items_in_batch: Tensor | int | None,
    ) -> _KDTerms:
        """The chunked path: both lm_heads skipped for the forward, KD and CE from the chunks."""
        distillation_model = self.distillation_model
        # without labels: the model must not compute its cross-entropy on hidden states
        forward_inputs.pop("labels", None)
        forward_inputs.pop("shift_labels", None)

        def forward_and_loss() -> _KDTerms:
            with skip_lm_head(distillation_model), skip_lm_head(distillation_model.teacher_model):
                outputs = distillation_model(**forward_inputs)
            hidden = outputs.get("logits") if isinstance(outputs, Mapping) else None
            hidden_shape = hidden.shape if isinstance(hidden, Tensor) else torch.Size()
            loss_kwargs = self._kd_loss_kwargs(inputs, hidden_shape, num_items_in_batch)
            with_ce = "labels" in loss_kwargs and self._wants_student_loss()
            # without a balancer the cross-entropy is only logged: no gradient for it
            kd_terms = distillation_model.compute_kd_loss(
                skip_balancer=True,
                return_student_loss=with_ce,
                student_loss_grad=distillation_model.loss_balancer is not None,
                **loss_kwargs,
            )
            student_loss = None
            if with_ce:
                ((key, (kd, student_loss)),) = kd_terms.items()
                kd_terms = {key: kd}
            if isinstance(outputs, Mapping):  # its "logits" are hidden states: return none
                outputs = type(outputs)(**{k: v for k, v in outputs.items() if k != "logits"})
            return _KDTerms(kd_terms, student_loss, outputs, loss_kwargs, hidden_shape)

        return _inside_forward(model, distillation_model, forward_and_loss)

    def _scale_for_trainer(
        self, terms: _KDTerms, training: bool, num_items_in_batch: Tensor | int | None
    ) -> float:
        """Scale every term in place the way Trainer expects its loss; return the log scale.

        Given ``num_items_in_batch`` (the token count of the whole optimizer step, all ranks with
        ``average_tokens_across_devices``), Trainer takes the loss as already scaled for gradient
        accumulation, as Hugging Face's cross-entropy is: summed terms are divided by that count
        (times the world size, since DDP averages gradients), per-micro-batch means by the
        accumulation steps. Without it, Trainer divides the loss by the accumulation steps
        itself: terms stay micro-batch means.
        """
        accumulation = 1
        if training:  # set by Trainer.train; the last step of an epoch may be shorter
            accumulation = getattr(
                self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps
            )
        world = 1
        if num_items_in_batch is not None:
            if self.args.average_tokens_across_devices:
                world = self.accelerator.num_processes // self.get_tp_size()
            token_divisor = num_items_in_batch / world
            mean_divisor = accumulation
        else:
            if "mask" in terms.loss_kwargs:
                token_divisor = terms.loss_kwargs["mask"].sum().clamp(min=1)
            else:
                token_divisor = max(terms.logits_shape[:-1].numel(), 1)
            mean_divisor = 1
        pairs = self.distillation_model.kd_pairs
        for (name, term), pair in zip(terms.kd.items(), pairs, strict=True):
            if "num_items_in_batch" in pair.kwargs_for(terms.loss_kwargs):
                terms.kd[name] = term * world  # the loss divided by num_items_in_batch itself
            elif getattr(pair.loss, "reduction", None) == "sum":
                terms.kd[name] = term / token_divisor
            else:
                terms.kd[name] = term / mean_divisor
        if terms.student_loss is not None and num_items_in_batch is not None:
            terms.student_loss = terms.student_loss * world  # HF's loss: sum / num_items_in_batch
        # log per optimizer step: Trainer divides the unscaled losses by the accumulation steps
        already_scaled = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        return 1 if already_scaled else 1 / accumulation

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        """Run teacher and student, and return the (balanced) KD loss of this micro-batch.

        Args:
            model: The model to call (possibly wrapped in DDP / ``torch.compile``).
            inputs: The batch; ``labels`` ``[B, T]`` (``-100`` = not a target) are optional.
            return_outputs: Also return the student's outputs.
            num_items_in_batch: Target tokens in the whole optimizer step (Trainer counts them).

        Returns:
            The loss, already scaled for gradient accumulation (and ``(loss, outputs)``).
        """
        terms = self._kd_terms(model, inputs, num_items_in_batch)
        log_scale = self._scale_for_trainer(terms, model.training, num_items_in_batch)
        balancer = self.distillation_model.loss_balancer
        if balancer is None:
            loss = sum_losses(terms.kd.values())
        else:
            loss_dict = dict(terms.kd)
            if terms.student_loss is not None:
                loss_dict = {STUDENT_LOSS_KEY: terms.student_loss, **terms.kd}
            loss = balancer(loss_dict)
        components = {"kd_loss": sum_losses(terms.kd.values()), **terms.kd}
        if terms.student_loss is not None:
            components["ce_loss"] = terms.student_loss
        self._record(components, model.training, inputs, log_scale)
        return (loss, terms.outputs) if return_outputs else loss

    # ------------------------------------------------------------------ logging
    def _record(
        self, components: dict[str, Tensor], training: bool, inputs: dict, scale: float
    ) -> None:
        """Accumulate detached components on device (no host sync per step)."""
        if training:
            for name, value in components.items():
                value = value.detach().float() * scale
                self._kd_train_sums[name] = self._kd_train_sums.get(name, 0) + value
            return
        batch = next((v.shape[0] for v in inputs.values() if isinstance(v, Tensor)), 1)
        for name, value in components.items():
            value = value.detach().float() * batch
            self._kd_eval_sums[name] = self._kd_eval_sums.get(name, 0) + value
        self._kd_eval_count += batch

    def _mean_over_processes(self, values: dict[str, Tensor]) -> dict[str, float]:
        names = sorted(values)
        stacked = torch.stack([values[name] for name in names])
        stacked = self.accelerator.reduce(stacked, reduction="mean")
        return dict(zip(names, stacked.tolist(), strict=True))

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the averaged KD components to the Trainer's training logs, then log."""
        if "loss" in logs and self._kd_train_sums:
            steps = max(self.state.global_step - self._kd_last_logged_step, 1)
            means = self._mean_over_processes(self._kd_train_sums)
            logs = {**logs, **{name: value / steps for name, value in means.items()}}
            self._kd_train_sums = {}
            self._kd_last_logged_step = self.state.global_step
        super().log(logs, *args, **kwargs)

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> Any:
        """Run Trainer's evaluation loop and add ``<prefix>_<component>`` means to its metrics."""
        self._kd_eval_sums, self._kd_eval_count = {}, 0
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        if self._kd_eval_sums:
            prefix = metric_key_prefix
            sums = self._mean_over_processes(self._kd_eval_sums)
            count = self._mean_over_processes(
                {"n": torch.tensor(float(self._kd_eval_count), device=self.args.device)}
            )["n"]
            metrics = dict(output.metrics or {})
            for name, value in sums.items():
                metrics[f"{prefix}_{name}"] = value / max(count, 1)
            output = output._replace(metrics=metrics)
            self._kd_eval_sums, self._kd_eval_count = {}, 0
        return output

    # ------------------------------------------------------------------ optimizer and saving
    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """Build the optimizer over the student (and loss-module) parameters only."""
        model = self.model
        hide = model.hide_teacher_model() if isinstance(model, DistillationModel) else None
        with hide or contextlib.nullcontext():
            return super().create_optimizer(*args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save the student alone, as an instance of its own class (no teacher, no kdistill)."""
        model = self.model
        if not isinstance(model, DistillationModel):
            super()._save(output_dir, state_dict=state_dict)
            return
        with model.as_student():
            super()._save(output_dir, state_dict=_student_only(state_dict))


class OnPolicyKDTrainer(KDTrainer):
    """On-policy distillation (GKD): the student samples, the teacher grades every completion token.

    Before each optimizer step, the prompts of every gradient-accumulation micro-batch get their
    completions (``kdistill.onpolicy.gkd_completions``): with probability ``lmbda`` the student
    samples them (on-policy), otherwise the dataset's own completions are used, or, with
    ``seq_kd=True``, the teacher samples them. The batch prompt + completion then goes through
    ``KDTrainer``'s step with the completion tokens as the only targets: the teacher runs once
    on it under ``no_grad``, and the loss is the divergence over the completion tokens only,
    chunked through the lm_heads by default (no ``[B, T, V]`` logits; see ``KDTrainer``). The
    divergence is TRL's generalized JSD with ``beta`` (0: forward KL, 1: reverse KL, the
    default; ``divergence=`` picks any other divergence of ``LMHeadDistillationLoss``), at
    ``temperature``, which also is the sampling temperature (TRL's convention). Unlike TRL, the
    loss is multiplied by T² (as every kdistill logit loss), so at T ≠ 1 it is T² times TRL's.

    Everything else is ``KDTrainer``'s: teacher instance or factory, optional ``criterion``
    (on full logits) and ``loss_balancer`` (then the student's cross-entropy on the completion
    tokens is trained too; without one it is not computed), student-only saves, the student you
    pass handed back plain after ``train``, components logged. With ``lmbda=0`` (and no
    ``seq_kd``) the trainer is ``KDTrainer`` on the dataset's prompt + completion with the
    prompt masked.

    Data (TRL's conventions): rows with ``"prompt"`` (text, or chat messages rendered with the
    tokenizer's chat template) and, for the off-policy share, ``"completion"``; the default
    ``data_collator`` is ``kdistill.onpolicy.PromptCollator``. A collator of your own must
    return ``prompt_input_ids`` / ``prompt_attention_mask`` (and optionally
    ``completion_input_ids`` / ``completion_attention_mask``).

    Normalization: the completions of all micro-batches of an optimizer step exist before its
    first backward, so ``num_items_in_batch`` is the number of completion tokens of the whole
    step (all ranks, with ``average_tokens_across_devices``) and gradient accumulation and data
    parallelism give the loss of the full batch.

    Logs (averaged since the last log, every ``logging_steps``): ``kd_loss`` and the
    ``KDTrainer`` components, ``completion_length`` (mean tokens per completion),
    ``eos_share`` (completions that ended with EOS rather than at ``max_new_tokens``) and
    ``on_policy_share`` (micro-batches sampled from the student); with ``log_completions=True``
    a few decoded (prompt, completion) pairs are logged (``logging.INFO``) and kept in
    ``completion_samples``. Evaluation samples completions from the student with a generator
    seeded by ``args.seed`` at every ``evaluate`` (the same weights give the same samples).

    Randomness: the λ draws use a generator seeded with ``args.seed`` (the same on every rank,
    so ranks stay in step), the sampling one seeded with ``args.seed`` + the process index.
    Their states are not checkpointed: a resumed run samples differently.

    Args:
        model: The student causal LM (a Hugging Face ``*ForCausalLM``).
        teacher_model: The teacher (instance or factory, as for ``KDTrainer``), same tokenizer.
        args: The ``transformers.TrainingArguments``.
        train_dataset: Rows ``{"prompt": ..., "completion"?: ...}``.
        processing_class: The tokenizer (prompts, chat template, EOS and pad ids).
        lmbda: Probability that a micro-batch is on-policy, in [0, 1].
        beta: β of the generalized JSD, in [0, 1] (TRL's ``beta``).
        temperature: Sampling and loss temperature (> 0).
        max_new_tokens: Most tokens sampled per completion (also the cut of dataset ones).
        top_k: Sampling top-k (0: off).
        top_p: Sampling nucleus top-p (1: off).
        seq_kd: Off-policy micro-batches use teacher samples instead of the dataset's.
        max_prompt_length: Keep at most this many (last) prompt tokens (None: all).
        divergence: A divergence of ``LMHeadDistillationLoss`` instead of JSD(β) (e.g.
            ``"topk_kl"``); ``divergence_kwargs`` are its arguments (e.g. ``{"k": 64}``).
        divergence_kwargs: See ``divergence``.
        log_completions: Log decoded samples every ``logging_steps``.
        num_completions_to_log: How many.
        **kwargs: ``criterion``, ``loss_balancer``, ``chunked`` (see ``KDTrainer``) and
            everything ``transformers.Trainer`` takes.

    Raises:
        ValueError: No tokenizer, a non-causal student, bad sampling or mixing values.

    Example:
        >>> import tempfile
        >>> from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments
        >>> from kdistill.xtoken import byte_tokenizer
        >>> tokenizer = byte_tokenizer()
        >>> config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16,
        ...                      intermediate_size=32, num_hidden_layers=1,
        ...                      num_attention_heads=2)
        >>> student, teacher = LlamaForCausalLM(config), LlamaForCausalLM(config)
        >>> args = TrainingArguments(tempfile.mkdtemp(), max_steps=1, report_to=[],
        ...                          use_cpu=True, per_device_train_batch_size=2,
        ...                          save_strategy="no", disable_tqdm=True)
        >>> trainer = OnPolicyKDTrainer(
        ...     model=student, teacher_model=teacher, args=args,
        ...     train_dataset=[{"prompt": "Hello"}, {"prompt": "Bye"}],
        ...     processing_class=tokenizer, max_new_tokens=4)
        >>> output = trainer.train()  # prints the final log line
        {'train_runtime': ...}
        >>> output.training_loss >= 0
        True
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        teacher_model: Any = None,
        args: transformers.TrainingArguments | None = None,
        train_dataset: Any = None,
        processing_class: Any = None,
        *,
        lmbda: float = 1.0,
        beta: float = 1.0,
        temperature: float = 1.0,
        max_new_tokens: int = 128,
        top_k: int = 0,
        top_p: float = 1.0,
        seq_kd: bool = False,
        max_prompt_length: int | None = None,
        divergence: str | None = None,
        divergence_kwargs: Mapping[str, Any] | None = None,
        log_completions: bool = False,
        num_completions_to_log: int = 4,
        **kwargs: Any,
    ) -> None:
        if processing_class is None:
            raise ValueError(
                "OnPolicyKDTrainer needs `processing_class` (the tokenizer): it tokenizes the "
                "prompts, renders chat templates and gives the EOS and pad ids."
            )
        self.lmbda = check_unit_interval("lmbda", lmbda)
        self.beta = check_unit_interval("beta", beta)
        self.seq_kd = check_bool("seq_kd", seq_kd)
        self.log_completions = check_bool("log_completions", log_completions)
        self.num_completions_to_log = check_int(
            "num_completions_to_log", num_completions_to_log, min_value=0
        )
        if divergence is None and divergence_kwargs:
            raise ValueError(
                "`divergence_kwargs` needs `divergence` (JSD's only argument is beta)."
            )
        self._divergence: dict[str, Any] = {"divergence": "jsd", "beta": self.beta}
        if divergence is not None:
            self._divergence = {"divergence": divergence, **dict(divergence_kwargs or {})}
        self._temperature = check_positive("temperature", temperature)
        LMHeadDistillationLoss(temperature=self._temperature, **self._divergence)  # check now
        eos_ids = _eos_ids(processing_class, model)
        collator = PromptCollator(processing_class, max_prompt_length, max_new_tokens)
        self.sampling = SamplingConfig(
            max_new_tokens=max_new_tokens,
            temperature=self._temperature,
            top_k=top_k,
            top_p=top_p,
            eos_token_id=eos_ids or None,
            pad_token_id=collator.pad_token_id,
        )
        kwargs.setdefault("data_collator", collator)
        super().__init__(
            model=model,
            teacher_model=teacher_model,
            args=args,
            train_dataset=train_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        if not self._kd_shift_labels:
            raise ValueError(
                f"OnPolicyKDTrainer distills causal LMs; {type(self.model).__name__} is not one."
            )
        if self._kd_config is not None and _teacher_names(self._kd_config["teacher_model"]):
            raise ValueError(
                "OnPolicyKDTrainer takes one teacher; for several, use KDTrainer (off-policy)."
            )
        self._mix_generator = torch.Generator().manual_seed(self.args.seed)
        self._sample_generator = self._new_sample_generator(self.args.process_index)
        self._sample_sums: dict[str, Tensor] = {}
        self.completion_samples: list[dict[str, str]] = []
        self._tokenizer: Any = processing_class

    # ------------------------------------------------------------------ configuration hooks
    def _full_logits_criterion(self, teacher_model: Any) -> nn.Module:
        """The divergence on full logits: the same loss, unbound (no lm_heads)."""
        return LMHeadDistillationLoss(
            temperature=self._temperature, shift_labels=False, **self._divergence
        )

    def _chunked_criterion(self, student_head: nn.Module, teacher_head: nn.Module) -> nn.Module:
        """The divergence through the two lm_heads, chunked."""
        return LMHeadDistillationLoss(
            student_head,
            teacher_head,
            temperature=self._temperature,
            shift_labels=False,
            compute_student_loss=True,
            **self._divergence,
        )

    def _wants_student_loss(self) -> bool:
        """The cross-entropy is computed only when a balancer trains on it."""
        model = self.model
        return isinstance(model, DistillationModel) and model.loss_balancer is not None

    def _set_signature_columns_if_needed(self) -> None:
        # the collator reads the raw columns: keep them when Trainer removes unused ones
        if self._signature_columns is None:
            self._signature_columns = ["prompt", "completion"]  # type: ignore[assignment]

    def _new_sample_generator(self, offset: int) -> torch.Generator:
        device = self.args.device
        generator = torch.Generator(device=device) if device.type == "cuda" else torch.Generator()
        return generator.manual_seed(self.args.seed + offset)

    # ------------------------------------------------------------------ completions
    @contextlib.contextmanager
    def _sampling_student(self) -> Iterator[nn.Module]:
        """The converted student, running only the student and capturing nothing that lingers.

        ``eval()`` (dropout off; no "overwritten output" warnings) inside
        ``only_student_forward()``; its train mode is restored after, which also drops what
        the sampling forwards captured.
        """
        model = self.distillation_model
        was_training = model.training
        model.eval()
        try:
            with model.only_student_forward():
                yield model
        finally:
            model.train(was_training)

    def _complete(
        self, batch: dict[str, Any], source: CompletionSource | None = None
    ) -> dict[str, Any]:
        """Replace a prompt batch by prompt + completion (``input_ids``, ``labels``, ...)."""
        if "prompt_input_ids" not in batch:
            raise ValueError(
                "OnPolicyKDTrainer batches hold `prompt_input_ids` (and optionally "
                f"`completion_input_ids`), got keys {sorted(batch)}. Use rows with a 'prompt' "
                "and the default data_collator (kdistill.onpolicy.PromptCollator)."
            )
        training = source is None
        if source is None:
            source = choose_source(self.lmbda, self.seq_kd, self._mix_generator)
        generator = self._sample_generator if training else self._eval_generator
        with self._sampling_student() as student:
            completions = gkd_completions(
                source,
                student,
                self.distillation_model.teacher_model,
                batch["prompt_input_ids"],
                batch["prompt_attention_mask"],
                batch.get("completion_input_ids"),
                batch.get("completion_attention_mask"),
                sampling=self.sampling,
                generator=generator,
            )
        if training:
            self._record_completions(completions, source)
        return {
            "input_ids": completions.input_ids,
            "attention_mask": completions.attention_mask,
            "position_ids": completions.position_ids,
            "labels": completions.labels(IGNORE_INDEX),
        }

    def get_batch_samples(
        self, epoch_iterator: Iterator, num_batches: int, device: torch.device
    ) -> tuple[list, Tensor | int | None]:
        """Fetch the step's micro-batches, complete them all, count their completion tokens."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        batches = [self._complete(batch) for batch in batches]
        return batches, self._get_num_items_in_batch(batches, device)

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> Any:
        """Evaluate on completions the student samples for the prompts (see the class doc)."""
        if "prompt_input_ids" in inputs:
            inputs = self._complete(inputs, source="student")
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        """Run Trainer's evaluation loop with the evaluation sampling generator reseeded."""
        self._eval_generator = self._new_sample_generator(self.args.process_index)
        return super().evaluation_loop(*args, **kwargs)

    # ------------------------------------------------------------------ logging
    def _record_completions(self, completions: Completions, source: CompletionSource) -> None:
        """Accumulate the completion statistics on device (no host sync per micro-batch)."""
        stats = {
            "rows": float(completions.input_ids.shape[0]),
            "tokens": completions.lengths.sum().float(),
            "ended": completions.ended.sum().float(),
            "batches": 1.0,
            "on_policy": float(source == "student"),
        }
        for name, value in stats.items():
            value = torch.as_tensor(value, device=completions.input_ids.device)
            self._sample_sums[name] = self._sample_sums.get(name, 0) + value
        if self.log_completions and self.num_completions_to_log:
            rows = slice(0, self.num_completions_to_log)
            prompts = completions.input_ids[rows, : completions.prompt_length]
            prompt_mask = completions.attention_mask[rows, : completions.prompt_length].bool()
            decode = self._tokenizer.decode
            self.completion_samples = [
                {
                    "source": source,
                    "prompt": decode(p[m].tolist(), skip_special_tokens=True),
                    "completion": decode(c[k].tolist(), skip_special_tokens=True),
                }
                for p, m, c, k in zip(
                    prompts,
                    prompt_mask,
                    completions.completion_ids[rows],
                    completions.completion_mask[rows, completions.prompt_length :],
                    strict=True,
                )
            ]

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the completion statistics (and samples) to the training logs, then log."""
        if "loss" in logs and self._sample_sums:
            names = sorted(self._sample_sums)
            stacked = torch.stack([self._sample_sums[n].float() for n in names])
            totals = dict(zip(names, self.accelerator.reduce(stacked, "sum").tolist(), strict=True))
            rows = max(totals["rows"], 1.0)
            logs = {
                **logs,
                "completion_length": totals["tokens"] / rows,
                "eos_share": totals["ended"] / rows,
                "on_policy_share": totals["on_policy"] / max(totals["batches"], 1.0),
            }
            self._sample_sums = {}
            if self.log_completions and self.completion_samples:
                for sample in self.completion_samples:
                    logger.info("step %d %s", self.state.global_step, sample)
        super().log(logs, *args, **kwargs)


def _eos_ids(tokenizer: Any, model: Any) -> list[int]:
    """The EOS ids: the tokenizer's and the student's ``generation_config``'s, deduplicated."""
    ids: list[int] = []
    for value in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
    ):
        for token in [value] if isinstance(value, int) else list(value or []):
            if isinstance(token, int) and token not in ids:
                ids.append(token)
    return ids
