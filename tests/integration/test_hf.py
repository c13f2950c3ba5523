"""``kdistill.hf.KDTrainer`` on tiny Llama / GPT-2 models built from configs (no downloads)."""

import doctest
import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import kdistill as mtd  # noqa: E402
from kdistill.hf import KDTrainer, next_token_mask  # noqa: E402

pytestmark = pytest.mark.integration

VOCAB, SEQ = 48, 8


def tiny_llama(layers: int = 1) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config)


def tiny_gpt2(layers: int = 1) -> torch.nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=16,
        n_layer=layers,
        n_head=2,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,  # no dropout: the hand reference runs the same forward
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config)


def make_data(
    n: int, seed: int = 0, prompt_lengths: list[int] | None = None
) -> list[dict[str, torch.Tensor]]:
    """Samples with a masked prompt (random length by default: token counts differ per sample)."""
    gen = torch.Generator().manual_seed(seed)
    data = []
    for i in range(n):
        ids = torch.randint(0, VOCAB, (SEQ,), generator=gen)
        labels = ids.clone()
        prompt = torch.randint(1, SEQ - 2, (), generator=gen)
        labels[: prompt_lengths[i] if prompt_lengths else int(prompt)] = -100
        data.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones(SEQ).long()})
    return data


def batch_of(data: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([d[k] for d in data]) for k in data[0]}


def make_args(tmp_path, **overrides) -> "transformers.TrainingArguments":
    kwargs = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 1,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "learning_rate": 1e-2,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
    }
    kwargs.update(overrides)
    return transformers.TrainingArguments(**kwargs)


def hand_masked_kd(student_logits, teacher_logits, labels) -> torch.Tensor:
    """Σ over next-token targets of KL(p_teacher ‖ p_student), / their count, in float64."""
    s = student_logits[:, :-1].double().log_softmax(-1)  # position t predicts labels[:, t + 1]
    t = teacher_logits[:, :-1].double().log_softmax(-1)
    keep = labels[:, 1:] != -100
    kl = (t.exp() * (t - s)).sum(-1)  # [B, T-1]
    return kl[keep].sum() / keep.sum()


def hand_ce(student_logits, labels) -> torch.Tensor:
    logits = student_logits[:, :-1].double().reshape(-1, VOCAB)
    return F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("kd_weight", [None, 0.25], ids=["kd-only", "balanced"])
def test_loss_equals_hand_computed_masked_kd(tmp_path, build, kd_weight):
    student, teacher = build(1), build(2)
    reference_student = build(1)
    reference_student.load_state_dict(student.state_dict())
    balancer = None if kd_weight is None else mtd.StaticLossBalancer(kd_loss_weight=kd_weight)
    trainer = KDTrainer(
        model=student, teacher_model=teacher, loss_balancer=balancer, args=make_args(tmp_path)
    )
    inputs = batch_of(make_data(3))
    with trainer.distilling() as model:
        model.train()
        loss = trainer.compute_loss(model, inputs)
        # given the step's token count (as Trainer does), the KD sum is divided by it instead
        num_items = 2 * int(next_token_mask(inputs["labels"]).sum())
        loss_half = trainer.compute_loss(model, inputs, num_items_in_batch=num_items)

    with torch.no_grad():
        s_logits = reference_student(input_ids=inputs["input_ids"]).logits
        t_logits = teacher(input_ids=inputs["input_ids"]).logits
    expected = hand_masked_kd(s_logits, t_logits, inputs["labels"])
    if kd_weight is not None:
        expected = kd_weight * expected + (1 - kd_weight) * hand_ce(s_logits, inputs["labels"])
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    if kd_weight is None:
        torch.testing.assert_close(loss_half.double(), expected / 2, rtol=1e-5, atol=1e-7)


def test_lm_head_loss_on_final_hidden_states_equals_default_criterion(tmp_path):
    """LMHeadDistillationLoss (chunked, from hidden states) gives the default criterion's loss."""
    student, teacher = tiny_llama(1), tiny_llama(2)
    student_copy = tiny_llama(1)
    student_copy.load_state_dict(student.state_dict())
    lm_head_loss = mtd.LMHeadDistillationLoss(
        student_copy.lm_head, teacher.lm_head, chunk_size=5, shift_labels=False
    )
    default = KDTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path))
    chunked = KDTrainer(
        model=student_copy,
        teacher_model=teacher,
        criterion={("model.norm", "model.norm"): lm_head_loss},
        args=make_args(tmp_path),
    )
    inputs = batch_of(make_data(3))
    for num_items in (None, 2 * int(next_token_mask(inputs["labels"]).sum())):
        losses = []
        for trainer in (default, chunked):
            with trainer.distilling() as model:
                model.train()
                losses.append(trainer.compute_loss(model, inputs, num_items_in_batch=num_items))
        torch.testing.assert_close(losses[1], losses[0])
    for loss in losses:
        loss.backward()
    for (name, p), (_, p_copy) in zip(
        student.named_parameters(), student_copy.named_parameters(), strict=True
    ):
        torch.testing.assert_close(p_copy.grad, p.grad, msg=name)


def test_causal_lm_recipe_model_trains_like_the_default_and_saves_plain_student(tmp_path):
    """A kdistill.llm.convert_causal_lm model (no [B, T, V] logits) takes the default's steps."""
    from kdistill.llm import convert_causal_lm, export_causal_lm

    data = make_data(4, seed=3, prompt_lengths=[1, 2, 3, 5])
    teacher = tiny_llama(2)
    start = tiny_llama(1).state_dict()
    args = make_args(
        tmp_path,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        optim="sgd",
        learning_rate=1.0,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        logging_steps=1,
    )
    trainers = []
    for recipe in (False, True):
        student = tiny_llama(1)
        student.load_state_dict(start)
        balancer = mtd.StaticLossBalancer(kd_loss_weight=0.5)
        if recipe:
            loss = mtd.LMHeadDistillationLoss(chunk_size=5, compute_student_loss=True)
            model = convert_causal_lm(student, teacher, loss, loss_balancer=balancer)
            trainer = KDTrainer(model=model, args=args, train_dataset=data)
        else:
            trainer = KDTrainer(
                model=student,
                teacher_model=teacher,
                loss_balancer=balancer,
                args=args,
                train_dataset=data,
            )
        trainer.train()
        trainers.append(trainer)
    default, chunked = trainers
    (log_default,) = [log for log in default.state.log_history if "kd_loss" in log]
    (log_chunked,) = [log for log in chunked.state.log_history if "kd_loss" in log]
    for key in ("loss", "kd_loss", "ce_loss"):
        assert log_chunked[key] == pytest.approx(log_default[key], rel=1e-5), key

    chunked.save_model(str(tmp_path / "recipe"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "recipe"))
    trained = export_causal_lm(chunked.model)
    torch.testing.assert_close(trained.state_dict(), default.model.state_dict())
    ids = data[0]["input_ids"][None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained(input_ids=ids).logits)


def test_losses_that_shift_labels_themselves_are_refused(tmp_path):
    student, teacher = tiny_llama(1), tiny_llama(1)
    loss = mtd.LMHeadDistillationLoss(student.lm_head, teacher.lm_head)  # shift_labels=True
    with pytest.raises(ValueError, match="shift_labels=False"):
        KDTrainer(
            model=student,
            teacher_model=teacher,
            criterion={("model.norm", "model.norm"): loss},
            args=make_args(tmp_path),
        )
    assert not isinstance(student, mtd.DistillationModel)  # refused before converting


def test_next_token_mask_shifts_labels():
    labels = torch.tensor([[-100, -100, 3, 4], [1, 2, -100, 5]])
    expected = torch.tensor([[False, True, True, False], [True, False, True, False]])
    assert torch.equal(next_token_mask(labels), expected)


@pytest.mark.parametrize(
    ("counted", "prompt_lengths"),
    # counted: targets per sample 6, 5, 4, 2, so however the samples are split in pairs the two
    # micro-batches hold different token counts (a per-micro-batch mean would differ).
    # uncounted: Trainer gets no token count and divides micro-batch means by the accumulation
    # steps, which equals the full batch only for equal counts (as for Hugging Face's own loss)
    [(True, [1, 2, 3, 5]), (False, [2, 2, 2, 2])],
    ids=["token-count", "no-token-count"],
)
def test_gradient_accumulation_matches_full_batch(tmp_path, counted, prompt_lengths):
    """2 micro-batches of 2 give the step of one batch of 4 (loss, logs and update)."""
    data = make_data(4, seed=1, prompt_lengths=prompt_lengths)
    teacher = tiny_llama(2)
    start = tiny_llama(1).state_dict()
    results = []
    for batch, accumulation in [(4, 1), (2, 2)]:
        student = tiny_llama(1)
        student.load_state_dict(start)
        args = make_args(
            tmp_path,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            optim="sgd",
            learning_rate=1.0,
            max_grad_norm=0.0,
            lr_scheduler_type="constant",
            logging_steps=1,
        )
        trainer = KDTrainer(
            model=student,
            teacher_model=teacher,
            loss_balancer=mtd.StaticLossBalancer(kd_loss_weight=0.5),
            args=args,
            train_dataset=data,
        )
        trainer.model_accepts_loss_kwargs = counted  # what Trainer decides from the signature
        out = trainer.train()
        (log,) = [log for log in trainer.state.log_history if "kd_loss" in log]
        results.append((out.training_loss, log, trainer.model.state_dict()))
    (loss_full, log_full, params_full), (loss_accumulated, log_accumulated, params_accumulated) = (
        results
    )
    assert loss_full == pytest.approx(loss_accumulated, rel=1e-5)
    for key in ("loss", "kd_loss", "ce_loss"):
        assert log_full[key] == pytest.approx(log_accumulated[key], rel=1e-5), key
    assert any(not torch.equal(params_full[k], start[k]) for k in start), "no training happened"
    torch.testing.assert_close(params_accumulated, params_full)


def test_training_logs_components_reduces_kd_and_saves_student(tmp_path):
    data = make_data(8, seed=2)
    student, teacher = tiny_llama(1), tiny_llama(2)
    with torch.no_grad():  # a confident teacher, so that the KD term dominates the CE term
        teacher.lm_head.weight.mul_(30)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    args = make_args(
        tmp_path,
        max_steps=6,
        logging_steps=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=3e-2,
    )
    trainer = KDTrainer(
        model=student,
        teacher_model=teacher,
        loss_balancer=mtd.StaticLossBalancer(kd_loss_weight=0.75),
        args=args,
        train_dataset=data,
        eval_dataset=data[:4],
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()

    for metrics in (before, after):
        assert {
            "eval_loss",
            "eval_kd_loss",
            "eval_ce_loss",
            "eval_LMHeadDistillationLoss_0",
        } <= set(metrics)
        assert metrics["eval_loss"] == pytest.approx(
            0.75 * metrics["eval_kd_loss"] + 0.25 * metrics["eval_ce_loss"], rel=1e-5
        )
    assert after["eval_kd_loss"] < before["eval_kd_loss"]

    train_logs = [log for log in trainer.state.log_history if "loss" in log]
    assert [log["step"] for log in train_logs] == [3, 6]
    for log in train_logs:
        assert log["loss"] == pytest.approx(0.75 * log["kd_loss"] + 0.25 * log["ce_loss"], rel=1e-4)
        assert log["kd_loss"] == pytest.approx(log["LMHeadDistillationLoss_0"])  # chunked default

    # teacher: unchanged, not in the optimizer, its flags as before; the student plain again
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in teacher_before.items())
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}
    assert trainer.model is student and type(student) is transformers.LlamaForCausalLM
    assert optimized == {id(p) for p in student.parameters()}

    # save_model writes the student alone, loadable without kdistill's classes
    trainer.save_model(str(tmp_path / "student"))
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "student"))
    assert type(loaded) is transformers.LlamaForCausalLM
    plain_keys = set(tiny_llama(1).state_dict())
    assert set(loaded.state_dict()) == plain_keys
    ids = data[0]["input_ids"][None]
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, student(input_ids=ids).logits)


def test_teacher_follows_student_dtype_and_factory_teacher(tmp_path):
    student = tiny_llama(1).to(torch.float64)
    trainer = KDTrainer(model=student, teacher_model=tiny_llama, args=make_args(tmp_path))
    with trainer.distilling() as model:
        assert {p.dtype for p in model.teacher_model.parameters()} == {torch.float64}
        assert not any(p.requires_grad for p in model.teacher_model.parameters())
        teacher = model.teacher_model
    with trainer.distilling() as model:
        assert model.teacher_model is teacher  # the factory is called once, in __init__


def test_accepts_a_converted_model(tmp_path):
    model = mtd.convert(
        tiny_llama(1),
        mode=[
            ("kd_loss", {"teacher_model": tiny_llama(1), "criterion": mtd.LogitsDistillationLoss()})
        ],
    )
    trainer = KDTrainer(model=model, args=make_args(tmp_path))
    inputs = batch_of(make_data(2))
    assert trainer.compute_loss(trainer.model, inputs).ndim == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "needs `teacher_model`"),
        (
            {"teacher_model": tiny_llama, "compute_loss_func": lambda *a, **k: 0},
            ValueError,
            "compute_loss_func",
        ),
    ],
    ids=["no-teacher", "compute-loss-func"],
)
def test_invalid_arguments(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        KDTrainer(model=tiny_llama(1), args=make_args(tmp_path), **kwargs)


def test_invalid_model_and_options(tmp_path):
    with pytest.raises(TypeError, match=r"student nn\.Module"):
        KDTrainer(model="gpt2", teacher_model=tiny_llama, args=make_args(tmp_path))
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        KDTrainer(
            model=tiny_llama(1),
            teacher_model=tiny_llama,
            args=make_args(tmp_path, label_smoothing_factor=0.1),
        )
    converted = mtd.convert(
        tiny_llama(1),
        mode=[("kd_loss", {"teacher_model": tiny_llama, "criterion": torch.nn.MSELoss()})],
    )
    with pytest.raises(ValueError, match="already a DistillationModel"):
        KDTrainer(model=converted, teacher_model=tiny_llama, args=make_args(tmp_path))


def test_docstring_examples():
    import kdistill.hf as module

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} doctest(s) failed"


def test_save_pretrained_on_converted_model_records_student_architecture(tmp_path):
    # the generated class keeps the student's name, so config.json names the student's class
    student = tiny_llama()
    model = mtd.convert(
        student,
        mode=[
            ("kd_loss", {"teacher_model": tiny_llama(), "criterion": mtd.LogitsDistillationLoss()})
        ],
    )
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is transformers.LlamaForCausalLM
    ids = torch.randint(0, VOCAB, (1, 5))
    torch.testing.assert_close(loaded(ids).logits, mtd.export(model)(ids).logits)


class _FailAt(transformers.TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("simulated crash during training")


def _plain_count() -> int:
    return sum(p.numel() for p in tiny_llama(1).parameters())


def test_the_student_passed_in_is_plain_after_training_and_after_a_crash(tmp_path):
    data = make_data(8, seed=4)
    teacher = tiny_llama(2)
    student = tiny_llama(1)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    args = make_args(tmp_path, max_steps=2, per_device_train_batch_size=2, logging_steps=1)
    trainer = KDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    assert type(student) is transformers.LlamaForCausalLM  # not converted by __init__ either
    trainer.train()
    assert trainer.model is student and type(student) is transformers.LlamaForCausalLM
    assert sum(p.numel() for p in student.parameters()) == _plain_count()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in student.modules())
    assert any(not torch.equal(v, start[k]) for k, v in student.state_dict().items()), "trained"
    ids = data[0]["input_ids"][None, :4]
    generated = student.generate(ids, max_new_tokens=2, do_sample=False)
    assert generated.shape == (1, 6)
    # train again: the optimizer (and its state) carries over, the student is plain afterwards
    optimizer = trainer.optimizer
    trainer.args.max_steps = 4
    trainer.train()
    assert trainer.optimizer is optimizer and type(student) is transformers.LlamaForCausalLM

    crashing = tiny_llama(1)
    trainer = KDTrainer(
        model=crashing,
        teacher_model=teacher,
        args=args,
        train_dataset=data,
        callbacks=[_FailAt(1)],
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.train()
    assert type(crashing) is transformers.LlamaForCausalLM
    assert sum(p.numel() for p in crashing.parameters()) == _plain_count()


def test_checkpoint_resume_with_a_plain_student(tmp_path):
    data = make_data(8, seed=5)
    teacher = tiny_llama(2)
    start = tiny_llama(1).state_dict()
    common = {"per_device_train_batch_size": 2, "optim": "sgd", "lr_scheduler_type": "constant"}

    def run(max_steps, resume=None, **extra):
        student = tiny_llama(1)
        student.load_state_dict(start)
        args = make_args(tmp_path, max_steps=max_steps, **common, **extra)
        trainer = KDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
        trainer.train(resume_from_checkpoint=resume)
        assert type(student) is transformers.LlamaForCausalLM
        return student

    straight = run(4)
    run(2, save_strategy="steps", save_steps=2)
    resumed = run(4, resume=str(tmp_path / "out" / "checkpoint-2"))
    torch.testing.assert_close(resumed.state_dict(), straight.state_dict())
