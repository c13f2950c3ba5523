"""Every registered loss and balancer passes the contract suites of ``kdistill.testing``."""

import pytest
import torch
from torch import Tensor, nn

import kdistill as mtd
from kdistill import list_balancers, list_losses
from kdistill.balancers import BALANCERS, get_balancer_recipe
from kdistill.losses import _registry as loss_registry
from kdistill.testing import (
    BalancerContract,
    BalancerRecipe,
    ContractOptOut,
    LossContract,
    LossRecipe,
    balancer_recipe,
    feature_inputs,
    loss_recipe,
    register_loss_recipe,
)


def _tested(name: str) -> bool:
    return isinstance(loss_registry.get_loss_recipe(name), LossRecipe)


LOSS_CASES = [
    (name, check)
    for name in list_losses()
    if _tested(name)
    for check in LossContract(name).applicable_checks()
]
BALANCER_CASES = [
    (name, check)
    for name in list_balancers()
    if isinstance(get_balancer_recipe(name), BalancerRecipe)
    for check in BalancerContract.CHECKS
]


@pytest.mark.parametrize("name", list_losses())
def test_every_registered_loss_has_a_contract_recipe(name):
    recipe = loss_registry.get_loss_recipe(name)
    if isinstance(recipe, ContractOptOut):
        pytest.skip(f"{name} opts out of the loss contract: {recipe.reason}")
    assert isinstance(recipe, LossRecipe), loss_recipe(name)  # raises, saying how to add one


@pytest.mark.parametrize("name", list_balancers())
def test_every_registered_balancer_has_a_contract_recipe(name):
    recipe = get_balancer_recipe(name)
    if isinstance(recipe, ContractOptOut):
        pytest.skip(f"{name} opts out of the balancer contract: {recipe.reason}")
    assert isinstance(recipe, BalancerRecipe), balancer_recipe(name)


@pytest.mark.parametrize(("name", "check"), LOSS_CASES, ids=[f"{n}-{c}" for n, c in LOSS_CASES])
def test_loss_contract(name, check):
    LossContract(name).run(check)


@pytest.mark.parametrize(
    ("name", "check"), BALANCER_CASES, ids=[f"{n}-{c}" for n, c in BALANCER_CASES]
)
def test_balancer_contract(name, check):
    BalancerContract(name).run(check)


def test_every_loss_gets_the_core_checks():
    for name in list_losses():
        checks = LossContract(name).applicable_checks()
        for core in (
            "finite_extreme",
            "finite_low_precision",
            "gradcheck",
            "teacher_gets_no_grad",
            "save_restore",
        ):
            assert core in checks, f"{name} skips {core}"


class _LeakyTeacherLoss(nn.Module):
    """A broken loss: no detach, not shift invariant (squared error of raw logits)."""

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, *, mask=None) -> Tensor:
        return (student_logits - teacher_logits).pow(2).mean()


@pytest.mark.parametrize(
    ("check", "match"),
    [
        ("teacher_gets_no_grad", "teacher input received a gradient"),
        ("shift_invariant", "after the shift"),
    ],
)
def test_contract_catches_a_broken_loss(check, match):
    contract = LossContract("leaky", recipe=LossRecipe(_LeakyTeacherLoss))
    with pytest.raises(AssertionError, match=match):
        contract.run(check)


def test_contract_rejects_unknown_check():
    with pytest.raises(ValueError, match="Unknown check 'nope'"):
        LossContract("jsd").run("nope")


class _L1Loss(nn.Module):
    def forward(self, student_feats: Tensor, teacher_feats: Tensor) -> Tensor:
        return (student_feats - teacher_feats.detach()).abs().mean()


@pytest.fixture
def scratch_registry(monkeypatch):
    """Register test-only losses and balancers without leaking them into other tests."""
    for registry in (loss_registry.LOSSES, BALANCERS):
        monkeypatch.setattr(registry, "_by_name", dict(registry._by_name))
        monkeypatch.setattr(registry, "_recipes", dict(registry._recipes))


def test_a_loss_without_recipe_fails_with_a_clear_message(scratch_registry):
    mtd.register_loss("l1_no_recipe", _L1Loss)  # the call form still registers
    assert mtd.get_loss("l1_no_recipe") is _L1Loss
    with pytest.raises(ValueError, match=r"'l1_no_recipe' is registered without a contract recipe"):
        LossContract("l1_no_recipe")
    with pytest.raises(ValueError, match=r"recipe=ContractOptOut\('why'\)"):
        loss_recipe("l1_no_recipe")
    # a recipe given later (e.g. by a plugin's tests) makes it testable
    register_loss_recipe("l1_no_recipe", LossRecipe(_L1Loss, feature_inputs(2, 3), "features"))
    for check in LossContract("l1_no_recipe").applicable_checks():
        LossContract("l1_no_recipe").run(check)
    with pytest.raises(ValueError, match="already registered"):
        register_loss_recipe("l1_no_recipe", LossRecipe(_L1Loss))
    with pytest.raises(ValueError, match="Unknown loss 'nope'"):
        register_loss_recipe("nope", LossRecipe(_L1Loss))


def test_decorator_registers_the_class_and_its_recipe(scratch_registry):
    recipe = LossRecipe(lambda: Decorated(), feature_inputs(2, 3), kind="features")

    @mtd.register_loss("l1_decorated", recipe=recipe)
    class Decorated(_L1Loss):
        pass

    assert mtd.get_loss("l1_decorated") is Decorated
    assert loss_recipe("l1_decorated") is recipe
    LossContract("l1_decorated").run("teacher_gets_no_grad")
    with pytest.raises(ValueError, match="already registered"):
        mtd.register_loss("l1_decorated")(_L1Loss)
    with pytest.raises(TypeError, match=r"`recipe` must be a kdistill\.testing\.LossRecipe"):
        mtd.register_loss("l1_bad_recipe", recipe=lambda: _L1Loss())
    with pytest.raises(TypeError, match=r"nn\.Module subclass"):
        mtd.register_loss("l1_not_a_class")(lambda: None)


def test_opt_out_is_explicit_and_visible(scratch_registry):
    mtd.register_loss("l1_opt_out", _L1Loss, recipe=ContractOptOut("needs a tokenizer"))
    assert loss_recipe("l1_opt_out").reason == "needs a tokenizer"
    with pytest.raises(ValueError, match="opted out of the contract suite: needs a tokenizer"):
        LossContract("l1_opt_out")
    with pytest.raises(ValueError, match="needs a `reason`"):
        ContractOptOut("  ")


class _BufferOffMetaLoss(_L1Loss):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(3, device="cpu"))  # ignores the device context


def test_meta_check_catches_real_allocations():
    contract = LossContract(
        "off_meta", recipe=LossRecipe(_BufferOffMetaLoss, feature_inputs(2, 3), kind="features")
    )
    with pytest.raises(AssertionError, match=r"tensors \['scale'\] were allocated off the meta"):
        contract.run("builds_on_meta")


def test_balancer_decorator_and_missing_recipe(scratch_registry):
    @mtd.register_balancer("half_static", recipe=BalancerRecipe(lambda: HalfStatic()))
    class HalfStatic(mtd.StaticLossBalancer):
        def __init__(self) -> None:
            super().__init__(0.5)

    assert mtd.get_balancer("half_static") is HalfStatic
    for check in BalancerContract.CHECKS:
        BalancerContract("half_static").run(check)
    mtd.register_balancer("bare_static", mtd.StaticLossBalancer)
    with pytest.raises(ValueError, match="'bare_static' is registered without a contract recipe"):
        BalancerContract("bare_static")
    with pytest.raises(TypeError, match="must subclass DistillationLossBalancer"):
        mtd.register_balancer("not_a_balancer")(_L1Loss)


class _LeakySecondTeacher(nn.Module):
    """A broken ensemble: the second teacher is not detached."""

    def forward(self, student_logits: Tensor, teachers: tuple, *, mask=None) -> Tensor:
        first, second = teachers
        mixture = (first.detach().softmax(-1) + second.softmax(-1)) / 2
        per_position = (mixture * (mixture.log() - student_logits.log_softmax(-1))).sum(-1)
        return (per_position if mask is None else per_position[mask]).mean()


def test_contract_checks_every_teacher_of_a_tuple():
    recipe = LossRecipe(_LeakySecondTeacher, mtd.testing.ensemble_logit_inputs(2))
    contract = LossContract("leaky_ensemble", recipe=recipe)
    contract.run("zero_when_equal")  # every teacher equal to the student gives 0
    contract.run("mask_drops_positions")
    with pytest.raises(AssertionError, match="teacher input received a gradient"):
        contract.run("teacher_gets_no_grad")


def test_loss_inputs_map_every_teacher():
    inputs = mtd.testing.ensemble_logit_inputs(3)(torch.Generator().manual_seed(0))
    assert len(inputs.teachers) == 3
    doubled = inputs.map(lambda s: s * 2, lambda t: t + 1)
    torch.testing.assert_close(doubled.student, inputs.student * 2)
    for got, teacher in zip(doubled.teachers, inputs.teachers, strict=True):
        torch.testing.assert_close(got, teacher + 1)
    single = mtd.testing.cross_vocab_logit_inputs(5, 8)(torch.Generator().manual_seed(0))
    assert single.teachers == (single.teacher,) and single.teacher.shape[-1] == 8
