"""Offline distillation: a student step with a live vs a cached teacher, and bytes on disk.

Question 1 (speed): how much faster is a KD step when the teacher's outputs are read from a
``kdistill.TeacherCache`` instead of computed by a live teacher about 10x the student's size?
Both runs use the same criterion, ``TopKLogitsKLLoss(k)`` on the LM logits, on the same batches of
synthetic token ids (fixed seed). Teacher and student are token-level MLP language models
(``embedding [V, D] -> blocks of residual MLPs (D -> 4D -> D) -> head [D, V]``); the teacher's
width and depth are chosen so that it has about 10x the student's parameters (printed). A step is:
teacher forward (live) or cache look-up (cached), student forward, loss, backward, SGD step.
Variants, timed in interleaved blocks (``_timing.interleaved_times``), median reported:

- ``live``: ``kdistill.convert`` with the live teacher (the loss truncates its dense logits);
- ``cached``: the same with ``CachedTeacher`` (float16 top-k cache, samples found by input hash);
- ``cached_ids``: samples named by id (``CachedTeacher.sample_ids``, ``verify_inputs=False``).

``speedup`` is the ratio of the medians, ``speedup_paired`` the median over rounds of the
per-round ratio (steadier on a shared machine). Before timing, the script checks that live and
cached give the same first-step loss (within the float16 storage tolerance) and stops with an
error if not. Target: live / cached >= 3.

Question 2 (size): bytes per token of a top-k cache. Analytically, from the format
(``kdistill/cache/_format.py``): per position k values in the storage dtype, k int32 indices and one
float32 tail log-mass, i.e. ``6k + 4`` bytes at float16 (388 for k = 64), plus 16 bytes per sample
(id and input hash) and at most 63 bytes of alignment per field per shard. Measured: the size of
a real top-64 float16 cache of a teacher with a 131,072-token vocabulary (a small embedding + head
model; only the logits' shape matters), divided by its token count. Target: <= 400 bytes/token.
The bench cache's own bytes per token (its vocabulary, its k) are reported too.

Commands (from the repository root):
    .venv/bin/python benchmarks/bench_cache.py                 # default sizes (about a minute)
    .venv/bin/python benchmarks/bench_cache.py --tiny          # smoke run (seconds)
    .venv/bin/python benchmarks/bench_cache.py --threads 1     # on a shared, oversubscribed CPU
    .venv/bin/python benchmarks/bench_cache.py --clock cpu     # CPU time instead of wall time
    .venv/bin/python benchmarks/bench_cache.py --device cuda --output benchmarks/results/cache.jsonl
"""

import argparse
import copy
import itertools
import sys
import tempfile
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from _timing import (
    CLOCKS,
    environment,
    format_table,
    interleaved_times,
    median,
    paired_ratio,
    write_rows,
)
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import kdistill
from kdistill.losses import TopKLogitsKLLoss

SPEEDUP_TARGET = 3.0
BYTES_PER_TOKEN_TARGET = 400.0
SIZE_VOCAB = 131_072  # "128k" vocabulary of the size question
SIZE_TOP_K = 64
FP16_RTOL = 1e-2  # float16 cache: first-step losses agree to well within 1 %


class TokenMLP(nn.Module):
    """``input_ids [B, T]`` -> logits ``[B, T, V]``: embedding, residual MLP blocks, head."""

    def __init__(self, vocab: int, dim: int, blocks: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
            )
            for _ in range(blocks)
        )
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids: Tensor) -> Tensor:
        """Logits ``[B, T, V]`` for token ids ``[B, T]``."""
        h = self.embed(input_ids)  # [B, T, D]
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


@dataclass(frozen=True)
class Config:
    """Sizes of one run."""

    vocab: int
    seq_len: int
    batch: int
    num_batches: int
    student_dim: int
    student_blocks: int
    teacher_dim: int
    teacher_blocks: int
    top_k: int
    number: int
    repeats: int
    size_seq_len: int


FULL = Config(4096, 128, 4, 4, 256, 4, 768, 8, 64, 1, 9, 256)
TINY = Config(512, 16, 4, 2, 16, 1, 48, 2, 8, 1, 2, 8)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _step_fn(model: nn.Module, batches: list, cached: kdistill.CachedTeacher | None):
    """A zero-argument training step cycling over ``batches``; ``cached`` names samples by id."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    cycle = itertools.cycle(batches)

    def step() -> Tensor:
        ids, x = next(cycle)
        with cached.sample_ids(ids) if cached is not None else nullcontext():
            model(x)
        loss = model.compute_kd_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def _convert(student: nn.Module, teacher: nn.Module, k: int) -> nn.Module:
    return kdistill.convert(
        copy.deepcopy(student),
        mode=[("kd_loss", {"teacher_model": teacher, "criterion": TopKLogitsKLLoss(k=k)})],
    )


def bench_speed(cfg: Config, device: torch.device, workdir: Path, clock: str = "wall") -> dict:
    """Time live vs cached steps; return one result row."""
    torch.manual_seed(0)
    teacher = TokenMLP(cfg.vocab, cfg.teacher_dim, cfg.teacher_blocks).to(device).eval()
    student = TokenMLP(cfg.vocab, cfg.student_dim, cfg.student_blocks).to(device)
    n = cfg.batch * cfg.num_batches
    ids = torch.arange(n)
    tokens = torch.randint(0, cfg.vocab, (n, cfg.seq_len))
    loader = DataLoader(TensorDataset(ids, tokens), batch_size=cfg.batch)
    batches = [(i, x.to(device)) for i, x in loader]
    cache = kdistill.TeacherCache.build(
        teacher, loader, workdir / "bench", top_k=cfg.top_k, dtype=torch.float16, progress=False
    )
    by_input = kdistill.CachedTeacher(cache, teacher=teacher)
    by_id = kdistill.CachedTeacher(cache, verify_inputs=False)
    models = {
        "live": (_convert(student, teacher, cfg.top_k), None),
        "cached": (_convert(student, by_input, cfg.top_k), None),
        "cached_ids": (_convert(student, by_id, cfg.top_k), by_id),
    }
    steps = {name: _step_fn(model, batches, ids_from) for name, (model, ids_from) in models.items()}
    first = {name: step() for name, step in steps.items()}  # one step each, same batch, same init
    for name in ("cached", "cached_ids"):
        if not torch.allclose(first[name], first["live"], rtol=FP16_RTOL):
            sys.exit(
                f"error: first-step loss of {name} ({first[name].item():.6g}) differs from the "
                f"live teacher's ({first['live'].item():.6g})"
            )
    times = interleaved_times(
        steps, number=cfg.number, repeats=cfg.repeats, device=device, clock=clock
    )
    live, cached, cached_ids = (median(times[k]) for k in ("live", "cached", "cached_ids"))
    tokens_per_step = cfg.batch * cfg.seq_len
    return {
        "question": "speed",
        "vocab": cfg.vocab,
        "seq_len": cfg.seq_len,
        "batch": cfg.batch,
        "top_k": cfg.top_k,
        "student_params": _params(student),
        "teacher_params": _params(teacher),
        "param_ratio": _params(teacher) / _params(student),
        "live_ms": live * 1e3,
        "cached_ms": cached * 1e3,
        "cached_ids_ms": cached_ids * 1e3,
        "clock": clock,
        "speedup": live / cached,
        "speedup_ids": live / cached_ids,
        # median over rounds of live / cached (each round's blocks ran back to back)
        "speedup_paired": 1 / paired_ratio(times["cached"], times["live"]),
        "cached_tokens_per_s": tokens_per_step / cached,
        "bench_cache_bytes_per_token": cache.nbytes / (n * cfg.seq_len),
        "meets_target": live / cached >= SPEEDUP_TARGET,
    }


def analytic_bytes_per_token(k: int, seq_len: int, samples_per_shard: int) -> float:
    """Bytes per token of a float16 top-k cache with one shard of ``samples_per_shard`` samples.

    Per position: k float16 values + k int32 indices + one float32 tail; per sample: int64 id and
    int64 input hash; per shard: up to 63 bytes of alignment before each of the 4 later fields.
    """
    per_position = 2 * k + 4 * k + 4
    per_sample = 8 + 8
    padding = 4 * 63
    return per_position + (per_sample + padding / samples_per_shard) / seq_len


def bench_size(cfg: Config, workdir: Path) -> dict:
    """Build a real top-64 float16 cache for a 128k vocabulary and measure its bytes per token."""
    torch.manual_seed(0)
    samples = 2
    teacher = TokenMLP(SIZE_VOCAB, 8, 0).eval()  # only the [B, T, 131072] logits matter
    tokens = torch.randint(0, SIZE_VOCAB, (samples, cfg.size_seq_len))
    loader = DataLoader(TensorDataset(torch.arange(samples), tokens), batch_size=1)
    cache = kdistill.TeacherCache.build(
        teacher, loader, workdir / "size", top_k=SIZE_TOP_K, dtype=torch.float16, progress=False
    )
    measured = cache.nbytes / (samples * cfg.size_seq_len)
    return {
        "question": "size",
        "vocab": SIZE_VOCAB,
        "seq_len": cfg.size_seq_len,
        "top_k": SIZE_TOP_K,
        "samples": samples,
        "bytes": cache.nbytes,
        "bytes_per_token": measured,
        "analytic_bytes_per_token_per_position": 6 * SIZE_TOP_K + 4,
        "analytic_bytes_per_token": analytic_bytes_per_token(SIZE_TOP_K, cfg.size_seq_len, samples),
        "full_fp16_bytes_per_token": 2 * SIZE_VOCAB,
        "meets_target": measured <= BYTES_PER_TOKEN_TARGET,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="smoke-test sizes (seconds)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--output", type=Path, help="write rows to this .jsonl or .csv file")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time, or this process's CPU time (steadier on a shared CPU; CPU work only)",
    )
    parser.add_argument(
        "--threads", type=int, help="torch intra-op threads (default: torch's; 1 on a busy host)"
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = TINY if args.tiny else FULL
    device = torch.device(args.device)
    env = environment(device, torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        speed = bench_speed(cfg, device, Path(tmp), args.clock)
        size = bench_size(cfg, Path(tmp))
    print(
        f"# bench_cache ({'tiny' if args.tiny else 'full'}) on {env['device']} "
        f"({env['gpu'] or env['cpu']}, {env['threads']} threads), torch {env['torch']}"
    )
    print(
        format_table(
            [speed],
            [
                "student_params",
                "teacher_params",
                "param_ratio",
                "live_ms",
                "cached_ms",
                "cached_ids_ms",
                "speedup",
                "speedup_ids",
                "speedup_paired",
                "meets_target",
            ],
        )
    )
    print()
    print(
        format_table(
            [size],
            [
                "vocab",
                "top_k",
                "seq_len",
                "bytes_per_token",
                "analytic_bytes_per_token",
                "full_fp16_bytes_per_token",
                "meets_target",
            ],
        )
    )
    if args.output is not None:
        rows = [{**row, **env, "config": asdict(cfg)} for row in (speed, size)]
        write_rows(rows, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
