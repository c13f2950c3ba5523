"""The chunked lm_head machinery of ``LMHeadDistillationLoss`` and ``LMHeadCrossTokenizerLoss``.

Both losses take final hidden states and the two output projections (lm_heads) instead of
logits and process the token (or aligned-pair) rows in chunks: each chunk computes both lm_head
matmuls, the per-row divergence in float32 and, in the same pass, its gradient with respect to
the student's hidden states, lm_head weight and bias. Only those gradients are kept (the chunk's
logits are freed before the next chunk), so peak memory is O(chunk · V) rather than O(B · T · V).
The design is that of the fused-linear chunked losses of Liger-Kernel
(``liger_kernel/chunked_loss/fused_linear_distillation.py`` at v0.8.5, BSD-2-Clause); the code
is kdistill's own. The divergence is a loss's own ``LogitDivergenceLoss.divergence`` hook,
differentiated by autograd on each sub-chunk: one formula for the plain and the chunked losses.

Here: the lm_head checks and binding (``LMHeadLossBase``), the per-row weights
(``token_weights``), and the chunk loop (``chunked_divergence``).
"""

import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import check_positive
from ._divergences import tempered_log_probs, upcast

__all__ = ["ChunkSpec", "LMHeadLossBase", "chunked_divergence", "token_weights"]

# Marks a weight gradient already handed to autograd by ``backward``.
_CONSUMED: Any = object()


def _check_head(head: Any, role: str) -> int:
    """Raise ``TypeError`` unless ``head`` is an lm_head; return its vocabulary size V."""
    weight = getattr(head, "weight", None)
    if not isinstance(head, nn.Module) or not isinstance(weight, Tensor) or weight.ndim != 2:
        raise TypeError(
            f"`{role}_lm_head` must be an nn.Module with a 2-D `weight` [V, D] (e.g. nn.Linear), "
            f"got {type(head).__name__}."
        )
    bias = getattr(head, "bias", None)
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != weight.shape[:1]):
        raise TypeError(
            f"`{role}_lm_head.bias` must be None or a tensor of shape [{weight.shape[0]}], got "
            f"{getattr(bias, 'shape', type(bias).__name__)}."
        )
    return weight.shape[0]


def _weight_and_bias(head: nn.Module) -> tuple[Tensor, Tensor | None]:
    """An lm_head's ``weight`` and ``bias`` (checked by ``_check_head`` when it was bound)."""
    return cast(Tensor, head.weight), cast("Tensor | None", getattr(head, "bias", None))


class LMHeadLossBase(nn.Module):
    """Base of the chunked lm_head losses: the two lm_heads, referenced and checked.

    The lm_heads are *referenced*, not registered as submodules: the loss has no parameters or
    ``state_dict`` entries, so checkpoints never hold the teacher's weights (nor a second copy
    of the student's). Without lm_heads the inputs are logits (identity heads).

    Subclasses call ``_bind_given_heads(student_lm_head, teacher_lm_head)`` at the end of their
    constructor.
    """

    def __init__(self) -> None:
        super().__init__()
        # a tuple is not registered by nn.Module: the heads stay out of parameters()/state_dict()
        self._lm_heads: tuple[nn.Module, nn.Module] | None = None

    def _bind_given_heads(
        self, student_lm_head: nn.Module | None, teacher_lm_head: nn.Module | None
    ) -> None:
        """Bind the constructor's heads: both, or neither (the inputs are then logits)."""
        if (student_lm_head is None) != (teacher_lm_head is None):
            raise ValueError(
                "Give both `student_lm_head` and `teacher_lm_head`, or neither (the inputs are "
                "then logits)."
            )
        if student_lm_head is not None and teacher_lm_head is not None:
            self.bind_lm_heads_(student_lm_head, teacher_lm_head)

    def bind_lm_heads_(self, student_lm_head: nn.Module, teacher_lm_head: nn.Module) -> None:
        """Set the lm_heads (in place), checking them (and, per loss, their vocabulary sizes).

        Raises:
            TypeError: A head has no 2-D ``weight``.
            ValueError: The loss cannot compare these vocabulary sizes.
        """
        student_vocab = _check_head(student_lm_head, "student")
        teacher_vocab = _check_head(teacher_lm_head, "teacher")
        self._check_vocab_sizes(student_vocab, teacher_vocab)
        self._lm_heads = (student_lm_head, teacher_lm_head)

    def _check_vocab_sizes(self, student_vocab: int, teacher_vocab: int) -> None:
        """Raise ``ValueError`` when the loss cannot compare these sizes (default: any can)."""

    @property
    def student_lm_head(self) -> nn.Module | None:
        """The student's lm_head (not a registered submodule), or None when unbound."""
        return None if self._lm_heads is None else self._lm_heads[0]

    @property
    def teacher_lm_head(self) -> nn.Module | None:
        """The teacher's lm_head (not a registered submodule), or None when unbound."""
        return None if self._lm_heads is None else self._lm_heads[1]

    def _head_tensors(
        self,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """``(weight_s, bias_s, weight_t, bias_t)``: the teacher's detached; all None unbound."""
        if self._lm_heads is None:
            return None, None, None, None
        weight_s, bias_s = _weight_and_bias(self._lm_heads[0])
        weight_t, bias_t = _weight_and_bias(self._lm_heads[1])
        return weight_s, bias_s, weight_t.detach(), None if bias_t is None else bias_t.detach()

    @staticmethod
    def _check_hidden(role: str, hidden: Tensor, weight: Tensor | None) -> None:
        """Raise ``ValueError`` unless ``hidden`` is ``[..., D]`` with D the head's input size."""
        if hidden.ndim < 2:
            raise ValueError(
                f"{role} inputs must be [..., D] with at least one token axis, got shape "
                f"{tuple(hidden.shape)}."
            )
        if weight is not None and hidden.shape[-1] != weight.shape[1]:
            raise ValueError(
                f"{role} hidden states of shape {tuple(hidden.shape)} do not fit the {role} "
                f"lm_head weight {tuple(weight.shape)}: expected [..., {weight.shape[1]}]. "
                "Pass the final hidden states (after the final norm), not logits."
            )


def token_weights(
    keep: Tensor | None,
    positions: torch.Size,
    device: torch.device,
    num_items_in_batch: int | Tensor | None,
) -> Tensor:
    """Per-row weights ``[N]``: ``keep / count`` (``N`` = the number of positions).

    ``count`` is the number of kept positions (at least 1: an all-dropped batch gives weights 0),
    or ``num_items_in_batch`` (the Hugging Face convention for gradient accumulation, where each
    micro-batch divides by the token count of the whole accumulated batch).

    Raises:
        TypeError / ValueError: ``num_items_in_batch`` is not a finite number > 0 (or a
            one-element tensor holding one).
    """
    kept = torch.ones(positions, device=device) if keep is None else keep.float()
    if num_items_in_batch is None:
        count = kept.sum().clamp(min=1)
    else:
        count = _check_num_items(num_items_in_batch).to(device=device, dtype=torch.float32)
    return (kept / count).reshape(-1)


def _check_num_items(value: Any) -> Tensor:
    """``num_items_in_batch`` as a tensor, checked: a real number (not a bool), finite, > 0."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise TypeError(
                f"`num_items_in_batch` must be a number or a one-element real tensor, got a "
                f"{value.dtype} tensor of shape {tuple(value.shape)}."
            )
        # one host read per call (it syncs an accelerator): a count of 0 would silently give inf
        check_positive("num_items_in_batch", value.item())
        return value.reshape(())
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(
            f"`num_items_in_batch` must be a number, a one-element tensor or None, got "
            f"{type(value).__name__} {value!r}."
        )
    return torch.tensor(check_positive("num_items_in_batch", value))


@dataclass(frozen=True)
class ChunkSpec:
    """Everything the chunk loop needs besides tensors.

    Attributes:
        divergence: Per-row divergence ``(student_log_probs [c, V_s], teacher_log_probs
            [c, V_t], labels [c] or None) -> [c]`` (a ``LogitDivergenceLoss.divergence``).
        temperature: T of both softmaxes.
        chunk_size: Rows per lm_head matmul.
        sub_chunk_size: Rows per divergence evaluation (its float32 temporaries stay small).
        student_vocab: V_s used: the first V_s rows of the student head (or logits).
        teacher_vocab: V_t used, likewise.
        ignore_index: The cross-entropy's ignored label.
        hand_over_weight_grad: ``backward`` hands the accumulated lm_head weight gradient to
            autograd without a copy (one [V, D] buffer less); a second backward through the same
            forward then raises. False keeps it (``retain_graph=True`` works).
        ce_grad: False computes the cross-entropy as a value only (logged, not trained): none of
            its gradient buffers or matmuls.
    """

    divergence: Callable[[Tensor, Tensor, Tensor | None], Tensor]
    temperature: float
    chunk_size: int
    sub_chunk_size: int
    student_vocab: int
    teacher_vocab: int
    ignore_index: int = -100
    hand_over_weight_grad: bool = True
    ce_grad: bool = True


def chunked_divergence(
    hidden_s: Tensor,
    hidden_t: Tensor,
    heads: tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None],
    kd_weights: Tensor,
    spec: ChunkSpec,
    *,
    ce_targets: Tensor | None = None,
    ce_weights: Tensor | None = None,
    divergence_labels: Tensor | None = None,
    keep: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Weighted row sums of the divergence (and of the student's CE), chunked through the heads.

    Args:
        hidden_s: ``[..., D_s]`` student hidden states (logits when unbound), flattened here.
        hidden_t: ``[..., D_t]`` teacher hidden states, same rows; detached by the caller.
        heads: ``(weight_s, bias_s, weight_t, bias_t)`` (``LMHeadLossBase._head_tensors``).
        kd_weights: ``[N]`` per-row weights of the divergence (mask, normalization and any T²
            folded in).
        spec: Sizes and the divergence.
        ce_targets: ``[N]`` student targets: also return their cross-entropy (temperature 1),
            weighted by ``ce_weights`` ``[N]``.
        ce_weights: ``[N]``, with ``ce_targets``.
        divergence_labels: ``[N]`` labels passed to the divergence (None for most).
        keep: ``[...]`` bool, False where the row's weights are 0 (prompts, padding): those rows
            are dropped before any lm_head projection (one host sync for their count).

    Returns:
        ``(kd, ce)`` scalars in float32 (float64 inputs stay float64); ``ce`` is 0 without
        ``ce_targets``. Their gradients were computed during this call.
    """
    weight_s, bias_s, weight_t, bias_t = heads
    flat_s = hidden_s.reshape(-1, hidden_s.shape[-1])  # [N, D_s]
    flat_t = hidden_t.reshape(-1, hidden_t.shape[-1])  # [N, D_t]
    if keep is not None:
        rows = keep.reshape(-1).nonzero().squeeze(1)
        flat_s, flat_t, kd_weights = flat_s[rows], flat_t[rows], kd_weights[rows]
        ce_targets = None if ce_targets is None else ce_targets[rows]
        ce_weights = None if ce_weights is None else ce_weights[rows]
        divergence_labels = None if divergence_labels is None else divergence_labels[rows]
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and flat_s.requires_grad,
        grad_on and weight_s is not None and weight_s.requires_grad,
        grad_on and bias_s is not None and bias_s.requires_grad,
    )
    return _ChunkedLinearDivergence.apply(
        flat_s,
        weight_s,
        bias_s,
        flat_t,
        weight_t,
        bias_t,
        kd_weights,
        ce_targets,
        ce_weights,
        divergence_labels,
        spec,
        needs,
    )


def _linear(hidden: Tensor, weight: Tensor | None, bias: Tensor | None, vocab_size: int) -> Tensor:
    """``hidden @ weight[:V].T + bias[:V]`` in the inputs' dtype: ``[c, D] -> [c, V]``.

    Without a weight (no lm_heads bound) the inputs already are logits: ``[c, ≥V] -> [c, V]``.
    """
    if weight is None:
        return hidden[:, :vocab_size]
    return F.linear(hidden, weight[:vocab_size], None if bias is None else bias[:vocab_size])


class _ChunkedLinearDivergence(torch.autograd.Function):
    """Weighted row sums of the divergence (and optionally CE), gradients computed in forward.

    Inputs are flattened: hidden ``[N, D_s]``/``[N, D_t]``, per-row KD weights ``[N]``, CE
    targets and weights ``[N]`` (or None) and the divergence's labels ``[N]`` (or None). Returns
    ``(kd, ce)``; ``ce`` is 0 without CE targets.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden_s: Tensor,
        weight_s: Tensor | None,
        bias_s: Tensor | None,
        hidden_t: Tensor,
        weight_t: Tensor | None,
        bias_t: Tensor | None,
        kd_weights: Tensor,
        ce_targets: Tensor | None,
        ce_weights: Tensor | None,
        divergence_labels: Tensor | None,
        spec: ChunkSpec,
        needs: tuple[bool, bool, bool],
    ) -> tuple[Tensor, Tensor]:
        n, vocab = hidden_s.shape[0], spec.student_vocab
        need_grad_hidden, need_grad_weight, need_grad_bias = needs
        acc_dtype = upcast(hidden_s[:0]).dtype
        keys = ("kd", "ce") if ce_targets is not None else ("kd",)
        grad_keys = keys if spec.ce_grad else ("kd",)
        # one set of gradient buffers per output, combined with the output grads in backward
        grads: dict[str, list[Tensor | None]] = {}
        for key in grad_keys:
            grads[key] = [
                torch.zeros_like(hidden_s) if need_grad_hidden else None,
                # float32 accumulators: many chunks are summed, low precision would lose them
                None
                if weight_s is None or not need_grad_weight
                else torch.zeros_like(weight_s, dtype=acc_dtype),
                None
                if bias_s is None or not need_grad_bias
                else torch.zeros_like(bias_s, dtype=acc_dtype),
            ]
        totals = {key: hidden_s.new_zeros((), dtype=acc_dtype) for key in keys}
        needs_any_grad = any(needs)
        for start in range(0, n, spec.chunk_size):
            rows = slice(start, min(start + spec.chunk_size, n))
            h_s = hidden_s[rows]  # [c, D_s]
            logits_t = _linear(hidden_t[rows], weight_t, bias_t, spec.teacher_vocab)  # [c, V_t]
            logits_s = _linear(h_s, weight_s, bias_s, vocab)  # [c, V_s]
            # [c, V] gradients of each output w.r.t. the logits; the KD one reuses the student
            # logits' memory when it can (each row is read before it is overwritten)
            grad_logits = {}
            if needs_any_grad:
                reuse = weight_s is not None and logits_s.dtype == acc_dtype
                for key in grad_keys:
                    grad_logits[key] = (
                        logits_s
                        if key == "kd" and reuse
                        else torch.empty_like(logits_s, dtype=acc_dtype)
                    )
            # the divergence (and its gradient) on sub-chunks: its float32 temporaries stay small
            for sub_start in range(0, rows.stop - rows.start, spec.sub_chunk_size):
                sub = slice(sub_start, min(sub_start + spec.sub_chunk_size, rows.stop - rows.start))
                token_rows = slice(rows.start + sub.start, rows.start + sub.stop)
                values = _sub_chunk(
                    logits_s[sub],
                    logits_t[sub],
                    kd_weights[token_rows],
                    None if ce_targets is None else ce_targets[token_rows],
                    None if ce_weights is None else ce_weights[token_rows],
                    None if divergence_labels is None else divergence_labels[token_rows],
                    spec,
                    acc_dtype,
                    needs_any_grad,
                )
                for key, (value, grad) in values.items():
                    totals[key] += value
                    if grad is not None:
                        grad_logits[key][sub] = grad
            del logits_t
            for key, grad in grad_logits.items():
                grad_hidden, grad_weight, grad_bias = grads[key]
                if grad_hidden is not None and weight_s is None:  # the inputs were logits
                    grad_hidden[rows, :vocab] = grad
                elif grad_hidden is not None and weight_s is not None:  # [c, V] @ [V, D_s]
                    grad_hidden[rows] = grad.to(weight_s.dtype) @ weight_s[:vocab]
                if grad_weight is not None:  # [V, c] @ [c, D_s], accumulated in float32
                    grad_weight[:vocab].addmm_(grad.t(), h_s.to(acc_dtype))
                if grad_bias is not None:
                    grad_bias[:vocab] += grad.sum(0)
            del logits_s, grad_logits
        ctx.grads = grads
        ctx.hand_over = spec.hand_over_weight_grad
        ctx.param_dtypes = tuple(None if p is None else p.dtype for p in (weight_s, bias_s))
        return totals["kd"], totals.get("ce", totals["kd"].new_zeros(()))

    @staticmethod
    def backward(ctx: Any, grad_kd: Tensor, grad_ce: Tensor) -> tuple[Tensor | None, ...]:
        outputs: list[Tensor | None] = [None, None, None]
        for key, grad_output in (("kd", grad_kd), ("ce", grad_ce)):
            if key not in ctx.grads:
                continue
            # the usual upstream gradient is exactly 1 (loss.backward()): skip a multiply then
            is_one = bool(grad_output == 1)
            for i, grad in enumerate(ctx.grads[key]):
                handed_over = i > 0 and ctx.hand_over
                if handed_over and grad is not None:
                    # the [V, D] weight gradient (and the bias's) is handed over, not copied:
                    # autograd may then store it as `.grad` without a second [V, D] buffer
                    ctx.grads[key][i] = _CONSUMED
                if grad is None:
                    continue
                if grad is _CONSUMED:
                    raise RuntimeError(
                        "The chunked lm_head loss hands its lm_head weight gradient to autograd "
                        "without a copy, so it cannot back-propagate twice through one forward "
                        "(retain_graph=True) while the student lm_head requires grad. Run the "
                        "forward again."
                    )
                if not is_one:
                    grad = grad.mul_(grad_output) if handed_over else grad * grad_output
                outputs[i] = grad if outputs[i] is None else outputs[i] + grad
        grad_hidden, grad_weight, grad_bias = outputs
        weight_dtype, bias_dtype = ctx.param_dtypes
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight_dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias_dtype)
        return (grad_hidden, grad_weight, grad_bias, *(None,) * 9)


def _sub_chunk(
    logits_s: Tensor,
    logits_t: Tensor,
    kd_weights: Tensor,
    ce_targets: Tensor | None,
    ce_weights: Tensor | None,
    divergence_labels: Tensor | None,
    spec: ChunkSpec,
    acc_dtype: torch.dtype,
    needs_grad: bool,
) -> dict[str, tuple[Tensor, Tensor | None]]:
    """Weighted sums over ``[c', V]`` logits and their gradients w.r.t. the student logits."""
    teacher_log_probs = tempered_log_probs(logits_t, spec.temperature)
    # a leaf copy in float32, so autograd stops here (and the caller may overwrite the input)
    logits = logits_s.to(acc_dtype, copy=True).requires_grad_(needs_grad)
    with torch.enable_grad():
        per_row = spec.divergence(
            tempered_log_probs(logits, spec.temperature), teacher_log_probs, divergence_labels
        )
        losses = {"kd": (per_row * kd_weights).sum()}
        if ce_targets is not None and ce_weights is not None:
            ce_logits = logits if spec.ce_grad else logits.detach()
            per_row_ce = F.cross_entropy(
                ce_logits, ce_targets, ignore_index=spec.ignore_index, reduction="none"
            )
            losses["ce"] = (per_row_ce * ce_weights).sum()
    differentiated = [key for key in losses if key == "kd" or spec.ce_grad]
    result = {}
    for key, value in losses.items():
        grad = None
        if needs_grad and key in differentiated:
            retain = key != differentiated[-1]
            (grad,) = torch.autograd.grad(value, logits, retain_graph=retain)
        result[key] = (value.detach(), grad)
    return result
