"""Logit distillation through the lm_head, chunked over tokens, never materializing ``[B, T, V]``.

The loss takes the models' final hidden states and their output projections (lm_heads) instead of
logits. Tokens are processed in chunks: each chunk computes both lm_head matmuls, the divergence in
float32 and, in the same pass, its gradient with respect to the student's hidden states, lm_head
weight and bias. Only those gradients are kept (the chunk's logits are freed before the next
chunk), so peak memory is O(chunk_size · V) rather than O(B · T · V). The design is that of the
fused-linear chunked losses of Liger-Kernel
(``liger_kernel/chunked_loss/fused_linear_distillation.py`` at v0.8.5, BSD-2-Clause); the code
is kdistill's own. The divergence is named like the plain losses of the registry (``"jsd"``,
``"reverse_kl"``, ...) and computed by that loss's own ``divergence`` hook
(``LogitDivergenceLoss``), differentiated by autograd: one formula for plain and chunked.
"""

import inspect
from typing import Any

from torch import Tensor, nn

from .._errors import unknown_name_message
from .._recipes import LossRecipe
from .._validation import MAX_SCALE, check_bool, check_choice, check_int, check_positive
from ._chunked import ChunkSpec, LMHeadLossBase, chunked_divergence, token_weights
from ._logit_loss import LogitDivergenceLoss
from ._registry import get_loss, list_losses, register_loss
from ._utils import extract_logits, position_mask

__all__ = ["DIVERGENCE_ALIASES", "LMHeadDistillationLoss"]

VOCAB_ALIGNMENTS: tuple[str, ...] = ("error", "truncate")

# The chunked loss's own names before it used the registry's; kept working, mapped here.
DIVERGENCE_ALIASES: dict[str, str] = {
    "forward_kl": "logits_distillation",
    "generalized_jsd": "jsd",
    "total_variation": "tvd",
    "topk_forward_kl": "topk_kl",
}
# Constructor arguments of the divergence losses that LMHeadDistillationLoss passes on.
_DIVERGENCE_ARGS: tuple[str, ...] = ("alpha", "beta", "k", "threshold")

# Two levels of chunking. The lm_head matmuls run on chunks of ``chunk_size`` tokens (default
# max(256, 2**23 // V)): every chunk reads both [V, D] weights and reads and writes the [V, D]
# weight-gradient accumulator, so larger chunks mean less memory traffic. Two [chunk, V] buffers
# are alive per chunk (student logits, overwritten by their gradient, and teacher logits). The
# divergence's float32 temporaries (about eight [rows, V] tensors with autograd) live on
# sub-chunks of max(8, 2**21 // V) rows only: 16 rows, 8 MiB each, at V = 128k.
_MIN_CHUNK_TOKENS = 256
_LOGITS_PER_CHUNK = 2**23
_MIN_SUB_CHUNK_TOKENS = 8
_LOGITS_PER_SUB_CHUNK = 2**21


def _divergence_names() -> list[str]:
    """Registered losses usable as a divergence: ``LogitDivergenceLoss``es on dense teachers."""
    return [
        name
        for name in list_losses()
        if isinstance(cls := get_loss(name), type)
        and issubclass(cls, LogitDivergenceLoss)
        and cls.lm_head_divergence
    ]


def _build_divergence(
    name: Any, temperature: float, args: dict[str, Any]
) -> tuple[str, LogitDivergenceLoss]:
    """The registry name and an instance of the divergence loss ``name`` (aliases allowed)."""
    valid = _divergence_names()
    canonical = DIVERGENCE_ALIASES.get(name, name) if isinstance(name, str) else name
    if canonical not in valid:
        raise ValueError(
            unknown_name_message("`divergence`", str(name), valid + list(DIVERGENCE_ALIASES))
        )
    cls = get_loss(canonical)
    given = {key: value for key, value in args.items() if value is not None}
    for key in given:
        if key not in inspect.signature(cls).parameters:
            users = [n for n in valid if key in inspect.signature(get_loss(n)).parameters]
            raise ValueError(
                f"`{key}` is not an argument of divergence {canonical!r} ({cls.__name__}); it is "
                f"used by divergence {users}. Drop `{key}` or pick one of those."
            )
    divergence_loss = cls(temperature=temperature, **given)
    assert isinstance(divergence_loss, LogitDivergenceLoss), "checked by _divergence_names"
    return canonical, divergence_loss


@register_loss(
    "lm_head_distillation",
    # unbound (no lm_heads), the inputs are logits: the contract tests it as a logit loss
    recipe=LossRecipe(lambda: LMHeadDistillationLoss(temperature=2.0, chunk_size=2)),
)
class LMHeadDistillationLoss(LMHeadLossBase):
    """Logit distillation from final hidden states, chunked so that ``[B, T, V]`` never exists.

    For every kept token position ``i`` it computes ``T² · D(softmax(t_i/T), softmax(s_i/T))`` with
    ``s_i = W_s h_s,i + b_s`` and ``t_i = W_t h_t,i + b_t`` (the two lm_heads), ``D`` the
    per-position divergence of the registered logit loss named by ``divergence``, computed by that
    loss's own ``divergence`` method (so the chunked value equals the plain loss on full logits):

    - ``"logits_distillation"`` (alias ``"forward_kl"``): ``KL(p_T ‖ p_S)``, Hinton KD;
    - ``"reverse_kl"``: ``KL(p_S ‖ p_T)``;
    - ``"jsd"`` (alias ``"generalized_jsd"``): GKD's ``β·KL(p_T ‖ M) + (1-β)·KL(p_S ‖ M)``,
      ``M = β·p_T + (1-β)·p_S`` (``beta``, default 0.5; β = 0 and β = 1 give forward and reverse
      KL);
    - ``"skew_kl"`` / ``"skew_reverse_kl"``: DistiLLM's ``KL(p_T ‖ α·p_T + (1-α)·p_S)`` and
      ``KL(p_S ‖ (1-α)·p_T + α·p_S)`` (``alpha``, default 0.1);
    - ``"tvd"`` (alias ``"total_variation"``): ``½ Σ |p_T - p_S|``;
    - ``"topk_kl"`` (alias ``"topk_forward_kl"``): forward KL over the teacher's top-``k`` classes
      plus one bucket holding the remaining mass of each side (``k``, default 64);
    - ``"dkd"``, ``"mft"``: decoupled KD (``alpha``, ``beta``) and minifinetuning
      (``threshold``), whose targets are the (shifted) ``labels``;
    - any other registered ``LogitDivergenceLoss`` (``available_divergences()`` lists them).

    The result is always multiplied by T² (for ``"tvd"`` too, unlike ``TVDLoss``, which is not:
    the chunked loss has done so since its first release). The per-token values are summed and
    divided by the number of kept tokens (or by ``num_items_in_batch`` when given: the Hugging Face
    convention for gradient accumulation, where each micro-batch divides by the token count of the
    whole accumulated batch). A position is kept when ``mask`` is True there and its (shifted)
    label is not ``ignore_index``; an all-masked batch gives 0 and zero gradients. The divergence
    is computed in float32 whatever the input dtype (float64 inputs stay float64).

    Tokens are processed ``chunk_size`` at a time; each chunk's gradient (w.r.t. the student hidden
    states, lm_head weight and bias, never the teacher's) is computed right away and only the
    gradients are kept, so peak memory is O(chunk_size · V) plus one gradient of the student lm_head
    weight, which ``backward`` hands to autograd without a copy. The consequences: the loss cannot
    be reduced per token (there is no ``reduction`` argument), its gradients are computed even if
    ``backward`` is never called, and while the student lm_head requires grad one forward allows
    one backward (``retain_graph=True`` reuse raises).

    The student's next-token cross-entropy can come from the same chunks (the costly part, the
    lm_head matmul, is shared): ``kd, ce = loss(..., labels=labels, return_student_loss=True)``.
    ``compute_student_loss=True`` tells the integrations (``kdistill.llm.compute_causal_lm_loss``,
    ``kdistill.hf.KDTrainer``) to ask for it; called as a plain criterion the loss returns the KD
    scalar only.

    The lm_heads are *referenced*, not registered as submodules: the loss has no parameters or
    ``state_dict`` entries, so checkpoints never hold the teacher's weights (nor a second copy of
    the student's). The student's head is trained through the student model that owns it; move
    the models, not the loss, between devices and dtypes. Without lm_heads
    (``LMHeadDistillationLoss()``, or a loss rebuilt by ``kdistill.restore``, which records only
    ``get_config()``) the inputs are taken to be logits already (identity heads): the same loss,
    chunked, on ``[..., V]`` tensors.
    ``kdistill.llm.restore_causal_lm`` binds the heads again after a restore.

    Args:
        student_lm_head: The student's output projection (``nn.Linear``-like: ``weight`` [V_s, D_s],
            optional ``bias`` [V_s]), or None (inputs are logits).
        teacher_lm_head: The teacher's output projection (``weight`` [V_t, D_t]); None with
            ``student_lm_head``.
        divergence: The registered name of a logit divergence loss (see above), or an alias.
        temperature: Softmax temperature T, finite, > 0 and at most 1e6; the result is multiplied
            by T² so gradient magnitudes do not depend on T.
        chunk_size: Tokens per lm_head matmul (an int >= 1); None picks ``max(256, 2**23 // V)``.
        ignore_index: Label value whose positions are dropped (Hugging Face uses -100).
        beta: ``beta`` of the divergence loss (``"jsd"``, ``"dkd"``); None keeps its default.
        k: ``k`` of ``"topk_kl"``; None keeps its default.
        alpha: ``alpha`` of the divergence loss (``"skew_kl"``, ``"skew_reverse_kl"``,
            ``"dkd"``); None keeps its default.
        threshold: ``threshold`` of ``"mft"``; None keeps its default. Each of ``beta``, ``k``,
            ``alpha`` and ``threshold`` is validated by the divergence loss and must be one of
            its constructor arguments.
        vocab_alignment: What to do when V_s ≠ V_t: ``"error"`` (default) raises, ``"truncate"``
            compares the first ``min(V_s, V_t)`` classes (the extra rows, usually padding, get no
            gradient). Divergences between different vocabularies (``same_classes = False``) use
            both vocabularies whole.
        shift_labels: With ``labels``, the hidden state at position t is scored against the label at
            t + 1 (causal LM convention: pass the same ``labels`` as to the model); the last
            position is dropped. Set False when the labels are already shifted.
        compute_student_loss: Whether the integrations also take the student's cross-entropy
            from this loss (``forward(..., return_student_loss=True)``); see above.

    Example:
        >>> import torch
        >>> student_head, teacher_head = torch.nn.Linear(8, 50), torch.nn.Linear(16, 50)
        >>> loss_fn = LMHeadDistillationLoss(student_head, teacher_head, chunk_size=3)
        >>> hidden_s = torch.randn(2, 5, 8, requires_grad=True)
        >>> loss = loss_fn(hidden_s, torch.randn(2, 5, 16))
        >>> loss.backward()
        >>> hidden_s.grad.shape, student_head.weight.grad.shape, teacher_head.weight.grad is None
        (torch.Size([2, 5, 8]), torch.Size([50, 8]), True)
        >>> labels = torch.randint(0, 50, (2, 5))
        >>> hidden_t = torch.randn(2, 5, 16)
        >>> kd, ce = loss_fn(hidden_s, hidden_t, labels=labels, return_student_loss=True)
        >>> kd.shape, ce.shape
        (torch.Size([]), torch.Size([]))
    """

    def __init__(
        self,
        student_lm_head: nn.Module | None = None,
        teacher_lm_head: nn.Module | None = None,
        divergence: str = "logits_distillation",
        temperature: float = 1.0,
        chunk_size: int | None = None,
        ignore_index: int = -100,
        beta: float | None = None,
        k: int | None = None,
        vocab_alignment: str = "error",
        shift_labels: bool = True,
        compute_student_loss: bool = False,
        alpha: float | None = None,
        threshold: float | None = None,
    ) -> None:
        super().__init__()
        self.temperature = check_positive("temperature", temperature, max_value=MAX_SCALE)
        args = {"alpha": alpha, "beta": beta, "k": k, "threshold": threshold}
        self.divergence, divergence_loss = _build_divergence(divergence, self.temperature, args)
        # the loss's validated values (e.g. beta=1 -> 1.0); None where its default is used
        for name, value in args.items():
            setattr(self, name, None if value is None else getattr(divergence_loss, name, value))
        # a bound method, not a submodule: the loss keeps no children, parameters or state
        self._divergence_fn = divergence_loss.divergence
        self._divergence_needs_labels = divergence_loss.requires_labels
        self._same_classes = divergence_loss.same_classes
        self.chunk_size = (
            None if chunk_size is None else check_int("chunk_size", chunk_size, min_value=1)
        )
        self.ignore_index = check_int("ignore_index", ignore_index)
        self.vocab_alignment = check_choice("vocab_alignment", vocab_alignment, VOCAB_ALIGNMENTS)
        self.shift_labels = check_bool("shift_labels", shift_labels)
        self.compute_student_loss = check_bool("compute_student_loss", compute_student_loss)
        self._bind_given_heads(student_lm_head, teacher_lm_head)

    # ------------------------------------------------------------------ configuration
    @staticmethod
    def available_divergences() -> list[str]:
        """Registered names accepted by ``divergence`` (aliases aside: ``DIVERGENCE_ALIASES``).

        Example:
            >>> {"jsd", "reverse_kl", "skew_kl", "tvd"} <= set(
            ...     LMHeadDistillationLoss.available_divergences())
            True
        """
        return _divergence_names()

    def get_config(self) -> dict[str, Any]:
        """The JSON-able constructor arguments, lm_heads excluded (they are runtime objects)."""
        return {
            "divergence": self.divergence,
            "temperature": self.temperature,
            "chunk_size": self.chunk_size,
            "ignore_index": self.ignore_index,
            "beta": self.beta,
            "k": self.k,
            "vocab_alignment": self.vocab_alignment,
            "shift_labels": self.shift_labels,
            "compute_student_loss": self.compute_student_loss,
            "alpha": self.alpha,
            "threshold": self.threshold,
        }

    def extra_repr(self) -> str:
        """The configuration, shown by ``repr``."""
        return ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())

    def _check_vocab_sizes(self, student_vocab: int, teacher_vocab: int) -> None:
        """Raise ``ValueError`` when the sizes differ and ``vocab_alignment="error"``."""
        self._vocab_sizes(student_vocab, teacher_vocab)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        student_hidden: Tensor,
        teacher_hidden: Tensor,
        *,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
        num_items_in_batch: int | Tensor | None = None,
        return_student_loss: bool = False,
        student_loss_grad: bool = True,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Compute the distillation loss (and, when asked, the student's cross-entropy).

        Args:
            student_hidden: ``[..., T, D_s]`` final hidden states (after the final norm), or a
                model output holding them as ``logits`` (the recipe's lm_head-less models).
                Without lm_heads: student logits ``[..., T, V_s]``.
            teacher_hidden: ``[..., T, D_t]``, same leading shape; detached here.
            labels: ``[..., T]`` token ids; positions whose (shifted) label is ``ignore_index`` are
                dropped. With ``shift_labels`` the last position is dropped too.
            mask: ``[..., T]`` bool aligned with the hidden states; True keeps a position.
            num_items_in_batch: Divide the token sum by this (global kept-token count: a number
                or a one-element tensor, finite and > 0) instead of the kept tokens of this call.
                A tensor is read once on the host to check it.
            return_student_loss: Also return the student's next-token cross-entropy
                (temperature 1, same kept tokens and normalization) from the same chunks;
                needs ``labels``.
            student_loss_grad: False computes that cross-entropy as a value only (for logging:
                no gradient, none of its gradient matmuls); backpropagating it then gives the
                student nothing.

        Returns:
            The KD loss, a scalar (float32; float64 for float64 inputs); with
            ``return_student_loss=True`` the pair ``(kd, ce)``.

        Raises:
            ValueError: Shapes that do not fit the heads or each other, vocabulary sizes that
                differ, missing ``labels`` where they are needed, or a bad
                ``num_items_in_batch``.
        """
        return_student_loss = check_bool("return_student_loss", return_student_loss)
        student_loss_grad = check_bool("student_loss_grad", student_loss_grad)
        if labels is None and (return_student_loss or self._divergence_needs_labels):
            why = (
                "`return_student_loss=True` (the cross-entropy targets)"
                if return_student_loss
                else f"divergence {self.divergence!r} (its target classes)"
            )
            raise ValueError(f"LMHeadDistillationLoss needs `labels` for {why}.")
        hidden_s = extract_logits(student_hidden, "student")
        hidden_t = extract_logits(teacher_hidden, "teacher").detach()
        heads = self._head_tensors()
        weight_s, _, weight_t, _ = heads
        vocab_s, vocab_t = self._vocab_sizes(
            hidden_s.shape[-1] if weight_s is None else weight_s.shape[0],
            hidden_t.shape[-1] if weight_t is None else weight_t.shape[0],
        )
        self._check_hidden("student", hidden_s, weight_s)
        self._check_hidden("teacher", hidden_t, weight_t)
        if hidden_s.shape[:-1] != hidden_t.shape[:-1]:
            raise ValueError(
                f"Student inputs {tuple(hidden_s.shape)} and teacher inputs "
                f"{tuple(hidden_t.shape)} differ in their leading (batch/token) dimensions."
            )
        if labels is not None and self.shift_labels:
            if hidden_s.ndim < 3:
                raise ValueError(
                    f"Shifting `labels` needs inputs [..., T, D], got shape "
                    f"{tuple(hidden_s.shape)}. Pass shift_labels=False for per-position labels."
                )
            hidden_s, hidden_t = hidden_s[..., :-1, :], hidden_t[..., :-1, :]
            labels = labels[..., 1:]
            mask = None if mask is None else mask[..., :-1]
        positions = hidden_s.shape[:-1]
        keep = position_mask(positions, mask, labels, self.ignore_index)
        weights = token_weights(keep, positions, hidden_s.device, num_items_in_batch)  # [N]
        flat_labels = None if labels is None else labels.reshape(-1)  # [N]
        divergence_labels = None
        if self._divergence_needs_labels and flat_labels is not None:
            # dropped positions get class 0: their weight is 0, any valid class will do
            divergence_labels = flat_labels.masked_fill(flat_labels == self.ignore_index, 0)
        spec = ChunkSpec(
            divergence=self._divergence_fn,
            temperature=self.temperature,
            chunk_size=self.chunk_size or max(_MIN_CHUNK_TOKENS, _LOGITS_PER_CHUNK // vocab_s),
            sub_chunk_size=max(_MIN_SUB_CHUNK_TOKENS, _LOGITS_PER_SUB_CHUNK // vocab_s),
            student_vocab=vocab_s,
            teacher_vocab=vocab_t,
            ignore_index=self.ignore_index,
            ce_grad=student_loss_grad,
        )
        # dropped positions (weight 0: prompts, padding) cost no lm_head projection
        kd, ce = chunked_divergence(
            hidden_s,
            hidden_t,
            heads,
            weights * self.temperature**2,
            spec,
            ce_targets=flat_labels if return_student_loss else None,
            ce_weights=weights if return_student_loss else None,
            divergence_labels=divergence_labels,
            keep=keep,
        )
        return (kd, ce) if return_student_loss else kd

    def _vocab_sizes(self, student_vocab: int, teacher_vocab: int) -> tuple[int, int]:
        """The compared vocabulary sizes ``(V_s, V_t)``, or ``ValueError`` naming both sizes."""
        if not self._same_classes:
            return student_vocab, teacher_vocab
        if student_vocab != teacher_vocab and self.vocab_alignment == "error":
            raise ValueError(
                f"Student and teacher vocabulary sizes differ: student V={student_vocab}, "
                f"teacher V={teacher_vocab}. If the tokenizers are the same and the extra rows "
                "are padding, pass vocab_alignment='truncate' to compare the first "
                f"{min(student_vocab, teacher_vocab)} classes."
            )
        common = min(student_vocab, teacher_vocab)
        return common, common
