"""``kdistill.teachers``: the TeacherDict container and the teacher-name rules."""

import pytest
import torch
from torch import nn

from kdistill.teachers import (
    MAX_TEACHER_NAME_CHARS,
    TeacherDict,
    describe_names,
    teacher_layer_problem,
    teacher_name_problem,
)


def test_forward_runs_every_teacher_on_the_same_inputs_in_order():
    a, b = nn.Linear(4, 3), nn.Linear(4, 5)
    teachers = TeacherDict({"b": b, "a": a})
    x = torch.randn(2, 4)
    outputs = teachers(x)
    assert list(outputs) == ["b", "a"] and teachers.kd_teacher_names == ("b", "a")
    assert torch.equal(outputs["a"], a(x)) and torch.equal(outputs["b"], b(x))
    assert teachers.get_submodule("a") is a
    assert list(teachers.state_dict()) == ["b.weight", "b.bias", "a.weight", "a.bias"]


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("big", None),
        ("expert_2", None),
        ("_private", None),
        ("a.b", "holds a dot"),
        ("", "is not a Python identifier"),
        ("2x", "is not a Python identifier"),
        ("a-b", "is not a Python identifier"),
        ("forward", "is an attribute of TeacherDict"),
        ("training", "is an attribute of TeacherDict"),
        ("_modules", "is an attribute of TeacherDict"),
        ("x" * (MAX_TEACHER_NAME_CHARS + 1), "is longer than 128 characters"),
        (3, "must be a string, got int"),
        (None, "must be a string, got NoneType"),
    ],
)
def test_teacher_name_rules(name, problem):
    got = teacher_name_problem(name)
    assert got is None if problem is None else problem in got


def test_teacher_dict_refuses_bad_names_and_values():
    with pytest.raises(ValueError, match=r"Teacher name 'a.b' holds a dot"):
        TeacherDict({"a.b": nn.Linear(1, 1)})
    with pytest.raises(TypeError, match=r"Teacher 'a' must be an nn.Module, got int"):
        TeacherDict({"a": 3})


def test_teacher_layer_problem_says_which_teacher():
    teachers = TeacherDict({"big": nn.Sequential(nn.Linear(2, 2)), "small": nn.Linear(2, 2)})
    modules = [name for name, _ in teachers.named_modules()]
    names = teachers.kd_teacher_names
    assert teacher_layer_problem("big.0", names, modules) is None
    assert teacher_layer_problem("small", names, modules) is None
    assert "is ambiguous with several teachers ['big', 'small']" in teacher_layer_problem(
        "", names, modules
    )
    assert "Unknown teacher 'bgi'. Did you mean 'big'?" in teacher_layer_problem(
        "bgi.0", names, modules
    )
    message = teacher_layer_problem("big.1", names, modules)
    assert "Available: ['big', 'big.0']" in message and "layer '1' of teacher 'big'" in message


def test_describe_names_cuts_long_lists():
    assert describe_names(["a", "b"]) == "['a', 'b']"
    assert describe_names([f"t{i}" for i in range(25)]).endswith("'t19', ... (25 in all)]")
