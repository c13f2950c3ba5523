"""``OnPolicyKDTrainer`` under the Trainer's own DDP: 2 gloo processes make the 1-process updates.

Each optimizer step mixes on-policy and dataset micro-batches (λ = 0.5, the draws are the same
on every rank) and the sampling is deterministic (top-k = 1), so 2 processes with half the
micro-batch see exactly the completions of 1 process; the dataset completions differ in length,
so only the global completion-token count gives the same update.
"""

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
]

WORLD = 2
ROWS = [
    {"prompt": "The cat", "completion": " sat."},
    {"prompt": "A", "completion": " dog ran far"},
    {"prompt": "Once upon", "completion": " a"},
    {"prompt": "Hi", "completion": " there, friend"},
    {"prompt": "Sun", "completion": "ny"},
    {"prompt": "Red and", "completion": " blue"},
    {"prompt": "One", "completion": " two three"},
    {"prompt": "Go", "completion": "!"},
]


def _tiny_llama(layers: int, vocab: int, eos: int) -> torch.nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        eos_token_id=eos,
    )
    return transformers.LlamaForCausalLM(config)


def _run(tmp_dir: Path) -> dict[str, torch.Tensor]:
    """2 OnPolicyKDTrainer steps (accumulation 2) on 8 prompts, global batch 4 per micro-step."""
    import transformers

    from kdistill.hf import OnPolicyKDTrainer
    from kdistill.xtoken import byte_tokenizer

    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    student = _tiny_llama(1, len(tokenizer), tokenizer.eos_token_id)
    teacher = _tiny_llama(2, len(tokenizer), tokenizer.eos_token_id)
    world = dist.get_world_size() if dist.is_initialized() else 1
    args = transformers.TrainingArguments(
        str(tmp_dir / f"onpolicy-{world}"),
        max_steps=2,
        per_device_train_batch_size=4 // world,
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
        logging_steps=1,
    )
    trainer = OnPolicyKDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=ROWS * 2,
        processing_class=tokenizer,
        lmbda=0.5,
        top_k=1,
        max_new_tokens=5,
    )
    trainer.train()
    sources = [log["on_policy_share"] for log in trainer.state.log_history if "kd_loss" in log]
    return {**trainer.model.state_dict(), "on_policy_share": torch.tensor(sources)}


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
        state = _run(out_dir)
        torch.save(state, out_dir / f"onpolicy-rank{rank}.pt")
        dist.barrier()  # no rank tears down while the other still communicates
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    _exit_without_finalization()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_on_policy_trainer_under_ddp_matches_single_process(tmp_path):
    pytest.importorskip("transformers")
    mp.spawn(_worker, args=(_free_port(), tmp_path), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"onpolicy-rank{r}.pt", weights_only=True) for r in range(2)]
    single = _run(tmp_path)
    assert 0 < float(single["on_policy_share"].mean()) < 1, "want on- and off-policy batches"
    torch.testing.assert_close(ranks[0], ranks[1])  # DDP kept the replicas identical
    torch.testing.assert_close(ranks[0], single)
