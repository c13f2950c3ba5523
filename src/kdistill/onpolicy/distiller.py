"""``OnPolicyDistiller``: generalized knowledge distillation (GKD) in a plain PyTorch loop.

One step (Agarwal et al., "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes", ICLR 2024, arXiv 2306.13649, Algorithm 1):

1. choose where the completions come from: with probability ``lmbda`` the student samples them
   (on-policy); otherwise the dataset's own completions are used (supervised KD), or, with
   ``seq_kd=True``, the teacher samples them (sequence-level KD, Kim & Rush 2016);
2. score them: the teacher runs once on prompt + completion under ``no_grad``, and the loss is
   the divergence between the two next-token distributions at every completion token
   (``completion_kd_loss``; chunked through the lm_heads, never ``[B, T, V]`` logits).

The default divergence is the reverse KL ``KL(p_S ‖ p_T)`` (TRL's ``DistillationTrainer``
default, ``beta=1``). With ``lmbda=0`` and no ``seq_kd`` the step is exactly off-policy KD on
the dataset's completions (the loss ``kdistill.llm.convert_causal_lm`` gives with those tokens as
labels).

Example (the whole training loop; ``prompts`` yields left- or right-padded prompt batches)::

    distiller = OnPolicyDistiller(student, teacher, sampling=SamplingConfig(
        max_new_tokens=64, eos_token_id=tokenizer.eos_token_id), generator=g)
    for batch in prompts:
        step = distiller.step(batch["input_ids"], batch["attention_mask"])
        step.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
"""

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .._validation import check_bool, check_choice, check_unit_interval
from ..losses.lm_head import LMHeadDistillationLoss
from ._model_utils import find_lm_head
from .completions import Completions
from .sampling import SamplingConfig, sample_completions
from .scoring import completion_kd_loss

__all__ = [
    "SOURCES",
    "CompletionSource",
    "OnPolicyDistiller",
    "OnPolicyStep",
    "choose_source",
    "gkd_completions",
]

CompletionSource = Literal["student", "teacher", "dataset"]
SOURCES: tuple[str, ...] = ("student", "teacher", "dataset")


def choose_source(
    lmbda: float, seq_kd: bool, generator: torch.Generator | None = None
) -> CompletionSource:
    """Draw a step's completion source: ``"student"`` with probability ``lmbda`` (GKD's λ).

    Otherwise ``"teacher"`` with ``seq_kd``, else ``"dataset"``. λ = 0 never samples from the
    student and λ = 1 always does: the draw is ``u < λ`` with ``u`` uniform in [0, 1) from
    ``generator`` (the global RNG when None).
    """
    u = float(torch.rand((), generator=generator))
    if u < lmbda:
        return "student"
    return "teacher" if seq_kd else "dataset"


def gkd_completions(
    source: CompletionSource,
    student: nn.Module,
    teacher: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor | None = None,
    completion_ids: Tensor | None = None,
    completion_mask: Tensor | None = None,
    *,
    sampling: SamplingConfig,
    generator: torch.Generator | None = None,
) -> Completions:
    """The completions of one GKD step from ``source``.

    Args:
        source: ``"student"`` / ``"teacher"`` (sampled with ``sampling``) or ``"dataset"``.
        student: The model sampled for ``"student"``.
        teacher: The model sampled for ``"teacher"`` (sequence-level KD).
        prompt_ids: ``[B, P]`` prompts (padded on either side).
        prompt_mask: ``[B, P]`` True/1 on real tokens (None: no padding).
        completion_ids: ``[B, C]`` the dataset's completions, needed for ``"dataset"``.
        completion_mask: ``[B, C]`` True/1 on real completion tokens.
        sampling: The sampling settings (its pad and EOS ids also pack dataset completions).
        generator: Source of randomness for the sampling.

    Raises:
        ValueError: An unknown source, or ``"dataset"`` without completions.
    """
    check_choice("source", source, SOURCES)
    if source == "dataset":
        if completion_ids is None:
            raise ValueError(
                "This step uses the dataset's completions (lmbda < 1 and seq_kd=False) but none "
                "were given: pass `completion_ids` (a 'completion' column), or set lmbda=1 or "
                "seq_kd=True."
            )
        return Completions.from_parts(
            prompt_ids,
            prompt_mask,
            completion_ids,
            completion_mask,
            pad_token_id=sampling.pad_id,
            eos_token_id=sampling.eos_ids or None,
        )
    model = student if source == "student" else teacher
    return sample_completions(model, prompt_ids, prompt_mask, sampling, generator=generator)


@dataclass(frozen=True)
class OnPolicyStep:
    """What ``OnPolicyDistiller.step`` computed.

    Attributes:
        loss: The scalar KD loss (backpropagate it).
        completions: The scored batch.
        source: Where the completions came from: ``"student"``, ``"teacher"`` or ``"dataset"``.
    """

    loss: Tensor
    completions: Completions
    source: CompletionSource


class OnPolicyDistiller:
    """Generalized knowledge distillation (GKD) of ``teacher`` into ``student`` (module docstring).

    The models are not modified: their lm_heads are skipped only during the scoring forwards.
    Bind ``loss`` yourself or let the distiller bind it: an unbound ``LMHeadDistillationLoss``
    (or the default) is bound, in place, to the models' lm_heads when both have one that the
    chunked path can use (``find_lm_head``); otherwise it stays unbound and works on the models'
    logits.

    Args:
        student: The student causal LM (trained by the caller's optimizer).
        teacher: The teacher causal LM (same vocabulary); frozen by the caller or not, it only
            runs under ``no_grad``.
        loss: The divergence: an ``LMHeadDistillationLoss``; None is reverse KL at temperature 1
            (``LMHeadDistillationLoss(divergence="reverse_kl")``). Every divergence of the loss
            works (forward/reverse KL, generalized JSD with ``beta``, top-k KL with the tail
            mass, total variation, ...).
        lmbda: Probability that a step is on-policy (the student samples), in [0, 1].
        seq_kd: Off-policy steps use teacher samples instead of the dataset's completions.
        sampling: How the student (and, for ``seq_kd``, the teacher) sample.
        lm_head_name: Name of both models' output projection.
        generator: Source of randomness for the λ draw and the sampling (None: global RNG).

    Raises:
        TypeError: ``loss`` is not an ``LMHeadDistillationLoss``, or a model is not a module.
        ValueError: A bad ``lmbda``, or a bound loss whose heads are not the models'.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        loss: LMHeadDistillationLoss | None = None,
        *,
        lmbda: float = 1.0,
        seq_kd: bool = False,
        sampling: SamplingConfig | None = None,
        lm_head_name: str = "lm_head",
        generator: torch.Generator | None = None,
    ) -> None:
        for role, model in (("student", student), ("teacher", teacher)):
            if not isinstance(model, nn.Module):
                raise TypeError(f"`{role}` must be an nn.Module, got {type(model).__name__}.")
        loss = LMHeadDistillationLoss(divergence="reverse_kl") if loss is None else loss
        if not isinstance(loss, LMHeadDistillationLoss):
            raise TypeError(
                f"`loss` must be an LMHeadDistillationLoss (or None), got {type(loss).__name__}."
            )
        sampling = SamplingConfig() if sampling is None else sampling
        if not isinstance(sampling, SamplingConfig):
            raise TypeError(f"`sampling` must be a SamplingConfig, got {type(sampling).__name__}.")
        if loss.student_lm_head is None:
            student_head, why_s = find_lm_head(student, lm_head_name)
            teacher_head, why_t = find_lm_head(teacher, lm_head_name)
            if student_head is not None and teacher_head is not None:
                loss.bind_lm_heads_(student_head, teacher_head)
            self._full_logits_reason = why_s or why_t
        else:
            self._full_logits_reason = ""
        self.student = student
        self.teacher = teacher
        self.loss_fn = loss
        self.lmbda = check_unit_interval("lmbda", lmbda)
        self.seq_kd = check_bool("seq_kd", seq_kd)
        self.sampling = sampling
        self.generator = generator

    @property
    def chunked(self) -> bool:
        """Whether the loss goes through the lm_heads (no ``[B, T, V]`` logits)."""
        return self.loss_fn.student_lm_head is not None

    @property
    def full_logits_reason(self) -> str:
        """Why the models' logits are used instead of the lm_heads ("" when chunked)."""
        return self._full_logits_reason

    def choose_source(self) -> CompletionSource:
        """Draw this step's completion source (``choose_source`` with this λ and generator)."""
        return choose_source(self.lmbda, self.seq_kd, self.generator)

    def completions(
        self,
        prompt_ids: Tensor,
        prompt_mask: Tensor | None = None,
        completion_ids: Tensor | None = None,
        completion_mask: Tensor | None = None,
        source: CompletionSource | None = None,
    ) -> tuple[Completions, CompletionSource]:
        """The completions of one step, and where they came from.

        Args:
            prompt_ids: ``[B, P]`` prompts (padded on either side).
            prompt_mask: ``[B, P]`` True/1 on real tokens (None: no padding).
            completion_ids: ``[B, C]`` the dataset's completions, needed when the source is
                ``"dataset"``.
            completion_mask: ``[B, C]`` True/1 on real completion tokens.
            source: Force the source; None draws it (``choose_source``).

        Raises:
            ValueError: The source is ``"dataset"`` but no completions were given.
        """
        source = self.choose_source() if source is None else source
        completions = gkd_completions(
            source,
            self.student,
            self.teacher,
            prompt_ids,
            prompt_mask,
            completion_ids,
            completion_mask,
            sampling=self.sampling,
            generator=self.generator,
        )
        return completions, source

    def loss(
        self, completions: Completions, num_items_in_batch: int | Tensor | None = None
    ) -> Tensor:
        """The KD loss over the completion tokens (``completion_kd_loss`` with this loss)."""
        return completion_kd_loss(
            self.student,
            self.teacher,
            completions,
            self.loss_fn,
            num_items_in_batch=num_items_in_batch,
        )

    def step(
        self,
        prompt_ids: Tensor,
        prompt_mask: Tensor | None = None,
        completion_ids: Tensor | None = None,
        completion_mask: Tensor | None = None,
        *,
        num_items_in_batch: int | Tensor | None = None,
    ) -> OnPolicyStep:
        """Choose the source, get the completions and compute the loss (not backpropagated).

        Args:
            prompt_ids: ``[B, P]`` prompts.
            prompt_mask: ``[B, P]`` True/1 on real prompt tokens.
            completion_ids: ``[B, C]`` the dataset's completions (for off-policy steps).
            completion_mask: ``[B, C]`` True/1 on real completion tokens.
            num_items_in_batch: Global completion-token count for gradient accumulation.

        Returns:
            The ``OnPolicyStep`` (loss, completions, source).
        """
        completions, source = self.completions(
            prompt_ids, prompt_mask, completion_ids, completion_mask
        )
        return OnPolicyStep(self.loss(completions, num_items_in_batch), completions, source)
