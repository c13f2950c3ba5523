"""Shared set-up of the adversarial teacher-cache tests: a real cache, its reference values, and a
snapshot of everything outside the cache directory (which no attack may change)."""

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from kdistill.cache import TeacherCache
from kdistill.testing.models import TinyMLP

VICTIM_TEXT = "precious bytes outside the cache"
LAYERS = ["fc2", ""]
TOP_K = {"": 3}


def make_teacher_and_loader() -> tuple[TinyMLP, DataLoader]:
    """A fixed tiny teacher and 20 samples in batches of 6 (4 batches, one shard each)."""
    generator = torch.Generator().manual_seed(0)
    teacher = TinyMLP(16, 32, 10)
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    data = TensorDataset(torch.arange(20) + 100, torch.randn(20, 16, generator=generator))
    return teacher, DataLoader(data, batch_size=6)


def build(path: Path, teacher: TinyMLP, loader: DataLoader, **kwargs: Any) -> TeacherCache:
    """Build (or resume) the attack's cache: a full layer and a top-3 output, float32."""
    kwargs = {"layers": LAYERS, "top_k": TOP_K, "dtype": torch.float32, "shard_bytes": 1} | kwargs
    return TeacherCache.build(teacher, loader, path, progress=False, **kwargs)


def read_all(cache: TeacherCache) -> dict[str, tuple[torch.Tensor, ...]]:
    """Every cached field of every sample, by layer (reads, and so verifies, every shard)."""
    rows = cache.locate(torch.arange(20) + 100)
    return {layer: cache.gather(layer, rows) for layer in cache.layers}


def same_values(a: dict, b: dict) -> bool:
    """Whether two ``read_all`` results hold bit-identical tensors."""
    return a.keys() == b.keys() and all(
        len(a[k]) == len(b[k]) and all(torch.equal(x, y) for x, y in zip(a[k], b[k], strict=True))
        for k in a
    )


def plant_victims(root: Path) -> None:
    """Files outside the cache that attacks aim at (a file, and one in a sibling directory)."""
    (root / "victim.txt").write_text(VICTIM_TEXT)
    (root / "outside").mkdir()
    (root / "outside" / "secret.bin").write_bytes(os.urandom(256))


def snapshot(root: Path, exclude: Path) -> dict[str, Any]:
    """Type, bytes, link target and mode of everything under ``root`` except ``exclude``."""
    state: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == exclude or exclude in here.parents:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            path = here / name
            if path == exclude:
                continue
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                state[str(path)] = ("link", os.readlink(path))
            elif stat.S_ISREG(info.st_mode):
                state[str(path)] = ("file", path.read_bytes(), stat.S_IMODE(info.st_mode))
            else:
                state[str(path)] = ("other", stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode))
    return state


def copy_cache(source: Path, target: Path) -> None:
    """A fresh copy of a cache directory (regular files only)."""
    shutil.copytree(source, target)


def load_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the cache at ``path``, as JSON."""
    return json.loads((path / "manifest.json").read_text())


def save_manifest(path: Path, manifest: Any) -> None:
    """Write a (tampered) manifest as an attacker would: plain JSON, NaN allowed."""
    (path / "manifest.json").write_text(json.dumps(manifest, allow_nan=True))
