"""Offline distillation end to end: build (interrupted, resumed), train with shuffling, save/restore."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import kdistill as mtd
from kdistill.losses import TopKLogitsKLLoss
from kdistill.testing.models import TinyMLP

pytestmark = pytest.mark.integration

N, D, C = 96, 16, 10


def _data():
    x = torch.randn(N, D)
    y = (x[:, :C] * 3).argmax(dim=1)  # a learnable labelling
    return torch.arange(N), x, y


def _train(model, dataset, epochs, seed):
    """SGD over a shuffled loader; returns the per-step total losses."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2)
    loader = DataLoader(
        dataset, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    losses = []
    for _ in range(epochs):
        for _ids, x, y in loader:
            out = model(x)
            loss = model.compute_kd_loss(student_loss=F.cross_entropy(out, y))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


def _convert(student, teacher, criterion):
    return mtd.convert(
        copy.deepcopy(student),
        mode=[
            (
                "kd_loss",
                {
                    "teacher_model": teacher,
                    "criterion": criterion,
                    "loss_balancer": mtd.StaticLossBalancer(0.5),
                },
            )
        ],
    )


def test_cached_float32_training_tracks_the_live_teacher(tmp_path):
    ids, x, y = _data()
    teacher, student = TinyMLP(D, 64, C), TinyMLP(D, 16, C)
    dataset = TensorDataset(ids, x, y)
    build_loader = DataLoader(dataset, batch_size=32)

    calls = []

    def interrupt(module, args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated")

    handle = teacher.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        mtd.TeacherCache.build(
            teacher, build_loader, tmp_path, dtype=torch.float32, shard_bytes=1, progress=False
        )
    handle.remove()
    cache = mtd.TeacherCache.build(
        teacher, build_loader, tmp_path, dtype=torch.float32, shard_bytes=1, progress=False
    )
    assert cache.num_samples == N and len(cache.manifest["shards"]) == 3

    criterion = mtd.LogitsDistillationLoss(temperature=2.0)
    live = _convert(student, teacher, criterion)
    cached = _convert(
        student, mtd.CachedTeacher(tmp_path, teacher=teacher), copy.deepcopy(criterion)
    )
    live_losses = _train(live, dataset, epochs=3, seed=1)
    cached_losses = _train(cached, dataset, epochs=3, seed=1)
    # shuffled batches differ from the build's, so the live teacher's own matmul rounding differs
    # by ~1 ulp; after 18 steps the two runs still agree to float32 tolerance
    torch.testing.assert_close(torch.tensor(cached_losses), torch.tensor(live_losses))
    for key, value in live.state_dict().items():
        torch.testing.assert_close(cached.state_dict()[key], value)
    assert cached_losses[-1] < cached_losses[0]


def test_topk_float16_cache_trains_and_restores(tmp_path):
    ids, x, y = _data()
    teacher, student = TinyMLP(D, 64, C), TinyMLP(D, 16, C)
    dataset = TensorDataset(ids, x, y)
    mtd.TeacherCache.build(
        teacher,
        DataLoader(dataset, batch_size=32),
        tmp_path / "cache",
        top_k=4,
        temperature=2.0,
        progress=False,
    )
    cached_teacher = mtd.CachedTeacher(tmp_path / "cache")
    model = _convert(student, cached_teacher, TopKLogitsKLLoss(k=4, temperature=2.0))
    losses = _train(model, dataset, epochs=4, seed=0)
    assert sum(losses[-6:]) < sum(losses[:6])

    mtd.save(model, tmp_path / "ckpt.pt")
    restored = mtd.restore(
        TinyMLP(D, 16, C), tmp_path / "ckpt.pt", teacher_model=mtd.CachedTeacher(tmp_path / "cache")
    )
    assert isinstance(restored.teacher_model, mtd.CachedTeacher)
    assert torch.equal(restored(x[:8]), model(x[:8]))
    torch.testing.assert_close(
        restored.compute_kd_loss(student_loss=torch.tensor(0.0)),
        model.compute_kd_loss(student_loss=torch.tensor(0.0)),
    )
    student_only = mtd.export(restored)
    assert not any("teacher" in key for key in student_only.state_dict())


def _kdistill(*argv, cwd):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "kdistill", *argv],
        capture_output=True,
        text=True,
        cwd=cwd,
        check=False,
        timeout=300,
    )


def test_cache_teacher_command_on_real_digits(tmp_path):
    pytest.importorskip("sklearn")
    from kdistill.demo.data import load_dataset
    from kdistill.demo.mnist import build_mlp

    teacher = build_mlp(64, [32], 10)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    argv = ["cache-teacher", "cache", "--dataset", "digits", "--limit", "50", "--no-progress"]
    argv += ["--teacher", "kdistill.demo.mnist:build_mlp", "--checkpoint", "teacher.pt"]
    kwargs = '{"in_features": 64, "hidden": [32], "num_classes": 10}'
    result = _kdistill(*argv, "--teacher-kwargs", kwargs, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "50 samples of digits train" in result.stdout and result.stderr == ""
    x = load_dataset("digits").x_train[:50]
    cached = mtd.CachedTeacher(tmp_path / "cache", teacher=teacher)
    with torch.no_grad():
        expected = teacher(x[10:20]).half().float()  # float16 storage by default
    assert torch.equal(cached(x[10:20]), expected)

    # user errors from the console: one line, exit 2 (usage) or 1 (runtime), never a traceback
    for extra, status in [
        (["--teacher-kwargs", "{bad"], 2),
        (["--teacher-kwargs", '{"in_features": 784, "hidden": [32], "num_classes": 10}'], 1),
    ]:
        bad = _kdistill(*argv, *extra, cwd=tmp_path)
        assert bad.returncode == status, bad.stderr
        assert bad.stderr.startswith("kdistill: error: ") and bad.stderr.count("\n") == 1
