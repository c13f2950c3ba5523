"""``kdistill cache-teacher``: argument handling and the cache it writes (tiny stand-in data)."""

import json

import pytest
import torch

import kdistill.demo.data
from kdistill.cache import CachedTeacher, teacher_fingerprint
from kdistill.cli import CLIError
from kdistill.cli.__main__ import build_parser, main
from kdistill.testing.models import tiny_mlp

FACTORY = "kdistill.testing.models:tiny_mlp"


@pytest.fixture
def dataset(monkeypatch):
    """A 12-sample stand-in for the demo datasets (no sklearn / MNIST load in unit tests)."""
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


def test_registered_in_the_kdistill_command(tmp_path, dataset, capsys) -> None:
    argv = ["cache-teacher", str(tmp_path), "--teacher", FACTORY, "--no-progress"]
    assert main([*argv, "--teacher-kwargs", '{"in_features": 64}']) == 0
    assert "12 samples of digits train" in capsys.readouterr().out
    assert main([*argv, "--teacher-kwargs", '{"in_features": 64}', "--top-k", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdistill cache-teacher: error: ") and "stale" in err
    assert "Pass --overwrite to rebuild" in err
    assert "\n" not in err


def test_caches_a_checkpointed_teacher(tmp_path, dataset, capsys) -> None:
    teacher = tiny_mlp(64, 32, 10)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    status = _run(
        str(tmp_path / "cache"),
        "--teacher",
        FACTORY,
        "--teacher-kwargs",
        '{"in_features": 64}',
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
    assert "5 samples of digits test" in capsys.readouterr().out
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
        '{"in_features": 64}',
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
    assert manifest["layers"][0] | {"sample_shape": None} == {
        "name": "",
        "top_k": 3,
        "temperature": 2.0,
        "sample_shape": None,
    }


def test_kdistill_save_checkpoint_is_accepted(tmp_path, dataset) -> None:
    teacher = tiny_mlp(64, 32, 10)
    torch.save({"kdistill_state": {}, "model_state_dict": teacher.state_dict()}, tmp_path / "k.pt")
    _run(
        str(tmp_path / "c"),
        "--teacher",
        FACTORY,
        "--teacher-kwargs",
        '{"in_features": 64}',
        "--checkpoint",
        str(tmp_path / "k.pt"),
        "--no-progress",
    )
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["teacher_fingerprint"] == teacher_fingerprint(teacher)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--teacher-kwargs", "{bad"], "not valid JSON"),
        (["--teacher-kwargs", "[1]"], "must be a JSON object"),
        (["--teacher", "kdistill.testing.models:nothing"], "has no attribute"),
        (["--teacher", "no_such_module_xyz:f"], "cannot import module"),
        (["--teacher", "kdistill.cache._format:FORMAT_NAME"], "not a callable"),
        (
            [
                "--teacher",
                "kdistill.cache._format:dtype_name",
                "--teacher-kwargs",
                '{"dtype": "x"}',
            ],
            "not an nn.Module",
        ),
        (["--checkpoint", "missing.pt"], "does not exist"),
        (["--layers", "fc9"], "Unknown teacher layer"),
        (
            ["--device", "cuda:0"] if not torch.cuda.is_available() else ["--layers", "fc9"],
            "CUDA is not available|Unknown teacher layer",
        ),
    ],
    ids=[
        "json",
        "json-list",
        "attr",
        "module",
        "not-callable",
        "not-module",
        "ckpt",
        "layer",
        "cuda",
    ],
)
def test_user_errors_are_one_line(tmp_path, dataset, argv, match) -> None:
    base = ["--teacher", FACTORY, "--teacher-kwargs", '{"in_features": 64}', "--no-progress"]
    with pytest.raises(CLIError, match=match):
        _run(str(tmp_path / "c"), *base, *argv)


def test_checkpoint_that_does_not_fit(tmp_path, dataset) -> None:
    torch.save(tiny_mlp(64, 8, 10).state_dict(), tmp_path / "small.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    base = ["--teacher", FACTORY, "--teacher-kwargs", '{"in_features": 64}', "--no-progress"]
    with pytest.raises(CLIError, match="does not fit"):
        _run(str(tmp_path / "c"), *base, "--checkpoint", str(tmp_path / "small.pt"))
    with pytest.raises(CLIError, match="cannot read --checkpoint"):
        _run(str(tmp_path / "c"), *base, "--checkpoint", str(tmp_path / "junk.pt"))
