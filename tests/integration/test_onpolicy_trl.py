"""kdistill's on-policy loss equals TRL's on the same batch and completions (skipped without trl).

TRL (checked with 1.16) takes ``temperature`` in the softmax but does not multiply by T², so at
T ≠ 1 kdistill's loss (Hinton's convention, like every kdistill logit loss) is T² times TRL's.
"""

import tempfile

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from kdistill import LMHeadDistillationLoss  # noqa: E402
from kdistill.onpolicy import Completions, completion_kd_loss  # noqa: E402

pytestmark = pytest.mark.integration

VOCAB = 48
INPUTS = {
    "prompt_ids": torch.tensor([[0, 3, 4, 5], [0, 0, 6, 7], [9, 10, 11, 12]]),
    "prompt_mask": torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]]),
    "completion_ids": torch.tensor([[8, 9, 2, 0, 0], [10, 11, 12, 13, 14], [15, 2, 0, 0, 0]]),
    "completion_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]),
}


def tokenizer():
    """A word-level tokenizer "<0>" … "<47>" built in memory (no download)."""
    vocab = {f"<{i}>": i for i in range(VOCAB)}  # no token is a substring of another
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<1>"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=model,
        pad_token="<0>",
        eos_token="<2>",
        unk_token="<1>",
        padding_side="left",
    )


def llama(hidden: int) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=0,
        eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(config)


def trl_trainer(beta: float, temperature: float):
    torch.manual_seed(0)
    student, teacher = llama(16), llama(32)
    args = trl.DistillationConfig(
        tempfile.mkdtemp(),
        per_device_train_batch_size=3,
        max_steps=1,
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        beta=beta,
        temperature=temperature,
        max_completion_length=5,
        save_strategy="no",
    )
    data = datasets.Dataset.from_list([{"prompt": "<3> <4> <5>"}] * 3)
    return trl.DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=data,
        processing_class=tokenizer(),
    )


@pytest.mark.parametrize("temperature", [1.0, 2.0], ids=["T1", "T2"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_loss_and_gradients_equal_trl_distillation_trainer(beta, temperature):
    trainer = trl_trainer(beta, temperature)
    student, teacher = trainer.model, trainer.teacher_model
    params = [p for p in student.parameters() if p.requires_grad]
    trl_loss, _, n_tokens = trainer._compute_loss(student, INPUTS, None)
    trl_grads = torch.autograd.grad(trl_loss, params)

    batch = Completions.from_parts(
        INPUTS["prompt_ids"],
        INPUTS["prompt_mask"],
        INPUTS["completion_ids"],
        INPUTS["completion_mask"],
    )
    assert batch.num_tokens == int(n_tokens)
    loss_fn = LMHeadDistillationLoss(
        student.lm_head,
        teacher.lm_head,
        divergence="generalized_jsd",
        beta=beta,
        temperature=temperature,
    )
    loss = completion_kd_loss(student, teacher, batch, loss_fn)
    grads = torch.autograd.grad(loss, params)
    scale = temperature**2  # kdistill multiplies by T², TRL does not
    torch.testing.assert_close(loss, scale * trl_loss)
    for grad, ref in zip(grads, trl_grads, strict=True):
        torch.testing.assert_close(grad, scale * ref)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_loss_equals_trl_gkd_jsd_on_full_logits(beta):
    gkd = pytest.importorskip("trl.experimental.gkd")
    torch.manual_seed(0)
    student, teacher = llama(16), llama(32)
    batch = Completions.from_parts(
        INPUTS["prompt_ids"],
        INPUTS["prompt_mask"],
        INPUTS["completion_ids"],
        INPUTS["completion_mask"],
    )
    inputs = {"attention_mask": batch.attention_mask, "position_ids": batch.position_ids}
    with torch.no_grad():
        t_logits = teacher(batch.input_ids, **inputs).logits
    s_logits = student(batch.input_ids, **inputs).logits
    labels = batch.labels()
    # GKDTrainer.compute_loss: the causal shift, then generalized_jsd_loss on -100-masked labels
    expected = gkd.GKDTrainer.generalized_jsd_loss(
        s_logits[:, :-1], t_logits[:, :-1], labels=labels[:, 1:], beta=beta
    )
    loss_fn = LMHeadDistillationLoss(
        student.lm_head, teacher.lm_head, divergence="generalized_jsd", beta=beta
    )
    torch.testing.assert_close(completion_kd_loss(student, teacher, batch, loss_fn), expected)
