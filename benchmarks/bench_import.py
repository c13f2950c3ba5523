"""Time ``import kdistill`` against ``import torch`` alone (and ModelOpt's distill when installed).

Every import runs in a fresh Python subprocess (nothing cached in ``sys.modules``); rounds are
interleaved (torch, kdistill, modelopt, then rotated) and the median of ``--repeats`` rounds is
reported. For a package other than torch the subprocess imports torch first and then the
package, so the row gives both the total and the package's own cost on top of torch. It also
lists which heavy optional packages the import added to those torch itself loads
(``import kdistill`` must add none).

Commands (from the repository root):
    .venv/bin/python benchmarks/bench_import.py                  # 7 rounds
    .venv/bin/python benchmarks/bench_import.py --tiny           # smoke run: 1 round, no ModelOpt
    .venv/bin/python benchmarks/bench_import.py --output benchmarks/results/import.jsonl
"""

import argparse
import importlib.util
import json
import subprocess
import sys

from _timing import environment, format_table, median, write_rows

# Optional packages that ``import kdistill`` must never load (see STYLE.md §3).
HEAVY = ("transformers", "lightning", "pytorch_lightning", "matplotlib", "tqdm", "pandas")

_PROBE = """
import json, sys, time
start = time.perf_counter()
import torch
after_torch = time.perf_counter()
loaded_by_torch = set(sys.modules)
if {module!r} != "torch":
    import warnings
    warnings.simplefilter("ignore")
    import {module}
end = time.perf_counter()
if {module!r} == "torch":
    loaded_by_torch = set()
heavy = sorted(n for n in {heavy!r} if n in sys.modules and n not in loaded_by_torch)
print(json.dumps({{"torch_s": after_torch - start, "total_s": end - start, "heavy": heavy}}))
"""


def time_import(module: str) -> dict:
    """Import ``module`` (after torch) in a fresh interpreter; return its timings in seconds."""
    result = subprocess.run(
        [sys.executable, "-c", _PROBE.format(module=module, heavy=HEAVY)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"`import {module}` failed in a subprocess:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--modelopt",
        choices=["auto", "on", "off"],
        default="auto",
        help="time `import modelopt.torch.distill` too: auto = when installed",
    )
    parser.add_argument("--tiny", action="store_true", help="smoke run: 1 round, no ModelOpt")
    parser.add_argument("--output", default=None, help="write rows to this .jsonl or .csv file")
    args = parser.parse_args(argv)
    if args.tiny:
        args.repeats, args.modelopt = 1, "off"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    modules = ["torch", "kdistill"]
    has_modelopt = importlib.util.find_spec("modelopt") is not None
    if args.modelopt == "on" and not has_modelopt:
        print("--modelopt on: nvidia-modelopt is not installed.", file=sys.stderr)
        return 2
    if args.modelopt == "on" or (args.modelopt == "auto" and has_modelopt):
        modules.append("modelopt.torch.distill")
    samples: dict[str, list[dict]] = {module: [] for module in modules}
    for round_index in range(args.repeats):
        shift = round_index % len(modules)
        for module in modules[shift:] + modules[:shift]:
            samples[module].append(time_import(module))
    torch_alone = median([s["total_s"] for s in samples["torch"]])
    rows = []
    for module in modules:
        total = median([s["total_s"] for s in samples[module]])
        own = median([s["total_s"] - s["torch_s"] for s in samples[module]])
        rows.append(
            {
                "import": module,
                "total_ms": total * 1e3,
                "own_ms": own * 1e3 if module != "torch" else None,
                "ratio_vs_torch": total / torch_alone,
                "heavy_added": ",".join(samples[module][-1]["heavy"]) or "-",
                "repeats": args.repeats,
            }
        )
    env = environment("cpu")
    print(f"python {env['python']}, torch {env['torch']}, {env['cpu']}, commit {env['commit']}")
    print(format_table(rows, ["import", "total_ms", "own_ms", "ratio_vs_torch", "heavy_added"]))
    if args.output:
        write_rows([{**row, **env} for row in rows], args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
