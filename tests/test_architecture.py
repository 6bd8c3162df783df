"""The layering rules of docs/ARCHITECTURE.md, read from the package's own imports (no import runs).

- commands/ is on top: nothing else in the library imports it (only the CLI entry points);
- losses and kernels never import data or model (nor anything above them);
- no import circle among the modules, counting every import a module makes, at its top or
  inside a function (a circle through a function-level import still ties the two modules
  together); ``if TYPE_CHECKING:`` blocks never run and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "boxcaseg"
ENTRY_POINTS = {"boxcaseg.cli", "boxcaseg.__main__"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(module: str, node: ast.AST, is_package: bool) -> list[str]:
    """The boxcaseg modules an import statement loads (a ``from pkg import sub`` loads ``pkg.sub``)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        src = _resolve(module, node, is_package)
        names = [f"{src}.{a.name}" if f"{src}.{a.name}" in MODULES else src for a in node.names]
    out = []
    for name in names:
        while name and name not in MODULES:  # `import boxcaseg.x.y as z`, attribute paths
            name = name.rpartition(".")[0]
        if name.startswith("boxcaseg"):
            out.append(name)
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(module: str, tree: ast.Module, is_package: bool) -> set[str]:
    found: set[str] = set()

    def visit(body):
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.update(_targets(module, node, is_package))
            elif isinstance(node, ast.If) and _is_type_checking(node):
                visit(node.orelse)
            else:
                for child in ast.iter_child_nodes(node):
                    if isinstance(child, ast.stmt):
                        visit([child])
                    elif isinstance(child, ast.excepthandler):
                        visit(child.body)

    visit(tree.body)
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    """{module: the boxcaseg modules it imports}, for every module of the package."""
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[name] = _imports(name, tree, path.name == "__init__.py")
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def _in(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_the_graph_is_read():
    """The reader finds the imports a known module makes (guards the checks below against an empty graph)."""
    g = import_graph()
    assert len(g) > 50
    assert "boxcaseg.training.loop" in g["boxcaseg.train"] or "boxcaseg.training" in g["boxcaseg.train"]
    assert any(_in(m, "boxcaseg.commands") for m in g["boxcaseg.cli"])
    assert "boxcaseg.io" in g["boxcaseg.model.boxcaseg"]  # a function-level import counts


def test_nothing_in_the_library_imports_commands():
    g = import_graph()
    bad = [(m, t) for m, ts in g.items() for t in ts
           if _in(t, "boxcaseg.commands") and not _in(m, "boxcaseg.commands") and m not in ENTRY_POINTS]
    assert not bad, f"library modules importing commands/: {bad}"


ABOVE_LOSSES = ("boxcaseg.data", "boxcaseg.model", "boxcaseg.commands", "boxcaseg.train", "boxcaseg.training",
                "boxcaseg.proxy", "boxcaseg.export", "boxcaseg.maskrcnn", "boxcaseg.evaluate")


@pytest.mark.parametrize("low", ["boxcaseg.losses", "boxcaseg.kernels", "boxcaseg.imageops"])
def test_losses_and_kernels_import_neither_data_nor_model(low):
    g = import_graph()
    above = ABOVE_LOSSES + (() if low == "boxcaseg.losses" else ("boxcaseg.losses",))
    bad = [(m, t) for m, ts in g.items() if _in(m, low) for t in ts if _in(t, *above)]
    assert not bad, f"{low} imports from above it: {bad}"


def test_importing_the_objective_loads_neither_data_nor_model():
    """The same rule at run time: a fresh interpreter that imports the losses and the kernels'
    dispatcher has loaded no module of data/, model/ or commands/."""
    import subprocess
    import sys

    code = ("import sys, boxcaseg.losses, boxcaseg.kernels.dispatch\n"
            "print(sorted(m for m in sys.modules if m.startswith(('boxcaseg.data', 'boxcaseg.model', "
            "'boxcaseg.commands'))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_no_import_circle():
    found = cycles(import_graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_cycle_finder_finds_a_planted_circle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(g) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
