"""What LMHeadDistillationLoss leaves out: dropped positions, and a logged CE's gradient."""

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


def test_a_logged_cross_entropy_has_no_gradient_and_the_same_value():
    torch.manual_seed(0)
    head_s, head_t = torch.nn.Linear(6, 23), torch.nn.Linear(10, 23)
    hidden_s = torch.randn(2, 7, 6, requires_grad=True)
    hidden_t = torch.randn(2, 7, 10)
    labels = torch.randint(0, 23, (2, 7))
    loss_fn = mtd.LMHeadDistillationLoss(head_s, head_t, chunk_size=3)
    kd, ce = loss_fn(hidden_s, hidden_t, labels=labels, return_student_loss=True)
    kd_grads = torch.autograd.grad(kd, [hidden_s, head_s.weight, head_s.bias])
    kd_log, ce_log = loss_fn(
        hidden_s, hidden_t, labels=labels, return_student_loss=True, student_loss_grad=False
    )
    torch.testing.assert_close((kd_log, ce_log), (kd, ce))
    # backpropagating kd + ce gives kd's gradients only: the logged ce contributes nothing
    grads = torch.autograd.grad(kd_log + ce_log, [hidden_s, head_s.weight, head_s.bias])
    for grad, expected in zip(grads, kd_grads, strict=True):
        torch.testing.assert_close(grad, expected)
