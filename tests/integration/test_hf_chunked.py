"""KDTrainer's default for causal LMs is the chunked lm_head path: same loss, no [B, T, V] logits."""

import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kdistill as mtd  # noqa: E402
from kdistill.hf import KDTrainer, next_token_mask  # noqa: E402

pytestmark = pytest.mark.integration

VOCAB, SEQ = 48, 9


def tiny_llama(layers: int = 1, hidden: int = 16) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config)


def tiny_gpt2(layers: int = 1, hidden: int = 16) -> torch.nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=hidden,
        n_layer=layers,
        n_head=2,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config)


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def make_data(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Prompt-masked labels and right padding of different lengths (target counts differ)."""
    gen = torch.Generator().manual_seed(seed)
    data = []
    for i in range(n):
        ids = torch.randint(0, VOCAB, (SEQ,), generator=gen)
        attention = torch.ones(SEQ, dtype=torch.long)
        attention[SEQ - i % 3 :] = 0  # 0, 1 or 2 padding tokens at the end
        labels = ids.masked_fill(attention == 0, -100)
        labels[: 1 + i % 4] = -100  # the prompt
        data.append({"input_ids": ids, "attention_mask": attention, "labels": labels})
    return data


def batch_of(data):
    return {k: torch.stack([d[k] for d in data]) for k in data[0]}


def make_args(tmp_path, **overrides):
    kwargs = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 1,
        "per_device_train_batch_size": 4,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
    }
    return transformers.TrainingArguments(**{**kwargs, **overrides})


def twin_trainers(tmp_path, build, **kwargs):
    """A chunked (default) and a full-logits trainer on students with the same weights."""
    teacher = build(2, hidden=24)
    students = [build(1), build(1)]
    students[1].load_state_dict(students[0].state_dict())
    chunked = KDTrainer(
        model=students[0], teacher_model=teacher, args=make_args(tmp_path), **kwargs
    )
    full = KDTrainer(
        model=students[1],
        teacher_model=teacher,
        args=make_args(tmp_path),
        chunked=False,
        **kwargs,
    )
    assert chunked.chunked and not full.chunked
    return chunked, full


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("balanced", [False, True], ids=["kd-only", "balanced"])
def test_default_equals_full_logits_loss_and_gradients(tmp_path, name, balanced):
    balancer = mtd.StaticLossBalancer(kd_loss_weight=0.3) if balanced else None
    chunked, full = twin_trainers(tmp_path, BUILDERS[name], loss_balancer=balancer)
    if name == "gpt2":  # GPT-2 ties its lm_head to the token embedding
        assert chunked.model.lm_head.weight is chunked.model.transformer.wte.weight
    inputs = batch_of(make_data(4))
    counted = int(next_token_mask(inputs["labels"]).sum())
    for num_items in (None, 3 * counted):  # a micro-batch of a larger accumulated step
        losses = []
        for trainer in (chunked, full):
            with trainer.distilling() as model:
                model.train()
                model.zero_grad(set_to_none=True)
                loss = trainer.compute_loss(model, inputs, num_items_in_batch=num_items)
                loss.backward()
                losses.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
        (loss_c, grads_c), (loss_f, grads_f) = losses
        torch.testing.assert_close(loss_c, loss_f)
        assert grads_c.keys() == grads_f.keys()
        for param_name, grad in grads_c.items():
            torch.testing.assert_close(grad, grads_f[param_name], msg=param_name)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_default_trains_like_full_logits_with_gradient_accumulation(tmp_path, name):
    build = BUILDERS[name]
    data = make_data(8, seed=3)
    teacher = build(2, hidden=24)
    start = build(1).state_dict()
    args = make_args(
        tmp_path,
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        optim="sgd",
        learning_rate=0.5,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        logging_steps=1,
    )
    results = []
    for chunked in (True, False):
        student = build(1)
        student.load_state_dict(start)
        trainer = KDTrainer(
            model=student,
            teacher_model=teacher,
            loss_balancer=mtd.StaticLossBalancer(kd_loss_weight=0.5),
            args=args,
            train_dataset=data,
            chunked=chunked,
        )
        trainer.train()
        logs = [log for log in trainer.state.log_history if "kd_loss" in log]
        results.append((logs, student.state_dict()))
    (logs_c, params_c), (logs_f, params_f) = results
    for log_c, log_f in zip(logs_c, logs_f, strict=True):
        for key in ("loss", "kd_loss", "ce_loss"):
            assert log_c[key] == pytest.approx(log_f[key], rel=1e-5), key
    assert any(not torch.equal(params_c[k], v) for k, v in start.items()), "no update"
    torch.testing.assert_close(params_c, params_f)


def test_no_vocabulary_logits_and_the_student_is_handed_back_plain(tmp_path):
    student, teacher = tiny_llama(1), tiny_llama(2)
    head = student.lm_head
    shapes = []
    for model in (student, teacher):
        model.lm_head.register_forward_hook(lambda m, args, out: shapes.append(out.shape))
    data = make_data(4)
    trainer = KDTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path, max_steps=2, per_device_train_batch_size=2),
        train_dataset=data,
        eval_dataset=data,
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert shapes == [], "an lm_head computed [B, T, V] logits during train / evaluate"
    assert {"eval_loss", "eval_kd_loss", "eval_ce_loss"} <= set(metrics)
    assert type(student) is transformers.LlamaForCausalLM and student.lm_head is head
    assert student.generate(data[0]["input_ids"][None, :3], max_new_tokens=2).shape == (1, 5)
    assert shapes, "the student's own lm_head is back"
    # its outputs hold no logits (they would be hidden states): predict gives none
    assert trainer.predict(data).predictions is None or not len(trainer.predict(data).predictions)


def test_saves_are_the_plain_student(tmp_path):
    student, teacher = tiny_gpt2(1), tiny_gpt2(2)
    trainer = KDTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path, max_steps=1, per_device_train_batch_size=2),
        train_dataset=make_data(4),
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"))
    assert type(loaded) is transformers.GPT2LMHeadModel
    ids = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, student(ids).logits)


def test_the_choice_is_logged_once(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="kdistill.hf"):
        trainer = KDTrainer(
            model=tiny_llama(1),
            teacher_model=tiny_llama(1),
            args=make_args(tmp_path, max_steps=2, per_device_train_batch_size=2),
            train_dataset=make_data(4),
        )
        trainer.train()
        trainer.train()
    messages = [r.getMessage() for r in caplog.records if r.name == "kdistill.hf"]
    assert len(messages) == 1 and "chunked lm_head path" in messages[0]


def gemma2(softcap: float | None) -> torch.nn.Module:
    config = transformers.Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        final_logit_softcapping=softcap,
    )
    return transformers.Gemma2ForCausalLM(config)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: {"criterion": mtd.LogitsDistillationLoss(reduction="sum")}, "a criterion"),
        (lambda: {"chunked": False}, "chunked=False"),
        (lambda: {"model": gemma2(30.0), "teacher_model": gemma2(30.0)}, "final_logit_softcapping"),
    ],
    ids=["criterion", "opt-out", "softcapping"],
)
def test_full_logits_path_when_the_chunked_one_does_not_apply(tmp_path, caplog, make, reason):
    kwargs = {"model": tiny_llama(1), "teacher_model": tiny_llama(1), **make()}
    with caplog.at_level(logging.INFO, logger="kdistill.hf"):
        trainer = KDTrainer(args=make_args(tmp_path), **kwargs)
    assert not trainer.chunked
    (message,) = [r.getMessage() for r in caplog.records if r.name == "kdistill.hf"]
    assert "full-logits path" in message and reason in message
    inputs = batch_of(make_data(2))
    with trainer.distilling() as model:
        assert trainer.compute_loss(model, inputs).ndim == 0


def test_softcapped_model_loss_matches_full_logits_reference(tmp_path):
    # Gemma-2 transforms its logits after the lm_head; the full path (chosen) keeps it exact
    student, teacher = gemma2(30.0), gemma2(30.0)
    trainer = KDTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path))
    inputs = batch_of(make_data(2))
    with trainer.distilling() as model:
        loss = trainer.compute_loss(model, inputs)
    with torch.no_grad():
        s_log = student(input_ids=inputs["input_ids"]).logits.double().log_softmax(-1)
        t_log = teacher(input_ids=inputs["input_ids"]).logits.double().log_softmax(-1)
    keep = next_token_mask(inputs["labels"])
    per_token = (t_log.exp() * (t_log - s_log)).sum(-1)
    torch.testing.assert_close(loss.double(), per_token[keep].mean(), rtol=1e-5, atol=1e-7)


def test_non_causal_models_keep_the_full_path(tmp_path):
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    student = transformers.BertForSequenceClassification(config)
    teacher = transformers.BertForSequenceClassification(config)
    trainer = KDTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path))
    assert not trainer.chunked


def test_chunked_argument_must_be_a_bool(tmp_path):
    with pytest.raises(TypeError, match="chunked"):
        KDTrainer(
            model=tiny_llama(1), teacher_model=tiny_llama(1), args=make_args(tmp_path), chunked=1
        )


def reference_loss(student, teacher, inputs, kd_weight, num_items):
    """Float64 formula on the plain models' own logits: w·KL(p_t ‖ p_s) + (1 − w)·CE, per target.

    Sums over the positions whose next label is a target, divided by ``num_items`` (Trainer's
    count for the whole accumulated step) or by the micro-batch's own count.
    """
    ids, attention = inputs["input_ids"], inputs["attention_mask"]
    s_log = student(input_ids=ids, attention_mask=attention).logits.double().log_softmax(-1)
    with torch.no_grad():
        t_log = teacher(input_ids=ids, attention_mask=attention).logits.double().log_softmax(-1)
    keep = next_token_mask(inputs["labels"])
    kl = (t_log.exp() * (t_log - s_log)).sum(-1)[keep].sum()
    targets = inputs["labels"][:, 1:][keep[:, :-1]]
    ce = -s_log[:, :-1][keep[:, :-1]].gather(-1, targets[:, None]).sum()
    count = int(keep.sum()) if num_items is None else num_items
    return (kd_weight * kl + (1 - kd_weight) * ce) / count


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("kd_weight", [1.0, 0.3], ids=["kd-only", "balanced"])
def test_default_equals_float64_reference_with_padding_and_accumulation(tmp_path, name, kd_weight):
    build = BUILDERS[name]
    student, teacher = build(1), build(2, hidden=24)
    reference_student = build(1)
    reference_student.load_state_dict(student.state_dict())
    balancer = None if kd_weight == 1.0 else mtd.StaticLossBalancer(kd_loss_weight=kd_weight)
    trainer = KDTrainer(
        model=student, teacher_model=teacher, loss_balancer=balancer, args=make_args(tmp_path)
    )
    assert trainer.chunked
    inputs = batch_of(make_data(4, seed=5))
    assert (inputs["attention_mask"] == 0).any(), "the batch must hold padding"
    counted = int(next_token_mask(inputs["labels"]).sum())
    for num_items in (None, 2 * counted + 1):  # 1 micro-batch of an accumulated step
        with trainer.distilling() as model:
            model.train()
            model.zero_grad(set_to_none=True)
            loss = trainer.compute_loss(model, inputs, num_items_in_batch=num_items)
            loss.backward()
            grads = {n: p.grad for n, p in student.named_parameters()}
        reference_student.train()
        reference_student.zero_grad(set_to_none=True)
        expected = reference_loss(reference_student, teacher, inputs, kd_weight, num_items)
        expected.backward()
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
        for param_name, param in reference_student.named_parameters():
            torch.testing.assert_close(grads[param_name], param.grad, msg=param_name)


class ScaledHead(torch.nn.Linear):
    """An lm_head with extra state (a learned output scale): not a plain projection."""

    def __init__(self, head: torch.nn.Linear) -> None:
        super().__init__(head.in_features, head.out_features, bias=False)
        self.weight = head.weight
        self.scale = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden) * self.scale


def test_a_head_that_is_not_a_plain_projection_keeps_the_full_path(tmp_path, caplog):
    student, teacher = tiny_llama(1), tiny_llama(2)
    student.lm_head = ScaledHead(student.lm_head)
    with caplog.at_level(logging.INFO, logger="kdistill.hf"):
        trainer = KDTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path))
    assert not trainer.chunked
    (message,) = [r.getMessage() for r in caplog.records if r.name == "kdistill.hf"]
    assert "full-logits path" in message and "lm_head (ScaledHead)" in message
    inputs = batch_of(make_data(2))
    with trainer.distilling() as model:
        loss = trainer.compute_loss(model, inputs)
    with torch.no_grad():  # the head's scale is applied: the model's own logits are distilled
        expected = reference_loss(student, teacher, inputs, kd_weight=1.0, num_items=None)
    torch.testing.assert_close(loss.detach().double(), expected, rtol=1e-5, atol=1e-7)
    assert type(student.lm_head) is ScaledHead


def test_the_student_is_handed_back_plain_after_a_failed_step(tmp_path):
    class Boom(transformers.TrainerCallback):
        def on_step_end(self, *_, **__):
            raise RuntimeError("boom")

    student, teacher = tiny_gpt2(1), tiny_gpt2(2)
    head, embedding = student.lm_head, student.transformer.wte
    trainer = KDTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path, max_steps=2, per_device_train_batch_size=2),
        train_dataset=make_data(4),
        callbacks=[Boom()],
    )
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert type(student) is transformers.GPT2LMHeadModel and student.lm_head is head
    assert student.lm_head.weight is embedding.weight  # still tied
    assert trainer.model is student
    ids = torch.randint(0, VOCAB, (1, 4))
    assert student(ids).logits.shape == (1, 4, VOCAB)
