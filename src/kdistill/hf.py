"""Hugging Face ``transformers.Trainer`` integration: ``KDTrainer``.

``KDTrainer`` is a ``Trainer`` whose model is the student converted with ``kdistill.convert``: each
step runs the frozen teacher and the student on the same batch and optimizes the KD loss (alone, the
ModelOpt ``KDTrainer`` convention) or, with a loss balancer, the balanced sum of the student's own
cross-entropy and the KD losses. Every component is logged through the Trainer's own ``log``.

Install the extra: ``pip install "kdistill[hf]"``. This module is never imported by ``kdistill``.
"""

import contextlib
from collections.abc import Iterator, Mapping
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

from .balancers import STUDENT_LOSS_KEY, DistillationLossBalancer, sum_losses
from .conversion import convert, export
from .llm import compute_causal_lm_loss, is_causal_lm_recipe
from .losses import EnsembleLogitsDistillationLoss, LogitsDistillationLoss
from .model import LOSS_MODULES_KEY, TEACHER_KEY, DistillationModel

__all__ = [
    "IGNORE_INDEX",
    "KDTrainer",
    "default_criterion",
    "default_multi_teacher_criterion",
    "next_token_mask",
]

IGNORE_INDEX = -100
"""Label value Hugging Face models ignore in their loss (and ``KDTrainer`` in the KD loss)."""


def default_criterion() -> nn.Module:
    """The default ``KDTrainer`` criterion: token-level forward KL, summed over kept tokens.

    ``LogitsDistillationLoss(temperature=1, reduction="sum")`` on the model outputs; ``KDTrainer``
    divides the sum by the number of target tokens (see ``KDTrainer``), which makes it the mean KL
    per target token, correct under gradient accumulation and data parallelism.
    """
    return LogitsDistillationLoss(temperature=1.0, reduction="sum")


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


def _default_criterion_for(teacher_model: Any) -> Any:
    """``default_criterion()``, or the multi-teacher one for a dict (or ``TeacherDict``)."""
    names = None
    if isinstance(teacher_model, Mapping):
        names = tuple(teacher_model)
    elif isinstance(teacher_model, nn.Module):  # a TeacherDict, a CachedTeacher of several
        names = getattr(teacher_model, "kd_teacher_names", None)
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

    ``LMHeadDistillationLoss`` on the final hidden states (e.g.
    ``{("model.norm", "model.norm"): LMHeadDistillationLoss(student.lm_head, teacher.lm_head,
    shift_labels=False)}`` for Llama) gives the default criterion's loss and gradients, chunked.
    To never build ``[B, T, V]`` logits at all, pass a model from
    ``kdistill.llm.convert_causal_lm`` as ``model`` (no teacher or criterion): the forward then
    runs without ``labels`` and the recipe's loss gives both the KD term and ``ce_loss``.

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
        **trainer_kwargs: Any,
    ) -> None:
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
                "criterion": _default_criterion_for(teacher_model)
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
        self._kd_train_sums: dict[str, Tensor] = {}
        self._kd_eval_sums: dict[str, Tensor] = {}
        self._kd_eval_count = 0
        self._kd_last_logged_step = 0

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
        outputs = model(**forward_inputs)
        has_labels = inputs.get("labels") is not None
        student_loss = outputs.get("loss") if has_labels and isinstance(outputs, dict) else None
        logits = outputs.get("logits") if isinstance(outputs, dict) else None
        logits_shape = logits.shape if isinstance(logits, Tensor) else torch.Size()
        loss_kwargs = self._kd_loss_kwargs(inputs, logits_shape, num_items_in_batch)
        kd_terms = self.distillation_model.compute_kd_loss(skip_balancer=True, **loss_kwargs)
        return _KDTerms(kd_terms, student_loss, outputs, loss_kwargs, logits_shape)

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
