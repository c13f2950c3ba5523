"""``KDTrainer`` with several named teachers (issue 15) on tiny Llama models (no downloads)."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kdistill as mtd  # noqa: E402
from kdistill.hf import KDTrainer, default_multi_teacher_criterion, next_token_mask  # noqa: E402

pytestmark = pytest.mark.integration

VOCAB, SEQ = 48, 8


def tiny_llama(layers: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
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


def make_batch(n: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=gen)
    labels = ids.clone()
    for i in range(n):
        labels[i, : 1 + i] = -100  # a masked prompt of a different length per sample
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def make_args(tmp_path, **overrides) -> "transformers.TrainingArguments":
    kwargs = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 2,
        "per_device_train_batch_size": 3,
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
    """Σ over next-token targets of KL(p_teacher ‖ p_student) / their count, in float64."""
    s = student_logits[:, :-1].double().log_softmax(-1)
    t = teacher_logits[:, :-1].double().log_softmax(-1)
    keep = labels[:, 1:] != -100
    kl = (t.exp() * (t - s)).sum(-1)
    return kl[keep].sum() / keep.sum()


def test_default_criterion_is_the_uniform_mean_of_per_teacher_forward_kl(tmp_path):
    teachers = {"deep": tiny_llama(2, seed=1), "wide": tiny_llama(1, seed=2)}
    student = tiny_llama(1, seed=3)
    reference = copy.deepcopy(student)
    trainer = KDTrainer(model=student, teacher_model=teachers, args=make_args(tmp_path))
    inputs = make_batch()
    with trainer.distilling() as model:
        assert [p.teacher_layer for p in model.kd_pairs] == [("deep", "wide")]
        model.train()
        loss = trainer.compute_loss(model, inputs)
        num_items = 2 * int(next_token_mask(inputs["labels"]).sum())
        loss_half = trainer.compute_loss(model, inputs, num_items_in_batch=num_items)
    with torch.no_grad():
        s_logits = reference(input_ids=inputs["input_ids"]).logits
        expected = sum(
            hand_masked_kd(s_logits, t(input_ids=inputs["input_ids"]).logits, inputs["labels"])
            for t in teachers.values()
        ) / len(teachers)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss_half.double(), expected / 2, rtol=1e-5, atol=1e-7)


def test_training_keeps_every_teacher_frozen_and_returns_the_plain_student(tmp_path):
    teachers = {"deep": tiny_llama(2, seed=1), "wide": tiny_llama(1, seed=2)}
    before = {n: copy.deepcopy(t.state_dict()) for n, t in teachers.items()}
    student = tiny_llama(1, seed=3)
    start = copy.deepcopy(student.state_dict())
    data = [{k: v[0] for k, v in make_batch(1, seed=s).items()} for s in range(6)]
    trainer = KDTrainer(
        model=student, teacher_model=teachers, args=make_args(tmp_path), train_dataset=data
    )
    trainer.train()
    assert type(trainer.model) is type(student) and trainer.model is student
    assert not any(k.startswith("_teacher_model") for k in student.state_dict())
    assert any(not torch.equal(v, start[k]) for k, v in student.state_dict().items())
    for name, teacher in teachers.items():
        for key, value in teacher.state_dict().items():
            assert torch.equal(value, before[name][key]), (name, key)


def test_an_explicit_per_teacher_criterion_with_a_balancer(tmp_path):
    teachers = {"deep": tiny_llama(2, seed=1), "wide": tiny_llama(1, seed=2)}
    student = tiny_llama(1, seed=3)
    criterion = {
        ("", "deep"): mtd.LogitsDistillationLoss(reduction="sum"),
        ("", "wide"): mtd.LogitsDistillationLoss(reduction="sum"),
    }
    trainer = KDTrainer(
        model=student,
        teacher_model=teachers,
        criterion=criterion,
        loss_balancer=mtd.StaticLossBalancer([0.5, 0.5]),
        args=make_args(tmp_path),
    )
    default = KDTrainer(
        model=copy.deepcopy(student), teacher_model=teachers, args=make_args(tmp_path)
    )
    inputs = make_batch()
    losses = []
    for t in (trainer, default):
        with t.distilling() as model:
            model.train()
            losses.append(t.compute_loss(model, inputs))
    torch.testing.assert_close(losses[0], losses[1])  # 0.5·KL_deep + 0.5·KL_wide, both ways


def test_default_multi_teacher_criterion_helper():
    ((key, loss),) = default_multi_teacher_criterion(["a", "b"]).items()
    assert key == ("", ("a", "b"))
    assert isinstance(loss, mtd.EnsembleLogitsDistillationLoss)
    assert (loss.combine, loss.reduction, loss.temperature, loss.weights) == (
        "losses",
        "sum",
        1.0,
        None,
    )
