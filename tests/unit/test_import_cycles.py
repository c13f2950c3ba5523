"""No import cycles among kdistill's modules, and the arrows point one way (STYLE §11).

The import graph is read from the source with ``ast`` (module- and function-level imports, the
``if TYPE_CHECKING:`` blocks skipped), so late imports cannot hide a cycle. Checked at two
levels: between modules, and between the package's direct children (``kdistill.cache``,
``kdistill.cli``, ``kdistill.model``, ...), where ``a.x -> b.y`` and ``b.z -> a.w`` form a cycle.

``from P import name`` depends on ``P.name`` when that is a module, else on ``P`` (its
``__init__``). A package's ``__init__`` always runs before its submodules, so ``from . import
sibling`` inside ``P`` adds no dependency on ``P`` itself; ``from . import something_defined_in_P``
does (and, since ``P`` imports its submodules, that is the classic cycle).
"""

import ast
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"


def _module_names(root: Path, package: str) -> dict[str, Path]:
    modules = {}
    for path in (root / package).rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(child) for child in ast.walk(node))
    return skip


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """``{module: {modules of the package it imports}}`` for every module under ``root/package``."""
    modules = _module_names(root, package)

    def own(name: str) -> str | None:
        while name and name not in modules:  # the deepest own module the name lies in
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_nodes(tree)
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    base = node.module or ""
                else:
                    parts = name.split(".") if is_package else name.split(".")[:-1]
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join(parts + ([node.module] if node.module else []))
                ancestor = name == base or name.startswith(base + ".")
                for alias in node.names:
                    if f"{base}.{alias.name}" in modules:
                        targets.append(f"{base}.{alias.name}")
                    elif base != name:  # a name defined in `base`'s __init__
                        targets.append(base)
                if not ancestor:
                    targets.append(base)  # importing from P runs P's __init__
            for target in targets:
                dependency = own(target)
                if dependency is not None and dependency != name:
                    graph[name].add(dependency)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The components of more than one node (Tarjan's algorithm, iterative)."""
    nodes = set(graph) | {d for deps in graph.values() for d in deps}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in sorted(nodes):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return components


def import_cycles(root: Path, package: str) -> list[list[str]]:
    """Cycles between modules, then between the package's direct children."""
    graph = import_graph(root, package)
    cycles = strongly_connected(graph)

    def child(module: str) -> str:
        return ".".join(module.split(".")[:2])

    coarse: dict[str, set[str]] = {}
    for module, deps in graph.items():
        coarse.setdefault(child(module), set()).update(
            child(d) for d in deps if child(d) != child(module)
        )
    return cycles + [c for c in strongly_connected(coarse) if c not in cycles]


def test_kdistill_has_no_import_cycle() -> None:
    cycles = import_cycles(SRC, "kdistill")
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_arrows_point_one_way() -> None:
    graph = import_graph(SRC, "kdistill")
    for module, deps in graph.items():
        if not module.startswith("kdistill.cli") and module != "kdistill.__main__":
            assert not [d for d in deps if d.startswith("kdistill.cli")], f"{module} imports cli"
        if module.startswith("kdistill.cache"):
            bad = [
                d
                for d in deps
                if d == "kdistill" or d.startswith(("kdistill.demo", "kdistill.cli"))
            ]
            assert not bad, f"{module} (a library module) imports {bad}"
        if not module.startswith(("kdistill.cli", "kdistill.demo")):
            assert not [d for d in deps if d.startswith("kdistill.demo")], f"{module} imports demo"


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (  # a late (function-level) import still counts
            {
                "pkg/__init__.py": "",
                "pkg/a.py": "from .b import g\n",
                "pkg/b.py": "def g():\n    from .a import f\n",
            },
            [["pkg.a", "pkg.b"]],
        ),
        (  # a submodule importing a name from its own package's __init__
            {
                "pkg/__init__.py": "from .core import run\n__version__ = '1'\n",
                "pkg/core.py": "from . import __version__\ndef run(): ...\n",
            },
            [["pkg", "pkg.core"]],
        ),
        (  # a cycle between subpackages through different modules
            {
                "pkg/__init__.py": "",
                "pkg/lib/__init__.py": "",
                "pkg/lib/x.py": "import pkg.cli.y\n",
                "pkg/cli/__init__.py": "",
                "pkg/cli/y.py": "",
                "pkg/cli/z.py": "from pkg.lib import x\n",
            },
            [["pkg.cli", "pkg.lib"]],
        ),
        (  # not cycles: a sibling import, and imports only for type checkers
            {
                "pkg/__init__.py": "from .a import f\n",
                "pkg/a.py": "from . import b\nfrom typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from . import f\ndef f(): ...\n",
                "pkg/b.py": "",
            },
            [],
        ),
    ],
    ids=["late-import", "package-init", "subpackages", "none"],
)
def test_the_checker_finds_cycles(tmp_path, files, expected) -> None:
    _write(tmp_path, files)
    assert import_cycles(tmp_path, "pkg") == expected
