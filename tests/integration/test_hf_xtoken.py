"""KDTrainer(teacher_processing_class=...): cross-tokenizer distillation in the HF trainer."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import kdistill as mtd  # noqa: E402
from kdistill.hf import KDTrainer, OnPolicyKDTrainer, next_token_mask  # noqa: E402
from kdistill.losses.cross_tokenizer import HybridULDLoss, ULDLoss  # noqa: E402
from kdistill.xtoken import TokenAligner, byte_tokenizer, train_bpe  # noqa: E402

pytestmark = pytest.mark.integration

TEXTS = [
    "the cat sat on the mat",
    "a dog ran in the park, café",
    "the bird sang a song",
    "then the cat ran",
]
TEACHER_TOKENIZER = train_bpe(TEXTS * 5, vocab_size=300, bos_token="<s>")
STUDENT_TOKENIZER = byte_tokenizer()


def tiny_llama(vocab: int, hidden: int = 16, layers: int = 1, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config)


def student_model(seed: int = 0) -> torch.nn.Module:
    return tiny_llama(len(STUDENT_TOKENIZER), hidden=16, seed=seed)


def teacher_model() -> torch.nn.Module:
    return tiny_llama(len(TEACHER_TOKENIZER), hidden=24, layers=2, seed=1)


def make_batch(texts=TEXTS) -> dict[str, torch.Tensor]:
    """Student tokens, right padding, a masked prompt of 1-4 tokens per row."""
    enc = STUDENT_TOKENIZER(list(texts), padding=True, return_tensors="pt")
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    for row in range(labels.shape[0]):
        labels[row, : 1 + row % 4] = -100
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": labels}


def rows_of(batch):
    n = batch["input_ids"].shape[0]
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


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


def reference_loss(student, teacher, batch, divergence, num_items, balancer):
    """Independent: decode the texts, align them, full-logits ULD / hybrid, HF cross-entropy."""
    ids, attention = batch["input_ids"], batch["attention_mask"]
    texts = [
        STUDENT_TOKENIZER.decode(row[keep.bool()].tolist(), skip_special_tokens=True)
        for row, keep in zip(ids, attention, strict=True)
    ]
    assert texts == TEXTS
    aligner = TokenAligner(TEACHER_TOKENIZER, STUDENT_TOKENIZER)
    aligned = aligner(texts)
    # the byte tokenizer's encoding of the decoded text is the batch's (right padding)
    width = aligned.student_input_ids.shape[1]
    assert torch.equal(
        aligned.student_input_ids, ids[:, :width].masked_fill(attention[:, :width] == 0, 256)
    )
    assert aligned.teacher_input_ids[0, 0].item() == TEACHER_TOKENIZER.convert_tokens_to_ids("<s>")
    with torch.no_grad():
        teacher_logits = teacher(**aligned.teacher_inputs).logits
    out = student(input_ids=ids, attention_mask=attention, labels=batch["labels"])
    if divergence == "uld":
        loss_fn = ULDLoss(reduction="sum")
    else:
        shared = aligner.shared_vocabulary
        loss_fn = HybridULDLoss(shared.teacher_ids, shared.student_ids, reduction="sum")
    mask = next_token_mask(batch["labels"])
    count = mask.sum() if num_items is None else num_items
    kd = loss_fn(out.logits, teacher_logits, alignment=aligned.alignment, mask=mask) / count
    ce = out.loss  # Hugging Face's: mean over targets
    if num_items is not None:
        ce = ce * mask.sum() / num_items
    if balancer is None:
        return kd, kd, ce
    return balancer({"student_loss": ce, "LMHeadCrossTokenizerLoss_0": kd}), kd, ce


@pytest.mark.parametrize("divergence", ["hybrid_uld", "uld"])
@pytest.mark.parametrize("balanced", [False, True], ids=["kd-only", "balanced"])
def test_loss_and_gradients_equal_an_independent_computation(tmp_path, divergence, balanced):
    balancer = mtd.StaticLossBalancer(kd_loss_weight=0.3) if balanced else None
    teacher = teacher_model()
    student, twin = student_model(), student_model()
    twin.load_state_dict(student.state_dict())
    trainer = KDTrainer(
        model=student,
        teacher_model=teacher,
        loss_balancer=balancer,
        args=make_args(tmp_path),
        processing_class=STUDENT_TOKENIZER,
        teacher_processing_class=TEACHER_TOKENIZER,
        xtoken_divergence=divergence,
    )
    assert trainer.chunked
    batch = make_batch()
    counted = int(next_token_mask(batch["labels"]).sum())
    for num_items in (None, 3 * counted):  # a micro-batch of a larger accumulated step
        with trainer.distilling() as model:
            model.train()
            model.zero_grad(set_to_none=True)
            loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items)
            loss.backward()
            assert all(p.grad is None for p in model.teacher_model.parameters())
            with model.hide_teacher_model():
                grads = {n: p.grad for n, p in model.named_parameters()}
        twin.train()
        twin.zero_grad(set_to_none=True)
        expected, kd, _ = reference_loss(twin, teacher, batch, divergence, num_items, balancer)
        expected.backward()
        assert kd.item() > 0
        torch.testing.assert_close(loss.detach(), expected.detach())
        expected_grads = {n: p.grad for n, p in twin.named_parameters()}
        assert grads.keys() == expected_grads.keys()
        for name, grad in grads.items():
            # float32, chunked vs full logits; gradients are small (KD values ~0.03): tight atol
            torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-9, msg=name)
        assert grads["lm_head.weight"].abs().sum() > 0


def test_train_decreases_the_kd_loss_and_hands_back_the_plain_student(tmp_path):
    student, teacher, twin = student_model(), teacher_model(), student_model()
    start = {k: v.clone() for k, v in student.state_dict().items()}
    # before any update: the first step's logs are the full batch's KD and cross-entropy
    _, kd_start, ce_start = reference_loss(twin, teacher, make_batch(), "hybrid_uld", None, None)
    args = make_args(
        tmp_path,
        max_steps=8,
        learning_rate=3e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
    )
    trainer = KDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=rows_of(make_batch()),
        processing_class=STUDENT_TOKENIZER,
        teacher_processing_class=TEACHER_TOKENIZER,
    )
    trainer.train()
    logs = [log for log in trainer.state.log_history if "kd_loss" in log]
    assert len(logs) == 8
    # 2 micro-batches of 2 rows: normalized by the step's target tokens, as one batch of 4
    assert logs[0]["kd_loss"] == pytest.approx(kd_start.item(), rel=1e-4)
    assert logs[0]["ce_loss"] == pytest.approx(ce_start.item(), rel=1e-4)
    assert logs[-1]["kd_loss"] < logs[0]["kd_loss"]
    assert all("ce_loss" in log for log in logs)
    assert type(student) is transformers.LlamaForCausalLM
    assert trainer.model is student
    metrics = trainer.evaluate(rows_of(make_batch()))
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_kd_loss"])
    assert metrics["eval_ce_loss"] > 0
    assert type(student) is transformers.LlamaForCausalLM
    assert student.state_dict().keys() == start.keys()  # no teacher, no loss modules
    assert any(not torch.equal(student.state_dict()[k], v) for k, v in start.items())
    trainer.save_model(str(tmp_path / "saved"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"))
    assert type(loaded) is transformers.LlamaForCausalLM
    torch.testing.assert_close(loaded.state_dict(), student.state_dict())


def test_without_teacher_processing_class_mismatched_vocabularies_still_raise(tmp_path):
    data = rows_of(make_batch())
    with pytest.raises(ValueError, match="vocabulary sizes differ"):
        KDTrainer(
            model=student_model(),
            teacher_model=teacher_model(),
            args=make_args(tmp_path),
            train_dataset=data,
            processing_class=STUDENT_TOKENIZER,
        )
    trainer = KDTrainer(
        model=student_model(),
        teacher_model=teacher_model(),
        args=make_args(tmp_path),
        train_dataset=data,
        processing_class=STUDENT_TOKENIZER,
        chunked=False,
    )
    with pytest.raises(ValueError, match="class counts differ"):
        trainer.train()


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"processing_class": None}, "needs `processing_class`"),
        ({"criterion": mtd.LogitsDistillationLoss()}, "`criterion` cannot be combined"),
        ({"chunked": False}, "chunked=False is not supported"),
        ({"xtoken_divergence": "kl"}, "xtoken_divergence"),
    ],
)
def test_bad_arguments_raise_clear_errors(tmp_path, overrides, match):
    kwargs = {
        "model": student_model(),
        "teacher_model": teacher_model(),
        "args": make_args(tmp_path),
        "processing_class": STUDENT_TOKENIZER,
        "teacher_processing_class": TEACHER_TOKENIZER,
        **overrides,
    }
    with pytest.raises(ValueError, match=match):
        KDTrainer(**kwargs)


def test_converted_model_and_on_policy_trainer_are_refused(tmp_path):
    converted = mtd.convert(
        student_model(),
        mode=[("kd_loss", {"teacher_model": teacher_model(), "criterion": ULDLoss()})],
    )
    with pytest.raises(ValueError, match="not a DistillationModel"):
        KDTrainer(
            model=converted,
            args=make_args(tmp_path),
            processing_class=STUDENT_TOKENIZER,
            teacher_processing_class=TEACHER_TOKENIZER,
        )
    with pytest.raises(ValueError, match="OnPolicyKDTrainer does not support"):
        OnPolicyKDTrainer(
            model=student_model(),
            teacher_model=teacher_model(),
            args=make_args(tmp_path),
            train_dataset=[{"prompt": "the"}],
            processing_class=STUDENT_TOKENIZER,
            teacher_processing_class=TEACHER_TOKENIZER,
        )
