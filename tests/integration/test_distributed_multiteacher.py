"""Two named teachers under DDP and FSDP2: 2 gloo processes equal one process (issue 15).

Follows ``test_distributed.py``: the workers train with ``examples/distributed_kd.py``'s loop on
their shard of each global batch; the reference trains in one process on the global batches.
"""

import importlib.util
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import kdistill as mtd
import kdistill.distributed as kd_dist
from kdistill.testing.models import TinyMLP

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
]

_EXAMPLE_PATH = Path(__file__).resolve().parents[2] / "examples" / "distributed_kd.py"
_spec = importlib.util.spec_from_file_location("distributed_kd_example_mt", _EXAMPLE_PATH)
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)

WORLD, STEPS, BATCH, SAMPLES = 2, 3, 8, 24
STRATEGIES = ("ddp", "fsdp")


class Expert(nn.Module):
    """A hand-written second teacher of another architecture."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(example.IN_FEATURES, 48)
        self.head = nn.Linear(48, example.NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc(x)))


def build_teachers(seed: int = 5) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    return {"big": TinyMLP(example.IN_FEATURES, 128, example.NUM_CLASSES), "expert": Expert()}


def build_model() -> mtd.DistillationModel:
    teachers = build_teachers()
    torch.manual_seed(0)
    student = TinyMLP(example.IN_FEATURES, hidden=32, num_classes=example.NUM_CLASSES)
    config = {
        "teacher_model": teachers,
        "criterion": {
            ("", "big"): mtd.LogitsDistillationLoss(temperature=2.0),
            ("fc2", "expert.fc"): mtd.HintLoss(32, 48),
            ("", ("big", "expert")): mtd.EnsembleLogitsDistillationLoss(2.0, [0.6, 0.4]),
        },
        "loss_balancer": mtd.StaticLossBalancer([0.2, 0.1, 0.3]),
    }
    return mtd.convert(student, mode=[("kd_loss", config)])


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach().clone()


def _exit_without_finalization() -> None:
    """End a worker that succeeded without interpreter finalization.

    gloo's C++ threads can abort a process during finalization (SIGABRT, "terminate called
    without an active exception"; pytorch/pytorch#179291) after its results are written, which
    would fail the test for a teardown that is not kdistill's.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _worker(rank: int, port: int, out_dir: Path) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        x, y = example.synthetic_data(SAMPLES)
        results = {}
        for strategy in STRATEGIES:
            model = build_model()
            teachers = model.teacher_model
            # differs per rank: shows whether the wrapper broadcasts a teacher's state
            teachers["expert"].register_buffer("marker", torch.full((1,), float(rank)))
            if strategy == "ddp":
                wrapped = kd_dist.wrap_ddp(model)
            else:
                for teacher in teachers.values():
                    fully_shard(teacher)  # each teacher its own unit
                wrapped = fully_shard(model)
            example.train(wrapped, model, x, y, STEPS, BATCH)
            kd_dist.save(wrapped if strategy == "ddp" else model, out_dir / f"{strategy}.pt")
            model.eval()
            with model.only_student_forward(), torch.no_grad():
                probe = _full(wrapped(x[:4]))
            results[strategy] = {
                "marker": teachers["expert"].marker.clone(),
                "teachers": {
                    k: _full(v) for k, v in teachers.state_dict().items() if "marker" not in k
                },
                "teacher_grads": [p.grad for p in teachers.parameters()],
                "probe": probe,
            }
        torch.save(results, out_dir / f"rank{rank}.pt")
        dist.barrier()  # no rank tears down while the other still communicates
    finally:
        dist.destroy_process_group()
    _exit_without_finalization()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_teachers_under_ddp_and_fsdp2_match_one_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), tmp_path), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    reference = build_model()
    teachers_start = {k: v.clone() for k, v in reference.teacher_model.state_dict().items()}
    x, y = example.synthetic_data(SAMPLES)
    example.train(reference, reference, x, y, STEPS, BATCH)
    reference_student = mtd.export(reference).state_dict()
    with torch.no_grad():
        reference_probe = reference.eval()(x[:4])

    for strategy in STRATEGIES:
        torch.manual_seed(0)
        restored = mtd.restore(
            TinyMLP(example.IN_FEATURES, 32, example.NUM_CLASSES),
            tmp_path / f"{strategy}.pt",
            teacher_model=build_teachers(),
        )
        assert list(restored.teacher_model) == ["big", "expert"]
        restored.eval()
        with restored.only_student_forward(), torch.no_grad():
            restored_probe = restored(x[:4])
        assert torch.equal(restored_probe, ranks[0][strategy]["probe"]), strategy
        torch.testing.assert_close(mtd.export(restored).state_dict(), reference_student)
        torch.testing.assert_close(restored_probe, reference_probe)
        for rank, result in enumerate(ranks):
            torch.testing.assert_close(result[strategy]["probe"], reference_probe)
            assert all(grad is None for grad in result[strategy]["teacher_grads"])
            for k, v in teachers_start.items():
                assert torch.equal(result[strategy]["teachers"][k], v), (strategy, rank, k)
    # neither wrap_ddp nor FSDP2 broadcasts a teacher's buffers
    assert ranks[1]["ddp"]["marker"].item() == 1.0
    assert ranks[1]["fsdp"]["marker"].item() == 1.0
