"""``kdistill.hf.KDTrainer``: its default (chunked) path vs full logits vs ModelOpt's KDTrainer.

Question: what do peak memory and step time of the three-line ``KDTrainer(model=student,
teacher_model=teacher, ...)`` call cost on causal LMs with a large vocabulary, and how does that
compare with the full-logits path and with ModelOpt's Hugging Face ``KDTrainer``?

Variants (each in a fresh subprocess, so allocator caches of one cannot hide another's memory):

- ``default``: ``kdistill.hf.KDTrainer`` as is: the chunked lm_head path (KD and cross-entropy
  from lm_head chunks, no ``[B, T, V]`` logits);
- ``full``: the same trainer with ``chunked=False`` (``[B, T, V]`` logits, the pre-issue-18
  default);
- ``modelopt``: ``modelopt.torch.distill.plugins.huggingface.KDTrainer`` (0.47: full logits,
  forward KL, KD only), run with ``--modelopt-python`` (a venv where ``nvidia-modelopt``
  imports); skipped when it does not.

All three: forward KL at temperature 1 over the target tokens, KD loss only (no balancer),
Trainer's default AdamW, the same weights (Llama configurations built from configs, seed 0) and
data (random token ids, every token a target). The first step's logged loss must agree across
variants (the same quantity on the same weights).

Measured per variant: ``step_s``, the median wall time of the optimizer steps after the first
(timed by a callback), then the median over ``--rounds`` interleaved runs (the variant order
rotates each round, so bursts of load from other jobs hit every variant); ``peak_rss_mb``, the
process's peak resident memory (``VmHWM``, models and Python included: what the machine must
have), the largest over the rounds; ``peak_extra_mb``, that peak minus the RSS just before
``train()`` (after ``malloc_trim``). Ratios are to ``full`` and to ``modelopt`` of the same run.

Defaults (issue 18): student 128 wide / 1 layer, teacher 256 / 2 layers, batch 4 x 512 tokens,
3 steps, V in {49,152 (SmolLM2), 128,256 (Llama 3)}, float32, CPU.

Commands (from the repository root):
    .venv/bin/python benchmarks/bench_hf_trainer.py --modelopt-python VENV_WITH_MODELOPT/bin/python
        --output benchmarks/results/hf-trainer-fp32-pt2.13-cpu-2core.jsonl   # (one line)
    .venv/bin/python benchmarks/bench_hf_trainer.py --vocab 49152 --variants default full
    .venv/bin/python benchmarks/bench_hf_trainer.py --tiny                  # smoke run, seconds
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _memory import proc_status_kb, trim_heap
from _timing import environment, format_table, interleaved_rounds, write_rows

VARIANTS = ("default", "full", "modelopt")
_REPO = Path(__file__).resolve().parent.parent


def build_models(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Student and teacher ``LlamaForCausalLM`` from configs, seed 0."""
    import transformers

    def make(hidden: int, layers: int) -> torch.nn.Module:
        config = transformers.LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=args.seq,
        )
        return transformers.LlamaForCausalLM(config)

    torch.manual_seed(0)
    return make(args.student_hidden, args.student_layers), make(
        args.teacher_hidden, args.teacher_layers
    )


def _data(args: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    samples = args.batch * args.steps
    ids = torch.randint(0, args.vocab, (samples, args.seq), generator=gen)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def measure(variant: str, args: argparse.Namespace) -> dict:
    """Step time and peak memory of ``variant`` (see the module docstring)."""
    import transformers

    student, teacher = build_models(args)
    data = _data(args)
    step_times: list[float] = []

    class StepClock(transformers.TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            step_times.append(time.perf_counter() - self.start)

    training_args = transformers.TrainingArguments(
        tempfile.mkdtemp(),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=1e-4,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    common = {"args": training_args, "train_dataset": data, "callbacks": [StepClock()]}
    if variant == "modelopt":
        from modelopt.torch.distill.plugins.huggingface import KDTrainer as ModelOptKDTrainer

        trainer = ModelOptKDTrainer(
            model=student, distill_args={"teacher_model": teacher}, **common
        )
        chunked = False
    else:
        from kdistill.hf import KDTrainer

        trainer = KDTrainer(
            model=student, teacher_model=teacher, chunked=variant == "default", **common
        )
        chunked = trainer.chunked
    trim_heap()
    rss_before = proc_status_kb("VmRSS")
    trainer.train()
    peak = proc_status_kb("VmHWM")
    first = next(log for log in trainer.state.log_history if "loss" in log)
    row = {
        "variant": variant,
        "chunked": chunked,
        "vocab": args.vocab,
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "first_loss": first["loss"],
        "step_s": statistics.median(step_times[1:] or step_times),
        "first_step_s": step_times[0],
        "peak_rss_mb": None if peak is None else peak / 1024,
        "peak_extra_mb": None if peak is None else (peak - rss_before) / 1024,
        "student_params": sum(p.numel() for p in student.parameters()),
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "threads": torch.get_num_threads(),
    }
    if variant == "modelopt":
        import modelopt

        row["modelopt"] = modelopt.__version__
    return row


def _measure_isolated(variant: str, args: argparse.Namespace, vocab: int) -> dict | None:
    """Run ``measure`` in a fresh process and read back its JSON row."""
    python = args.modelopt_python if variant == "modelopt" else sys.executable
    command = [python, str(Path(__file__).resolve()), "--child", variant, "--vocab", str(vocab)]
    for name in ("batch", "seq", "steps"):
        command += [f"--{name}", str(getattr(args, name))]
    for name in ("student_hidden", "student_layers", "teacher_hidden", "teacher_layers"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(_REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        if variant == "modelopt" and "No module named 'modelopt'" in result.stderr:
            print(f"modelopt skipped: nvidia-modelopt does not import in {python}")
            return None
        raise RuntimeError(f"Benchmark of {variant!r} (V={vocab}) failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _rounds(args: argparse.Namespace, vocab: int) -> list[dict]:
    """``--rounds`` interleaved runs of every variant: the median step time, the largest peak."""
    runs = interleaved_rounds(
        args.variants, args.rounds, lambda v: _measure_isolated(v, args, vocab)
    )
    group = []
    for rows in runs.values():
        row = dict(rows[0])
        row["rounds"] = len(rows)
        row["step_s_rounds"] = [r["step_s"] for r in rows]
        row["step_s"] = statistics.median(row["step_s_rounds"])
        row["step_s_min"] = min(row["step_s_rounds"])
        for key in ("peak_rss_mb", "peak_extra_mb"):
            values = [r[key] for r in rows]
            row[key] = None if None in values else max(values)
        group.append(row)
    return group


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse arguments, run the variants, print the table; return the rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (smoke run, seconds)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 128256])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved runs per variant")
    parser.add_argument("--student-hidden", type=int, default=128)
    parser.add_argument("--student-layers", type=int, default=1)
    parser.add_argument("--teacher-hidden", type=int, default=256)
    parser.add_argument("--teacher-layers", type=int, default=2)
    parser.add_argument("--modelopt-python", default=sys.executable)
    parser.add_argument("--output", help="write rows to a .jsonl or .csv file")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        args.vocab, args.batch, args.seq, args.steps, args.rounds = [64], 2, 16, 2, 1
        args.student_hidden, args.teacher_hidden = 16, 32
    if args.child:
        args.vocab = args.vocab[0]
        print(json.dumps(measure(args.child, args)))
        return []

    env = environment("cpu", torch.float32)
    rows: list[dict] = []
    for vocab in args.vocab:
        group = _rounds(args, vocab)
        losses = [r["first_loss"] for r in group]
        if max(losses) - min(losses) > 1e-4 * max(abs(v) for v in losses) + 1e-6:
            raise RuntimeError(f"The variants disagree on the first loss (V={vocab}): {losses}")
        for baseline in ("full", "modelopt"):
            base = next((r for r in group if r["variant"] == baseline), None)
            if base is None:
                continue
            for row in group:
                row[f"time_vs_{baseline}"] = row["step_s"] / base["step_s"]
                if row["peak_rss_mb"] is not None:
                    row[f"memory_vs_{baseline}"] = row["peak_rss_mb"] / base["peak_rss_mb"]
                    row[f"extra_vs_{baseline}"] = row["peak_extra_mb"] / base["peak_extra_mb"]
        rows += [{**row, **env} for row in group]
    columns = ["vocab", "variant", "step_s", "peak_rss_mb", "peak_extra_mb", "time_vs_full"]
    columns += ["memory_vs_full", "extra_vs_full", "memory_vs_modelopt", "extra_vs_modelopt"]
    columns += ["first_loss"]
    print(format_table(rows, columns))
    if args.output:
        write_rows(rows, args.output)
    return rows


if __name__ == "__main__":
    main()
