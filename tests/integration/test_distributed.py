"""DistillationModel under DDP and FSDP2 (``fully_shard``): 2 gloo processes on loopback.

The workers run ``examples/distributed_kd.py``'s functions, so the example is tested too.
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
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import kdistill as mtd
import kdistill.distributed as kd_dist
from kdistill.testing.models import TinyMLP

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
]

_EXAMPLE_PATH = Path(__file__).resolve().parents[2] / "examples" / "distributed_kd.py"
_spec = importlib.util.spec_from_file_location("distributed_kd_example", _EXAMPLE_PATH)
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)

WORLD, STEPS, BATCH, SAMPLES = 2, 3, 8, 24
STRATEGIES = ("plain-ddp", "ddp", "fsdp")


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
            model = example.build_model()
            teacher = model.teacher_model
            # differs per rank: shows whether the wrapper broadcasts the teacher's state
            teacher.register_buffer("marker", torch.full((1,), float(rank)))
            if strategy == "plain-ddp":
                wrapped = DistributedDataParallel(model)  # defaults: broadcast_buffers=True
            else:
                wrapped = example.wrap(model, strategy)
            example.train(wrapped, model, x, y, STEPS, BATCH)
            kd_dist.save(wrapped, out_dir / f"{strategy}.pt")
            model.eval()
            with model.only_student_forward(), torch.no_grad():
                probe = _full(wrapped(x[:4]))
            results[strategy] = {
                "marker": teacher.marker.clone(),
                "teacher": {k: _full(v) for k, v in teacher.state_dict().items() if k != "marker"},
                "teacher_grads": [p.grad for p in teacher.parameters()],
                "probe": probe,
            }
        torch.save(results, out_dir / f"rank{rank}.pt")
        dist.barrier()  # no rank tears down while the other still communicates
    finally:
        dist.destroy_process_group()
    _exit_without_finalization()


def _tiny_llama(layers: int) -> torch.nn.Module:
    import transformers  # only in the test that needs it

    config = transformers.LlamaConfig(
        vocab_size=48,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
    )
    return transformers.LlamaForCausalLM(config)


def _kd_trainer_run(tmp_dir: Path) -> dict[str, torch.Tensor]:
    """2 KDTrainer steps (gradient accumulation 2, uneven token counts) on 8 samples."""
    import transformers

    from kdistill.hf import KDTrainer

    torch.manual_seed(0)
    student, teacher = _tiny_llama(1), _tiny_llama(2)
    generator = torch.Generator().manual_seed(5)
    data = []
    for i in range(8):
        ids = torch.randint(0, 48, (8,), generator=generator)
        labels = ids.clone()
        labels[: 1 + i % 5] = -100
        data.append({"input_ids": ids, "labels": labels})
    world = dist.get_world_size() if dist.is_initialized() else 1
    args = transformers.TrainingArguments(
        str(tmp_dir / f"hf-{world}"),
        max_steps=2,
        per_device_train_batch_size=4 // world,  # global batch 8 = 2 micro-batches of 4
        gradient_accumulation_steps=2,
        optim="sgd",
        learning_rate=1.0,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = KDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    trainer.train()
    return trainer.model.state_dict()  # the plain student again after train()


def _hf_worker(rank: int, port: int, out_dir: Path) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_WORLD_SIZE=str(WORLD),
    )
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        state = _kd_trainer_run(out_dir)
        if rank == 0:
            torch.save(state, out_dir / "hf-ddp.pt")
        dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    _exit_without_finalization()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _restore(path: Path) -> mtd.DistillationModel:
    student = TinyMLP(example.IN_FEATURES, hidden=32, num_classes=example.NUM_CLASSES)
    teacher = TinyMLP(example.IN_FEATURES, hidden=128, num_classes=example.NUM_CLASSES)
    return mtd.restore(student, path, teacher_model=teacher)


def test_ddp_and_fsdp2_match_single_process_and_checkpoints_restore(tmp_path):
    mp.spawn(_worker, args=(_free_port(), tmp_path), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    # one process training on the global batches
    reference = example.build_model()
    teacher_start = {k: v.clone() for k, v in reference.teacher_model.state_dict().items()}
    x, y = example.synthetic_data(SAMPLES)
    example.train(reference, reference, x, y, STEPS, BATCH)
    reference_student = mtd.export(reference).state_dict()
    reference.eval()
    with torch.no_grad():
        reference_probe = reference(x[:4])

    for strategy in STRATEGIES:
        restored = _restore(tmp_path / f"{strategy}.pt")
        assert not any(k.startswith("_teacher_model") for k in restored.state_dict())
        restored.eval()
        with restored.only_student_forward(), torch.no_grad():
            restored_probe = restored(x[:4])
        # the checkpoint holds exactly the trained weights: identical outputs
        assert torch.equal(restored_probe, ranks[0][strategy]["probe"]), strategy
        # ... which equal one process on the global batch, to float32 tolerance
        torch.testing.assert_close(mtd.export(restored).state_dict(), reference_student)
        torch.testing.assert_close(restored_probe, reference_probe)
        for rank, result in enumerate(ranks):
            torch.testing.assert_close(result[strategy]["probe"], reference_probe)
            assert all(grad is None for grad in result[strategy]["teacher_grads"])
            for k, v in teacher_start.items():
                assert torch.equal(result[strategy]["teacher"][k], v), (strategy, rank, k)

    # plain DDP broadcasts every buffer from rank 0, the teacher's included; wrap_ddp and FSDP2
    # leave each rank's teacher alone
    assert ranks[1]["plain-ddp"]["marker"].item() == 0.0
    assert ranks[1]["ddp"]["marker"].item() == 1.0
    assert ranks[1]["fsdp"]["marker"].item() == 1.0


def test_helpers_reject_models_that_are_not_distillation_models(tmp_path):
    with pytest.raises(TypeError, match="Expected a DistillationModel"):
        kd_dist.wrap_ddp(TinyMLP())
    with pytest.raises(TypeError, match="Expected a DistillationModel"):
        kd_dist.save(TinyMLP(), tmp_path / "x.pt")


def test_save_without_process_group_matches_kdistill_save(tmp_path):
    model = example.build_model()
    kd_dist.save(model, tmp_path / "a.pt")
    mtd.save(model, tmp_path / "b.pt")
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert a["kdistill_state"] == b["kdistill_state"]
    torch.testing.assert_close(a["model_state_dict"], b["model_state_dict"], rtol=0, atol=0)


@pytest.mark.slow
def test_kd_trainer_under_ddp_matches_single_process(tmp_path):
    """KDTrainer in 2 processes (the Trainer's own DDP) makes the same updates as 1 process."""
    pytest.importorskip("transformers")
    mp.spawn(_hf_worker, args=(_free_port(), tmp_path), nprocs=WORLD, join=True)
    distributed = torch.load(tmp_path / "hf-ddp.pt", weights_only=True)
    single = _kd_trainer_run(tmp_path)
    torch.manual_seed(0)
    initial = _tiny_llama(1).state_dict()  # the students' starting point
    assert any(not torch.equal(distributed[k], v) for k, v in initial.items()), "no update"
    torch.testing.assert_close(distributed, single)
