"""Distill a wide MLP teacher into a small student on several processes, with DDP or FSDP2.

Runs on CPU with the gloo backend (use ``--backend nccl`` on GPUs)::

    torchrun --nproc_per_node=2 examples/distributed_kd.py --strategy ddp
    torchrun --nproc_per_node=2 examples/distributed_kd.py --strategy fsdp --out student.pt

Every rank builds the same student and teacher (same seed), trains on its shard of each global
batch, and the gradients are averaged across ranks (DDP) or reduce-scattered (FSDP2), so the
result equals one process training on the global batch. The teacher is frozen and never
synchronized. Rank 0 writes a regular ``kdistill`` checkpoint that ``kdistill.restore`` reads in a
single process.
"""

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard

import kdistill as mtd
import kdistill.distributed as kd_dist
from kdistill.testing.models import TinyMLP

IN_FEATURES, NUM_CLASSES = 16, 10


def build_model(seed: int = 0) -> mtd.DistillationModel:
    """The student (hidden 32) converted with a frozen teacher (hidden 128); same on all ranks."""
    torch.manual_seed(seed)
    student = TinyMLP(IN_FEATURES, hidden=32, num_classes=NUM_CLASSES)
    teacher = TinyMLP(IN_FEATURES, hidden=128, num_classes=NUM_CLASSES)
    config = {
        "teacher_model": teacher,
        "criterion": mtd.LogitsDistillationLoss(temperature=2.0),
        "loss_balancer": mtd.StaticLossBalancer(kd_loss_weight=0.5),
    }
    return mtd.convert(student, mode=[("kd_loss", config)])


def wrap(model: mtd.DistillationModel, strategy: str) -> nn.Module:
    """Wrap for data parallelism: ``"ddp"``, ``"fsdp"`` (FSDP2) or ``"none"`` (one process)."""
    if strategy == "ddp":
        return kd_dist.wrap_ddp(model)
    if strategy == "fsdp":
        fully_shard(model.teacher_model)  # its own unit: gathered for its forward, then freed
        return fully_shard(model)
    return model


def synthetic_data(num_samples: int, seed: int = 1) -> tuple[Tensor, Tensor]:
    """Inputs ``[N, IN_FEATURES]`` and labels ``[N]`` from a fixed random linear rule."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, IN_FEATURES, generator=generator)
    rule = torch.randn(IN_FEATURES, NUM_CLASSES, generator=generator)
    return x, (x @ rule).argmax(dim=1)


def train(
    wrapped: nn.Module,
    model: mtd.DistillationModel,
    x: Tensor,
    y: Tensor,
    steps: int,
    batch_size: int,
    lr: float = 0.5,
) -> list[float]:
    """SGD on this rank's shard of each global batch; returns the local losses.

    Args:
        wrapped: What to call for the forward (the DDP / FSDP module, or the model).
        model: The DistillationModel inside, for ``compute_kd_loss``.
        x: All inputs ``[N, D]``.
        y: All labels ``[N]``.
        steps: Optimizer steps; step ``i`` uses global batch ``i`` (wrapping around).
        batch_size: Global batch size, divisible by the world size.
        lr: SGD learning rate.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        start = (step * batch_size) % len(x)
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        xb, yb = xb.chunk(world)[rank], yb.chunk(world)[rank]  # this rank's shard
        logits = wrapped(xb)  # teacher (frozen, no grad) then student
        loss = model.compute_kd_loss(student_loss=F.cross_entropy(logits, yb))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, train with the chosen strategy, save from rank 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="distributed_student.pt")
    args = parser.parse_args(argv)

    dist.init_process_group(args.backend)  # torchrun provides rank, world size and address
    try:
        model = build_model()
        wrapped = wrap(model, args.strategy)
        x, y = synthetic_data(1024)
        losses = train(wrapped, model, x, y, args.steps, args.batch_size)
        kd_dist.save(wrapped if args.strategy == "ddp" else model, args.out)  # on every rank
        if dist.get_rank() == 0:
            print(
                f"{args.strategy}: {dist.get_world_size()} processes, loss "
                f"{losses[0]:.4f} -> {losses[-1]:.4f} (rank 0's shard); saved {args.out}"
            )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
