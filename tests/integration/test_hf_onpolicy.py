"""``kdistill.hf.OnPolicyKDTrainer`` on tiny Llamas built from configs, offline byte tokenizer."""

import doctest
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kdistill as mtd  # noqa: E402
from kdistill.hf import KDTrainer, OnPolicyKDTrainer  # noqa: E402
from kdistill.onpolicy import Completions, PromptCollator  # noqa: E402
from kdistill.xtoken import byte_tokenizer  # noqa: E402

pytestmark = pytest.mark.integration

TOKENIZER = byte_tokenizer()  # ids 0-255 = bytes, 256 = EOS (also the pad)
VOCAB = len(TOKENIZER)
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


def tiny_llama(layers: int = 1, hidden: int = 16) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=TOKENIZER.eos_token_id,
    )
    return transformers.LlamaForCausalLM(config)


def make_args(tmp_path, **overrides):
    kwargs = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
        "logging_steps": 1,
        "optim": "sgd",
        "learning_rate": 0.5,
        "max_grad_norm": 0.0,
        "lr_scheduler_type": "constant",
    }
    return transformers.TrainingArguments(**{**kwargs, **overrides})


def test_on_policy_training_logs_and_hands_back_the_student(tmp_path, caplog):
    torch.manual_seed(0)
    student, teacher = tiny_llama(1), tiny_llama(2, hidden=24)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    teacher_start = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = OnPolicyKDTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path),
        train_dataset=[{"prompt": r["prompt"]} for r in ROWS],
        processing_class=TOKENIZER,
        max_new_tokens=5,
        log_completions=True,
        num_completions_to_log=2,
    )
    assert trainer.chunked
    with caplog.at_level(logging.INFO, logger="kdistill.hf"):
        trainer.train()
    logs = [log for log in trainer.state.log_history if "kd_loss" in log]
    assert len(logs) == 2
    for log in logs:
        assert log["on_policy_share"] == 1.0
        assert 1 <= log["completion_length"] <= 5 and 0 <= log["eos_share"] <= 1
        assert log["loss"] == pytest.approx(log["kd_loss"]) and "ce_loss" not in log
    assert len(trainer.completion_samples) == 2
    assert {s["source"] for s in trainer.completion_samples} == {"student"}
    assert any("completion" in r.getMessage() for r in caplog.records)
    assert type(student) is transformers.LlamaForCausalLM
    assert any(not torch.equal(v, start[k]) for k, v in student.state_dict().items())
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in teacher_start.items())


def completed_collator(eos_id):
    """What OnPolicyKDTrainer does with a dataset batch, as a collator for KDTrainer."""
    prompts = PromptCollator(TOKENIZER, max_completion_length=8)

    def collate(rows):
        batch = prompts(rows)
        completions = Completions.from_parts(
            batch["prompt_input_ids"],
            batch["prompt_attention_mask"],
            batch["completion_input_ids"],
            batch["completion_attention_mask"],
            pad_token_id=eos_id,
            eos_token_id=eos_id,
        )
        return {
            "input_ids": completions.input_ids,
            "attention_mask": completions.attention_mask,
            "position_ids": completions.position_ids,
            "labels": completions.labels(),
        }

    return collate


@pytest.mark.parametrize("accumulation", [1, 2])
def test_lmbda_zero_is_kd_trainer_on_the_dataset_completions(tmp_path, accumulation):
    teacher = tiny_llama(2, hidden=24)
    start = tiny_llama(1).state_dict()
    args = make_args(
        tmp_path,
        per_device_train_batch_size=4 // accumulation,
        gradient_accumulation_steps=accumulation,
    )
    results = []
    for on_policy in (True, False):
        student = tiny_llama(1)
        student.load_state_dict(start)
        if on_policy:
            trainer = OnPolicyKDTrainer(
                model=student,
                teacher_model=teacher,
                args=args,
                train_dataset=ROWS,
                processing_class=TOKENIZER,
                lmbda=0.0,
                beta=0.0,  # forward KL: KDTrainer's default divergence
                max_new_tokens=8,
            )
        else:
            trainer = KDTrainer(
                model=student,
                teacher_model=teacher,
                args=args,
                train_dataset=ROWS,
                data_collator=completed_collator(TOKENIZER.eos_token_id),
            )
            trainer._signature_columns = ["prompt", "completion"]
        trainer.train()
        logs = [log for log in trainer.state.log_history if "kd_loss" in log]
        results.append(([log["kd_loss"] for log in logs], student.state_dict()))
    (kd_on, params_on), (kd_off, params_off) = results
    assert kd_on == pytest.approx(kd_off, rel=1e-5)
    assert any(not torch.equal(params_on[k], v) for k, v in start.items()), "no update"
    torch.testing.assert_close(params_on, params_off)


def test_accumulation_is_normalized_by_the_steps_completion_tokens(tmp_path):
    # dataset completions of different lengths: 2 micro-batches of 2 must give the update of
    # one batch of 4 (a per-micro-batch mean would not: their token counts differ)
    teacher = tiny_llama(2, hidden=24)
    start = tiny_llama(1).state_dict()
    results = []
    for batch, accumulation in [(4, 1), (2, 2)]:
        student = tiny_llama(1)
        student.load_state_dict(start)
        trainer = OnPolicyKDTrainer(
            model=student,
            teacher_model=teacher,
            args=make_args(
                tmp_path,
                max_steps=1,
                per_device_train_batch_size=batch,
                gradient_accumulation_steps=accumulation,
            ),
            train_dataset=ROWS[:4],
            processing_class=TOKENIZER,
            lmbda=0.0,
            max_new_tokens=6,
        )
        trainer.train()
        results.append(student.state_dict())
    torch.testing.assert_close(results[0], results[1])


def test_the_step_count_is_the_completion_tokens_of_all_micro_batches(tmp_path):
    trainer = OnPolicyKDTrainer(
        model=tiny_llama(1),
        teacher_model=tiny_llama(1),
        args=make_args(tmp_path),
        train_dataset=ROWS,
        processing_class=TOKENIZER,
        lmbda=0.5,
        max_new_tokens=6,
    )
    collate = trainer.data_collator
    batches = [collate(ROWS[i : i + 2]) for i in range(0, 8, 2)]
    with trainer.distilling():
        completed, count = trainer.get_batch_samples(iter(batches), 4, torch.device("cpu"))
    assert len(completed) == 4
    tokens = sum(int((b["labels"] != -100).sum()) for b in completed)
    assert int(count) == tokens > 0
    for batch in completed:  # the targets are the completion tokens after each prompt
        assert (batch["labels"][:, : batch["input_ids"].shape[1] - 6] == -100).any()


def test_seq_kd_samples_from_the_teacher(tmp_path):
    trainer = OnPolicyKDTrainer(
        model=tiny_llama(1),
        teacher_model=tiny_llama(2),
        args=make_args(tmp_path, max_steps=1),
        train_dataset=[{"prompt": r["prompt"]} for r in ROWS],
        processing_class=TOKENIZER,
        lmbda=0.0,
        seq_kd=True,
        max_new_tokens=4,
        log_completions=True,
    )
    trainer.train()
    (log,) = [log for log in trainer.state.log_history if "kd_loss" in log]
    assert log["on_policy_share"] == 0.0
    assert {s["source"] for s in trainer.completion_samples} == {"teacher"}


def test_evaluation_samples_reproducibly_and_a_balancer_trains_ce(tmp_path):
    trainer = OnPolicyKDTrainer(
        model=tiny_llama(1),
        teacher_model=tiny_llama(2),
        args=make_args(tmp_path, max_steps=1, per_device_eval_batch_size=4),
        train_dataset=ROWS,
        eval_dataset=[{"prompt": r["prompt"]} for r in ROWS[:4]],
        processing_class=TOKENIZER,
        lmbda=0.5,
        loss_balancer=mtd.StaticLossBalancer(kd_loss_weight=0.5),
        max_new_tokens=4,
    )
    first, second = trainer.evaluate(), trainer.evaluate()
    assert first["eval_kd_loss"] == second["eval_kd_loss"] > 0
    assert first["eval_loss"] == pytest.approx(
        0.5 * first["eval_kd_loss"] + 0.5 * first["eval_ce_loss"], rel=1e-5
    )
    trainer.train()
    (log,) = [log for log in trainer.state.log_history if "kd_loss" in log]
    assert log["loss"] == pytest.approx(0.5 * log["kd_loss"] + 0.5 * log["ce_loss"], rel=1e-4)


def chat_tokenizer():
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return tokenizer


def test_chat_prompts_and_completions(tmp_path):
    tokenizer = chat_tokenizer()
    rows = [
        {
            "prompt": [{"role": "user", "content": "Hi"}],
            "completion": [{"role": "assistant", "content": "Hello!"}],
        },
        {
            "prompt": [{"role": "user", "content": "Name?"}],
            "completion": [{"role": "assistant", "content": "Kd."}],
        },
    ]
    batch = PromptCollator(tokenizer)(rows)
    prompt = tokenizer.decode(batch["prompt_input_ids"][0][batch["prompt_attention_mask"][0] == 1])
    completion_ids = batch["completion_input_ids"][0][batch["completion_attention_mask"][0] == 1]
    assert prompt == "<user>Hi<assistant>"
    assert tokenizer.decode(completion_ids) == "Hello!"
    trainer = OnPolicyKDTrainer(
        model=tiny_llama(1),
        teacher_model=tiny_llama(1),
        args=make_args(tmp_path, max_steps=1),
        train_dataset=rows,
        processing_class=tokenizer,
        lmbda=0.5,
        max_new_tokens=4,
    )
    trainer.train()
    assert trainer.state.global_step == 1


@pytest.mark.parametrize(
    ("divergence", "kwargs"), [("topk_kl", {"k": 8}), ("tvd", {}), ("skew_kl", {"alpha": 0.2})]
)
def test_other_divergences(tmp_path, divergence, kwargs):
    trainer = OnPolicyKDTrainer(
        model=tiny_llama(1),
        teacher_model=tiny_llama(1),
        args=make_args(tmp_path, max_steps=1),
        train_dataset=[{"prompt": r["prompt"]} for r in ROWS],
        processing_class=TOKENIZER,
        max_new_tokens=3,
        divergence=divergence,
        divergence_kwargs=kwargs,
    )
    assert trainer.chunked
    trainer.train()
    (log,) = [log for log in trainer.state.log_history if "kd_loss" in log]
    assert log["kd_loss"] >= 0


def test_errors(tmp_path):
    common = {"model": tiny_llama(1), "teacher_model": tiny_llama(1), "args": make_args(tmp_path)}
    with pytest.raises(ValueError, match="processing_class"):
        OnPolicyKDTrainer(**common, train_dataset=ROWS)
    with pytest.raises(ValueError, match="lmbda"):
        OnPolicyKDTrainer(**common, processing_class=TOKENIZER, lmbda=2.0)
    with pytest.raises(ValueError, match="divergence_kwargs"):
        OnPolicyKDTrainer(**common, processing_class=TOKENIZER, divergence_kwargs={"k": 3})
    with pytest.raises(ValueError, match="divergence"):
        OnPolicyKDTrainer(**common, processing_class=TOKENIZER, divergence="nope")
    with pytest.raises(ValueError, match="top_p"):
        OnPolicyKDTrainer(**common, processing_class=TOKENIZER, top_p=0.0)
    trainer = OnPolicyKDTrainer(
        **common,
        processing_class=TOKENIZER,
        train_dataset=[{"prompt": r["prompt"]} for r in ROWS],
        lmbda=0.0,
    )
    with pytest.raises(ValueError, match="completion"):
        trainer.train()
    assert type(common["model"]) is transformers.LlamaForCausalLM  # handed back on errors too


def test_docstring_examples():
    import kdistill.hf as module

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
