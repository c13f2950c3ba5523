"""The shared base of the logit losses, and the argument checks of every loss constructor."""

import math

import pytest
import torch

import kdistill as mtd
from kdistill.losses import LogitDivergenceLoss
from kdistill.losses._divergences import forward_kl


class _HandKL(LogitDivergenceLoss):
    """Forward KL written by hand in the hook: the base must give LogitsDistillationLoss."""

    def divergence(self, student_log_probs, teacher, labels):
        return (teacher.exp() * (teacher - student_log_probs)).sum(-1)


class _ArgmaxHit(LogitDivergenceLoss):
    """A loss that needs labels: the student's log-prob of the label, negated."""

    requires_labels = True
    temperature_squared = False

    def divergence(self, student_log_probs, teacher, labels):
        return -student_log_probs.gather(-1, labels[..., None]).squeeze(-1)


def test_base_is_abstract():
    with pytest.raises(TypeError, match="abstract"):
        LogitDivergenceLoss()


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_a_new_subclass_gets_the_whole_preamble(reduction, temperature):
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, 1] = -100
    mask = torch.rand(2, 5) > 0.3
    kwargs = {"temperature": temperature, "reduction": reduction, "ignore_index": -100}
    ours = _HandKL(**kwargs)(student, {"logits": teacher}, labels=labels, mask=mask)
    reference = mtd.LogitsDistillationLoss(**kwargs)(student, teacher, labels=labels, mask=mask)
    torch.testing.assert_close(ours, reference)


def test_base_detaches_the_teacher_and_checks_shapes():
    student = torch.randn(3, 4, requires_grad=True)
    teacher = torch.randn(3, 4, requires_grad=True)
    _HandKL()(student, teacher).backward()
    assert teacher.grad is None and student.grad is not None
    with pytest.raises(
        ValueError, match=r"student has 4 classes \(shape \(3, 4\)\), teacher has 5"
    ):
        _HandKL()(student, torch.randn(3, 5))
    with pytest.raises(ValueError, match="differ in their leading"):
        _HandKL()(student, torch.randn(2, 4))


def test_labels_are_passed_with_ignored_positions_set_to_zero():
    student = torch.randn(2, 3, 6, dtype=torch.float64)
    labels = torch.tensor([[1, -100, 5], [0, 2, -100]])
    loss = _ArgmaxHit(ignore_index=-100, reduction="none")(student, student, labels=labels)
    log_probs = torch.log_softmax(student, -1)
    keep = labels != -100
    expected = torch.where(keep, -log_probs.gather(-1, labels.clamp(min=0)[..., None])[..., 0], 0)
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="_ArgmaxHit needs `labels`"):
        _ArgmaxHit()(student, student)
    with pytest.raises(ValueError, match=r"`labels` must have shape \(2, 3\)"):
        _ArgmaxHit()(student, student, labels=labels[0])


def test_cross_vocabulary_subclass_checks_only_leading_shapes():
    class SortedL1(LogitDivergenceLoss):
        same_classes = False

        def divergence(self, student_log_probs, teacher, labels):
            k = min(student_log_probs.shape[-1], teacher.shape[-1])
            s = student_log_probs.exp().sort(-1, descending=True).values[..., :k]
            t = teacher.exp().sort(-1, descending=True).values[..., :k]
            return (s - t).abs().sum(-1)

    value = SortedL1()(torch.randn(4, 7), torch.randn(4, 9))
    assert value.shape == () and math.isfinite(value.item())
    with pytest.raises(ValueError, match="differ in their leading"):
        SortedL1()(torch.randn(4, 7), torch.randn(3, 9))


def test_forward_kl_hook_is_the_shared_divergence():
    s, t = torch.randn(3, 8).log_softmax(-1), torch.randn(3, 8).log_softmax(-1)
    loss = mtd.LogitsDistillationLoss()
    torch.testing.assert_close(loss.divergence(s, t, None), forward_kl(s, t))


# ------------------------------------------------------------------ constructors as schemas
NAN, INF = float("nan"), float("inf")
BAD_ARGUMENTS = [
    (lambda: mtd.LogitsDistillationLoss(temperature=NAN), ValueError, "`temperature` must be a"),
    (lambda: mtd.LogitsDistillationLoss(temperature=INF), ValueError, "`temperature` must be a"),
    (lambda: mtd.ReverseKLLoss(temperature=1e200), ValueError, r"at most 1e\+06"),
    (
        lambda: mtd.TVDLoss(temperature=-1.0),
        ValueError,
        "`temperature` must be a finite number > 0",
    ),
    (lambda: mtd.JSDLoss(temperature=True), TypeError, "`temperature` must be a number"),
    (lambda: mtd.JSDLoss(temperature="2"), TypeError, "`temperature` must be a number"),
    (lambda: mtd.JSDLoss(beta=NAN), ValueError, "`beta` must be a finite number"),
    (lambda: mtd.JSDLoss(beta=True), TypeError, "`beta` must be a number"),
    (lambda: mtd.SkewKLLoss(alpha=INF), ValueError, "`alpha` must be a finite number"),
    (lambda: mtd.LogitsDistillationLoss(reduction=3), ValueError, "`reduction` must be one of"),
    (lambda: mtd.LogitsDistillationLoss(ignore_index=1.5), TypeError, "`ignore_index` must be an"),
    (lambda: mtd.LogitsDistillationLoss(ignore_index=True), TypeError, "`ignore_index` must be"),
    (lambda: mtd.DKDLoss(alpha=INF), ValueError, "`alpha` must be a finite number"),
    (lambda: mtd.DKDLoss(alpha=-1), ValueError, "`alpha` must be a finite number >= 0"),
    (lambda: mtd.DKDLoss(beta=False), TypeError, "`beta` must be a number"),
    (lambda: mtd.MFTLoss(threshold=1.5), ValueError, r"`threshold` must be in \[0, 1\]"),
    (lambda: mtd.MFTLoss(threshold="0.2"), TypeError, "`threshold` must be a number"),
    (lambda: mtd.TopKLogitsKLLoss(k=2.0), TypeError, "`k` must be an integer"),
    (lambda: mtd.TopKLogitsKLLoss(k=True), TypeError, "`k` must be an integer"),
    (lambda: mtd.MGDLoss(True, 4), TypeError, "`num_student_channels` must be an integer"),
    (lambda: mtd.MGDLoss(4, 0), ValueError, "`num_teacher_channels` must be an integer >= 1"),
    (lambda: mtd.MGDLoss(4, 4, alpha_mgd=NAN), ValueError, "`alpha_mgd` must be a finite"),
    (lambda: mtd.MGDLoss(4, 4, lambda_mgd=1.5), ValueError, r"`lambda_mgd` must be in \[0, 1\]"),
    (lambda: mtd.MGDLoss(4, 4, generator=7), TypeError, "`generator` must be a torch.Generator"),
    (lambda: mtd.HintLoss(True, 3), TypeError, "`student_dim` must be an integer"),
    (lambda: mtd.CosineLoss(3, 2.0), TypeError, "`teacher_dim` must be an integer"),
    (lambda: mtd.AttentionTransferLoss(p=100), ValueError, "`p` must be .* at most 16"),
    (lambda: mtd.AttentionTransferLoss(p=NAN), ValueError, "`p` must be a finite number"),
    (lambda: mtd.RKDLoss(distance_weight=NAN), ValueError, "`distance_weight` must be a finite"),
    (lambda: mtd.RKDLoss(angle_weight=-1), ValueError, "`angle_weight` must be a finite number >="),
    (lambda: mtd.PKTLoss(eps=0), ValueError, "`eps` must be a finite number > 0"),
    (lambda: mtd.PKTLoss(eps=True), TypeError, "`eps` must be a number"),
    (lambda: mtd.LogitsDistillationLoss(tau=2.0), TypeError, "unexpected keyword argument 'tau'"),
    (
        lambda: mtd.TopKTeacher.from_logits(torch.randn(2, 4), k=2, temperature=INF),
        ValueError,
        "`temperature`",
    ),
    (lambda: mtd.StaticLossBalancer(NAN), ValueError, "`kd_loss_weight` must be a finite number"),
    (lambda: mtd.DynamicLossBalancer(INF), ValueError, "`kd_loss_weight` must be a finite number"),
    (
        lambda: mtd.DynamicLossBalancer(student_loss_weight=NAN),
        ValueError,
        "`student_loss_weight` must be a finite number",
    ),
    (lambda: mtd.DynamicLossBalancer(reference=True), ValueError, "`reference` must be"),
    (lambda: mtd.DynamicLossBalancer(eps=0.0), ValueError, "`eps` must be a finite number > 0"),
    (lambda: mtd.ScheduledLossBalancer(warmup_steps=True), TypeError, "`warmup_steps` must be an"),
    (
        lambda: mtd.ScheduledLossBalancer(schedule="cosine", total_steps=10.0),
        TypeError,
        "`total_steps` must be an integer",
    ),
    (lambda: mtd.ScheduledLossBalancer(final_factor=NAN), ValueError, "`final_factor` must be a"),
    (lambda: mtd.ScheduledLossBalancer(schedule=1), ValueError, "`schedule` must be one of"),
]


@pytest.mark.parametrize(("make", "error", "match"), BAD_ARGUMENTS, ids=range(len(BAD_ARGUMENTS)))
def test_constructors_refuse_bad_arguments_naming_them(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_set_student_loss_reduction_fn_needs_a_callable():
    with pytest.raises(TypeError, match="`fn` must be a callable or None"):
        mtd.StaticLossBalancer().set_student_loss_reduction_fn("mean")


# ------------------------------------------------------------------ one base for every logit loss
@pytest.mark.parametrize(
    "cls",
    [mtd.EnsembleLogitsDistillationLoss, mtd.ULDLoss, mtd.HybridULDLoss],
    ids=["ensemble", "uld", "hybrid_uld"],
)
def test_ensemble_and_cross_tokenizer_losses_share_the_base(cls):
    assert issubclass(cls, LogitDivergenceLoss)
    # they are not dense-teacher divergences: the chunked loss refuses them by name
    name = mtd.losses._registry.LOSSES.name_of(cls)
    assert name not in mtd.LMHeadDistillationLoss.available_divergences()
    with pytest.raises(ValueError, match=f"Unknown `divergence` '{name}'"):
        mtd.LMHeadDistillationLoss(divergence=name)


def test_reductions_are_declared_per_class():
    assert mtd.LogitsDistillationLoss(reduction="mean").reduction == "mean"
    with pytest.raises(
        ValueError, match=r"`reduction` must be one of \['batchmean', 'none', 'sum'"
    ):
        mtd.ULDLoss(reduction="mean")


def test_reduce_divergence_is_the_second_half_of_forward():
    student, teacher = torch.randn(4, 3, 7), torch.randn(4, 3, 7)
    keep = torch.rand(4, 3) > 0.4
    loss = mtd.JSDLoss(beta=0.3, temperature=2.0)
    half = loss.reduce_divergence(student, loss.teacher_distribution(teacher, student), None, keep)
    torch.testing.assert_close(half, loss(student, teacher, mask=keep))


def test_dense_teacher_names_the_role_and_detaches_only_what_has_a_graph():
    student = torch.randn(3, 4)
    loss = mtd.LogitsDistillationLoss()
    teacher = torch.randn(3, 4)
    assert loss.dense_teacher(teacher, student) is teacher  # no graph: nothing to cut
    with_graph = torch.randn(3, 4, requires_grad=True) * 2
    got = loss.dense_teacher(with_graph, student)
    assert not got.requires_grad and got.data_ptr() == with_graph.data_ptr()
    with pytest.raises(TypeError, match="Cannot find teacher 1 logits"):
        loss.dense_teacher(object(), student, "teacher 1")
