"""A batch of prompts with their completions: ids, attention mask and which tokens are completion.

Layout (the one generation produces, and TRL's): the prompts are **left-padded** to a common
length ``P`` and the completions **right-padded** after them, so the sequence of row ``b`` is
``[pad … pad, prompt_b, completion_b, pad … pad]`` and every completion starts at column ``P``.
A causal LM's hidden state at position ``t`` predicts token ``t + 1``, so the positions the
distillation loss is taken over are ``target_mask = completion_mask`` shifted left by one.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Completions", "check_token_batch", "pack_tokens"]


def check_token_batch(ids: Tensor, mask: Tensor | None, role: str) -> Tensor:
    """Check ``ids`` ``[B, L]`` (integer) and ``mask`` (same shape or None); return a bool mask.

    Raises:
        TypeError: ``ids`` is not a tensor.
        ValueError: ``ids`` is not a 2-D integer tensor, or ``mask`` does not have its shape.
    """
    if not isinstance(ids, Tensor):
        raise TypeError(f"`{role}_ids` must be a tensor [B, L], got {type(ids).__name__}.")
    if ids.ndim != 2 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(
            f"`{role}_ids` must be an integer tensor [B, L], got {ids.dtype} of shape "
            f"{tuple(ids.shape)}."
        )
    if mask is None:
        return torch.ones_like(ids, dtype=torch.bool)
    if not isinstance(mask, Tensor) or mask.shape != ids.shape:
        raise ValueError(
            f"`{role}_mask` must be a tensor of the same shape as `{role}_ids` "
            f"{tuple(ids.shape)}, got {getattr(mask, 'shape', type(mask).__name__)}."
        )
    return mask.to(device=ids.device, dtype=torch.bool)


def pack_tokens(ids: Tensor, mask: Tensor, side: str, pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Move every row's real tokens to one side, keeping their order; pad the rest.

    Args:
        ids: ``[B, L]`` token ids.
        mask: ``[B, L]`` bool, True on real tokens (anywhere in the row).
        side: ``"left"`` (real tokens at the end of the row, padding first) or ``"right"``.
        pad_token_id: Id written at the padded positions.

    Returns:
        ``(ids, mask)`` of the same shape, packed.

    Example:
        >>> ids, mask = pack_tokens(torch.tensor([[5, 6, 0]]), torch.tensor([[1, 1, 0]]).bool(),
        ...                         "left", pad_token_id=0)
        >>> ids.tolist(), mask.tolist()
        ([[0, 5, 6]], [[False, True, True]])
    """
    if side not in ("left", "right"):
        raise ValueError(f"`side` must be 'left' or 'right', got {side!r}.")
    # a stable sort on the mask moves padding to one side and keeps the tokens' order
    key = mask.to(torch.int8) if side == "left" else (~mask).to(torch.int8)
    order = torch.argsort(key, dim=1, stable=True)
    packed_mask = mask.gather(1, order)
    packed_ids = ids.gather(1, order).masked_fill(~packed_mask, pad_token_id)
    return packed_ids, packed_mask


def _eos_tensor(eos_token_id: int | Sequence[int] | None, device: torch.device) -> Tensor | None:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None


@dataclass(frozen=True)
class Completions:
    """Prompts and completions, ready for the teacher and the student (see the module docstring).

    Attributes:
        input_ids: ``[B, P + C]`` prompt (left-padded) then completion (right-padded) token ids.
        attention_mask: ``[B, P + C]`` long, 1 on real prompt and completion tokens.
        completion_mask: ``[B, P + C]`` bool, True on completion tokens only (an EOS that ended a
            completion included; prompt and padding excluded).
        prompt_length: ``P``, the column where every completion starts.
        ended: ``[B]`` bool, whether the completion ended with an EOS token (False when it was cut
            at the length limit, or when no EOS id is known).
    """

    input_ids: Tensor
    attention_mask: Tensor
    completion_mask: Tensor
    prompt_length: int
    ended: Tensor

    @classmethod
    def from_parts(
        cls,
        prompt_ids: Tensor,
        prompt_mask: Tensor | None,
        completion_ids: Tensor,
        completion_mask: Tensor | None,
        *,
        pad_token_id: int = 0,
        eos_token_id: int | Sequence[int] | None = None,
        cut_at_eos: bool = False,
    ) -> "Completions":
        """Build the batch from prompts and completions padded any way (left, right, or none).

        Args:
            prompt_ids: ``[B, P]`` prompt token ids.
            prompt_mask: ``[B, P]``, True/1 on real prompt tokens (None: all real).
            completion_ids: ``[B, C]`` completion token ids.
            completion_mask: ``[B, C]``, True/1 on real completion tokens (None: all real).
            pad_token_id: Id written at the padded positions (they are masked, any id works).
            eos_token_id: EOS id(s), used for ``ended`` (and ``cut_at_eos``).
            cut_at_eos: Drop every completion token after a row's first EOS (what generation
                does); the EOS itself stays a completion token.

        Returns:
            The packed batch; the completion part is trimmed to its longest row.

        Raises:
            ValueError: Shapes or dtypes that do not fit, or a batch-size mismatch.
        """
        p_mask = check_token_batch(prompt_ids, prompt_mask, "prompt")
        c_mask = check_token_batch(completion_ids, completion_mask, "completion")
        if prompt_ids.shape[0] != completion_ids.shape[0]:
            raise ValueError(
                f"Prompts and completions differ in batch size: {prompt_ids.shape[0]} prompts, "
                f"{completion_ids.shape[0]} completions."
            )
        completion_ids = completion_ids.to(prompt_ids.device)
        c_mask = c_mask.to(prompt_ids.device)
        eos = _eos_tensor(eos_token_id, prompt_ids.device)
        p_ids, p_mask = pack_tokens(prompt_ids, p_mask, "left", pad_token_id)
        c_ids, c_mask = pack_tokens(completion_ids, c_mask, "right", pad_token_id)
        if cut_at_eos and eos is not None:
            is_eos = torch.isin(c_ids, eos) & c_mask
            # positions strictly after the first EOS: the running count of EOS before them
            after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
            c_mask = c_mask & ~after_eos
            c_ids = c_ids.masked_fill(~c_mask, pad_token_id)
        width = int(c_mask.sum(1).max()) if c_mask.numel() else 0
        c_ids, c_mask = c_ids[:, :width], c_mask[:, :width]
        lengths = c_mask.sum(1)
        if eos is None or width == 0:
            ended = torch.zeros(c_ids.shape[0], dtype=torch.bool, device=c_ids.device)
        else:
            last = c_ids.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
            ended = torch.isin(last, eos) & (lengths > 0)
        input_ids = torch.cat([p_ids, c_ids], dim=1)
        full_completion = torch.cat([torch.zeros_like(p_mask), c_mask], dim=1)
        attention_mask = torch.cat([p_mask, c_mask], dim=1).long()
        return cls(input_ids, attention_mask, full_completion, prompt_ids.shape[1], ended)

    # ------------------------------------------------------------------ derived views
    @property
    def completion_ids(self) -> Tensor:
        """``[B, C]`` the completion tokens (padded with the pad id after each one)."""
        return self.input_ids[:, self.prompt_length :]

    @property
    def lengths(self) -> Tensor:
        """``[B]`` number of completion tokens per row."""
        return self.completion_mask.sum(1)

    @property
    def num_tokens(self) -> int:
        """Completion tokens in the batch (what the loss averages over)."""
        return int(self.completion_mask.sum())

    @property
    def position_ids(self) -> Tensor:
        """``[B, P + C]`` positions counted over real tokens only (what generation uses).

        ``attention_mask.cumsum(-1) - 1``, clamped at 0 on the left padding, so a prompt's first
        real token has position 0 whatever its padding.
        """
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    @property
    def target_mask(self) -> Tensor:
        """``[B, P + C]`` bool: positions whose next token is a completion token.

        The hidden state at position ``t`` predicts token ``t + 1``, so this is
        ``completion_mask[:, 1:]`` followed by a False column: the last prompt token's position
        predicts the first completion token; the last position predicts nothing.
        """
        targets = torch.zeros_like(self.completion_mask)
        targets[:, :-1] = self.completion_mask[:, 1:]
        return targets

    def labels(self, ignore_index: int = -100) -> Tensor:
        """``[B, P + C]`` labels for a causal LM loss: the completion tokens, else ``ignore_index``.

        With Hugging Face's label shift (``labels[:, t + 1]`` is the target of position ``t``),
        the kept targets are exactly ``target_mask``.
        """
        return self.input_ids.masked_fill(~self.completion_mask, ignore_index)

    def to(self, device: torch.device | str) -> "Completions":
        """The same batch on ``device``."""
        return Completions(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.completion_mask.to(device),
            self.prompt_length,
            self.ended.to(device),
        )
