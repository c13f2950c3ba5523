"""The feature-loss zoo against float64 loop implementations of each paper's formula."""

import math

import pytest
import torch
import torch.nn.functional as F

import kdistill as mtd
from kdistill.testing import TinyCNN


def test_hint_loss_without_projector_is_mse():
    s, t = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    expected = ((s.double() - t.double()) ** 2).mean()
    torch.testing.assert_close(mtd.HintLoss()(s, t), expected.float())


def test_hint_projector_is_a_linear_map_and_a_1x1_conv():
    loss = mtd.HintLoss(student_dim=3, teacher_dim=5)
    weight, bias = loss.projector.weight, loss.projector.bias
    # [B, T, D]: a linear map of the last axis
    s, t = torch.randn(2, 4, 3), torch.randn(2, 4, 5)
    torch.testing.assert_close(loss(s, t), F.mse_loss(s @ weight.T + bias, t))
    # [B, C, H, W]: exactly a 1×1 convolution over the channels (FitNets' regressor)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    conv = F.conv2d(s, weight[:, :, None, None], bias)
    torch.testing.assert_close(loss(s, t), F.mse_loss(conv, t))


def test_feature_shape_mismatch_suggests_a_projector():
    with pytest.raises(
        ValueError,
        match=r"\(2, 8, 4, 4\) and teacher features of shape \(2, 16, 4, 4\) differ.*"
        r"HintLoss\(student_dim=8, teacher_dim=16\)",
    ):
        mtd.HintLoss()(torch.randn(2, 8, 4, 4), torch.randn(2, 16, 4, 4))
    with pytest.raises(ValueError, match=r"CosineLoss\(student_dim=6, teacher_dim=4\)"):
        mtd.CosineLoss()(torch.randn(2, 6), torch.randn(2, 4))
    with pytest.raises(ValueError, match="built with student_dim=3"):
        mtd.HintLoss(3, 5)(torch.randn(2, 4), torch.randn(2, 5))
    with pytest.raises(ValueError, match="needs both `student_dim` and `teacher_dim`"):
        mtd.HintLoss(student_dim=3)
    with pytest.raises(ValueError, match="`teacher_dim` must be an integer >= 1"):
        mtd.CosineLoss(3, 0)


def test_cosine_loss_matches_per_position_formula():
    s, t = torch.randn(2, 5, 4, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
    expected = []
    for b in range(2):
        for i in range(5):
            u, v = s[b, i].tolist(), t[b, i].tolist()
            dot = sum(a * c for a, c in zip(u, v, strict=True))
            norm = math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(c * c for c in v))
            expected.append(1 - dot / norm)
    assert mtd.CosineLoss()(s, t).item() == pytest.approx(sum(expected) / 10, rel=1e-10)
    # BCHW: the cosine is taken over channels, per pixel; scale does not matter
    maps = torch.randn(2, 3, 4, 4)
    assert mtd.CosineLoss()(maps * 7.0, maps).item() == pytest.approx(0.0, abs=1e-6)


def test_attention_transfer_matches_formula():
    s, t = (
        torch.randn(2, 3, 4, 5, dtype=torch.float64),
        torch.randn(2, 6, 4, 5, dtype=torch.float64),
    )
    for p in (1.0, 2.0, 3.0):

        def attention(x, p=p):
            a = (x.abs() ** p).sum(1) / x.shape[1]  # mean over channels, [B, H, W]
            a = a.reshape(2, -1)
            return a / a.norm(dim=1, keepdim=True)

        expected = ((attention(s) - attention(t)) ** 2).mean()
        torch.testing.assert_close(mtd.AttentionTransferLoss(p=p)(s, t), expected)
    with pytest.raises(ValueError, match="share batch and spatial sizes"):
        mtd.AttentionTransferLoss()(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="`p` must be a finite number > 0 and at most 16"):
        mtd.AttentionTransferLoss(p=0)


def _huber(a, b):
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def test_rkd_matches_loop_formula():
    s, t = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64) * 3
    n = 4

    def distances(x):
        d = [[(x[i] - x[j]).norm().item() for j in range(n)] for i in range(n)]
        mean = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[v / mean for v in row] for row in d]

    def angles(x):
        out = {}
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    if i == j or k == j:
                        out[i, j, k] = 0.0
                        continue
                    e1 = (x[i] - x[j]) / (x[i] - x[j]).norm()
                    e2 = (x[k] - x[j]) / (x[k] - x[j]).norm()
                    out[i, j, k] = float(e1 @ e2)
        return out

    ds, dt = distances(s), distances(t)
    dist = sum(_huber(ds[i][j], dt[i][j]) for i in range(n) for j in range(n)) / n**2
    a_s, a_t = angles(s), angles(t)
    angle = sum(_huber(a_s[key], a_t[key]) for key in a_s) / n**3
    loss = mtd.RKDLoss(distance_weight=2.0, angle_weight=3.0)(s, t)
    assert loss.item() == pytest.approx(2.0 * dist + 3.0 * angle, rel=1e-9)


def test_rkd_is_invariant_to_scale_and_translation_of_the_teacher():
    s, t = torch.randn(5, 4), torch.randn(5, 6)
    loss = mtd.RKDLoss()
    torch.testing.assert_close(loss(s, t * 10 + 3), loss(s, t))


def test_pkt_matches_loop_formula():
    s, t = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    eps = 1e-7

    def conditional(x):
        unit = [row / (row.norm() + eps) for row in x]
        k = [[(float(unit[i] @ unit[j]) + 1) / 2 + eps for j in range(4)] for i in range(4)]
        return [[v / sum(row) for v in row] for row in k]

    ps, pt = conditional(s), conditional(t)
    kl = sum(pt[i][j] * math.log(pt[i][j] / ps[i][j]) for i in range(4) for j in range(4))
    assert mtd.PKTLoss()(s, t).item() == pytest.approx(kl / 16, rel=1e-9)


def test_similarity_preserving_matches_formula():
    s, t = torch.randn(4, 2, 3, 3, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)

    def normalized_gram(x):
        q = x.reshape(4, -1)
        g = q @ q.T
        return g / g.norm(dim=1, keepdim=True)

    expected = ((normalized_gram(t) - normalized_gram(s)) ** 2).sum() / 16
    torch.testing.assert_close(mtd.SimilarityPreservingLoss()(s, t), expected)


@pytest.mark.parametrize(
    "loss", [mtd.RKDLoss(), mtd.PKTLoss(), mtd.SimilarityPreservingLoss()], ids=type
)
def test_relational_losses_need_a_batch(loss):
    with pytest.raises(ValueError, match="B >= 2"):
        loss(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(ValueError, match="different batch sizes"):
        loss(torch.randn(3, 4), torch.randn(2, 4))


def _hint_model():
    # TinyCNN's conv2 maps: student 4 channels, teacher 8 -> a learned 1×1 projector
    return mtd.convert(
        TinyCNN(channels=4),
        mode=[
            (
                "kd_loss",
                {
                    "teacher_model": TinyCNN(channels=8),
                    "criterion": {("conv2", "conv2"): mtd.HintLoss(student_dim=4, teacher_dim=8)},
                },
            )
        ],
    )


def test_projector_is_trained_and_saved_with_the_model(tmp_path):
    model = _hint_model()
    assert "_loss_modules.0.projector.weight" in model.state_dict()
    model(torch.randn(2, 1, 6, 6))
    model.compute_kd_loss().backward()
    projector = model.loss_modules[0].projector
    assert projector.weight.grad is not None and projector.weight.grad.abs().sum() > 0
    with torch.no_grad():
        projector.weight.add_(1.0)
    mtd.save(model, tmp_path / "hint.pt")
    restored = mtd.restore(
        TinyCNN(channels=4), tmp_path / "hint.pt", teacher_model=TinyCNN(channels=8)
    )
    torch.testing.assert_close(restored.loss_modules[0].projector.weight, projector.weight)
