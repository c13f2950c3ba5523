"""``kdistill cache-teacher``: arguments, errors and exit codes, the cache it writes, its help."""

import json
import shlex

import pytest
import torch

import kdistill.demo.data
from kdistill.cache import CachedTeacher, teacher_fingerprint
from kdistill.cli import CLIError, UsageError
from kdistill.cli.__main__ import build_parser, main
from kdistill.cli._cache_teacher import EXAMPLE_COMMAND, EXAMPLE_PYTHON
from kdistill.demo.mnist import build_mlp
from kdistill.testing.models import tiny_mlp

FACTORY = "kdistill.testing.models:tiny_mlp"
KWARGS = '{"in_features": 64}'


@pytest.fixture
def dataset(monkeypatch):
    """A 12-sample stand-in for the demo datasets (64 features, as digits; no sklearn load)."""
    data = kdistill.demo.data.Dataset(
        "digits",
        torch.rand(12, 64),
        torch.randint(0, 10, (12,)),
        torch.rand(5, 64),
        torch.randint(0, 10, (5,)),
        10,
    )
    monkeypatch.setattr(kdistill.demo.data, "load_dataset", lambda name: data)
    return data


def _run(*argv: str) -> int:
    """Parse with the real ``kdistill`` parser and call the handler (user errors raise)."""
    args = build_parser().parse_args(["cache-teacher", *argv])
    return args.handler(args)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("kdistill: warning:")]
    assert len(lines) == 1, err
    assert lines[0].startswith("kdistill: error: ") and "Traceback" not in err
    return lines[0]


def test_registered_in_the_kdistill_command(tmp_path, dataset, capsys) -> None:
    argv = ["cache-teacher", str(tmp_path), "--teacher", FACTORY, "--no-progress"]
    assert main([*argv, "--teacher-kwargs", KWARGS]) == 0
    assert "12 samples of digits train" in capsys.readouterr().out
    assert main([*argv, "--teacher-kwargs", KWARGS, "--top-k", "2"]) == 1
    err = _one_line_error(capsys)
    assert "stale" in err and "Pass --overwrite to rebuild" in err


def test_caches_a_checkpointed_teacher(tmp_path, dataset, capsys) -> None:
    teacher = tiny_mlp(64, 32, 10)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    status = _run(
        str(tmp_path / "cache"),
        "--teacher",
        FACTORY,
        "--teacher-kwargs",
        KWARGS,
        "--checkpoint",
        str(tmp_path / "teacher.pt"),
        "--dataset",
        "digits",
        "--split",
        "test",
        "--layers",
        "",
        "fc2",
        "--dtype",
        "float32",
        "--batch-size",
        "2",
        "--no-progress",
    )
    assert status == 0
    captured = capsys.readouterr()
    assert "5 samples of digits test" in captured.out
    assert "warning" not in captured.err
    cached = CachedTeacher(tmp_path / "cache", teacher=teacher)  # the checkpoint's weights
    with torch.no_grad():
        expected = teacher(dataset.x_test[2:4])
    assert torch.equal(cached(dataset.x_test[2:4]), expected)
    with cached.sample_ids(torch.arange(5)):
        cached(dataset.x_test)  # sample ids are the split's row numbers


def test_top_k_and_limit(tmp_path, dataset) -> None:
    _run(
        str(tmp_path),
        "--teacher",
        FACTORY,
        "--teacher-kwargs",
        KWARGS,
        "--top-k",
        "3",
        "--temperature",
        "2",
        "--limit",
        "7",
        "--no-progress",
    )
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["num_samples"] == 7
    assert manifest["dtype"] == "float16"  # the default
    assert manifest["layers"][0] == {
        "name": "",
        "top_k": 3,
        "temperature": 2.0,
        "sample_shape": [3],
    }


def test_kdistill_save_checkpoint_is_accepted(tmp_path, dataset) -> None:
    teacher = tiny_mlp(64, 32, 10)
    torch.save({"kdistill_state": {}, "model_state_dict": teacher.state_dict()}, tmp_path / "k.pt")
    _run(
        str(tmp_path / "c"),
        "--teacher",
        FACTORY,
        "--teacher-kwargs",
        KWARGS,
        "--checkpoint",
        str(tmp_path / "k.pt"),
        "--no-progress",
    )
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["teacher_fingerprint"] == teacher_fingerprint(teacher)


def test_without_checkpoint_a_warning_and_reruns_are_not_stale(tmp_path, dataset, capsys) -> None:
    argv = ["cache-teacher", str(tmp_path / "c"), "--teacher", FACTORY, "--teacher-kwargs", KWARGS]
    assert main([*argv, "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "kdistill: warning: no --checkpoint" in err and "random" in err
    first = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert main([*argv, "--no-progress"]) == 0  # the same seeded weights: only checked
    assert json.loads((tmp_path / "c" / "manifest.json").read_text()) == first


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--teacher-kwargs", "{bad"], "argument --teacher-kwargs: not valid JSON"),
        (["--teacher-kwargs", "[1]"], "argument --teacher-kwargs: expected a JSON object"),
        (["--teacher", "no-colon"], "argument --teacher: expected MODULE:FACTORY"),
        (["--teacher", "os:system;rm"], "argument --teacher: expected MODULE:FACTORY"),
        (["--device", "meta"], "argument --device: the meta device holds no data"),
        (["--device", "gpu7"], "argument --device: expected a torch device"),
        (["--top-k", "0"], "argument --top-k: expected a positive integer"),
        (["--temperature", "inf"], "argument --temperature: expected a positive number"),
        (["--dataset", "cifar"], "argument --dataset: invalid choice"),
    ],
    ids=["json", "json-list", "spec", "spec-shell", "meta", "device", "top-k", "inf", "dataset"],
)
def test_usage_errors_exit_two_on_one_line(tmp_path, argv, match, capsys) -> None:
    base = ["cache-teacher", str(tmp_path / "c"), "--teacher", FACTORY, "--teacher-kwargs", KWARGS]
    with pytest.raises(SystemExit) as info:
        main([*base, *argv])
    assert info.value.code == 2
    err = _one_line_error(capsys)
    assert match in err and "(see 'kdistill cache-teacher --help')" in err
    assert not (tmp_path / "c").exists()


def test_factory_arguments_that_do_not_fit_are_a_usage_error(tmp_path, dataset, capsys) -> None:
    argv = ["cache-teacher", str(tmp_path / "c"), "--teacher", "kdistill.demo.mnist:build_mlp"]
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert "missing a required argument: 'in_features'" in err
    assert (
        """--teacher-kwargs '{"in_features": "...", "hidden": "...", "num_classes": "..."}'"""
        in err
    )
    assert (
        main(
            [
                *argv,
                "--teacher-kwargs",
                '{"in_features": 64, "hidden": [4], "num_classes": 10, "width": 3}',
            ]
        )
        == 2
    )
    assert "unexpected keyword argument 'width'" in _one_line_error(capsys)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--teacher", "kdistill.testing.models:nothing"], "has no attribute"),
        (["--teacher", "no_such_module_xyz:f"], "cannot import module 'no_such_module_xyz'"),
        (["--teacher", "kdistill.cache._format:FORMAT_NAME"], "not a callable"),
        (
            ["--teacher", "collections:OrderedDict", "--teacher-kwargs", "{}"],
            "returned a OrderedDict, not a torch.nn.Module",
        ),
        (
            [
                "--teacher",
                "kdistill.demo.mnist:build_mlp",
                "--teacher-kwargs",
                '{"in_features": 64, "hidden": [4], "num_classes": 10, "dropout": "x"}',
            ],
            r"raised TypeError",
        ),
        (["--checkpoint", "missing.pt"], "does not exist"),
        (["--layers", "fc9"], "Unknown teacher layer"),
        (["--top-k", "11"], "exceeds its 10 classes"),
    ],
    ids=["attr", "module", "not-callable", "not-module", "factory-raises", "ckpt", "layer", "k"],
)
def test_runtime_errors_exit_one_and_leave_nothing(tmp_path, dataset, argv, match, capsys) -> None:
    base = ["cache-teacher", str(tmp_path / "out" / "c"), "--teacher", FACTORY]
    assert main([*base, "--teacher-kwargs", KWARGS, "--no-progress", *argv]) == 1
    assert match in _one_line_error(capsys)
    assert not (tmp_path / "out").exists()  # the directories it created are removed again


def test_cuda_unavailable_is_a_runtime_error(tmp_path, dataset) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(CLIError, match="CUDA is not available"):
        _run(str(tmp_path / "c"), "--teacher", FACTORY, "--device", "cuda:0")


def test_teacher_that_does_not_fit_the_data(tmp_path, dataset, capsys) -> None:
    argv = ["cache-teacher", str(tmp_path / "c"), "--teacher", FACTORY, "--no-progress"]
    assert main([*argv, "--teacher-kwargs", '{"in_features": 784}']) == 1
    err = _one_line_error(capsys)
    assert "cannot run on the digits data (inputs of shape [1, 64])" in err
    assert "mat1 and mat2 shapes cannot be multiplied" in err
    assert not (tmp_path / "c").exists()
    # the corrected command starts from scratch: no leftover, no "stale"
    assert main([*argv, "--teacher-kwargs", KWARGS]) == 0


def test_teacher_failing_on_a_later_batch_is_one_line_and_a_rerun_works(
    tmp_path, dataset, monkeypatch, capsys
) -> None:
    calls = []
    original = torch.nn.Linear.forward

    def flaky(self, x):
        calls.append(1)
        if len(calls) == 9:  # 3 layers per forward: the probe, batch 1, then batch 2's head
            raise RuntimeError("out of memory (simulated)")
        return original(self, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", flaky)
    argv = ["cache-teacher", str(tmp_path / "c"), "--teacher", FACTORY, "--teacher-kwargs", KWARGS]
    argv += ["--batch-size", "4", "--no-progress"]
    assert main(argv) == 1
    err = _one_line_error(capsys)
    assert "RuntimeError: out of memory (simulated)" in err and "kdistill --debug" in err
    assert not (tmp_path / "c").exists()  # no shard was finished: nothing is left
    monkeypatch.setattr(torch.nn.Linear, "forward", original)
    assert main(argv) == 0


def test_debug_shows_the_traceback(tmp_path, dataset) -> None:
    argv = ["--debug", "cache-teacher", str(tmp_path / "c"), "--teacher", FACTORY]
    with pytest.raises(CLIError, match="cannot run on the digits data") as info:
        main([*argv, "--teacher-kwargs", '{"in_features": 784}'])
    assert isinstance(info.value.__cause__, RuntimeError)  # the original error is kept


@pytest.mark.parametrize(
    "make_output",
    [
        lambda tmp: tmp / "file.txt" / "cache",  # a path below a file, like /etc/passwd/out
        lambda tmp: tmp / "file.txt",  # an existing file
    ],
    ids=["below-a-file", "a-file"],
)
def test_uncreatable_output_directory(tmp_path, dataset, make_output, monkeypatch, capsys) -> None:
    (tmp_path / "file.txt").write_text("keep")
    built = []
    monkeypatch.setattr(kdistill.cli._cache_teacher, "_build", lambda args: built.append(1))
    argv = ["cache-teacher", str(make_output(tmp_path)), "--teacher", FACTORY]
    assert main(argv) == 1
    assert "OUTPUT_DIR" in _one_line_error(capsys)
    assert built == []  # refused before the teacher is even built
    assert (tmp_path / "file.txt").read_text() == "keep"


def test_help_gives_the_worked_example_and_the_default_dtype(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["cache-teacher", "--help"])
    text = capsys.readouterr().out
    usage = text.split("\n\n")[0]
    assert "[--dataset {auto,digits,mnist}]" in usage  # optional
    assert "--teacher MODULE:FACTORY" in usage and "[--teacher MODULE" not in usage  # required
    assert "float16 by default" in text and "(default: float16" in text
    for line in (EXAMPLE_COMMAND + "\n" + EXAMPLE_PYTHON).splitlines():
        assert line.strip() in text


def test_the_worked_example_runs(tmp_path, dataset, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    # the trained teacher of the example (here: fresh weights stand in for trained ones)
    teacher = build_mlp(64, [256, 256], 10)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    argv = shlex.split(EXAMPLE_COMMAND.replace("\\\n", " "))
    assert argv[0] == "kdistill"
    assert main([*argv[1:], "--no-progress"]) == 0
    assert "warning" not in capsys.readouterr().err
    CachedTeacher(tmp_path / "digits-cache", teacher=teacher)  # built from the checkpoint
    namespace: dict = {}
    exec(compile(EXAMPLE_PYTHON, "<cache-teacher --help>", "exec"), namespace)
    assert torch.isfinite(namespace["loss"])
    assert isinstance(namespace["model"].teacher_model, CachedTeacher)


def test_usage_error_class_has_status_two() -> None:
    assert (CLIError("x").exit_status, UsageError("x").exit_status) == (1, 2)
