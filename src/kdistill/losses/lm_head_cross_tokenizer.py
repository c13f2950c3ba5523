"""Cross-tokenizer distillation through the two lm_heads, chunked: no ``[B, T, V]`` logits.

The memory-efficient form of ``ULDLoss`` and ``HybridULDLoss`` (``cross_tokenizer.py``): it takes
the models' final hidden states and their output projections, which have different vocabulary
sizes (V_t for the teacher, V_s for the student). The hidden states are gathered at the aligned
position pairs, then the pairs are processed in chunks: each chunk computes both lm_head
matmuls, the per-pair loss in float32 (the same ``divergence`` hook as the plain loss) and, in
the same pass, its gradient with respect to the gathered student hidden states and the student
lm_head weight and bias. Only the gradients are kept, so peak memory is O(chunk · (V_t + V_s))
rather than O(B · T · V). The chunk loop is the one of ``LMHeadDistillationLoss``
(``_chunked.py``, after the fused-linear chunked losses of Liger-Kernel v0.8.5, BSD-2-Clause).
"""

from typing import Any

import torch
from torch import Tensor, nn

from .._recipes import LossRecipe, cross_vocab_logit_inputs
from .._validation import check_bool, check_choice, check_int
from ._chunked import ChunkSpec, LMHeadLossBase, chunked_divergence, token_weights
from ._registry import register_loss
from ._utils import extract_logits, position_mask
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


@register_loss(
    "lm_head_cross_tokenizer",
    # unbound (no lm_heads), the inputs are logits of two vocabularies, paired one to one
    recipe=LossRecipe(
        lambda: LMHeadCrossTokenizerLoss(temperature=2.0),
        cross_vocab_logit_inputs(5, 8),
        zero_when_equal=False,
    ),
)
class LMHeadCrossTokenizerLoss(LMHeadLossBase):
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
        self.ignore_index = check_int("ignore_index", ignore_index)
        self.shift_labels = check_bool("shift_labels", shift_labels)
        self._bind_given_heads(student_lm_head, teacher_lm_head)

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
        heads = self._head_tensors()
        weight_s, _, weight_t, _ = heads
        self._check_hidden("student", hidden_s, weight_s)
        self._check_hidden("teacher", hidden_t, weight_t)
        keep = self._student_keep(hidden_s.shape[:-1], hidden_s.device, labels, mask)
        hidden_s, hidden_t, keep = aligned_pairs(hidden_s, hidden_t, alignment, keep)
        weights = token_weights(keep, hidden_s.shape[:-1], hidden_s.device, num_items_in_batch)
        vocab_s = hidden_s.shape[-1] if weight_s is None else weight_s.shape[0]
        vocab_t = hidden_t.shape[-1] if weight_t is None else weight_t.shape[0]
        vocab = max(vocab_s, vocab_t)
        spec = ChunkSpec(
            divergence=self.loss_fn.divergence,
            temperature=self.loss_fn.temperature,
            chunk_size=self.chunk_size or max(_MIN_CHUNK, _LOGITS_PER_CHUNK // vocab),
            sub_chunk_size=max(_MIN_SUB_CHUNK, _LOGITS_PER_SUB_CHUNK // vocab),
            student_vocab=vocab_s,
            teacher_vocab=vocab_t,
            # the plain losses' backward can run twice (retain_graph=True): so can this one's
            hand_over_weight_grad=False,
        )
        kd, _ = chunked_divergence(hidden_s, hidden_t, heads, weights, spec)
        return kd

    def _student_keep(
        self,
        positions: torch.Size,
        device: torch.device,
        labels: Tensor | None,
        mask: Tensor | None,
    ) -> Tensor | None:
        """``[..., T_s]`` bool: student positions that count (None: all)."""
        targets = None
        if labels is not None:
            if labels.shape != positions:
                raise ValueError(
                    f"`labels` must have shape {tuple(positions)} (the student tokens), got "
                    f"{tuple(labels.shape)}."
                )
            if self.shift_labels and len(positions) < 2:
                raise ValueError(
                    f"Shifting `labels` needs inputs [..., T, D], got positions "
                    f"{tuple(positions)}. Pass shift_labels=False for per-position labels."
                )
            targets = labels.to(device)
            if self.shift_labels:  # position t predicts labels[t + 1]; the last predicts nothing
                targets = torch.cat(
                    [targets[..., 1:], targets.new_full((*positions[:-1], 1), self.ignore_index)],
                    dim=-1,
                )
        mask = None if mask is None else mask.to(device)
        return position_mask(positions, mask, targets, self.ignore_index)
