"""ULDLoss and HybridULDLoss against float64 references written out here, plus their properties."""

import json
import math

import pytest
import torch

from kdistill import LogitsDistillationLoss
from kdistill._serialization import build_object, describe_object
from kdistill.losses._registry import LOSSES
from kdistill.losses.cross_tokenizer import HybridULDLoss, ULDLoss, uld_distance
from kdistill.testing import LossContract, LossInputs, LossRecipe
from kdistill.xtoken.alignment import TokenAlignment

# ------------------------------------------------------------------------------ references


def ref_softmax(logits, temperature):
    """Softmax of one row, float64, computed term by term."""
    values = [float(x) / temperature for x in logits]
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def ref_uld(q, p):
    """Pad both lists with zeros to one length, sort each decreasingly, sum |differences|."""
    n = max(len(q), len(p))
    q = sorted([*q, *[0.0] * (n - len(q))], reverse=True)
    p = sorted([*p, *[0.0] * (n - len(p))], reverse=True)
    return sum(abs(a - b) for a, b in zip(q, p, strict=True))


def ref_hybrid(q, p, teacher_ids, student_ids, temperature, kl_weight=1.0, uld_weight=1.0):
    """kl_weight·T²·P·KL(p̃‖q̃) + uld_weight·ULD(rest of q, rest of p), from its definition."""
    mass_p = sum(p[a] for a in teacher_ids)
    mass_q = sum(q[b] for b in student_ids)
    kl = 0.0
    for a, b in zip(teacher_ids, student_ids, strict=True):
        pt, qt = p[a] / mass_p, q[b] / mass_q
        if pt > 0:
            kl += pt * math.log(pt / qt)
    rest_p = [x for i, x in enumerate(p) if i not in set(teacher_ids)]
    rest_q = [x for i, x in enumerate(q) if i not in set(student_ids)]
    uld = ref_uld(rest_q, rest_p) if rest_p or rest_q else 0.0
    return kl_weight * temperature**2 * mass_p * kl + uld_weight * uld


def ref_loss(per_pair, student, teacher, alignment, temperature, keep_student=None):
    """Mean over kept pairs of ``per_pair(q, p)`` at the aligned rows."""
    values = []
    for b in range(alignment.mask.shape[0]):
        for slot in range(alignment.mask.shape[1]):
            i = int(alignment.teacher_positions[b, slot])
            j = int(alignment.student_positions[b, slot])
            if not alignment.mask[b, slot] or (keep_student is not None and not keep_student[b, j]):
                continue
            q = ref_softmax(student[b, j].tolist(), temperature)
            p = ref_softmax(teacher[b, i].tolist(), temperature)
            values.append(per_pair(q, p))
    return sum(values) / max(len(values), 1), values


# ------------------------------------------------------------------------------ fixtures

ALIGNMENT = TokenAlignment(
    teacher_positions=torch.tensor([[0, 2, 3, 0], [1, 4, 0, 0]]),
    student_positions=torch.tensor([[1, 2, 4, 0], [0, 3, 0, 0]]),
    mask=torch.tensor([[True, True, True, False], [True, True, False, False]]),
)
TEACHER_IDS = [0, 2, 3, 5, 8, 9]
STUDENT_IDS = [4, 0, 1, 6, 3, 2]


def make_inputs(student_vocab=7, teacher_vocab=11, dtype=torch.float64, scale=2.0):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, student_vocab, generator=generator, dtype=dtype) * scale
    teacher = torch.randn(2, 6, teacher_vocab, generator=generator, dtype=dtype) * scale
    return student, teacher


# ------------------------------------------------------------------------------ values


@pytest.mark.parametrize(
    ("student_vocab", "teacher_vocab"), [(7, 11), (11, 7), (9, 9)], ids=["Vs<Vt", "Vs>Vt", "Vs=Vt"]
)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_uld_matches_reference(student_vocab, teacher_vocab, temperature):
    student, teacher = make_inputs(student_vocab, teacher_vocab)
    got = ULDLoss(temperature=temperature)(student, teacher, alignment=ALIGNMENT)
    expected, values = ref_loss(ref_uld, student, teacher, ALIGNMENT, temperature)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
    per_pair = ULDLoss(temperature=temperature, reduction="none")(
        student, teacher, alignment=ALIGNMENT
    )
    assert per_pair.shape == (2, 4)
    torch.testing.assert_close(per_pair[ALIGNMENT.mask], torch.tensor(values, dtype=torch.float64))
    assert (per_pair[~ALIGNMENT.mask] == 0).all()
    summed = ULDLoss(temperature=temperature, reduction="sum")(
        student, teacher, alignment=ALIGNMENT
    )
    torch.testing.assert_close(summed, torch.tensor(sum(values), dtype=torch.float64))


@pytest.mark.parametrize(
    ("temperature", "kl_weight", "uld_weight"), [(1.0, 1.0, 1.0), (2.0, 0.7, 1.3)]
)
def test_hybrid_matches_reference(temperature, kl_weight, uld_weight):
    student, teacher = make_inputs()
    loss = HybridULDLoss(TEACHER_IDS, STUDENT_IDS, temperature, kl_weight, uld_weight)
    got = loss(student, teacher, alignment=ALIGNMENT)

    def per_pair(q, p):
        return ref_hybrid(q, p, TEACHER_IDS, STUDENT_IDS, temperature, kl_weight, uld_weight)

    expected, _ = ref_loss(per_pair, student, teacher, ALIGNMENT, temperature)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_hybrid_when_one_side_is_all_shared():
    # the student's whole vocabulary is shared: its rest is empty, the teacher's is not
    student, teacher = make_inputs(student_vocab=4, teacher_vocab=9)
    teacher_ids, student_ids = [1, 5, 6, 8], [3, 0, 2, 1]
    got = HybridULDLoss(teacher_ids, student_ids)(student, teacher, alignment=ALIGNMENT)

    def per_pair(q, p):
        return ref_hybrid(q, p, teacher_ids, student_ids, 1.0)

    expected, _ = ref_loss(per_pair, student, teacher, ALIGNMENT, 1.0)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_uld_distance_of_masses_with_a_zero_tail():
    # sorted: q = (.5, .5, 0), p = (.7, .2, .1): |.5-.7| + |.5-.2| + |0-.1| = 0.6
    got = uld_distance(torch.tensor([0.5, 0.5]), torch.tensor([0.2, 0.7, 0.1]))
    torch.testing.assert_close(got, torch.tensor(0.6))


# ------------------------------------------------------------------------------ properties


def test_uld_of_identical_distributions_is_zero():
    student, _ = make_inputs(student_vocab=8)
    loss = ULDLoss(temperature=1.5)
    assert loss(student, student) == 0
    # a permuted vocabulary, and a teacher with extra zero-probability tokens: still 0
    permuted = student[..., torch.randperm(8)]
    torch.testing.assert_close(loss(student, permuted), torch.tensor(0.0, dtype=torch.float64))
    padded = torch.cat([student, torch.full((2, 5, 5), -1e9, dtype=student.dtype)], dim=-1)
    torch.testing.assert_close(loss(student, padded), torch.tensor(0.0, dtype=torch.float64))


def test_uld_is_invariant_to_permuting_either_vocabulary():
    student, teacher = make_inputs()
    student = student.clone().requires_grad_(True)
    loss = ULDLoss(temperature=2.0)
    value = loss(student, teacher, alignment=ALIGNMENT)
    (grad,) = torch.autograd.grad(value, student)
    perm_s, perm_t = torch.randperm(7), torch.randperm(11)
    student_p = student.detach()[..., perm_s].requires_grad_(True)
    value_p = loss(student_p, teacher[..., perm_t], alignment=ALIGNMENT)
    (grad_p,) = torch.autograd.grad(value_p, student_p)
    torch.testing.assert_close(value_p, value)
    torch.testing.assert_close(grad_p, grad[..., perm_s])


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_hybrid_with_identical_vocabularies_is_forward_kl(temperature):
    student, teacher = make_inputs(9, 9)
    student, teacher = student[:, :5], teacher[:, :5]
    expected = LogitsDistillationLoss(temperature=temperature)(student, teacher)
    # no map: the identity, computed as forward KL itself (T² applied per position, so equal up
    # to float64 rounding)
    torch.testing.assert_close(HybridULDLoss(temperature=temperature)(student, teacher), expected)
    if temperature == 1.0:
        assert torch.equal(HybridULDLoss()(student, teacher), expected)
    # the identity map spelled out, and a permuted vocabulary with its map
    ids = list(range(9))
    torch.testing.assert_close(
        HybridULDLoss(ids, ids, temperature=temperature)(student, teacher), expected
    )
    perm = torch.randperm(9)  # student id k holds teacher id perm[k]
    student_permuted = student[..., perm]
    hybrid = HybridULDLoss(perm.tolist(), ids, temperature=temperature)
    torch.testing.assert_close(hybrid(student_permuted, teacher), expected)


def test_hybrid_with_identical_tokenizers_is_forward_kl_at_aligned_positions():
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    from kdistill.xtoken import TokenAligner, train_bpe

    tok = train_bpe(["the cat sat on the mat 🤗 naïve"] * 10, vocab_size=300)
    aligner = TokenAligner(tok, tok)
    batch = aligner(["the cat 🤗 sat", "naïve mat"])
    shared = aligner.shared_vocabulary
    vocab = len(tok)
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(*batch.student_input_ids.shape, vocab, generator=generator)
    teacher = torch.randn(*batch.teacher_input_ids.shape, vocab, generator=generator)
    hybrid = HybridULDLoss(shared.teacher_ids, shared.student_ids, temperature=2.0)
    got = hybrid(student, teacher, alignment=batch.alignment)
    keep = batch.alignment.mask
    expected = LogitsDistillationLoss(temperature=2.0)(
        batch.alignment.gather_student(student)[keep],
        batch.alignment.gather_teacher(teacher)[keep],
    )
    torch.testing.assert_close(got, expected)


def test_masks_and_labels_select_student_positions():
    student, teacher = make_inputs()
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 2] = False  # drops pair (teacher 2, student 2)
    labels = torch.zeros(2, 5, dtype=torch.long)
    labels[1, 0] = -100  # drops pair (teacher 1, student 0)
    for loss in (
        ULDLoss(temperature=2.0, ignore_index=-100),
        HybridULDLoss(TEACHER_IDS, STUDENT_IDS, ignore_index=-100),
    ):
        got = loss(student, teacher, alignment=ALIGNMENT, mask=mask, labels=labels)

        def per_pair(q, p, loss=loss):
            if isinstance(loss, ULDLoss):
                return ref_uld(q, p)
            return ref_hybrid(q, p, TEACHER_IDS, STUDENT_IDS, 1.0)

        keep = mask & (labels != -100)
        expected, values = ref_loss(per_pair, student, teacher, ALIGNMENT, loss.temperature, keep)
        assert len(values) == 3
        torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
        # garbage at dropped pairs changes nothing
        garbage = student.clone()
        garbage[0, 2] = 1e4
        garbage[1, 0] = -1e4
        torch.testing.assert_close(
            loss(garbage, teacher, alignment=ALIGNMENT, mask=mask, labels=labels), got
        )


def test_all_dropped_is_zero_with_zero_gradient():
    student, teacher = make_inputs()
    student.requires_grad_(True)
    for loss in (ULDLoss(), HybridULDLoss(TEACHER_IDS, STUDENT_IDS)):
        value = loss(
            student, teacher, alignment=ALIGNMENT, mask=torch.zeros(2, 5, dtype=torch.bool)
        )
        assert value == 0
        (grad,) = torch.autograd.grad(value, student)
        assert (grad == 0).all()


@pytest.mark.parametrize("which", ["uld", "hybrid"])
def test_gradcheck_float64(which):
    student, teacher = make_inputs()
    student.requires_grad_(True)
    loss = (
        ULDLoss(temperature=1.5)
        if which == "uld"
        else HybridULDLoss(TEACHER_IDS, STUDENT_IDS, temperature=1.5, uld_weight=0.5)
    )
    assert torch.autograd.gradcheck(
        lambda s: loss(s, teacher, alignment=ALIGNMENT), (student,), eps=1e-6, atol=1e-5
    )


def test_teacher_is_detached_and_dtypes():
    student, teacher = make_inputs(dtype=torch.float32)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    for loss in (ULDLoss(), HybridULDLoss(TEACHER_IDS, STUDENT_IDS)):
        value = loss(student, teacher, alignment=ALIGNMENT)
        value.backward()
        assert teacher.grad is None
        assert student.grad is not None and torch.isfinite(student.grad).all()
        assert value.dtype == torch.float32
        half = loss(student.detach().bfloat16(), teacher.detach().bfloat16(), alignment=ALIGNMENT)
        assert half.dtype == torch.float32
        torch.testing.assert_close(half, value.detach(), rtol=0.05, atol=0.02)  # bf16 inputs


def test_hybrid_config_round_trip():
    loss = HybridULDLoss(TEACHER_IDS, STUDENT_IDS, temperature=2.0, kl_weight=0.5)
    record = json.loads(json.dumps(describe_object(loss, LOSSES)))
    rebuilt = build_object(record, LOSSES)
    assert rebuilt.get_config() == loss.get_config()
    student, teacher = make_inputs()
    assert torch.equal(
        rebuilt(student, teacher, alignment=ALIGNMENT), loss(student, teacher, alignment=ALIGNMENT)
    )
    assert loss.state_dict() == {}  # the id tensors are not checkpoint state
    assert "6 pairs" in repr(loss)


def _cross_vocab_inputs(generator):
    student = torch.randn(2, 3, 5, generator=generator)
    return LossInputs(student, torch.randn(2, 3, 8, generator=generator))


@pytest.mark.parametrize(
    "make_loss",
    [ULDLoss, lambda: HybridULDLoss([0, 2, 7], [4, 1, 0], temperature=2.0)],
    ids=["uld", "hybrid"],
)
def test_contract_with_different_vocabularies(make_loss):
    recipe = LossRecipe(make_loss, _cross_vocab_inputs, zero_when_equal=False)
    contract = LossContract("cross_vocab", recipe=recipe)
    for check in contract.applicable_checks():
        contract.run(check)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda s, t: HybridULDLoss()(s, t, alignment=ALIGNMENT),
            ValueError,
            "7 logits and the teacher 11",
        ),
        (
            lambda s, t: HybridULDLoss([0, 20], [1, 2])(s, t, alignment=ALIGNMENT),
            ValueError,
            "out of range",
        ),
        (lambda s, t: HybridULDLoss([0, 0], [1, 2]), ValueError, "twice"),
        (lambda s, t: HybridULDLoss([0, 1], [1]), ValueError, "one to one"),
        (lambda s, t: HybridULDLoss([0, 1]), ValueError, "both"),
        (lambda s, t: HybridULDLoss([0.5], [1]), ValueError, "integer"),
        (lambda s, t: HybridULDLoss(uld_weight=-1.0), ValueError, "uld_weight"),
        (lambda s, t: ULDLoss(reduction="mean"), ValueError, "reduction"),
        (lambda s, t: ULDLoss(temperature=0), ValueError, "temperature"),
        (lambda s, t: ULDLoss(ignore_index=1.5), TypeError, "ignore_index"),
        (lambda s, t: ULDLoss()(s, t), ValueError, "alignment="),
        (lambda s, t: ULDLoss()(s, t, alignment=object()), TypeError, "teacher_positions"),
        (lambda s, t: ULDLoss()(s[:1], t, alignment=ALIGNMENT), ValueError, "B = 2"),
        (
            lambda s, t: ULDLoss()(s, t, alignment=ALIGNMENT, mask=torch.ones(2, 4)),
            ValueError,
            "mask",
        ),
    ],
    ids=[
        "no-map-sizes",
        "id-range",
        "duplicate",
        "lengths",
        "one-side",
        "float-ids",
        "weight",
        "reduction",
        "temperature",
        "ignore-index",
        "unpaired-shapes",
        "alignment-type",
        "alignment-batch",
        "mask-shape",
    ],
)
def test_errors(call, error, match):
    student, teacher = make_inputs()
    with pytest.raises(error, match=match):
        call(student, teacher)
