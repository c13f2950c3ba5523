"""``kdistill.cli._args``: the argparse types and the checks every command makes before working."""

import argparse
import os
import sys
import types

import pytest

from kdistill.cli._args import (
    CLIError,
    UsageError,
    build_module,
    device_name,
    factory_spec,
    first_line,
    json_object,
    positive_float,
    positive_int,
    prepare_output_dir,
    remove_empty_dirs,
)


def test_prepare_output_dir_creates_checks_and_reports_what_it_made(tmp_path) -> None:
    target = tmp_path / "a" / "b" / "c"
    created = prepare_output_dir(target, "--output-dir")
    assert created == [tmp_path / "a", tmp_path / "a" / "b", target]
    assert target.is_dir() and list(target.iterdir()) == []  # the write probe is gone
    assert prepare_output_dir(target, "--output-dir") == []  # exists already
    (target / "result.json").write_text("{}")
    remove_empty_dirs(created)  # keeps what holds a result
    assert (target / "result.json").is_file()
    (target / "result.json").unlink()
    remove_empty_dirs(created)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda tmp: tmp / "file" / "out", "cannot create the directory"),
        (lambda tmp: tmp / "file", "exists and is not a directory"),
    ],
    ids=["below-a-file", "a-file"],
)
def test_prepare_output_dir_errors(tmp_path, make, match) -> None:
    (tmp_path / "file").write_text("keep")
    with pytest.raises(CLIError, match=f"--out '.*': {match}|--out '.*' {match}"):
        prepare_output_dir(make(tmp_path), "--out")
    assert (tmp_path / "file").read_text() == "keep"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only directories")
def test_prepare_output_dir_refuses_a_read_only_directory(tmp_path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(CLIError, match="is not writable"):
            prepare_output_dir(locked, "--out")
        with pytest.raises(CLIError, match="cannot create"):
            prepare_output_dir(locked / "sub", "--out")
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize(
    ("parse", "text", "expected"),
    [
        (positive_int, "3", 3),
        (positive_float, "0.5", 0.5),
        (json_object, '{"a": [1, 2]}', {"a": [1, 2]}),
        (factory_spec, "pkg.mod:Class.build", "pkg.mod:Class.build"),
        (device_name, "cpu", "cpu"),
        (device_name, "cuda:1", "cuda:1"),
    ],
)
def test_argparse_types_accept(parse, text, expected) -> None:
    assert parse(text) == expected


@pytest.mark.parametrize(
    ("parse", "text"),
    [
        (positive_int, "0"),
        (positive_int, "1.5"),
        (positive_float, "nan"),
        (positive_float, "inf"),
        (positive_float, "-1"),
        (json_object, "[1]"),
        (json_object, "{'a': 1}"),
        (json_object, "1" * 5000),
        (factory_spec, "mod"),
        (factory_spec, "mod:"),
        (factory_spec, ":f"),
        (factory_spec, "../mod:f"),
        (factory_spec, "mod:f()"),
        (device_name, "meta"),
        (device_name, "gpu"),
    ],
)
def test_argparse_types_refuse(parse, text) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse(text)


def test_build_module_checks_the_signature_before_calling(monkeypatch) -> None:
    calls = []

    def factory(width: int, depth: int = 2):
        calls.append((width, depth))

    module = types.ModuleType("kdistill_test_factories")
    module.factory = factory
    monkeypatch.setitem(sys.modules, module.__name__, module)
    with pytest.raises(UsageError, match=r"factory\(width, depth=2\) does not accept"):
        build_module("kdistill_test_factories:factory", {}, "--kw")
    assert calls == []  # refused before the call
    with pytest.raises(CLIError, match=r"returned a NoneType, not a torch\.nn\.Module"):
        build_module("kdistill_test_factories:factory", {"width": 3}, "--kw")
    assert calls == [(3, 2)]


def test_first_line() -> None:
    assert first_line(RuntimeError("\n  first \nsecond")) == "first"
    assert first_line(RuntimeError()) == ""
