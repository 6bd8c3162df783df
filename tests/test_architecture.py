"""The layering rules of docs/ARCHITECTURE.md, read from the package's own imports (no import runs).

- every module of the package sits in one layer of ``LAYERS`` (bottom first), and no module
  reaches, through any chain of imports, a module of a higher layer: the steps are ordered
  (step 1 -> export -> proxy -> step 3), the Python API and the tools sit above them and
  commands/ on top (only the CLI entry points beside it);
- losses, kernels and imageops reach only an allowed list (``BOTTOM``), through any chain;
- no import circle among the modules, nor among the top-level packages, counting every
  import a module makes, at its top or inside a function;
- no module loads a module whose name is computed: an ``importlib.import_module`` /
  ``__import__`` call (under any name they are bound to) takes a literal name, with one
  exception read precisely, a package's lazy re-export (below); exec/eval and the
  importlib/runpy loaders are not used at all.

What counts as an import: ``import``/``from`` statements (relative ones too), anywhere in the
module; ``import_module("...")`` and ``__import__("...")`` calls with a literal name; and the
parent packages an import loads (``from boxcaseg.proxy.tasks import x`` runs
``boxcaseg/proxy/__init__.py``). ``if TYPE_CHECKING:`` blocks never run and are left out, and
so is a package's lazy re-export: the module-level ``__getattr__`` of an ``__init__.py``, whose
imports load on attribute access, never on import. Its only computed name allowed is
``import_module(f"{__name__}.{_EXPORTS[name]}")`` where ``_EXPORTS`` is a literal dict bound
once at module level and never changed: its values are read from the source as the targets.

The planted cases at the bottom copy the package's sources to a temporary folder, write the
violation into real source text and run the same reader and checks on the copy.
"""

from __future__ import annotations

import ast
import shutil
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "boxcaseg"
ROOT = PKG.name
ENTRY_POINTS = {"boxcaseg.cli", "boxcaseg.__main__"}

#: The layers, bottom first: a module may reach (through any chain of imports) only modules of
#: its own layer or of a lower one. An entry names a module, or a package and everything in it
#: (the root ``boxcaseg`` names only its own ``__init__.py``).
LAYERS = (
    ("errors", ("boxcaseg.errors",)),
    ("bottom: the objective", ("boxcaseg.imageops", "boxcaseg.kernels", "boxcaseg.losses")),
    ("foundation", ("boxcaseg", "boxcaseg.io", "boxcaseg.paths", "boxcaseg.dist", "boxcaseg.usercache",
                    "boxcaseg.images", "boxcaseg.boxes", "boxcaseg.masks", "boxcaseg.infer_settings",
                    "boxcaseg.cocojson", "boxcaseg.formats", "boxcaseg.config", "boxcaseg.report")),
    ("step 1: learn from boxes", ("boxcaseg.data", "boxcaseg.model", "boxcaseg.training",
                                  "boxcaseg.joint_training", "boxcaseg.weights")),
    ("step 2a: export and engines", ("boxcaseg.export", "boxcaseg.model_files")),
    ("step 2b: proxy masks", ("boxcaseg.proxy",)),
    ("step 3: Mask R-CNN and measuring", ("boxcaseg.maskrcnn", "boxcaseg.evaluate")),
    ("the Python API and tools", ("boxcaseg.predictor", "boxcaseg.baselines", "boxcaseg.visualize",
                                  "boxcaseg.demo")),
    ("commands", ("boxcaseg.commands", "boxcaseg.cli", "boxcaseg.__main__")),
)

#: What the bottom of the house may reach (anything else -- io, data, model, the steps,
#: predictor, config, ... -- sits above it; kernels never reach losses).
BOTTOM = {
    "boxcaseg.kernels": ("boxcaseg.kernels", "boxcaseg.errors"),
    "boxcaseg.imageops": ("boxcaseg.imageops", "boxcaseg.errors"),
    "boxcaseg.losses": ("boxcaseg.losses", "boxcaseg.kernels", "boxcaseg.imageops", "boxcaseg.errors"),
}

IMPORT_FUNCTIONS = ("import_module", "__import__")
#: Other ways to run code a reader cannot follow: none is used in the package.
CODE_LOADERS = ("exec", "eval", "spec_from_file_location", "module_from_spec", "exec_module", "load_module",
                "run_module", "run_path", "reload")


def _in(module: str, *packages: str) -> bool:
    """``module`` is one of ``packages`` or inside one (the root names only itself)."""
    return any(module == p or (p != ROOT and module.startswith(p + ".")) for p in packages)


def module_files(pkg: Path) -> dict[str, Path]:
    """{module name: its file} for every ``.py`` file under ``pkg`` (a package folder)."""
    out = {}
    for path in sorted(pkg.rglob("*.py")):
        parts = list(path.relative_to(pkg.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


# -- the reader ---------------------------------------------------------------------------------


@dataclass
class Graph:
    """What the reader found: ``eager`` {module: the package modules loading it loads},
    ``lazy`` {package: the modules its lazy re-exports load}, ``errors`` (``file:line: what``)
    for every import the reader cannot follow."""
    files: dict[str, Path]
    eager: dict[str, set[str]] = field(default_factory=dict)
    lazy: dict[str, set[str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


class _ModuleReader:
    """The imports of one module's source text (see the module docstring for what counts)."""

    def __init__(self, module: str, path: Path, source: str, known: dict[str, Path]):
        self.module, self.path, self.known = module, path, known
        self.is_package = path.name == "__init__.py"
        self.tree = ast.parse(source, str(path))
        self.eager: set[str] = set()
        self.lazy: set[str] = set()
        self.errors: list[str] = []
        self.getattr_arg: str | None = None  # the argument of a lazy re-export's __getattr__
        # the names import_module / __import__ are bound to in this module (any scope)
        self.functions = set(IMPORT_FUNCTIONS)
        for node in ast.walk(self.tree):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module in ("importlib", "builtins"):
                self.functions.update(a.asname or a.name for a in node.names if a.name in IMPORT_FUNCTIONS)
        self.exports = self._literal_exports()
        self._visit(self.tree, self.eager, top=True)
        self.eager.discard(module)

    def _error(self, node: ast.AST, what: str) -> None:
        self.errors.append(f"{self.path}:{getattr(node, 'lineno', 0)}: {what}")

    # what an import loads

    def _resolve(self, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = self.module.split(".") if self.is_package else self.module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def _loaded(self, name: str) -> list[str]:
        """``name`` (a module path, maybe with attributes) as this module loads it: the module
        and its parent packages that are not already loaded around this module."""
        while name and name not in self.known:  # `import boxcaseg.x.y as z`, attribute paths
            name = name.rpartition(".")[0]
        if not (name == ROOT or name.startswith(ROOT + ".")):
            return []
        own = self.module if self.is_package else self.module.rpartition(".")[0]
        out = []
        while name:
            if name in self.known and not (own == name or own.startswith(name + ".")):
                out.append(name)
            name = name.rpartition(".")[0]
        return out

    def _statement_targets(self, node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:  # `from pkg import sub` loads pkg.sub, and pkg
            src = self._resolve(node)
            names = [f"{src}.{a.name}" if f"{src}.{a.name}" in self.known else src for a in node.names]
        return [m for name in names for m in self._loaded(name)]

    # calls

    def _import_call(self, node: ast.Call) -> bool:
        f = node.func
        return (isinstance(f, ast.Name) and f.id in self.functions) or (
            isinstance(f, ast.Attribute) and f.attr in IMPORT_FUNCTIONS)

    def _call_targets(self, node: ast.Call, lazy: bool) -> list[str]:
        """The modules an import_module / __import__ call loads; an error if its name is computed."""
        kw = {k.arg: k.value for k in node.keywords}
        name = node.args[0] if node.args else kw.get("name")
        fromlist = node.args[3] if len(node.args) > 3 else kw.get("fromlist")
        if isinstance(name, ast.Constant) and isinstance(name.value, str):
            if name.value.startswith("."):
                self._error(node, f"a relative name in an import call ({name.value!r}): write the whole name")
                return []
            names = [name.value]
            if fromlist is not None:
                items = fromlist.elts if isinstance(fromlist, (ast.List, ast.Tuple)) else [fromlist]
                if not all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in items):
                    self._error(node, "__import__ with a computed fromlist")
                    return []
                names += [f"{name.value}.{e.value}" for e in items]
            return [m for n in names for m in self._loaded(n)]
        if lazy and self._is_lazy_export_call(name):
            return [m for v in self.exports.values() for m in self._loaded(f"{self.module}.{v}")]
        shown = ast.unparse(name) if name else "none"
        self._error(node, f"{ast.unparse(node.func)}(...) with a computed name ({shown})")
        return []

    def _literal_exports(self) -> dict[str, str]:
        """A package's ``_EXPORTS``: a literal {str: str} dict bound once at module level and
        never changed (assigned, mutated, declared global) anywhere else; {} otherwise."""
        if not self.is_package:
            return {}
        binds = [n for n in self.tree.body if isinstance(n, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in n.targets)]
        if len(binds) != 1 or len(binds[0].targets) != 1 or not isinstance(binds[0].value, ast.Dict):
            return {}
        d = binds[0].value
        if not all(isinstance(x, ast.Constant) and isinstance(x.value, str) for x in [*d.keys, *d.values]):
            return {}
        for n in ast.walk(self.tree):
            changed = (
                (isinstance(n, ast.Name) and n.id == "_EXPORTS" and not isinstance(n.ctx, ast.Load)
                 and n is not binds[0].targets[0])
                or (isinstance(n, (ast.Subscript, ast.Attribute)) and isinstance(n.value, ast.Name)
                    and n.value.id == "_EXPORTS" and (isinstance(n, ast.Attribute) or not isinstance(n.ctx, ast.Load)))
                or (isinstance(n, (ast.Global, ast.Nonlocal)) and "_EXPORTS" in n.names))
            if changed:
                return {}
        return {k.value: v.value for k, v in zip(d.keys, d.values)}

    def _is_lazy_export_call(self, name: ast.AST | None) -> bool:
        """``f"{__name__}.{_EXPORTS[<the __getattr__ argument>]}"`` over a literal ``_EXPORTS``."""
        if not self.exports or not isinstance(name, ast.JoinedStr) or len(name.values) != 3:
            return False
        head, dot, tail = name.values
        return (isinstance(head, ast.FormattedValue) and isinstance(head.value, ast.Name)
                and head.value.id == "__name__" and head.conversion == -1 and head.format_spec is None
                and isinstance(dot, ast.Constant) and dot.value == "."
                and isinstance(tail, ast.FormattedValue) and tail.conversion == -1 and tail.format_spec is None
                and isinstance(tail.value, ast.Subscript) and isinstance(tail.value.value, ast.Name)
                and tail.value.value.id == "_EXPORTS" and isinstance(tail.value.slice, ast.Name)
                and tail.value.slice.id == self.getattr_arg)

    # the walk

    def _visit(self, node: ast.AST, into: set[str], top: bool, lazy: bool = False) -> None:
        if isinstance(node, ast.If) and self._is_type_checking(node):
            for child in node.orelse:
                self._visit(child, into, top, lazy)
            return
        if (top and self.is_package and isinstance(node, ast.FunctionDef) and node.name == "__getattr__"
                and node.args.args):  # the lazy re-export: loads on attribute access
            into, lazy = self.lazy, True
            self.getattr_arg = node.args.args[0].arg
        children = list(ast.iter_child_nodes(node))
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            into.update(self._statement_targets(node))
        elif isinstance(node, ast.Call):
            f = node.func
            if self._import_call(node):
                into.update(self._call_targets(node, lazy))
                children.remove(f)  # the call's own name is no loose reference
                if isinstance(f, ast.Attribute):
                    children.append(f.value)
            elif (isinstance(f, ast.Name) and f.id in CODE_LOADERS) or (
                    isinstance(f, ast.Attribute) and f.attr in CODE_LOADERS and f.attr != "eval"):
                self._error(node, f"{ast.unparse(f)}(...) runs code this reader cannot follow")
            elif (isinstance(f, ast.Name) and f.id == "getattr" and len(node.args) > 1
                  and isinstance(node.args[1], ast.Constant) and node.args[1].value in IMPORT_FUNCTIONS):
                self._error(node, f"{ast.unparse(node)}: an import function reached through getattr")
        elif (isinstance(node, ast.Name) and node.id in self.functions) or (
                isinstance(node, ast.Attribute) and node.attr in IMPORT_FUNCTIONS):
            self._error(node, f"{ast.unparse(node)} used other than in a direct call (its name cannot be read)")
        for child in children:
            self._visit(child, into, top and isinstance(node, ast.Module), lazy)

    @staticmethod
    def _is_type_checking(node: ast.If) -> bool:
        t = node.test
        return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
            isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def import_graph(pkg: Path = PKG) -> Graph:
    """The imports of every module of the package under ``pkg`` (its sources, read, not run)."""
    files = module_files(pkg)
    graph = Graph(files)
    for name, path in files.items():
        r = _ModuleReader(name, path, path.read_text(), files)
        graph.eager[name] = r.eager
        if r.lazy:
            graph.lazy[name] = r.lazy
        graph.errors += r.errors
    return graph


# -- the checks -----------------------------------------------------------------------------------


def reach(graph: dict[str, set[str]], start: str) -> dict[str, list[str]]:
    """{module: the shortest chain of imports from ``start`` to it} for every module ``start`` loads."""
    chains = {start: [start]}
    todo = deque([start])
    while todo:
        m = todo.popleft()
        for t in sorted(graph.get(m, ())):
            if t not in chains:
                chains[t] = chains[m] + [t]
                todo.append(t)
    del chains[start]
    return chains


def layer_of(module: str) -> list[int]:
    return [k for k, (_, members) in enumerate(LAYERS) if _in(module, *members)]


def unplaced(graph: Graph) -> list[str]:
    """The modules in no layer, or in more than one."""
    return sorted(m for m in graph.files if len(layer_of(m)) != 1)


def layer_violations(graph: Graph) -> list[tuple[str, str, str]]:
    """(module, a module of a higher layer it reaches, the chain) for every such pair."""
    bad = []
    for m in sorted(graph.eager):
        for t, chain in reach(graph.eager, m).items():
            if layer_of(m) and layer_of(t) and layer_of(t)[0] > layer_of(m)[0]:
                bad.append((m, t, " -> ".join(chain)))
    return bad


def bottom_violations(graph: Graph) -> list[tuple[str, str, str]]:
    """(a module of the bottom, a module outside its allowed list it reaches, the chain)."""
    return [(m, t, " -> ".join(chain)) for low, allowed in BOTTOM.items() for m in sorted(graph.eager)
            if _in(m, low) for t, chain in reach(graph.eager, m).items() if not _in(t, *allowed)]


def commands_violations(graph: Graph) -> list[tuple[str, str, str]]:
    return [(m, t, " -> ".join(chain)) for m in sorted(graph.eager)
            if not _in(m, "boxcaseg.commands") and m not in ENTRY_POINTS
            for t, chain in reach(graph.eager, m).items() if _in(t, "boxcaseg.commands")]


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph between top-level units (``boxcaseg.proxy``, ``boxcaseg.config``, ...)."""
    def unit(m: str) -> str:
        return ".".join(m.split(".")[:2])

    out: dict[str, set[str]] = {}
    for m, ts in graph.items():
        if m == ROOT:
            continue
        out.setdefault(unit(m), set()).update(unit(t) for t in ts if unit(t) not in (unit(m), ROOT))
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


def _lines(bad) -> str:
    return "\n  ".join(chain for *_, chain in bad[:20]) + (f"\n  ... {len(bad) - 20} more" if len(bad) > 20 else "")


# -- the package today ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph() -> Graph:
    return import_graph()


def test_the_graph_is_read(graph):
    """The reader finds the imports known modules make (guards the checks below against an empty graph)."""
    g = graph.eager
    assert len(g) > 50
    assert "boxcaseg.training" in g["boxcaseg.joint_training"]
    assert any(_in(m, "boxcaseg.commands") for m in g["boxcaseg.cli"])
    assert "boxcaseg.io" in g["boxcaseg.model.boxcaseg"]  # a function-level import counts
    assert "boxcaseg.export.onnx_export" in g["boxcaseg.model_files"]  # function-level too
    assert graph.lazy["boxcaseg.export"] >= {"boxcaseg.export.engines", "boxcaseg.export.wrapper"}


def test_every_import_has_a_literal_name(graph):
    assert not graph.errors, "imports the reader cannot follow:\n  " + "\n  ".join(graph.errors)


def test_every_module_is_in_one_layer(graph):
    assert not unplaced(graph), f"modules in no layer of LAYERS (or in several): {unplaced(graph)}"


def test_no_module_reaches_a_higher_layer(graph):
    bad = layer_violations(graph)
    assert not bad, "modules reaching a higher layer:\n  " + _lines(bad)


def test_the_bottom_reaches_only_what_it_may(graph):
    bad = bottom_violations(graph)
    assert not bad, "losses/kernels/imageops reach modules above them:\n  " + _lines(bad)


def test_nothing_in_the_library_imports_commands(graph):
    bad = commands_violations(graph)
    assert not bad, "library modules reaching commands/:\n  " + _lines(bad)


def test_no_circle_between_packages(graph):
    found = cycles(package_graph(graph.eager))
    assert not found, "package circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_lazy_exports_are_only_package_aliases(graph):
    """The root's ``Segmenter`` loads on attribute access only; any other package's lazy names
    are its own submodules."""
    assert graph.lazy.get(ROOT) == {"boxcaseg.predictor"}
    for pkg, targets in graph.lazy.items():
        assert graph.files[pkg].name == "__init__.py"
        if pkg != ROOT:
            assert all(t.startswith(pkg + ".") for t in targets), (pkg, targets)


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


# -- planted cases: real source text in a copy of the package, read by the same reader ----------


def copy_sources(folder: Path) -> Path:
    """A copy of the package's sources (its ``.py`` files) in ``folder``; the copy's package folder."""
    shutil.copytree(PKG, folder / ROOT, ignore=lambda d, names: [
        n for n in names if n == "__pycache__" or not (n.endswith(".py") or (Path(d) / n).is_dir())])
    return folder / ROOT


@pytest.fixture
def copy(tmp_path) -> Path:
    return copy_sources(tmp_path / "first")


def plant(pkg: Path, rel: str, source: str) -> Path:
    """Append ``source`` to the module file ``rel`` of the copy (a new file if there is none)."""
    path = pkg / rel
    path.write_text((path.read_text() + "\n\n" if path.exists() else "") + source)
    return path


def test_the_copy_passes_before_planting(copy):
    """The planted cases below fail because of what they plant, not because of the copy."""
    g = import_graph(copy)
    assert g.eager == import_graph().eager
    assert not (g.errors or unplaced(g) or layer_violations(g) or bottom_violations(g)
                or cycles(g.eager) or cycles(package_graph(g.eager)))


def test_planted_aliased_import_module_circle_between_subpackages(copy):
    """data <-> model through function-level import_module calls under aliases: both sit in
    step 1, so only the circle checks can see it, and they do."""
    plant(copy, "data/transforms.py", "def _late():\n    import importlib as il\n\n"
                                      "    return il.import_module('boxcaseg.model.heads')\n")
    plant(copy, "model/heads.py", "def _late():\n    from importlib import import_module as load\n\n"
                                  "    return load('boxcaseg.data.transforms')\n")
    g = import_graph(copy)
    assert "boxcaseg.model.heads" in g.eager["boxcaseg.data.transforms"]
    assert {"boxcaseg.data.transforms", "boxcaseg.data"} <= g.eager["boxcaseg.model.heads"]
    assert any({"boxcaseg.data", "boxcaseg.model"} <= set(c) for c in cycles(package_graph(g.eager)))
    assert any({"boxcaseg.data.transforms", "boxcaseg.model.heads"} <= set(c) for c in cycles(g.eager))
    assert not g.errors


def test_planted_import_module_with_a_computed_name(copy):
    path = plant(copy, "evaluate/tables.py", "def _late(part):\n    import importlib\n\n"
                                             "    return importlib.import_module('boxcaseg.' + part)\n")
    plant(copy, "training/state.py", "def _late(part):\n    from importlib import import_module as im\n\n"
                                     "    return im(f'boxcaseg.{part}')\n")
    g = import_graph(copy)
    assert len(g.errors) == 2
    line = len(path.read_text().splitlines())
    assert g.errors[0].startswith(f"{path}:{line}: importlib.import_module(...) with a computed name")
    assert "training/state.py" in g.errors[1] and "im(...) with a computed name" in g.errors[1]


def test_planted_dunder_import(copy):
    """``__import__`` with a literal name is an import (a step violation here); with a computed
    name, through getattr or passed around, an error."""
    plant(copy, "training/loop.py", "def _late():\n    return __import__('boxcaseg.proxy.tasks')\n")
    plant(copy, "data/voc.py", "import builtins\n\n\ndef _late(n):\n    return builtins.__import__(n)\n")
    plant(copy, "model/pack.py", "def _late(n):\n    return getattr(__builtins__, '__import__')(n)\n")
    plant(copy, "weights/__init__.py", "import importlib\n\nLOAD = importlib.import_module\n")
    g = import_graph(copy)
    assert {"boxcaseg.proxy.tasks", "boxcaseg.proxy"} <= g.eager["boxcaseg.training.loop"]
    assert ("boxcaseg.training.loop", "boxcaseg.proxy.tasks") in [(m, t) for m, t, _ in layer_violations(g)]
    assert [e.split(": ", 1)[1] for e in g.errors] == [
        "builtins.__import__(...) with a computed name (n)",
        "getattr(__builtins__, '__import__'): an import function reached through getattr",
        "importlib.import_module used other than in a direct call (its name cannot be read)"]


def test_planted_function_level_predictor_import_in_training(copy):
    """A function-level ``from boxcaseg.predictor import Segmenter`` in training/ is a step
    violation, and so is reaching predictor through a module of training's own layer."""
    plant(copy, "training/loop.py", "def _late():\n    from boxcaseg.predictor import Segmenter\n\n"
                                    "    return Segmenter\n")
    g = import_graph(copy)
    bad = {(m, t): chain for m, t, chain in layer_violations(g)}
    assert ("boxcaseg.training.loop", "boxcaseg.predictor") in bad
    assert ("boxcaseg.training.loop", "boxcaseg.proxy.image_masks") in bad  # predictor's own imports
    # through a chain: weights (step 1, which training may import) imports predictor
    copy2 = copy_sources(copy.parent.parent / "second")
    plant(copy2, "training/state.py", "def _late():\n    from boxcaseg import weights\n\n    return weights\n")
    plant(copy2, "weights/__init__.py", "def _late():\n    from boxcaseg.predictor import Segmenter\n\n"
                                        "    return Segmenter\n")
    g2 = import_graph(copy2)
    assert "boxcaseg.predictor" not in g2.eager["boxcaseg.training.state"]  # not a direct edge
    bad2 = {(m, t): chain for m, t, chain in layer_violations(g2)}
    assert bad2[("boxcaseg.training.state", "boxcaseg.predictor")] == \
        "boxcaseg.training.state -> boxcaseg.weights -> boxcaseg.predictor"
    assert ("boxcaseg.training.loop", "boxcaseg.predictor") in bad2  # loop imports state


def test_planted_bottom_reaches_above_through_errors(copy):
    """kernels may import errors; errors importing io puts io within the kernels' reach."""
    plant(copy, "errors.py", "def _late():\n    from boxcaseg import io\n\n    return io\n")
    g = import_graph(copy)
    bad = {(m, t): chain for m, t, chain in bottom_violations(g)}
    assert bad[("boxcaseg.kernels.dispatch", "boxcaseg.io")] == \
        "boxcaseg.kernels.dispatch -> boxcaseg.errors -> boxcaseg.io"


def test_planted_module_without_a_layer(copy):
    plant(copy, "newthing.py", "X = 1\n")
    plant(copy, "proxy/extra.py", "X = 1\n")  # inside a package: its layer
    assert unplaced(import_graph(copy)) == ["boxcaseg.newthing"]


def test_planted_relative_and_parent_package_imports(copy):
    plant(copy, "kernels/maps.py", "def _late():\n    from ..proxy import tasks\n\n    return tasks\n")
    plant(copy, "data/sampler.py", "def _late():\n    from boxcaseg.proxy.tasks import build_tasks\n\n"
                                   "    return build_tasks\n")
    g = import_graph(copy)
    assert {"boxcaseg.proxy", "boxcaseg.proxy.tasks"} <= g.eager["boxcaseg.kernels.maps"]
    assert {"boxcaseg.proxy", "boxcaseg.proxy.tasks"} <= g.eager["boxcaseg.data.sampler"]  # its __init__ runs
    assert "boxcaseg.proxy" not in g.eager["boxcaseg.proxy.tasks"]  # already loaded around it
    assert ("boxcaseg.kernels.maps", "boxcaseg.proxy.tasks") in [(m, t) for m, t, _ in bottom_violations(g)]
    assert ("boxcaseg.data.sampler", "boxcaseg.proxy") in [(m, t) for m, t, _ in layer_violations(g)]


@pytest.mark.parametrize("change", [
    "_EXPORTS['late'] = 'pipeline'\n",
    "_EXPORTS.update(late='pipeline')\n",
    "_EXPORTS = dict(_EXPORTS, late='pipeline')\n",
    "def _more():\n    global _EXPORTS\n    _EXPORTS = {}\n",
])
def test_planted_lazy_export_table_that_changes(copy, change):
    """The lazy re-export is recognised only over a literal ``_EXPORTS`` nobody changes."""
    plant(copy, "proxy/__init__.py", change)
    g = import_graph(copy)
    assert [e.split(": ", 1)[1] for e in g.errors] == [
        "importlib.import_module(...) with a computed name (f'{__name__}.{_EXPORTS[name]}')"]


def test_planted_lazy_export_pattern_outside_a_package_getattr(copy):
    plant(copy, "proxy/tasks.py", "import importlib\n\n_EXPORTS = {'x': 'geometry'}\n\n\n"
                                  "def __getattr__(name):\n"
                                  "    return importlib.import_module(f'{__name__}.{_EXPORTS[name]}')\n")
    g = import_graph(copy)
    assert len(g.errors) == 1 and "proxy/tasks.py" in g.errors[0] and "computed name" in g.errors[0]


def test_planted_lazy_export_reads_its_targets(copy):
    """A new lazy name is read from the table: its module is a lazy target, not an eager one."""
    plant(copy, "proxy/__init__.py", "")
    path = copy / "proxy/__init__.py"
    path.write_text(path.read_text().replace('"merge_shards": "shards",', '"merge_shards": "shards", "X": "report",'))
    g = import_graph(copy)
    assert "boxcaseg.proxy.report" in g.lazy["boxcaseg.proxy"] - import_graph().lazy["boxcaseg.proxy"]
    assert "boxcaseg.proxy.report" not in g.eager["boxcaseg.proxy"]
    assert not g.errors


def test_planted_code_loaders(copy):
    plant(copy, "report.py", "def _late(p):\n    import runpy\n\n    return runpy.run_path(p)\n")
    plant(copy, "dist.py", "def _late(s):\n    exec(s)\n")
    errors = [e.split(": ", 1)[1] for e in import_graph(copy).errors]
    assert errors == ["exec(...) runs code this reader cannot follow",
                      "runpy.run_path(...) runs code this reader cannot follow"]


def test_no_import_circle(graph):
    found = cycles(graph.eager)
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_cycle_finder_finds_a_planted_circle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(g) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


#: The one inference path (proxy/image_masks.py): the post-processing steps it wraps are called
#: from there alone, so a change to them is made once for the proxy run, Segmenter and segment.
ONE_PATH = {"masks_from_probs": "boxcaseg.proxy.image_masks", "merge_masks": "boxcaseg.proxy.image_masks"}


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
    sources = {m: p.read_text() for m, p in module_files(PKG).items()}
    for name, home in ONE_PATH.items():
        assert call_sites(name, sources) == {home}, f"{name} called outside {home}"
    # Segmenter, the proxy run's post-processing and its warm-up compose the path's stages
    assert "boxcaseg.predictor" in call_sites("image_masks", sources)
    assert {"boxcaseg.proxy.chunk_writer", "boxcaseg.proxy.pipeline"} <= call_sites("crop_masks", sources)
    assert {"boxcaseg.proxy.chunk_writer", "boxcaseg.proxy.pipeline"} <= call_sites("finish_image", sources)
    planted = dict(sources, **{"boxcaseg.predictor": "from boxcaseg.proxy import postprocess\n"
                                                     "postprocess.masks_from_probs(p, c, b, s)\n"})
    assert call_sites("masks_from_probs", planted) == {"boxcaseg.proxy.image_masks", "boxcaseg.predictor"}
