"""The layering rules of docs/ARCHITECTURE.md, read from the package's own imports (no import runs).

- commands/ is on top: nothing else in the library imports it (only the CLI entry points);
- losses, kernels and imageops import only from an allowed list (never data, model, the
  steps, predictor, config, ...);
- the steps are ordered: data/model/losses/training/weights -> export/proxy ->
  maskrcnn/evaluate, and no step package imports a later one;
- no import circle among the modules, nor among the top-level packages, counting every
  import a module makes, at its top or inside a function (a circle through a function-level
  import still ties the two modules together).

What counts as an import: ``import``/``from`` statements, ``importlib.import_module("...")``
and ``__import__("...")`` with a literal name, and the parent packages an import loads
(``from boxcaseg.proxy.tasks import x`` runs ``boxcaseg/proxy/__init__.py``).
``if TYPE_CHECKING:`` blocks never run and are left out, and so is a package's lazy
re-export (a module-level ``__getattr__`` in an ``__init__.py``: it loads on attribute access,
never on import).
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


def _loaded(module: str, name: str, is_package: bool) -> list[str]:
    """``name`` (a module path, maybe with attributes) as the boxcaseg modules importing it loads:
    the module and its parent packages that are not already loaded around ``module``."""
    while name and name not in MODULES:  # `import boxcaseg.x.y as z`, attribute paths
        name = name.rpartition(".")[0]
    if not name.startswith("boxcaseg"):
        return []
    own = module if is_package else module.rpartition(".")[0]
    out = []
    while name:
        if name in MODULES and not (own == name or own.startswith(name + ".")):
            out.append(name)
        name = name.rpartition(".")[0]
    return out


def _targets(module: str, node: ast.AST, is_package: bool) -> list[str]:
    """The boxcaseg modules an import statement or a literal ``importlib.import_module`` /
    ``__import__`` call loads (a ``from pkg import sub`` loads ``pkg.sub``, and ``pkg``)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        src = _resolve(module, node, is_package)
        names = [f"{src}.{a.name}" if f"{src}.{a.name}" in MODULES else src for a in node.names]
    else:  # a call: importlib.import_module("boxcaseg.x") / __import__("boxcaseg.x")
        names = [node.args[0].value]
    return [m for name in names for m in _loaded(module, name, is_package)]


def _is_import_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call) or not node.args:
        return False
    f = node.func
    named = (isinstance(f, ast.Name) and f.id in ("__import__", "import_module")) or (
        isinstance(f, ast.Attribute) and f.attr == "import_module")
    arg = node.args[0]
    return named and isinstance(arg, ast.Constant) and isinstance(arg.value, str)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _is_lazy_export(node: ast.AST, top: bool, is_package: bool) -> bool:
    return top and is_package and isinstance(node, ast.FunctionDef) and node.name == "__getattr__"


def _imports(module: str, tree: ast.Module, is_package: bool, lazy: set[str] | None = None) -> set[str]:
    """The modules ``module`` loads; a package's lazy re-exports go to ``lazy`` instead."""
    found: set[str] = set()

    def visit(node: ast.AST, into: set[str], top: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)) or _is_import_call(node):
            into.update(_targets(module, node, is_package))
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child, into, top)
            return
        if _is_lazy_export(node, top, is_package):
            into = lazy if lazy is not None else set()
        for child in ast.iter_child_nodes(node):
            visit(child, into, top and isinstance(node, ast.Module))

    visit(tree, found, True)
    found.discard(module)
    return found


def import_graph(lazy: dict[str, set[str]] | None = None) -> dict[str, set[str]]:
    """{module: the boxcaseg modules it imports}, for every module of the package (lazy
    re-exports into ``lazy``, when given)."""
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        found: set[str] = set()
        graph[name] = _imports(name, tree, path.name == "__init__.py", found)
        if lazy is not None and found:
            lazy[name] = found
    return graph


def parse_imports(module: str, source: str, is_package: bool = False) -> set[str]:
    """The modules a (planted) source text would load, read as if it were ``module``."""
    return _imports(module, ast.parse(source), is_package)


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph between top-level units (``boxcaseg.proxy``, ``boxcaseg.config``, ...)."""
    def unit(m: str) -> str:
        return ".".join(m.split(".")[:2])

    out: dict[str, set[str]] = {}
    for m, ts in graph.items():
        if m == "boxcaseg":
            continue
        out.setdefault(unit(m), set()).update(unit(t) for t in ts if unit(t) not in (unit(m), "boxcaseg"))
    return out


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
    assert "boxcaseg.training.loop" in g["boxcaseg.joint_training"] or "boxcaseg.training" in g["boxcaseg.joint_training"]
    assert any(_in(m, "boxcaseg.commands") for m in g["boxcaseg.cli"])
    assert "boxcaseg.io" in g["boxcaseg.model.boxcaseg"]  # a function-level import counts


def test_nothing_in_the_library_imports_commands():
    g = import_graph()
    bad = [(m, t) for m, ts in g.items() for t in ts
           if _in(t, "boxcaseg.commands") and not _in(m, "boxcaseg.commands") and m not in ENTRY_POINTS]
    assert not bad, f"library modules importing commands/: {bad}"


# what the bottom of the house may import (anything else -- data, model, the steps, predictor,
# demo, visualize, formats, cocojson, config, ... -- sits above it)
BELOW = {
    "boxcaseg.kernels": ("boxcaseg.kernels", "boxcaseg.errors"),
    "boxcaseg.imageops": ("boxcaseg.imageops", "boxcaseg.errors"),
    "boxcaseg.losses": ("boxcaseg.losses", "boxcaseg.kernels", "boxcaseg.imageops", "boxcaseg.errors"),
}
# the steps of the method, in order: a step package never imports a later step's
STEPS = (
    ("boxcaseg.data", "boxcaseg.model", "boxcaseg.losses", "boxcaseg.training", "boxcaseg.joint_training", "boxcaseg.weights"),
    ("boxcaseg.export", "boxcaseg.proxy"),
    ("boxcaseg.maskrcnn", "boxcaseg.evaluate"),
)


def below_violations(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return [(m, t) for low, allowed in BELOW.items() for m, ts in graph.items() if _in(m, low)
            for t in ts if not _in(t, *allowed)]


def step_violations(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    bad = []
    for k, step in enumerate(STEPS):
        later = [p for s in STEPS[k + 1:] for p in s]
        bad += [(m, t) for m, ts in graph.items() if _in(m, *step) for t in ts if _in(t, *later)]
    return bad


def test_the_bottom_imports_only_what_it_may():
    bad = below_violations(import_graph())
    assert not bad, f"losses/kernels/imageops import from above them: {bad}"


def test_the_steps_are_ordered():
    bad = step_violations(import_graph())
    assert not bad, f"a step imports a later step: {bad}"


def test_no_circle_between_packages():
    found = cycles(package_graph(import_graph()))
    assert not found, "package circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_lazy_exports_are_only_package_aliases():
    """The root's ``Segmenter`` (and any package's lazy names) load on attribute access only."""
    lazy: dict[str, set[str]] = {}
    import_graph(lazy)
    assert lazy.get("boxcaseg") == {"boxcaseg.predictor"}
    assert all((MODULES[m].name == "__init__.py") for m in lazy)


def test_planted_imports_are_seen():
    """What the reader must not miss: a function-level import of predictor inside kernels, an
    importlib call, a parent package's __init__, an import from a later step."""
    g = import_graph()
    planted = dict(g)
    src = "def f():\n    from boxcaseg.predictor import Segmenter\n    return Segmenter\n"
    planted["boxcaseg.kernels.dispatch"] = g["boxcaseg.kernels.dispatch"] | parse_imports(
        "boxcaseg.kernels.dispatch", src)
    assert ("boxcaseg.kernels.dispatch", "boxcaseg.predictor") in below_violations(planted)
    assert parse_imports("boxcaseg.kernels.dispatch", "import importlib\nimportlib.import_module('boxcaseg.config')\n") \
        == {"boxcaseg.config"}
    assert "boxcaseg.config" in parse_imports("boxcaseg.losses", "m = __import__('boxcaseg.config')\n")
    assert "boxcaseg.proxy" in parse_imports("boxcaseg.data.box_patches", "from boxcaseg.proxy.tasks import build_tasks\n")
    assert "boxcaseg.proxy" not in parse_imports("boxcaseg.proxy.tasks", "from boxcaseg.proxy.geometry import x\n")
    planted["boxcaseg.model.pack"] = g["boxcaseg.model.pack"] | parse_imports(
        "boxcaseg.model.pack", "def f():\n    import boxcaseg.export.onnx_export\n")
    assert ("boxcaseg.model.pack", "boxcaseg.export.onnx_export") in step_violations(planted)
    assert ("boxcaseg.model.pack", "boxcaseg.export") in step_violations(planted)  # its __init__ runs too
    planted["boxcaseg.evaluate.metrics"] = g["boxcaseg.evaluate.metrics"] | {"boxcaseg.proxy.tasks"}
    planted["boxcaseg.proxy.tasks"] = g["boxcaseg.proxy.tasks"] | {"boxcaseg.evaluate.metrics"}
    assert any({"boxcaseg.evaluate", "boxcaseg.proxy"} <= set(c) for c in cycles(package_graph(planted)))


def test_importing_a_proxy_reader_loads_no_pipeline():
    """Package __init__ files stay light: the COCO reader of the proxy loads neither the
    pipeline, the shards nor the torchrun glue."""
    import subprocess
    import sys

    code = ("import sys, boxcaseg.proxy.tasks\n"
            "print(sorted(m for m in sys.modules if m in ('boxcaseg.proxy.pipeline', 'boxcaseg.proxy.shards', "
            "'boxcaseg.proxy.distributed', 'boxcaseg.export', 'torch')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


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


#: The one inference path (proxy/image_masks.py): the post-processing steps it wraps are called
#: from there alone, so a change to them is made once for the proxy run, Segmenter and segment.
ONE_PATH = {"masks_from_probs": "boxcaseg.proxy.image_masks", "merge_and_drop": "boxcaseg.proxy.image_masks"}


def call_sites(name: str, sources: dict[str, str]) -> set[str]:
    """The modules of ``sources`` (module -> source text) that call a function named ``name``
    (``name(...)`` or ``anything.name(...)``)."""
    out = set()
    for module, source in sources.items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
                if called == name:
                    out.add(module)
    return out


def test_post_processing_is_called_from_the_one_masks_path():
    sources = {m: p.read_text() for m, p in MODULES.items()}
    for name, home in ONE_PATH.items():
        assert call_sites(name, sources) == {home}, f"{name} called outside {home}"
    # Segmenter, the proxy run's post-processing and its warm-up compose the path's stages
    assert "boxcaseg.predictor" in call_sites("image_masks", sources)
    assert {"boxcaseg.proxy.chunk_writer", "boxcaseg.proxy.pipeline"} <= call_sites("crop_masks", sources)
    assert {"boxcaseg.proxy.chunk_writer", "boxcaseg.proxy.pipeline"} <= call_sites("finish_image", sources)
    planted = dict(sources, **{"boxcaseg.predictor": "from boxcaseg.proxy import postprocess\n"
                                                     "postprocess.masks_from_probs(p, c, b, s)\n"})
    assert call_sites("masks_from_probs", planted) == {"boxcaseg.proxy.image_masks", "boxcaseg.predictor"}
