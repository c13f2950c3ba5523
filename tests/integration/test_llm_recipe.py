"""The causal-LM recipe (``kdistill.llm``) on tiny ``transformers`` Llama models built from configs."""

import copy

import pytest
import torch
from torch import nn

import kdistill as mtd
from kdistill.llm import (
    compute_causal_lm_loss,
    convert_causal_lm,
    export_causal_lm,
    restore_causal_lm,
)

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.integration

VOCAB, B, T = 61, 2, 9


def tiny_llama(hidden: int, layers: int, vocab: int = VOCAB) -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config)


@pytest.fixture
def models():
    return tiny_llama(16, 1), tiny_llama(24, 2)


@pytest.fixture
def batch():
    ids = torch.randint(0, VOCAB, (B, T))
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt
    return ids, labels


def plain_step(student: nn.Module, teacher: nn.Module, ids, labels, temperature: float):
    """Full logits: Hugging Face's own CE plus Hinton KD on the shifted positions."""
    out = student(input_ids=ids, labels=labels)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids).logits
    kd = mtd.LogitsDistillationLoss(temperature, ignore_index=-100)(
        out.logits[:, :-1], teacher_logits[:, :-1], labels=labels[:, 1:]
    )
    return kd, out.loss


def test_one_pass_gives_kd_and_ce_equal_to_full_logits(models, batch):
    student, teacher = models
    reference = copy.deepcopy(student)
    ids, labels = batch
    kd_ref, ce_ref = plain_step(reference, teacher, ids, labels, 2.0)
    (0.5 * kd_ref + 0.5 * ce_ref).backward()

    model = convert_causal_lm(
        student,
        teacher,
        mtd.LMHeadDistillationLoss(temperature=2.0, chunk_size=5, compute_student_loss=True),
        loss_balancer=mtd.StaticLossBalancer(0.5),
    )
    model(input_ids=ids)
    losses = compute_causal_lm_loss(model, labels, skip_balancer=True)
    torch.testing.assert_close(losses["student_loss"], ce_ref)
    torch.testing.assert_close(losses["LMHeadDistillationLoss_0"], kd_ref)
    model(input_ids=ids)
    compute_causal_lm_loss(model, labels).backward()
    expected = dict(reference.named_parameters())
    with model.hide_teacher_model():
        for name, param in model.named_parameters():
            torch.testing.assert_close(param.grad, expected[name].grad, msg=name)
    assert all(p.grad is None for p in teacher.parameters())


def test_models_never_compute_full_logits(models, batch):
    student, teacher = models
    calls = []
    for head in (student.lm_head, teacher.lm_head):
        head.register_forward_hook(lambda *_: calls.append(1))
    model = convert_causal_lm(student, teacher)
    out = model(input_ids=batch[0])
    assert out.logits.shape == (B, T, 16)  # final-norm hidden states
    assert calls == []
    torch.testing.assert_close(out.logits, model.model(input_ids=batch[0]).last_hidden_state)


def test_export_puts_the_lm_heads_back(models, batch):
    student, teacher = models
    student_head, teacher_head = student.lm_head, teacher.lm_head
    reference = copy.deepcopy(student)
    keys = list(student.state_dict())
    model = convert_causal_lm(student, teacher)
    assert list(model.state_dict()) == keys  # stand-ins keep the keys, teacher hidden
    exported = export_causal_lm(model)
    assert type(exported) is type(reference) and exported.lm_head is student_head
    assert teacher.lm_head is teacher_head
    torch.testing.assert_close(
        exported(input_ids=batch[0]).logits, reference(input_ids=batch[0]).logits
    )
    assert teacher(input_ids=batch[0]).logits.shape == (B, T, VOCAB)


def test_plain_export_still_gives_logits(models, batch):
    student, teacher = models
    reference = copy.deepcopy(student)
    exported = mtd.export(convert_causal_lm(student, teacher))
    torch.testing.assert_close(
        exported(input_ids=batch[0]).logits, reference(input_ids=batch[0]).logits
    )


def test_save_restore_round_trip(models, batch, tmp_path):
    student, teacher = models
    ids, labels = batch
    balancer = mtd.StaticLossBalancer(0.5)
    loss = mtd.LMHeadDistillationLoss(
        divergence="reverse_kl", chunk_size=4, compute_student_loss=True
    )
    model = convert_causal_lm(student, teacher, loss, loss_balancer=balancer)
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)  # the checkpoint differs from a fresh init
    path = tmp_path / "ckpt.pt"
    mtd.save(model, path)
    saved = torch.load(path, weights_only=True)["model_state_dict"]
    assert not any(k.startswith("_teacher_model") for k in saved)
    model(input_ids=ids)
    expected = compute_causal_lm_loss(model, labels, skip_balancer=True)

    restored = restore_causal_lm(tiny_llama(16, 1), path, teacher_model=teacher_after_export(model))
    assert restored(input_ids=ids).logits.shape == (B, T, 16)  # heads skipped again
    got = compute_causal_lm_loss(restored, labels, skip_balancer=True)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value)
    # a plain restore computes full logits and its head-less loss works on them: same KD value
    plain = mtd.restore(tiny_llama(16, 1), path, teacher_model=teacher_after_export(restored))
    assert plain(input_ids=ids).logits.shape == (B, T, VOCAB)
    torch.testing.assert_close(
        plain.compute_kd_loss(labels=labels, skip_balancer=True)["LMHeadDistillationLoss_0"],
        expected["LMHeadDistillationLoss_0"],
    )


def teacher_after_export(model):
    """Export the recipe model and hand back its (unmodified again) teacher."""
    teacher = model.teacher_model
    export_causal_lm(model)
    return teacher


def test_gradient_accumulation_with_num_items_in_batch(models, batch):
    student, teacher = models
    ids, labels = batch
    model = convert_causal_lm(student, teacher, mtd.LMHeadDistillationLoss(chunk_size=3))
    model(input_ids=ids)
    full = compute_causal_lm_loss(model, labels)
    total = int((labels[:, 1:] != -100).sum())
    micro = []
    for i in range(B):
        model(input_ids=ids[i : i + 1])
        micro.append(compute_causal_lm_loss(model, labels[i : i + 1], num_items_in_batch=total))
    torch.testing.assert_close(sum(micro), full)


def test_recipe_errors(models, batch):
    student, teacher = models
    with pytest.raises(ValueError, match="no submodule 'head'"):
        convert_causal_lm(student, teacher, lm_head_name="head")
    with pytest.raises(TypeError, match="must be an LMHeadDistillationLoss"):
        convert_causal_lm(student, teacher, mtd.LogitsDistillationLoss())
    with pytest.raises(TypeError, match="must be a linear projection"):
        convert_causal_lm(student, teacher, lm_head_name="model.layers.0")
    with pytest.raises(ValueError, match="student V=61, teacher V=64"):
        convert_causal_lm(student, tiny_llama(24, 1, vocab=64))
    assert not isinstance(student, mtd.DistillationModel)  # failed converts change nothing
    model = convert_causal_lm(student, teacher)  # CE computed, no balancer to combine it
    model(input_ids=batch[0])
    with pytest.raises(ValueError, match="no loss balancer"):
        compute_causal_lm_loss(model, batch[1])
    with pytest.raises(RuntimeError, match="expects a model from convert_causal_lm"):
        export_causal_lm(nn.Linear(2, 2))
