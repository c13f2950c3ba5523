"""Shared pieces of the checkpoint attacks: a valid checkpoint, a victim model, a snapshot.

Every attack edits a checkpoint written by ``kdistill.save`` (what an attacker who can replace a
file gets), restores it into a victim student and checks, besides the error, that nothing ran and
that the victim is exactly as it was.
"""

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

import kdistill as mto
from kdistill.testing import TinyMLP, tiny_mlp

__all__ = ["Snapshot", "saved", "victim_for"]


def saved(path: Path, criterion: dict | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Save a converted TinyMLP (factory teacher, two losses, a balancer); return it and the file.

    Returns:
        The converted model and the checkpoint as ``torch.load(weights_only=True)`` reads it.
    """
    torch.manual_seed(0)
    model = mto.convert(
        TinyMLP(),
        mode=[
            (
                "kd_loss",
                {
                    "teacher_model": (tiny_mlp, (16, 32)),
                    "criterion": criterion
                    or {
                        ("fc2", "fc2"): nn.MSELoss(),
                        ("", ""): mto.LogitsDistillationLoss(2.0),
                    },
                    "loss_balancer": mto.StaticLossBalancer([0.25, 0.5]),
                },
            )
        ],
    )
    mto.save(model, path)
    return model, torch.load(path, weights_only=True)


def victim_for(model: nn.Module) -> nn.Module:
    """A plain student holding the saved student's weights (a correct restore changes nothing)."""
    victim = TinyMLP()
    with model.as_student():
        victim.load_state_dict(copy.deepcopy(model.state_dict()))
    return victim


class Snapshot:
    """Everything a failed (or plain) restore must leave as it was."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.state = self._take()

    def _take(self) -> tuple:
        model = self.model
        return (
            type(model),
            sorted(model.__dict__),
            {k: v.detach().clone() for k, v in model.state_dict().items()},
            {
                n: (dict(m._forward_hooks), dict(m._forward_pre_hooks))
                for n, m in model.named_modules()
            },
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: m.training for n, m in model.named_modules()},
        )

    def assert_unchanged(self) -> None:
        """Class, attributes, weights (bitwise), hooks, requires_grad and train/eval flags."""
        now = self._take()
        assert now[0] is self.state[0], "class changed"
        assert now[1] == self.state[1], "attributes changed"
        assert now[2].keys() == self.state[2].keys(), "state dict keys changed"
        for key, value in now[2].items():
            before = self.state[2][key]
            assert value.dtype == before.dtype and torch.equal(value, before), key
        assert now[3] == self.state[3], "hooks changed"
        assert now[4] == self.state[4], "requires_grad changed"
        assert now[5] == self.state[5], "train/eval flags changed"
