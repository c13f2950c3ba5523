"""``kdistill inspect`` and ``kdistill.inspect_model``."""

import ast
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from kdistill.cli import CLIError
from kdistill.cli.__main__ import main
from kdistill.cli._args import load_factory
from kdistill.inspect_model import (
    criterion_key,
    format_side_by_side,
    matching_pairs,
    summarize_modules,
)
from kdistill.testing.models import tiny_mlp

TINY_MLP = "kdistill.testing.models:tiny_mlp"


def _reference_shapes(model: nn.Module, x: torch.Tensor) -> dict[str, list[int]]:
    """Output shapes computed by calling each layer of TinyMLP by hand."""
    h1 = torch.relu(model.fc1(x))
    h2 = torch.relu(model.fc2(h1))
    out = model.head(h2)
    return {
        "": list(out.shape),
        "fc1": list(model.fc1(x).shape),
        "fc2": list(model.fc2(h1).shape),
        "head": list(out.shape),
    }


def test_summarize_modules_matches_hand_computed_shapes_and_params() -> None:
    model, x = tiny_mlp(), torch.zeros(3, 16)
    rows = {row.name: row for row in summarize_modules(model, x)}
    assert list(rows) == [name for name, _ in model.named_modules()]
    for name, shape in _reference_shapes(model, x).items():
        assert rows[name].output_shape == str(shape)
        module = model.get_submodule(name)
        assert rows[name].params == sum(p.numel() for p in module.parameters())
    assert rows[""].params == 16 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10
    # dropout is called twice in TinyMLP.forward: both calls are shown
    assert rows["dropout"].output_shape == "[3, 32] | [3, 32]"
    assert not any(m._forward_hooks for m in model.modules()), "hooks must be removed"


def test_inspect_cli_prints_every_submodule(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", TINY_MLP, "--input-shape", "2,16"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    model = tiny_mlp()
    for name, module in model.named_modules():
        label = name or "(root)"
        assert label in lines
        assert lines[label][1] == type(module).__name__
        assert lines[label][-1] == f"{sum(p.numel() for p in module.parameters()):,}"
    assert lines["fc1"][2:4] == ["[2,", "32]"]


def test_inspect_with_teacher_flags_equal_shapes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "user_models.py").write_text(
        textwrap.dedent(
            """
            from kdistill.testing.models import TinyMLP

            def wide_teacher():
                return TinyMLP(in_features=16, hidden=64)
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert (
        main(
            ["inspect", TINY_MLP, "--input-shape", "1,16", "--teacher", "user_models:wide_teacher"]
        )
        == 0
    )
    out = capsys.readouterr().out
    student = summarize_modules(tiny_mlp(), torch.zeros(1, 16))
    teacher = summarize_modules(load_factory("user_models:wide_teacher")(), torch.zeros(1, 16))
    pairs = matching_pairs(student, teacher)
    # hidden widths differ (32 vs 64): only the logits-shaped modules match
    assert ("head", "head") in pairs
    assert ("fc1", "fc1") not in pairs
    assert all(next(r for r in student if r.name == s).output_shape == "[1, 10]" for s, _ in pairs)
    assert f"pairs with equal output shapes ({len(pairs)}), as criterion keys" in out
    assert out == format_side_by_side(student, teacher) + "\n"
    # every pair is printed as a criterion key that Python reads back as the pair itself
    printed = [line.strip() for line in out.split("criterion keys")[1].splitlines()[1:]]
    assert [ast.literal_eval(line) for line in printed] == pairs
    assert '  ("", "head")' in out.splitlines() and "(root)" not in out.split("criterion keys")[1]
    head_row = next(line for line in out.splitlines() if line.startswith("head "))
    assert " = " in head_row
    fc1_row = next(line for line in out.splitlines() if line.startswith("fc1 "))
    assert " = " not in fc1_row


@pytest.mark.parametrize(
    ("spec", "message", "status"),
    [
        ("no_colon", "argument MODULE:FACTORY: expected MODULE:FACTORY", 2),
        ("a:b c", "argument MODULE:FACTORY: expected MODULE:FACTORY", 2),
        (
            "kdistill_no_such_module_xyz:f",
            "cannot import module 'kdistill_no_such_module_xyz'",
            1,
        ),
        ("kdistill.testing.models:nope", "has no attribute 'nope'", 1),
        ("kdistill.testing.models:__all__", "not a callable", 1),
        ("kdistill.testing:models.TinyMLP.__doc__", "not a callable", 1),
        ("kdistill.demo.mnist:build_mlp", "missing a required argument: 'in_features'", 2),
    ],
    ids=[
        "no-colon",
        "not-a-name",
        "missing-module",
        "missing-attribute",
        "not-callable",
        "dotted-not-callable",
        "needs-arguments",
    ],
)
def test_bad_factory_is_one_line_user_error(
    spec: str, message: str, status: int, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(["inspect", spec, "--input-shape", "1,16"])
    except SystemExit as exit_info:  # argparse's own usage errors
        code = exit_info.code
    assert code == status
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and err.startswith("kdistill: error: ")
    assert "Traceback" not in err


def test_factory_arguments_come_from_model_kwargs(capsys: pytest.CaptureFixture[str]) -> None:
    kwargs = '{"in_features": 8, "hidden": [5], "num_classes": 3}'
    argv = ["inspect", "kdistill.demo.mnist:build_mlp", "--model-kwargs", kwargs]
    assert main([*argv, "--input-shape", "2,8"]) == 0
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert lines["0"][1:4] == ["Linear", "[2,", "5]"] and lines["2"][1:4] == ["Linear", "[2,", "3]"]
    teacher = ["--teacher", "kdistill.demo.mnist:build_mlp", "--teacher-kwargs", kwargs]
    assert main([*argv, "--input-shape", "2,8", *teacher]) == 0
    assert '  ("2", "2")' in capsys.readouterr().out.splitlines()


def test_factory_returning_non_module_and_failing_forward(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["inspect", "collections:OrderedDict", "--input-shape", "1,16"]) == 1
    assert "not a torch.nn.Module" in capsys.readouterr().err
    assert main(["inspect", TINY_MLP, "--input-shape", "1,7"]) == 1
    err = capsys.readouterr().err
    assert "forward on zeros of shape [1, 7] failed" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("kdistill.testing.models:missing", "Available: .*'tiny_mlp'"),
        ("kdistill.testing.models:__name__", "not a callable"),
    ],
    ids=["missing", "not-callable"],
)
def test_load_factory_errors(spec: str, match: str) -> None:
    with pytest.raises(CLIError, match=match):
        load_factory(spec)


def test_load_factory_resolves_dotted_attribute() -> None:
    from kdistill.testing.models import TinyMLP

    assert load_factory("kdistill.testing:models.TinyMLP") is TinyMLP


def test_criterion_key_is_pasteable() -> None:
    assert criterion_key("", "head") == '("", "head")'
    assert ast.literal_eval(criterion_key("a.b", 'q"uote')) == ("a.b", 'q"uote')


def test_meta_device_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["inspect", TINY_MLP, "--input-shape", "1,16", "--device", "meta"])
    assert info.value.code == 2
    assert "meta device holds no data" in capsys.readouterr().err
