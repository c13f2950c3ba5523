"""Every Python block of README.md and docs/*.md runs as written (issue 17): the docs cannot drift.

Each ```python block runs in a fresh interpreter in an empty folder, offline. A block preceded by
the line ``<!-- run: torchrun -->`` runs under ``torchrun --nproc_per_node=2`` (gloo on CPU).
"""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"(?:<!-- run: (?P<how>[a-z]+) -->\n)?```python\n(?P<code>.*?)```", re.S)


def _blocks() -> list[tuple[str, str, str]]:
    """``(id, how, code)`` of every Python block; the id is ``file:line``."""
    blocks = []
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        for match in _BLOCK.finditer(text):
            line = text[: match.start("code")].count("\n")
            blocks.append(
                (f"{document.name}:{line}", match.group("how") or "python", match.group("code"))
            )
    return blocks


BLOCKS = _blocks()
_TIMEOUT_S = 300


def test_the_docs_have_runnable_examples():
    names = {block_id.split(":")[0] for block_id, _, _ in BLOCKS}
    assert "README.md" in names and len(BLOCKS) >= 8, BLOCKS


def test_only_known_runners_are_named():
    assert {how for _, how, _ in BLOCKS} <= {"python", "torchrun"}


@pytest.mark.integration
@pytest.mark.parametrize(("block_id", "how", "code"), BLOCKS, ids=[b[0] for b in BLOCKS])
def test_block_runs_as_written(block_id, how, code, tmp_path):
    for module in ("transformers", "lightning"):
        if f"import {module}" in code or f"from {module} " in code:
            pytest.importorskip(module)
    script = tmp_path / "example.py"
    script.write_text(code, encoding="utf-8")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])
        ),
    }
    if how == "torchrun":
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
        ]
    else:
        command = [sys.executable, str(script)]
    # its own session, so that a hang kills torchrun's workers too, not only the launcher
    process = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(
            f"{block_id} did not finish in {_TIMEOUT_S} s:\n{stdout[-2000:]}\n{stderr[-4000:]}"
        )
    assert process.returncode == 0, (
        f"{block_id} failed (exit {process.returncode}):\n{stdout[-2000:]}\n{stderr[-4000:]}"
    )
