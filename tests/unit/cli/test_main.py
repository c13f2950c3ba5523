"""The ``kdistill`` command line: help, exit codes, argument errors."""

import subprocess
import sys

import pytest

import kdistill.cli._inspect
import kdistill.demo.mnist
from kdistill.cli.__main__ import COMMANDS, build_parser, main


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch) -> None:
    """Commands create their default output directories (./kdistill-out/...) at the start."""
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["demo", "--help"],
        ["demo", "llm", "--help"],
        ["inspect", "--help"],
        ["cache-teacher", "--help"],
    ],
    ids=["kdistill", "demo", "demo-llm", "inspect", "cache-teacher"],
)
def test_help_exits_zero(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert "usage: kdistill" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required: COMMAND"),
        (["nope"], "invalid choice: 'nope'"),
        (["demo", "--quick", "--paper"], "not allowed with argument"),
        (["demo", "--seed", "1", "--seeds", "1,2"], "not allowed with argument"),
        (["demo", "--seeds", "0,x"], "expected comma-separated integers"),
        (["demo", "--seeds", "1,1"], "seeds must be distinct"),
        (["demo", "--train-samples", "0"], "expected a positive integer"),
        (["demo", "--device", "gpu7"], "expected a torch device"),
        (["demo", "--device", "meta"], "the meta device holds no data"),
        (["demo", "--dataset", "cifar"], "invalid choice: 'cifar'"),
        (["inspect", "kdistill.testing.models:tiny_mlp"], "--input-shape"),
        (["inspect", "m:f", "--input-shape", "1,x"], "expected comma-separated sizes"),
        (["inspect", "m:f", "--input-shape", "1,0"], "sizes must be positive"),
    ],
    ids=[
        "no-command",
        "unknown-command",
        "two-presets",
        "seed-and-seeds",
        "bad-seeds",
        "duplicate-seeds",
        "zero-samples",
        "bad-device",
        "meta-device",
        "unknown-dataset",
        "missing-input-shape",
        "bad-shape",
        "zero-size",
    ],
)
def test_bad_arguments_exit_two(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and err.startswith("kdistill: error: ")  # no usage block


def test_demo_defaults_to_quick_preset() -> None:
    args = build_parser().parse_args(["demo"])
    assert (args.preset, args.device, args.seed, args.seeds) == ("quick", "cpu", None, None)
    assert args.handler.__name__ == "run"
    assert build_parser().parse_args(["demo", "--paper"]).preset == "paper"


def test_demo_llm_bad_value_is_a_clean_user_error(capsys: pytest.CaptureFixture[str]) -> None:
    # exits 1 on one line: the bad --temperature, or a missing [demo-llm] package checked first
    assert main(["demo", "llm", "--temperature", "0", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--temperature must be positive" in err or "missing" in err
    assert "Traceback" not in err


def test_bad_preset_values_are_user_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--temperature", "0", "--no-progress"]) == 1
    assert "--temperature must be positive" in capsys.readouterr().err
    assert main(["demo", "--kd-loss-weight", "1.5", "--no-progress"]) == 1
    assert "--kd-loss-weight must be in [0, 1]" in capsys.readouterr().err


def test_every_command_module_registers_a_handler() -> None:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    assert set(subparsers.choices) == {"demo", "inspect", "cache-teacher"}
    assert len(subparsers.choices) >= len(COMMANDS)
    for name, sub in subparsers.choices.items():
        assert callable(sub.get_default("handler")), name


def test_python_dash_m_kdistill_runs_the_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kdistill", "--version"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    import kdistill

    assert result.stdout.strip() == f"kdistill {kdistill.__version__}"


def _boom(args):
    raise ZeroDivisionError("boom\nsecond line")


def test_unexpected_errors_are_one_line_unless_debug(monkeypatch, capsys) -> None:
    monkeypatch.setattr(kdistill.cli._inspect, "run", _boom)
    argv = ["inspect", "m:f", "--input-shape", "1"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err == (
        "kdistill: error: ZeroDivisionError: boom (run `kdistill --debug inspect ...` to see the "
        "traceback)\n"
    )
    with pytest.raises(ZeroDivisionError, match="boom"):
        main(["--debug", *argv])


def _never(*args, **kwargs):
    raise AssertionError("training started although the output directory is unusable")


@pytest.mark.parametrize("task", [[], ["llm"]], ids=["mnist", "llm"])
def test_demo_output_dir_is_checked_before_anything_runs(
    tmp_path, monkeypatch, capsys, task
) -> None:
    monkeypatch.setattr(kdistill.demo.mnist, "run_mnist_demo", _never)  # (the LLM demo checks
    # its packages first, which would fail instead: the output directory must come before them)
    (tmp_path / "passwd").write_text("root:x:0:0")
    out = tmp_path / "passwd" / "out"  # like /etc/passwd/out
    assert main(["demo", *task, "--output-dir", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"kdistill: error: --output-dir {str(out)!r}: cannot create")
    assert err.count("\n") == 1
    assert (tmp_path / "passwd").read_text() == "root:x:0:0"
