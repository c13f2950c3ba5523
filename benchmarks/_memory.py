"""Peak-memory helpers shared by the benchmarks: the kernel's own RSS counters (Linux procfs).

``reset_peak_rss()`` then a step then ``proc_status_kb("VmHWM") - rss_before`` gives the step's peak
extra resident memory, allocator caches and temporaries included. ``run_isolated`` runs one
measurement in a fresh Python process, so the allocator caches of one cannot hide another's.
"""

import ctypes
import ctypes.util
import gc
import json
import subprocess
import sys
from pathlib import Path

__all__ = ["proc_status_kb", "reset_peak_rss", "run_isolated", "trim_heap"]


def proc_status_kb(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``None`` where there is no procfs)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (``VmHWM``) of this process; False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def trim_heap() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc ``malloc_trim``).

    Without it, memory a previous step freed stays in the process (and in its RSS), so a later
    step reusing it shows no extra peak. A no-op where glibc is not available.
    """
    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):
        return


def run_isolated(script: str, args: list[str], what: str) -> dict:
    """Run ``python script *args`` in a fresh process and return the JSON row it prints last.

    Raises:
        RuntimeError: The child failed; the message holds its stderr.
    """
    command = [sys.executable, str(Path(script).resolve()), *args]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"Benchmark of {what} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])
