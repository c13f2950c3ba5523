"""Every registered loss and balancer passes the contract suites of ``kdistill.testing``."""

import pytest
from torch import Tensor, nn

from kdistill import ReverseKLLoss, list_balancers, list_losses
from kdistill.testing import BalancerContract, LossContract, LossRecipe, contracts

LOSS_CASES = [
    (name, check) for name in list_losses() for check in LossContract(name).applicable_checks()
]
BALANCER_CASES = [(name, check) for name in list_balancers() for check in BalancerContract.CHECKS]


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


def test_default_recipe_is_used_for_losses_without_one(monkeypatch):
    # a plain logit loss registered without a recipe is built with its default arguments
    monkeypatch.delitem(contracts._LOSS_RECIPES, "reverse_kl")
    recipe = contracts.loss_recipe("reverse_kl")
    assert recipe.kind == "logits"
    assert isinstance(recipe.make_loss(), ReverseKLLoss)
    LossContract("reverse_kl").run("mask_drops_positions")
