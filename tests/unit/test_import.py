"""``import kdistill`` stays lean: no optional packages (beyond what torch itself imports), no CUDA,
no global torch flag changes."""

import subprocess
import sys
import textwrap


def run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_import_does_not_pull_optional_packages_or_cuda():
    out = run("""
        import sys, torch
        before = set(sys.modules)
        flags = (torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled(),
                 torch.get_float32_matmul_precision(), torch.is_grad_enabled(),
                 torch.backends.cudnn.benchmark)
        import kdistill
        after = (torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled(),
                 torch.get_float32_matmul_precision(), torch.is_grad_enabled(),
                 torch.backends.cudnn.benchmark)
        heavy = [m for m in ("transformers", "lightning", "pytorch_lightning", "matplotlib",
                             "tqdm", "sklearn", "modelopt", "safetensors", "pydantic")
                 if m in set(sys.modules) - before]
        print(heavy, flags == after, torch.cuda.is_initialized())
    """)
    assert out == "[] True False"
