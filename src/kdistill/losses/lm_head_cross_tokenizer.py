"""Cross-tokenizer distillation through the two lm_heads, chunked: no ``[B, T, V]`` logits.

The memory-efficient form of ``ULDLoss`` and ``HybridULDLoss`` (``cross_tokenizer.py``): it takes
the models' final hidden states and their output projections, which have different vocabulary
sizes (V_t for the teacher, V_s for the student). The hidden states are gathered at the aligned
position pairs, then the pairs are processed in chunks: each chunk computes both lm_head
matmuls, the per-pair loss in float32 (the same ``per_position`` as the plain loss) and, in the
same pass, its gradient with respect to the gathered student hidden states and the student
lm_head weight and bias. Only the gradients are kept, so peak memory is O(chunk · (V_t + V_s))
rather than O(B · T · V). The chunking follows kdistill's ``LMHeadDistillationLoss`` (itself
after the fused-linear chunked losses of Liger-Kernel v0.8.5, BSD-2-Clause).
"""

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._recipes import LossRecipe
from .._validation import check_bool, check_choice, check_int
from ._divergences import upcast
from ._registry import register_loss
from ._utils import extract_logits
from .cross_tokenizer import AlignedPositions, HybridULDLoss, ULDLoss, aligned_pairs

__all__ = ["LMHeadCrossTokenizerLoss"]

DIVERGENCES: tuple[str, ...] = ("uld", "hybrid_uld")

# lm_head matmuls run on chunks of max(256, 2**23 // V) pairs (V = the larger vocabulary); the
# loss's float32 temporaries (sorting included: int64 indices) on sub-chunks of
# max(8, 2**20 // V) pairs, about 21 rows at V = 49,152.
_MIN_CHUNK = 256
_LOGITS_PER_CHUNK = 2**23
_MIN_SUB_CHUNK = 8
_LOGITS_PER_SUB_CHUNK = 2**20


def _check_head(head: Any, role: str) -> None:
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


@dataclass(frozen=True)
class _ChunkSpec:
    """Everything the autograd function needs besides tensors."""

    loss: ULDLoss | HybridULDLoss  # its per_position and temperature
    chunk_size: int
    sub_chunk_size: int
    need_grad_hidden: bool
    need_grad_weight: bool
    need_grad_bias: bool


def _linear(hidden: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """``hidden @ weight.T + bias``: ``[c, D] -> [c, V]``; without a weight ``hidden`` is logits."""
    return hidden if weight is None else F.linear(hidden, weight, bias)


class _ChunkedCrossTokenizer(torch.autograd.Function):
    """Weighted sum over pairs of the per-pair loss; gradients computed chunk by chunk in forward.

    Inputs are the gathered pairs: student hidden ``[N, D_s]``, teacher hidden ``[N, D_t]``,
    per-pair weights ``[N]`` (mask and normalization folded in).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden_s: Tensor,
        weight_s: Tensor | None,
        bias_s: Tensor | None,
        hidden_t: Tensor,
        weight_t: Tensor | None,
        bias_t: Tensor | None,
        pair_weights: Tensor,
        spec: _ChunkSpec,
    ) -> Tensor:
        acc_dtype = upcast(hidden_s[:0]).dtype
        grad_hidden = torch.zeros_like(hidden_s) if spec.need_grad_hidden else None
        # float32 accumulators: many chunks are summed, low precision would lose them
        grad_weight = torch.zeros_like(weight_s, dtype=acc_dtype) if spec.need_grad_weight else None
        grad_bias = torch.zeros_like(bias_s, dtype=acc_dtype) if spec.need_grad_bias else None
        needs_grad = spec.need_grad_hidden or spec.need_grad_weight or spec.need_grad_bias
        total = hidden_s.new_zeros((), dtype=acc_dtype)
        temperature = spec.loss.temperature
        for start in range(0, hidden_s.shape[0], spec.chunk_size):
            rows = slice(start, min(start + spec.chunk_size, hidden_s.shape[0]))
            h_s = hidden_s[rows]  # [c, D_s]
            logits_t = _linear(hidden_t[rows], weight_t, bias_t)  # [c, V_t]
            logits_s = _linear(h_s, weight_s, bias_s)  # [c, V_s]
            grad_logits = torch.empty_like(logits_s, dtype=acc_dtype) if needs_grad else None
            for sub_start in range(0, logits_s.shape[0], spec.sub_chunk_size):
                sub = slice(sub_start, min(sub_start + spec.sub_chunk_size, logits_s.shape[0]))
                teacher_log_probs = F.log_softmax(upcast(logits_t[sub]) / temperature, dim=-1)
                # a float32 leaf copy, so autograd stops here
                logits = logits_s[sub].to(acc_dtype, copy=True).requires_grad_(needs_grad)
                with torch.enable_grad():
                    per_pair = spec.loss.per_position(
                        F.log_softmax(logits / temperature, dim=-1), teacher_log_probs
                    )
                    value = (per_pair * pair_weights[rows][sub]).sum()
                if needs_grad:
                    (grad_logits[sub],) = torch.autograd.grad(value, logits)
                total += value.detach()
            del logits_t
            if grad_logits is not None:
                if grad_hidden is not None:  # [c, V_s] @ [V_s, D_s], or the logits themselves
                    grad_hidden[rows] = (
                        grad_logits
                        if weight_s is None
                        else grad_logits.to(weight_s.dtype) @ weight_s
                    )
                if grad_weight is not None:  # [V_s, c] @ [c, D_s]
                    grad_weight.addmm_(grad_logits.t(), h_s.to(acc_dtype))
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(0)
            del logits_s, grad_logits
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.param_dtypes = tuple(None if p is None else p.dtype for p in (weight_s, bias_s))
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grad_hidden, grad_weight, grad_bias = (
            None if g is None else g * grad_output.to(g.dtype) for g in ctx.grads
        )
        weight_dtype, bias_dtype = ctx.param_dtypes
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight_dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


@register_loss(
    "lm_head_cross_tokenizer", recipe=LossRecipe(lambda: LMHeadCrossTokenizerLoss(temperature=2.0))
)
class LMHeadCrossTokenizerLoss(nn.Module):
    """ULD or hybrid ULD from final hidden states and two lm_heads of different vocabularies.

    For every kept aligned pair ``(i, j)`` (teacher position i, student position j) it computes the
    per-position loss of ``ULDLoss`` (``divergence="uld"``) or ``HybridULDLoss``
    (``"hybrid_uld"``) between ``softmax(t_i/T)``, ``t_i = W_t h_t,i + b_t`` (V_t logits), and
    ``softmax(s_j/T)``, ``s_j = W_s h_s,j + b_s`` (V_s logits): the same formulas, T² on the
    hybrid's KL term only. The values are summed and divided by the number of kept pairs (or by
    ``num_items_in_batch``: the global count under gradient accumulation). A pair is kept when
    its alignment slot is real, ``mask`` is True at its student position and, with ``labels``,
    the student's (shifted) label is not ``ignore_index``; an all-dropped batch gives 0 and zero
    gradients.

    Pairs are processed ``chunk_size`` at a time; each chunk's gradient (w.r.t. the student hidden
    states, lm_head weight and bias; never the teacher's) is computed right away, so peak memory
    is O(chunk_size · (V_t + V_s)) plus one gradient of the student lm_head weight. Hence there is
    no per-pair ``reduction``, and the gradients are computed even if ``backward`` is never called.
    The lm_heads are referenced, not registered (no parameters, no ``state_dict`` entries), as in
    ``LMHeadDistillationLoss``; without lm_heads the inputs are logits (``[B, T, V]``), which
    gives the plain loss's value, chunked.

    Args:
        student_lm_head: The student's output projection (``weight`` [V_s, D_s], optional
            ``bias``), or None (inputs are logits).
        teacher_lm_head: The teacher's (``weight`` [V_t, D_t]); None with ``student_lm_head``.
        divergence: ``"uld"`` or ``"hybrid_uld"``.
        temperature: Softmax temperature T > 0 of both sides.
        teacher_ids: ``"hybrid_uld"`` only: teacher ids of the shared tokens (see
            ``HybridULDLoss``); None with ``student_ids`` for identical vocabularies.
        student_ids: ``"hybrid_uld"`` only: the paired student ids.
        kl_weight: ``"hybrid_uld"`` only: weight of the shared-token KL term.
        uld_weight: ``"hybrid_uld"`` only: weight of the ULD term on the other tokens.
        chunk_size: Pairs per lm_head chunk; None picks ``max(256, 2**23 // max(V_s, V_t))``.
        ignore_index: Label value whose positions are dropped (Hugging Face uses -100).
        shift_labels: With ``labels`` (over the student tokens), student position j is kept when
            the label at j + 1 is not ``ignore_index`` (causal LM convention: pass the same
            ``labels`` as to the model); the last position is dropped. False: ``labels[j]``
            decides position j.

    Example:
        >>> import torch
        >>> from kdistill.xtoken import align_offsets
        >>> student_head, teacher_head = torch.nn.Linear(8, 50), torch.nn.Linear(16, 300)
        >>> loss_fn = LMHeadCrossTokenizerLoss(student_head, teacher_head, chunk_size=2)
        >>> # "abcd": student "ab" "cd", teacher "a" "bcd"
        >>> alignment = align_offsets(torch.tensor([[[0, 1], [1, 4]]]),
        ...                           torch.tensor([[[0, 2], [2, 4]]]))
        >>> hidden_s = torch.randn(1, 2, 8, requires_grad=True)
        >>> loss_fn(hidden_s, torch.randn(1, 2, 16), alignment=alignment).backward()
        >>> hidden_s.grad[0, 0].abs().sum().item(), student_head.weight.grad.shape
        (0.0, torch.Size([50, 8]))
    """

    def __init__(
        self,
        student_lm_head: nn.Module | None = None,
        teacher_lm_head: nn.Module | None = None,
        divergence: str = "uld",
        temperature: float = 1.0,
        teacher_ids: Any = None,
        student_ids: Any = None,
        kl_weight: float = 1.0,
        uld_weight: float = 1.0,
        chunk_size: int | None = None,
        ignore_index: int = -100,
        shift_labels: bool = True,
    ) -> None:
        super().__init__()
        self.divergence = check_choice("divergence", divergence, DIVERGENCES)
        if divergence == "uld":
            hybrid_only = {
                "teacher_ids": teacher_ids is not None,
                "student_ids": student_ids is not None,
                "kl_weight": kl_weight != 1.0,
                "uld_weight": uld_weight != 1.0,
            }
            given = [name for name, set_ in hybrid_only.items() if set_]
            if given:
                raise ValueError(
                    f"{given} are only used by divergence='hybrid_uld', got divergence='uld'. "
                    "Drop them or pick 'hybrid_uld'."
                )
            self.loss_fn: ULDLoss | HybridULDLoss = ULDLoss(temperature)
        else:
            self.loss_fn = HybridULDLoss(
                teacher_ids, student_ids, temperature, kl_weight=kl_weight, uld_weight=uld_weight
            )
        self.chunk_size = (
            None if chunk_size is None else check_int("chunk_size", chunk_size, min_value=1)
        )
        if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
            raise TypeError(f"`ignore_index` must be an int, got {ignore_index!r}.")
        self.ignore_index = ignore_index
        self.shift_labels = check_bool("shift_labels", shift_labels)
        # a tuple is not registered by nn.Module: the heads stay out of parameters()/state_dict()
        self._lm_heads: tuple[nn.Module, nn.Module] | None = None
        if (student_lm_head is None) != (teacher_lm_head is None):
            raise ValueError(
                "Give both `student_lm_head` and `teacher_lm_head`, or neither (the inputs are "
                "then logits)."
            )
        if student_lm_head is not None:
            self.bind_lm_heads_(student_lm_head, teacher_lm_head)

    def get_config(self) -> dict[str, Any]:
        """The JSON-able constructor arguments, lm_heads excluded (they are runtime objects)."""
        config: dict[str, Any] = {
            "divergence": self.divergence,
            "temperature": self.loss_fn.temperature,
            "chunk_size": self.chunk_size,
            "ignore_index": self.ignore_index,
            "shift_labels": self.shift_labels,
        }
        if isinstance(self.loss_fn, HybridULDLoss):
            hybrid = self.loss_fn.get_config()
            for key in ("teacher_ids", "student_ids", "kl_weight", "uld_weight"):
                config[key] = hybrid[key]
        return config

    def bind_lm_heads_(self, student_lm_head: nn.Module, teacher_lm_head: nn.Module) -> None:
        """Set the lm_heads (in place), checking their shapes.

        Raises:
            TypeError: A head has no 2-D ``weight``.
        """
        _check_head(student_lm_head, "student")
        _check_head(teacher_lm_head, "teacher")
        self._lm_heads = (student_lm_head, teacher_lm_head)

    @property
    def student_lm_head(self) -> nn.Module | None:
        """The student's lm_head (not a registered submodule), or None when unbound."""
        return None if self._lm_heads is None else self._lm_heads[0]

    @property
    def teacher_lm_head(self) -> nn.Module | None:
        """The teacher's lm_head (not a registered submodule), or None when unbound."""
        return None if self._lm_heads is None else self._lm_heads[1]

    def forward(
        self,
        student_hidden: Tensor,
        teacher_hidden: Tensor,
        *,
        alignment: AlignedPositions | None = None,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
        num_items_in_batch: int | Tensor | None = None,
    ) -> Tensor:
        """Compute the loss over the kept aligned pairs.

        Args:
            student_hidden: ``[B, T_s, D_s]`` final hidden states (after the final norm), or a
                model output holding them as ``logits``. Without lm_heads: logits
                ``[B, T_s, V_s]``.
            teacher_hidden: ``[B, T_t, D_t]``; detached here.
            alignment: The aligned pairs (``kdistill.xtoken.TokenAlignment``). None: the two
                inputs have the same leading shape and pair position by position.
            labels: ``[B, T_s]`` student token ids (see ``shift_labels``).
            mask: ``[B, T_s]`` bool over the student positions, True keeps a position.
            num_items_in_batch: Divide the sum by this instead of the kept pairs of this call.

        Returns:
            A scalar, float32 (float64 for float64 inputs).
        """
        hidden_s = extract_logits(student_hidden, "student")
        hidden_t = extract_logits(teacher_hidden, "teacher").detach()
        weight_s = bias_s = weight_t = bias_t = None
        if self._lm_heads is not None:
            student_head, teacher_head = self._lm_heads
            weight_s, bias_s = student_head.weight, getattr(student_head, "bias", None)
            weight_t, bias_t = teacher_head.weight.detach(), getattr(teacher_head, "bias", None)
            bias_t = None if bias_t is None else bias_t.detach()
        for role, hidden, weight in (
            ("student", hidden_s, weight_s),
            ("teacher", hidden_t, weight_t),
        ):
            if hidden.ndim < 2 or (weight is not None and hidden.shape[-1] != weight.shape[1]):
                expected = "[..., D]" if weight is None else f"[..., {weight.shape[1]}]"
                raise ValueError(
                    f"{role} inputs of shape {tuple(hidden.shape)} do not fit: expected "
                    f"{expected}. Pass the final hidden states (after the final norm)."
                )
        keep = self._student_keep(hidden_s.shape[:-1], hidden_s.device, labels, mask)
        hidden_s, hidden_t, keep = aligned_pairs(hidden_s, hidden_t, alignment, keep)
        weights = self._pair_weights(keep, hidden_s.shape[:-1], hidden_s.device, num_items_in_batch)
        vocab = max(
            hidden_s.shape[-1] if weight_s is None else weight_s.shape[0],
            hidden_t.shape[-1] if weight_t is None else weight_t.shape[0],
        )
        grad_on = torch.is_grad_enabled()
        spec = _ChunkSpec(
            loss=self.loss_fn,
            chunk_size=self.chunk_size or max(_MIN_CHUNK, _LOGITS_PER_CHUNK // vocab),
            sub_chunk_size=max(_MIN_SUB_CHUNK, _LOGITS_PER_SUB_CHUNK // vocab),
            need_grad_hidden=grad_on and hidden_s.requires_grad,
            need_grad_weight=grad_on and weight_s is not None and weight_s.requires_grad,
            need_grad_bias=grad_on and bias_s is not None and bias_s.requires_grad,
        )
        return _ChunkedCrossTokenizer.apply(
            hidden_s.reshape(-1, hidden_s.shape[-1]),  # [N, D_s]
            weight_s,
            bias_s,
            hidden_t.reshape(-1, hidden_t.shape[-1]),  # [N, D_t]
            weight_t,
            bias_t,
            weights.reshape(-1),
            spec,
        )

    def _student_keep(
        self,
        positions: torch.Size,
        device: torch.device,
        labels: Tensor | None,
        mask: Tensor | None,
    ) -> Tensor | None:
        """``[..., T_s]`` bool: student positions that count (None: all)."""
        keep = None
        if mask is not None:
            if mask.shape != positions:
                raise ValueError(
                    f"`mask` must have shape {tuple(positions)}, got {tuple(mask.shape)}."
                )
            keep = mask.to(device=device, dtype=torch.bool)
        if labels is not None:
            if labels.shape != positions:
                raise ValueError(
                    f"`labels` must have shape {tuple(positions)} (the student tokens), got "
                    f"{tuple(labels.shape)}."
                )
            targets = labels.to(device)
            if self.shift_labels and len(positions) < 2:
                raise ValueError(
                    f"Shifting `labels` needs inputs [..., T, D], got positions "
                    f"{tuple(positions)}. Pass shift_labels=False for per-position labels."
                )
            if self.shift_labels:  # position t predicts labels[t + 1]; the last predicts nothing
                targets = torch.cat(
                    [targets[..., 1:], targets.new_full((*positions[:-1], 1), self.ignore_index)],
                    dim=-1,
                )
            keep_labels = targets != self.ignore_index
            keep = keep_labels if keep is None else keep & keep_labels
        return keep

    @staticmethod
    def _pair_weights(
        keep: Tensor | None,
        shape: torch.Size,
        device: torch.device,
        num_items_in_batch: int | Tensor | None,
    ) -> Tensor:
        """``keep / count`` per pair (count: kept pairs, or ``num_items_in_batch``)."""
        kept = torch.ones(shape, device=device) if keep is None else keep.float()
        if num_items_in_batch is None:
            count = kept.sum().clamp(min=1)
        elif isinstance(num_items_in_batch, Tensor):
            count = num_items_in_batch.to(device=device, dtype=torch.float32)
        else:
            count = float(check_int("num_items_in_batch", num_items_in_batch, min_value=1))
        return kept / count
