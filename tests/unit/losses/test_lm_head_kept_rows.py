"""LMHeadDistillationLoss projects only the kept positions (prompts and padding cost nothing)."""

import torch

import kdistill as mtd
from kdistill.losses import lm_head


def test_only_kept_positions_are_projected_and_the_result_is_unchanged(monkeypatch):
    torch.manual_seed(0)
    head_s, head_t = torch.nn.Linear(6, 23), torch.nn.Linear(10, 23)
    hidden_s = torch.randn(2, 7, 6, requires_grad=True)
    hidden_t = torch.randn(2, 7, 10)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, 4:6] = mask[1, 1] = True  # 3 of 14 positions
    projected = []
    original = lm_head._linear

    def counting(hidden, weight, bias, vocab):
        projected.append(hidden.shape[0])
        return original(hidden, weight, bias, vocab)

    monkeypatch.setattr(lm_head, "_linear", counting)
    loss_fn = mtd.LMHeadDistillationLoss(head_s, head_t, divergence="reverse_kl", chunk_size=2)
    loss = loss_fn(hidden_s, hidden_t, mask=mask)
    assert sum(projected) == 2 * 3, projected  # student and teacher, kept rows only
    (grad,) = torch.autograd.grad(loss, [hidden_s])

    kept_s = hidden_s.detach()[mask].requires_grad_(True)
    expected = loss_fn(kept_s, hidden_t[mask])
    (kept_grad,) = torch.autograd.grad(expected, [kept_s])
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad[mask], kept_grad)
    assert grad[~mask].abs().sum() == 0
