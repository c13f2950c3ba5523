"""One on-policy distillation step: kdistill vs TRL's ``DistillationTrainer``, time and memory.

Question: what does one on-policy step cost (the student samples completions for a batch of
prompts, the teacher scores prompt + completion, the reverse-KL loss over the completion tokens,
backward, optimizer step) in kdistill and in TRL, on the same models and data?

Variants (each in a fresh subprocess, so allocator caches of one cannot hide another's memory):

- ``kdistill``: ``kdistill.onpolicy.OnPolicyDistiller`` (default loss: reverse KL through the
  lm_heads, chunked; sampling through the student's ``generate``);
- ``kdistill-trainer``: ``kdistill.hf.OnPolicyKDTrainer`` (the same defaults), one step through
  its internals: ``_complete`` (sampling) and ``compute_loss`` (scoring + loss, the chunked
  default) inside ``distilling()``;
- ``trl``: TRL's ``DistillationTrainer`` (``beta=1``: reverse KL; its own chunked divergence
  kernel), one step through its internals: ``_generate_and_score_completions`` (sampling) and
  ``_compute_loss`` (scoring + loss). Skipped when ``trl`` does not import in ``--python``.

Both use ``torch.optim.AdamW`` on the student, temperature 1, no top-k / top-p, the same
weights (Llama configurations built from configs, seed 0, tied embeddings like SmolLM2) and
the same prompts. Before timing, each computes the loss of a fixed batch of completions; the
values must agree (they are the same quantity).

Measured per variant (median of ``--repeats`` steps after one warm-up step, then the median over
``--rounds`` interleaved runs, the variant order rotating each round):

- ``sampling_s``: generating the completions (``max_new_tokens`` = completion length);
- ``scoring_s``: the teacher's forward (timed by hooks on the teacher's backbone, which both
  variants call);
- ``loss_backward_s``: the rest of loss + backward (student forward, divergence, backward);
- ``optimizer_s`` and ``total_s`` (the whole step);
- ``peak_extra_mb``: peak RSS of scoring + loss + backward minus the RSS just before it (the
  kernel's ``VmHWM`` reset through ``/proc/self/clear_refs`` after ``malloc_trim``, so memory
  freed by sampling is not reused unseen), the maximum over the timed steps. It includes the
  student's gradients.

Defaults (issue 13): vocabulary 49,152 (SmolLM2's), batch 8, prompt 64 and completion 64 tokens,
float32, CPU; configurations ``tiny`` (student 128 wide / 1 layer, teacher 256 / 2) and
``small`` (student 256 / 4, teacher 576 / 6: SmolLM2-135M's width).

Commands (from the repository root; TRL lives in a scratch venv beside the pinned torch):
    .venv/bin/python benchmarks/bench_onpolicy.py --python VENV_WITH_TRL/bin/python
        --output benchmarks/results/onpolicy-fp32-pt2.13-cpu-2core.jsonl   # (one line)
    .venv/bin/python benchmarks/bench_onpolicy.py --configs tiny --variants kdistill
    .venv/bin/python benchmarks/bench_onpolicy.py --tiny                  # smoke run, seconds
"""

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _memory import proc_status_kb, reset_peak_rss, trim_heap
from _timing import environment, format_table, interleaved_rounds, write_rows

VARIANTS = ("kdistill", "kdistill-trainer", "trl")
# (hidden, layers, attention heads, kv heads, intermediate)
CONFIGS = {
    "tiny": {"student": (128, 1, 4, 4, 512), "teacher": (256, 2, 4, 4, 1024)},
    "small": {"student": (256, 4, 4, 4, 1024), "teacher": (576, 6, 9, 3, 1536)},
    "smoke": {"student": (16, 1, 2, 2, 32), "teacher": (32, 1, 2, 2, 64)},
}
EOS, PAD = 2, 0
_OPEN_CONTEXTS = contextlib.ExitStack()
_REPO = Path(__file__).resolve().parent.parent


def build_models(config: str, vocab: int, max_len: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Student and teacher ``LlamaForCausalLM`` from configs (seed 0), teacher frozen."""
    import transformers

    def make(hidden: int, layers: int, heads: int, kv_heads: int, inter: int) -> torch.nn.Module:
        llama = transformers.LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=max_len,
            tie_word_embeddings=True,
            pad_token_id=PAD,
            eos_token_id=EOS,
            bos_token_id=1,
        )
        return transformers.LlamaForCausalLM(llama)

    torch.manual_seed(0)
    student = make(*CONFIGS[config]["student"])
    teacher = make(*CONFIGS[config]["teacher"]).requires_grad_(False).eval()
    return student, teacher


def _data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts ``[B, P]`` and fixed check completions ``[B, C]`` (ids >= 3: no special tokens)."""
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, args.vocab, (args.batch, args.prompt), generator=gen)
    completions = torch.randint(3, args.vocab, (args.batch, args.completion), generator=gen)
    return prompts, completions


class _TeacherClock:
    """Accumulates the wall time of the teacher backbone's forwards (hooks)."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        self.total = 0.0
        self._start = 0.0
        backbone.register_forward_pre_hook(self._begin)
        backbone.register_forward_hook(self._end)

    def _begin(self, *_: Any) -> None:
        self._start = time.perf_counter()

    def _end(self, *_: Any) -> None:
        self.total += time.perf_counter() - self._start


def _kdistill_step_fns(args, student, teacher, prompts, check):
    from kdistill.onpolicy import Completions, OnPolicyDistiller, SamplingConfig

    sampling = SamplingConfig(max_new_tokens=args.completion, eos_token_id=EOS, pad_token_id=PAD)
    distiller = OnPolicyDistiller(
        student, teacher, sampling=sampling, generator=torch.Generator().manual_seed(0)
    )
    mask = torch.ones_like(prompts)

    def sample():
        return distiller.completions(prompts, mask, source="student")[0]

    def loss(completions):
        return distiller.loss(completions), completions.num_tokens

    def check_loss():
        return distiller.loss(Completions.from_parts(prompts, None, check, None))

    return sample, loss, check_loss


def _word_tokenizer(vocab_size: int):
    """A word-level tokenizer "<0>" … "<V-1>" (no token is a substring of another)."""
    import tokenizers
    import transformers

    vocab = {f"<{i}>": i for i in range(vocab_size)}
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<1>"))
    word_level.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=word_level,
        pad_token=f"<{PAD}>",
        eos_token=f"<{EOS}>",
        unk_token="<1>",
        padding_side="left",
    )


def _texts(prompts: torch.Tensor) -> list[str]:
    return [" ".join(f"<{i}>" for i in row.tolist()) for row in prompts]


def _trainer_step_fns(args, student, teacher, prompts, check):
    import transformers

    from kdistill.hf import OnPolicyKDTrainer
    from kdistill.onpolicy import Completions

    training_args = transformers.TrainingArguments(
        tempfile.mkdtemp(),
        per_device_train_batch_size=args.batch,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        seed=0,
    )
    rows = [{"prompt": t} for t in _texts(prompts)]
    trainer = OnPolicyKDTrainer(
        model=student,
        teacher_model=teacher,
        args=training_args,
        train_dataset=rows,
        processing_class=_word_tokenizer(args.vocab),
        max_new_tokens=args.completion,
    )
    # the student stays converted for the whole benchmark (the stack lives in the module: a
    # collected generator context would export it)
    model = _OPEN_CONTEXTS.enter_context(trainer.distilling())
    model.train()
    collated = trainer.data_collator(rows)

    def sample():
        batch = trainer._complete(collated)
        if not torch.equal(batch["input_ids"][:, : args.prompt], prompts):
            raise RuntimeError("OnPolicyKDTrainer tokenized the prompts differently")
        return batch

    def loss(batch):
        n_tokens = int((batch["labels"] != -100).sum())
        return trainer.compute_loss(model, batch, num_items_in_batch=n_tokens), n_tokens

    def check_loss():
        completions = Completions.from_parts(prompts, None, check, None)
        batch = {
            "input_ids": completions.input_ids,
            "attention_mask": completions.attention_mask,
            "position_ids": completions.position_ids,
            "labels": completions.labels(),
        }
        return trainer.compute_loss(model, batch)

    return sample, loss, check_loss


def _trl_step_fns(args, student, teacher, prompts, check):
    import trl
    from datasets import Dataset

    tokenizer = _word_tokenizer(args.vocab)
    texts = _texts(prompts)
    config = trl.DistillationConfig(
        tempfile.mkdtemp(),
        per_device_train_batch_size=args.batch,
        max_steps=1,
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        beta=1.0,
        temperature=1.0,
        max_completion_length=args.completion,
        save_strategy="no",
        seed=0,
    )
    trainer = trl.DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=Dataset.from_list([{"prompt": t} for t in texts]),
        processing_class=tokenizer,
    )
    rows = [{"prompt": t} for t in texts]

    def sample():
        batch = trainer._generate_and_score_completions(rows)
        if not torch.equal(batch["prompt_ids"], prompts):
            raise RuntimeError(f"TRL tokenized the prompts differently: {batch['prompt_ids']}")
        return batch

    def loss(batch):
        value, _, _ = trainer._compute_loss(student, batch, batch["num_items_in_batch"])
        return value, int(batch["completion_mask"].sum())

    def check_loss():
        batch = {
            "prompt_ids": prompts,
            "prompt_mask": torch.ones_like(prompts),
            "completion_ids": check,
            "completion_mask": torch.ones_like(check),
        }
        return trainer._compute_loss(student, batch, None)[0]

    return sample, loss, check_loss


def measure(variant: str, args: argparse.Namespace) -> dict:
    """Time and memory of ``variant``'s on-policy steps (see the module docstring)."""
    torch.manual_seed(0)
    max_len = args.prompt + args.completion + 8
    student, teacher = build_models(args.config, args.vocab, max_len)
    # counted before the trainer variant converts the student (its parameters then hold the
    # teacher's)
    params = {
        "student_params": sum(p.numel() for p in student.parameters()),
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
    }
    prompts, check = _data(args)
    make = {
        "kdistill": _kdistill_step_fns,
        "kdistill-trainer": _trainer_step_fns,
        "trl": _trl_step_fns,
    }[variant]
    sample, loss_fn, check_loss = make(args, student, teacher, prompts, check)
    student.train()
    with torch.no_grad():
        check_value = float(check_loss())
    clock = _TeacherClock(teacher.model)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    phases: dict[str, list[float]] = {
        k: [] for k in ("sampling", "scoring", "loss_backward", "optimizer", "total")
    }
    peaks, lengths = [], []
    for step in range(args.repeats + 1):  # step 0 warms up
        start = time.perf_counter()
        batch = sample()
        sampled = time.perf_counter()
        trim_heap()
        rss_before = proc_status_kb("VmRSS")
        hwm = rss_before is not None and reset_peak_rss()
        clock.total = 0.0
        scored_start = time.perf_counter()
        value, n_tokens = loss_fn(batch)
        value.backward()
        backward_done = time.perf_counter()
        peak_mb = (proc_status_kb("VmHWM") - rss_before) / 1024 if hwm else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        if step == 0:
            continue
        phases["sampling"].append(sampled - start)
        phases["scoring"].append(clock.total)
        phases["loss_backward"].append(backward_done - scored_start - clock.total)
        phases["optimizer"].append(end - backward_done)
        phases["total"].append(end - start)
        peaks.append(peak_mb)
        lengths.append(n_tokens / args.batch)
    row = {
        "variant": variant,
        "config": args.config,
        "vocab": args.vocab,
        "batch": args.batch,
        "prompt": args.prompt,
        "completion": args.completion,
        "mean_completion_length": statistics.mean(lengths),
        "check_loss": check_value,
        **{f"{name}_s": statistics.median(times) for name, times in phases.items()},
        "peak_extra_mb": max(peaks) if None not in peaks else None,
        **params,
        "threads": torch.get_num_threads(),
    }
    if variant == "trl":
        import trl

        row["trl"] = trl.__version__
    _OPEN_CONTEXTS.close()
    return row


def _measure_isolated(variant: str, args: argparse.Namespace, config: str) -> dict | None:
    """Run ``measure`` in a fresh process (``--python``) and read back its JSON row."""
    command = [args.python, str(Path(__file__).resolve()), "--child", variant, "--config", config]
    for name in ("vocab", "batch", "prompt", "completion", "repeats"):
        command += [f"--{name}", str(getattr(args, name))]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(_REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        if variant == "trl" and "No module named 'trl'" in result.stderr:
            print(f"trl skipped: it does not import in {args.python}")
            return None
        raise RuntimeError(f"Benchmark of {variant!r} ({config}) failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse arguments, run the variants, print the table; return the rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (smoke run, seconds)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["tiny", "small"])
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--completion", type=int, default=64, help="completion tokens (max)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after a warm-up")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved runs per variant")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the workers")
    parser.add_argument("--output", help="write rows to a .jsonl or .csv file")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--config", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        args.configs, args.vocab, args.batch, args.prompt, args.completion = ["smoke"], 64, 2, 4, 4
        args.repeats, args.rounds = 1, 1
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return []

    env = environment("cpu", torch.float32)
    rows: list[dict] = []
    for config in args.configs:
        runs = interleaved_rounds(
            args.variants, args.rounds, lambda v, c=config: _measure_isolated(v, args, c)
        )
        group = []
        for variant_rows in runs.values():
            row = dict(variant_rows[0])
            row["rounds"] = len(variant_rows)
            for phase in ("sampling_s", "scoring_s", "loss_backward_s", "optimizer_s", "total_s"):
                row[phase] = statistics.median(r[phase] for r in variant_rows)
            row["total_s_rounds"] = [r["total_s"] for r in variant_rows]
            peaks = [r["peak_extra_mb"] for r in variant_rows]
            row["peak_extra_mb"] = None if None in peaks else max(peaks)
            group.append(row)
        values = [r["check_loss"] for r in group]
        if max(values) - min(values) > 1e-4 * max(abs(v) for v in values) + 1e-6:
            raise RuntimeError(f"The variants disagree on the check loss ({config}): {values}")
        trl_row = next((r for r in group if r["variant"] == "trl"), None)
        for row in group:
            if trl_row is not None:
                row["time_vs_trl"] = row["total_s"] / trl_row["total_s"]
                if row["peak_extra_mb"] is not None and trl_row["peak_extra_mb"]:
                    row["memory_vs_trl"] = row["peak_extra_mb"] / trl_row["peak_extra_mb"]
            rows.append({**row, **env})
    columns = ["config", "variant", "sampling_s", "scoring_s", "loss_backward_s", "optimizer_s"]
    columns += ["total_s", "peak_extra_mb", "time_vs_trl", "memory_vs_trl", "check_loss"]
    print(format_table(rows, columns))
    if args.output:
        write_rows(rows, args.output)
    return rows


if __name__ == "__main__":
    main()
