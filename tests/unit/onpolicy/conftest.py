"""A tiny torch-only causal LM (attention mask, position ids, lm_head) for the on-policy tests."""

import math

import pytest
import torch
from torch import nn

VOCAB = 32


class TinyCausalLM(nn.Module):
    """One causal self-attention block with learned absolute positions and an lm_head.

    ``forward(input_ids, attention_mask=None, position_ids=None)`` returns logits ``[B, T, V]``.
    Padded keys are never attended to (each position may always attend to itself, so left-pad
    rows stay finite). Absolute positions make scores depend on ``position_ids``, like GPT-2.
    """

    def __init__(
        self,
        vocab: int = VOCAB,
        hidden: int = 16,
        max_len: int = 64,
        tied: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(max_len, hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden)
        )
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=True)
        if tied:
            self.lm_head.weight = self.embed.weight
        self.calls = 0

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        self.calls += 1
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
        x = self.embed(input_ids) + self.pos(position_ids)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])  # [B, T, T]
        allowed = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        if attention_mask is not None:
            keys = attention_mask.bool()[:, None, :] | torch.eye(
                t, dtype=torch.bool, device=x.device
            )
            allowed = allowed & keys
        scores = scores.masked_fill(~allowed, -1e9)
        x = x + scores.softmax(-1) @ v
        x = x + self.dropout(self.mlp(x))
        return self.lm_head(self.norm(x))


class PositionwiseLM(nn.Module):
    """Logits at each position depend on that position's token only (no mixing across tokens)."""

    def __init__(self, vocab: int = VOCAB, hidden: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.lm_head = nn.Linear(hidden, vocab)

    def forward(self, input_ids, attention_mask=None):
        return self.lm_head(torch.tanh(self.embed(input_ids)))


@pytest.fixture
def tiny_lm():
    """``tiny_lm(hidden=16, tied=False, dtype=float32, dropout=0)``: a fresh ``TinyCausalLM``."""

    def build(hidden=16, tied=False, dtype=torch.float32, dropout=0.0):
        return TinyCausalLM(hidden=hidden, tied=tied, dropout=dropout).to(dtype)

    return build


@pytest.fixture
def positionwise_lm():
    """``positionwise_lm(hidden=8)``: a fresh ``PositionwiseLM``."""
    return lambda hidden=8: PositionwiseLM(hidden=hidden)
