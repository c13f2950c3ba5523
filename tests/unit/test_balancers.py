"""StaticLossBalancer and the balancer interface."""

import pytest
import torch

import kdistill as mtd


def test_static_balancer_formula_with_several_weights():
    balancer = mtd.StaticLossBalancer(kd_loss_weight=[0.2, 0.3])
    losses = {"student_loss": torch.tensor(2.0), "A_0": torch.tensor(3.0), "B_1": torch.tensor(5.0)}
    assert balancer(losses).item() == pytest.approx(0.2 * 3 + 0.3 * 5 + 0.5 * 2)


def test_static_balancer_int_weight_one_without_student_loss():
    balancer = mtd.StaticLossBalancer(kd_loss_weight=1)
    assert balancer({"A_0": torch.tensor(3.0)}).item() == pytest.approx(3.0)


def test_missing_student_loss_raises_at_compute_time():
    with pytest.raises(ValueError, match=r"weight 0.5 .*no `student_loss`"):
        mtd.StaticLossBalancer(0.5)({"A_0": torch.tensor(1.0)})


def test_student_loss_reduction_fn_is_applied():
    balancer = mtd.StaticLossBalancer(0.5)
    balancer.set_student_loss_reduction_fn(lambda loss: loss.mean())
    total = balancer({"student_loss": torch.tensor([1.0, 3.0]), "A_0": torch.tensor(4.0)})
    assert total.item() == pytest.approx(0.5 * 4 + 0.5 * 2)


@pytest.mark.parametrize(
    ("weight", "error", "match"),
    [
        (-0.1, ValueError, "`kd_loss_weight` must be a finite number >= 0"),
        ([0.7, 0.6], ValueError, "at most 1"),
        ("0.5", TypeError, "number"),
        ([], ValueError, "between 1 and"),
        (float("nan"), ValueError, "`kd_loss_weight` must be a finite number"),
        (float("inf"), ValueError, "`kd_loss_weight` must be a finite number"),
        ([0.2, float("nan")], ValueError, r"`kd_loss_weight\[1\]` must be a finite number"),
        (True, TypeError, "`kd_loss_weight` must be a number"),
        ([0.5, False], TypeError, r"`kd_loss_weight\[1\]` must be a number"),
    ],
    ids=[
        "negative",
        "sum_above_one",
        "string",
        "empty",
        "nan",
        "inf",
        "nan_in_list",
        "bool",
        "bool_in_list",
    ],
)
def test_static_balancer_validation(weight, error, match):
    with pytest.raises(error, match=match):
        mtd.StaticLossBalancer(kd_loss_weight=weight)


def test_interface_is_abstract():
    with pytest.raises(TypeError, match="abstract"):
        mtd.DistillationLossBalancer()


def test_balancer_registry():
    assert "static" in mtd.list_balancers()
    assert mtd.get_balancer("static") is mtd.StaticLossBalancer
    with pytest.raises(ValueError, match="Unknown loss balancer"):
        mtd.get_balancer("statc")


def test_sum_losses_adds_in_order_from_the_first_term():
    from kdistill.balancers import sum_losses

    a, b, c = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (0.1, 0.2, 0.3))
    total = sum_losses([a, b, c])
    assert total.item() == (0.1 + 0.2) + 0.3  # float64 left-to-right, as Python adds floats
    total.backward()
    assert [t.grad.item() for t in (a, b, c)] == [1.0, 1.0, 1.0]
    assert sum_losses(iter([a])) is a  # one term comes back as it is: no 0 + a op
    with pytest.raises(ValueError, match="no loss term"):
        sum_losses([])
