"""Contract suites that every registered loss and balancer must pass.

``LossContract(name)`` checks one registered loss against the properties every kdistill loss
promises (finite on extreme and half-precision inputs, zero and non-negative where the math says
so, invariant to a constant added to logits, masking that changes nothing, float64 ``gradcheck``,
a detached teacher, save/restore of config and parameters, construction on the ``meta`` device).
``BalancerContract(name)`` does the same for balancers. The tests parametrize over
``list_losses()`` / ``list_balancers()``, so registering a loss is enough to get it tested.

Each loss declares how to build a small instance of it where it is registered:
``@register_loss("jsd", recipe=LossRecipe(...))`` (or later, ``register_loss_recipe``). A loss
registered without a recipe is not guessed at: ``LossContract`` raises a ``ValueError`` saying
how to add one. A loss the generic contract cannot test opts out, visibly, with
``recipe=ContractOptOut("why")``.

Failures raise ``AssertionError`` with a message naming the loss and the property. No pytest
import: plugin authors can run the contract from any test framework.
"""

import copy
import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from .._recipes import (
    BalancerRecipe,
    ContractOptOut,
    LossInputs,
    LossRecipe,
    cross_vocab_logit_inputs,
    ensemble_logit_inputs,
    feature_inputs,
    labelled_logit_inputs,
    logit_inputs,
)
from .._registry import Registry
from .._serialization import build_object, describe_object
from ..balancers import BALANCERS, STUDENT_LOSS_KEY, register_balancer_recipe
from ..losses._registry import LOSSES, register_loss_recipe

__all__ = [
    "BalancerContract",
    "BalancerRecipe",
    "ContractOptOut",
    "LossContract",
    "LossInputs",
    "LossRecipe",
    "balancer_recipe",
    "cross_vocab_logit_inputs",
    "ensemble_logit_inputs",
    "feature_inputs",
    "labelled_logit_inputs",
    "logit_inputs",
    "loss_recipe",
    "register_balancer_recipe",
    "register_loss_recipe",
]

EXTREME = 1e4
# |loss| below this counts as zero, and above -this as non-negative (float32 rounding)
ZERO_TOL = 1e-5


def _declared_recipe(registry: Registry, name: str, register: str, example: str) -> Any:
    """The recipe ``registry`` holds for ``name``; a ``ValueError`` saying how to add one."""
    recipe = registry.recipe(name)
    if recipe is None:
        recipe_cls = registry.recipe_types[0].__name__
        raise ValueError(
            f"{registry.kind.capitalize()} {name!r} is registered without a contract recipe, so "
            f"the contract suite cannot test it. Declare one where it is registered: "
            f"@{register}({name!r}, recipe={recipe_cls}(lambda: {example}(...))), or call "
            f"kdistill.testing.{register}_recipe({name!r}, {recipe_cls}(...)). If the generic "
            "contract cannot apply, opt out with recipe=ContractOptOut('why')."
        )
    return recipe


def loss_recipe(name: str) -> LossRecipe | ContractOptOut:
    """The contract recipe registered with the loss ``name`` (or its opt-out).

    Raises:
        ValueError: ``name`` is not a registered loss, or was registered without a recipe.
    """
    return _declared_recipe(LOSSES, name, "register_loss", "MyLoss")


def _to_dtype(dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    return lambda x: x.to(dtype)


def _scaled_by(factor: float) -> Callable[[Tensor], Tensor]:
    return lambda x: x * factor


def _off_meta_tensors(module: nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``module`` that are *not* on the meta device."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return [name for name, tensor in tensors if not tensor.is_meta]


def _seeded(fn: Callable[[], Tensor], random: bool) -> Tensor:
    """Call ``fn``; for random losses under a fixed seed, so two calls draw the same numbers."""
    if not random:
        return fn()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        return fn()


class LossContract:
    """The properties every registered loss must have; ``run(check)`` raises on a violation.

    Args:
        name: A registered loss name.
        recipe: Overrides the registered recipe (used to test the contract itself).

    Raises:
        ValueError: ``name`` is not registered, has no recipe, or opted out of the contract.

    Example:
        >>> contract = LossContract("jsd")
        >>> "gradcheck" in contract.applicable_checks()
        True
        >>> contract.run("zero_when_equal")
    """

    CHECKS: tuple[str, ...] = (
        "finite_extreme",
        "finite_low_precision",
        "zero_when_equal",
        "non_negative",
        "shift_invariant",
        "mask_drops_positions",
        "all_masked_is_zero",
        "gradcheck",
        "teacher_gets_no_grad",
        "save_restore",
        "builds_on_meta",
    )

    def __init__(self, name: str, recipe: LossRecipe | None = None) -> None:
        self.name = name
        found = recipe if recipe is not None else loss_recipe(name)
        if isinstance(found, ContractOptOut):
            raise ValueError(
                f"Loss {name!r} opted out of the contract suite: {found.reason} (check with "
                "kdistill.testing.loss_recipe(name) before building a contract)."
            )
        self.recipe = found

    def applicable_checks(self) -> list[str]:
        """The checks that apply to this loss (per its recipe)."""
        skip = set()
        if not self.recipe.zero_when_equal:
            skip.add("zero_when_equal")
        if not self.recipe.non_negative:
            skip.add("non_negative")
        if self.recipe.kind != "logits":
            skip |= {"shift_invariant", "mask_drops_positions", "all_masked_is_zero"}
        return [c for c in self.CHECKS if c not in skip]

    def run(self, check: str) -> None:
        """Run one check by name (see ``CHECKS``)."""
        if check not in self.CHECKS:
            raise ValueError(f"Unknown check {check!r}. Available: {list(self.CHECKS)}.")
        getattr(self, f"check_{check}")()

    # helpers ---------------------------------------------------------------------------------
    def _inputs(self, seed: int = 0) -> LossInputs:
        return self.recipe.make_inputs(torch.Generator().manual_seed(seed))

    def _call(self, loss: nn.Module, inputs: LossInputs, mask: Tensor | None = None) -> Tensor:
        kwargs = {}
        if inputs.labels is not None:
            kwargs["labels"] = inputs.labels
        if mask is not None:
            kwargs["mask"] = mask
        return _seeded(lambda: loss(inputs.student, inputs.teacher, **kwargs), self.recipe.random)

    def _fail(self, prop: str, detail: str) -> AssertionError:
        return AssertionError(f"Loss {self.name!r} violates '{prop}': {detail}")

    def _scalar(self, value: Tensor, prop: str) -> float:
        if not isinstance(value, Tensor) or value.dim() != 0:
            raise self._fail(prop, f"expected a scalar tensor, got {value!r}")
        if not torch.isfinite(value):
            raise self._fail(prop, f"the loss is {value.item()}")
        return float(value.detach())

    # checks ----------------------------------------------------------------------------------
    def check_finite_extreme(self) -> None:
        """Finite value and gradient for inputs of magnitude up to 1e4."""
        inputs = self._inputs().map(lambda x: (x * EXTREME).clamp(-EXTREME, EXTREME))
        student = inputs.student.clone().requires_grad_(True)
        value = self._call(self.recipe.make_loss(), replace(inputs, student=student))
        self._scalar(value, "finite_extreme")
        value.backward()
        if student.grad is None or not torch.isfinite(student.grad).all():
            raise self._fail("finite_extreme", "the student gradient is missing or not finite")

    def check_finite_low_precision(self) -> None:
        """Finite value for float16 and bfloat16 inputs (and loss parameters in that dtype)."""
        for dtype in (torch.float16, torch.bfloat16):
            loss = self.recipe.make_loss().to(dtype)  # a half-precision model has such losses
            inputs = self._inputs().map(_to_dtype(dtype))
            self._scalar(self._call(loss, inputs), f"finite_low_precision ({dtype})")

    def check_zero_when_equal(self) -> None:
        """The loss is 0 when the student input equals the teacher input (each of them)."""
        inputs = self._inputs()
        first = inputs.teachers[0]
        equal = replace(inputs, student=first.clone(), teacher=inputs.map_teacher(lambda _: first))
        value = self._scalar(self._call(self.recipe.make_loss(), equal), "zero_when_equal")
        if abs(value) > ZERO_TOL:
            raise self._fail("zero_when_equal", f"loss(x, x) = {value}, expected 0")

    def check_non_negative(self) -> None:
        """The loss is >= 0 on several random and extreme inputs."""
        loss = self.recipe.make_loss()
        for seed in range(3):
            for scale in (1.0, 30.0):
                inputs = self._inputs(seed).map(_scaled_by(scale))
                value = self._scalar(self._call(loss, inputs), "non_negative")
                if value < -ZERO_TOL:
                    raise self._fail("non_negative", f"loss = {value} (seed {seed}, scale {scale})")

    def check_shift_invariant(self) -> None:
        """Adding a constant to the student or teacher logits changes nothing."""
        loss = self.recipe.make_loss()
        inputs = self._inputs()
        shifted = inputs.map(lambda s: s + 3.5, lambda t: t - 2.0)
        expected, got = self._call(loss, inputs), self._call(loss, shifted)
        if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):  # float32 softmax rounding
            raise self._fail(
                "shift_invariant", f"{got.item()} after the shift vs {expected.item()}"
            )

    def _mask(self, inputs: LossInputs) -> Tensor:
        mask = torch.ones(inputs.student.shape[:-1], dtype=torch.bool)
        mask.view(-1)[::2] = False
        return mask

    def check_mask_drops_positions(self) -> None:
        """Masked loss = loss over the kept positions only; masked values do not matter."""
        loss = self.recipe.make_loss()
        inputs = self._inputs()
        mask = self._mask(inputs)
        subset = LossInputs(
            inputs.student[mask],
            inputs.map_teacher(lambda t: t[mask]),
            None if inputs.labels is None else inputs.labels[mask],
        )
        expected = self._call(loss, subset)
        got = self._call(loss, inputs, mask)
        garbage = inputs.student.masked_fill(~mask[..., None], EXTREME)
        got_garbage = self._call(loss, replace(inputs, student=garbage), mask)
        for value, what in ((got, "masked"), (got_garbage, "masked with garbage")):
            if not torch.allclose(value, expected, rtol=1e-5, atol=1e-6):
                raise self._fail(
                    "mask_drops_positions",
                    f"{what} loss {value.item()} != loss over kept positions {expected.item()}",
                )

    def check_all_masked_is_zero(self) -> None:
        """An all-masked batch gives exactly 0 and a finite (zero) gradient."""
        inputs = self._inputs()
        student = inputs.student.clone().requires_grad_(True)
        mask = torch.zeros(inputs.student.shape[:-1], dtype=torch.bool)
        value = self._call(self.recipe.make_loss(), replace(inputs, student=student), mask)
        if self._scalar(value, "all_masked_is_zero") != 0.0:
            raise self._fail("all_masked_is_zero", f"loss = {value.item()}, expected 0")
        value.backward()
        if student.grad is None or student.grad.abs().sum() != 0:
            raise self._fail("all_masked_is_zero", "backward must work and give a zero gradient")

    def check_gradcheck(self) -> None:
        """``torch.autograd.gradcheck`` w.r.t. the student input, in float64."""
        loss = self.recipe.make_loss().double()
        inputs = self._inputs().map(lambda x: x.double())

        def fn(student: Tensor) -> Tensor:
            return self._call(loss, replace(inputs, student=student))

        student = inputs.student.clone().requires_grad_(True)
        try:
            ok = torch.autograd.gradcheck(
                fn, (student,), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True
            )
        except RuntimeError as err:  # gradcheck raises on a mismatch
            raise self._fail("gradcheck", str(err).splitlines()[0]) from err
        if not ok:
            raise self._fail("gradcheck", "analytical and numerical gradients differ")

    def check_teacher_gets_no_grad(self) -> None:
        """The teacher input gets no gradient; the student and every loss parameter get one."""
        loss = self.recipe.make_loss()
        inputs = self._inputs()
        student = inputs.student.clone().requires_grad_(True)
        with_grad = replace(
            inputs,
            student=student,
            teacher=inputs.map_teacher(lambda t: t.clone().requires_grad_(True)),
        )
        self._call(loss, with_grad).backward()
        if any(teacher.grad is not None for teacher in with_grad.teachers):
            raise self._fail("teacher_gets_no_grad", "the teacher input received a gradient")
        if student.grad is None or not torch.isfinite(student.grad).all():
            raise self._fail(
                "teacher_gets_no_grad", "the student gradient is missing or not finite"
            )
        for name, param in loss.named_parameters():
            if param.grad is None or not torch.isfinite(param.grad).all():
                raise self._fail(
                    "teacher_gets_no_grad", f"parameter {name!r} got no finite gradient"
                )

    def check_save_restore(self) -> None:
        """Config → JSON → registered class, plus ``state_dict``, rebuilds an identical loss."""
        loss = self.recipe.make_loss()
        with torch.no_grad():  # make the parameters differ from a fresh init
            for param in loss.parameters():
                param.add_(torch.randn_like(param))
        record = json.loads(json.dumps(describe_object(loss, LOSSES)))
        rebuilt = build_object(record, LOSSES)
        if type(rebuilt) is not type(loss):
            raise self._fail("save_restore", f"rebuilt a {type(rebuilt).__name__}")
        rebuilt.load_state_dict(loss.state_dict())
        inputs = self._inputs()
        expected, got = self._call(loss, inputs), self._call(rebuilt, inputs)
        if not torch.equal(got, expected):
            raise self._fail("save_restore", f"{got.item()} after restore vs {expected.item()}")

    def check_builds_on_meta(self) -> None:
        """Built under ``torch.device("meta")``, every parameter and buffer is on meta.

        ``restore`` builds losses on the meta device first (no memory), compares their parameter
        shapes with the checkpoint, and only then builds them for real.
        """
        with torch.device("meta"):
            loss = self.recipe.make_loss()
        real = _off_meta_tensors(loss)
        if real:
            raise self._fail("builds_on_meta", f"tensors {real} were allocated off the meta device")


def balancer_recipe(name: str) -> BalancerRecipe | ContractOptOut:
    """The contract recipe registered with the balancer ``name`` (or its opt-out).

    Raises:
        ValueError: ``name`` is not a registered balancer, or was registered without a recipe.
    """
    return _declared_recipe(BALANCERS, name, "register_balancer", "MyBalancer")


class BalancerContract:
    """The properties every registered balancer must have; ``run(check)`` raises on a violation.

    Args:
        name: A registered balancer name.
        recipe: Overrides the registered recipe.

    Raises:
        ValueError: ``name`` is not registered, has no recipe, or opted out of the contract.
    """

    CHECKS: tuple[str, ...] = (
        "scalar_and_finite",
        "gradient_reaches_losses",
        "no_parameters",
        "save_restore",
        "builds_on_meta",
    )

    def __init__(self, name: str, recipe: BalancerRecipe | None = None) -> None:
        self.name = name
        found = recipe if recipe is not None else balancer_recipe(name)
        if isinstance(found, ContractOptOut):
            raise ValueError(
                f"Balancer {name!r} opted out of the contract suite: {found.reason} (check with "
                "kdistill.testing.balancer_recipe(name) before building a contract)."
            )
        self.recipe = found

    def run(self, check: str) -> None:
        """Run one check by name (see ``CHECKS``)."""
        if check not in self.CHECKS:
            raise ValueError(f"Unknown check {check!r}. Available: {list(self.CHECKS)}.")
        getattr(self, f"check_{check}")()

    def _fail(self, prop: str, detail: str) -> AssertionError:
        return AssertionError(f"Balancer {self.name!r} violates '{prop}': {detail}")

    def _loss_dict(self) -> dict[str, Tensor]:
        values = torch.tensor([0.7, 2.5, 11.0, 0.3])[: self.recipe.num_kd_losses + 1]
        leaves = values.clone().requires_grad_(True)
        losses = {f"KDLoss_{i}": leaves[i + 1] * 1.0 for i in range(self.recipe.num_kd_losses)}
        if self.recipe.with_student_loss:
            losses[STUDENT_LOSS_KEY] = leaves[0] * 1.0
        self._leaves = leaves
        return losses

    def check_scalar_and_finite(self) -> None:
        """The result is a finite scalar."""
        total = self.recipe.make_balancer()(self._loss_dict())
        if not isinstance(total, Tensor) or total.dim() != 0 or not torch.isfinite(total):
            raise self._fail("scalar_and_finite", f"got {total!r}")

    def check_gradient_reaches_losses(self) -> None:
        """Backward through the result gives finite gradients to the KD terms."""
        self.recipe.make_balancer()(self._loss_dict()).backward()
        grad = self._leaves.grad
        if grad is None or not torch.isfinite(grad).all():
            raise self._fail("gradient_reaches_losses", f"gradient {grad}")

    def check_no_parameters(self) -> None:
        """Balancers hold no parameters (checkpoints record them by config only)."""
        params = [name for name, _ in self.recipe.make_balancer().named_parameters()]
        if params:
            raise self._fail("no_parameters", f"has parameters {params}")

    def check_save_restore(self) -> None:
        """Config → JSON → registered class rebuilds a balancer with identical output."""
        balancer = self.recipe.make_balancer()
        step = getattr(balancer, "step", None)
        if callable(step):  # move stateful balancers away from their initial state
            for _ in range(3):
                step()
        record = json.loads(json.dumps(describe_object(balancer, BALANCERS)))
        rebuilt = build_object(record, BALANCERS)
        losses = self._loss_dict()
        expected = balancer(losses)
        got = rebuilt(copy.copy(losses))
        if type(rebuilt) is not type(balancer) or not torch.equal(got, expected):
            raise self._fail("save_restore", f"{got} after restore vs {expected}")

    def check_builds_on_meta(self) -> None:
        """Built under ``torch.device("meta")``, the balancer holds no real tensor."""
        with torch.device("meta"):
            balancer = self.recipe.make_balancer()
        real = _off_meta_tensors(balancer)
        if real:
            raise self._fail("builds_on_meta", f"tensors {real} were allocated off the meta device")
