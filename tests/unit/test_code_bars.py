"""Issue 12's bars on the source, checked with `ast`: no function over 100 lines, no import cycle between
the modules of src/mole_trainer, and nothing that unpickles arbitrary objects (torch.load only with an
explicit weights_only=True, no pickle-family loads). Each checker is first tried on small synthetic
sources, so a checker that finds nothing is caught too."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

PACKAGE = "mole_trainer"
SRC = Path(__file__).resolve().parents[2] / "src" / PACKAGE
MAX_FUNCTION_LINES = 100  # issue 12: "no function over 100 lines in src"

# callables that unpickle (run arbitrary code from) their input: dotted name after import aliases
UNPICKLERS = {
    f"{module}.{name}"
    for module in ("pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal")
    for name in ("load", "loads", "Unpickler")
} | {"pandas.read_pickle", "shelve.open"}
TORCH_LOADS = {"torch.load", "torch.serialization.load"}
NUMPY_LOADS = {"numpy.load"}  # unpickles only with allow_pickle=True


class Source:
    """One module of a package: its dotted name, whether it is a package's __init__, its file and tree."""

    def __init__(self, name: str, text: str, is_package: bool = False, path: str | None = None):
        self.name, self.is_package = name, is_package
        self.path = path or name.replace(".", "/") + ("/__init__.py" if is_package else ".py")
        self.tree = ast.parse(text, filename=self.path)


def package_sources(root: Path = SRC, package: str = PACKAGE) -> dict[str, Source]:
    """{dotted module name: Source} of every .py file under `root` (a package's __init__ is the package)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        out[name] = Source(name, path.read_text(), is_package, str(path.relative_to(root.parent)))
    return out


def synthetic(modules: dict[str, str]) -> dict[str, Source]:
    """Sources from {name: text}; a name ending in '/' is a package (its __init__)."""
    return {
        name.rstrip("/"): Source(name.rstrip("/"), textwrap.dedent(text), name.endswith("/"))
        for name, text in modules.items()
    }


# --- (a) function length ---------------------------------------------------------------------------------


def long_functions(sources: dict[str, Source], limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """'path:line name (N lines)' of every function or method, nested ones too, longer than `limit` lines
    (from its `def` line to its last line, decorators not counted)."""
    found = []
    for src in sources.values():
        for node in ast.walk(src.tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append((src.path, node.lineno, f"{node.name} ({lines} lines)"))
    return [f"{path}:{line} {what}" for path, line, what in sorted(found)]


# --- (b) import cycles -----------------------------------------------------------------------------------


def _absolute(src: Source, node: ast.ImportFrom) -> str:
    """The module a `from ... import` names, relative levels resolved against `src`'s package."""
    if not node.level:
        return node.module or ""
    package = src.name.split(".") if src.is_package else src.name.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(sources: dict[str, Source]) -> dict[str, dict[str, int]]:
    """{module: {imported module of `sources`: line of the first such import}}, counting every import
    statement wherever it is (module level, inside functions, under TYPE_CHECKING).

    `import a.b` and `from a import b` (b a module) import a.b; `from a import name` (not a module)
    imports a, i.e. a's __init__. Importing a.b.c first runs the __init__ of a and of a.b: such a parent
    package counts as imported too, unless it is the importer's own ancestor (already initialised, or
    being initialised, before the importer runs).
    """
    graph: dict[str, dict[str, int]] = {name: {} for name in sources}
    for src in sources.values():
        edges = graph[src.name]
        for node in ast.walk(src.tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                module = _absolute(src, node)
                for alias in node.names:
                    sub = f"{module}.{alias.name}"
                    targets.append(sub if sub in sources else module)
            for target in targets:
                parts = target.split(".")
                for parent in (".".join(parts[:i]) for i in range(1, len(parts))):
                    if parent in sources and not (src.name + ".").startswith(parent + "."):
                        edges.setdefault(parent, node.lineno)
                if target in sources and target != src.name:
                    edges.setdefault(target, node.lineno)
    return graph


def _strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of `graph` with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
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
    return sorted(components)


def _shortest_cycle(graph: dict[str, dict[str, int]], start: str, within: set[str]) -> list[str]:
    """The shortest import path start -> ... -> start through modules of `within` (breadth first)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node]):
                if child not in within:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{start} is on no cycle within {sorted(within)}")


def import_cycles(sources: dict[str, Source]) -> list[str]:
    """One line per group of modules that import each other in a circle: its shortest cycle from its
    first module, each import with the line it is on, and the group's other members if any."""
    graph = import_graph(sources)
    found = []
    for component in _strongly_connected(graph):
        cycle = _shortest_cycle(graph, component[0], set(component))
        steps = [cycle[0]] + [
            f"{b} ({sources[a].path}:{graph[a][b]})" for a, b in zip(cycle, cycle[1:], strict=False)
        ]
        line = " -> ".join(steps)
        rest = sorted(set(component) - set(cycle))
        found.append(line + (f"; same group: {', '.join(rest)}" if rest else ""))
    return found


# --- (c) unpickling --------------------------------------------------------------------------------------


def _aliases(tree: ast.AST) -> dict[str, str]:
    """{local name: dotted name it stands for} of every import in `tree` (functions' imports too)."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    out[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    out[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                out[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return out


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """The dotted name an expression such as `pk.loads` or `torch.load` refers to, aliases resolved."""
    attrs = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([aliases.get(node.id, node.id), *reversed(attrs)])


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_loads(sources: dict[str, Source]) -> list[str]:
    """'path:line what' of every call that may unpickle arbitrary objects.

    torch.load must say weights_only=True itself: torch's default is True since 2.6, but the
    environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD turns an unstated default off. Any
    `weights_only=` that is not the constant True is flagged wherever it is passed; so are pickle-family
    loads and numpy.load with allow_pickle other than False.
    """
    found = []
    for src in sources.values():
        aliases = _aliases(src.tree)
        for node in ast.walk(src.tree):
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func, aliases)
            kw = {k.arg: k.value for k in node.keywords}
            where = src.path, node.lineno
            if "weights_only" in kw and not _is_true(kw["weights_only"]):
                found.append((*where, f"{name}(weights_only={ast.unparse(kw['weights_only'])})"))
            elif name in TORCH_LOADS and "weights_only" not in kw:
                found.append((*where, f"{name}() without weights_only=True"))
            elif name in UNPICKLERS:
                found.append((*where, f"{name}()"))
            elif name in NUMPY_LOADS and "allow_pickle" in kw:
                flag = kw["allow_pickle"]
                if not (isinstance(flag, ast.Constant) and flag.value is False):
                    found.append((*where, f"{name}(allow_pickle={ast.unparse(flag)})"))
    return [f"{path}:{line} {what}" for path, line, what in sorted(found)]


# --- the checkers on synthetic sources -------------------------------------------------------------------


def _function(name: str, lines: int, indent: str = "") -> str:
    body = "".join(f"{indent}    x{i} = {i}\n" for i in range(lines - 2))
    return f"{indent}def {name}():\n{body}{indent}    return 0\n"


def test_a_function_of_101_lines_is_found_and_one_of_100_is_not():
    text = (
        "@decorator\n"
        + _function("exactly_100", 100)
        + "class C:\n"
        + _function("method_101", 101, "    ")
        + "async def outer():\n"
        + _function("nested_101", 101, "    ")
    )
    sources = synthetic({"pkg.mod": text})
    assert long_functions(sources) == [
        "pkg/mod.py:103 method_101 (101 lines)",
        "pkg/mod.py:204 outer (102 lines)",
        "pkg/mod.py:205 nested_101 (101 lines)",
    ]
    assert long_functions(synthetic({"pkg.mod": _function("f", 100)})) == []


def test_an_import_cycle_is_found_whatever_form_its_imports_take():
    sources = synthetic(
        {
            "pkg/": "",
            "pkg.a": "from . import b\n",  # a module: imports pkg.b, not pkg
            "pkg.b": "import os\n\ndef f():\n    from pkg.a import thing\n",  # inside a function too
            "pkg.c": "import pkg.d\n",
            "pkg.d": "from .sub.e import x\n",
            "pkg.sub/": "",
            "pkg.sub.e": "from .. import c\n",
            "pkg.f": "from pkg import g\n",
            "pkg.g": "from pkg.a import y\n",  # a chain into a cycle is not a cycle
        }
    )
    assert import_cycles(sources) == [
        "pkg.a -> pkg.b (pkg/a.py:1) -> pkg.a (pkg/b.py:4)",
        "pkg.c -> pkg.d (pkg/c.py:1) -> pkg.sub.e (pkg/d.py:1) -> pkg.c (pkg/sub/e.py:1)",
    ]


def test_a_package_init_importing_its_user_is_a_cycle_and_a_chain_is_not():
    # `from pkg import name` (not a module) runs pkg/__init__.py, which imports the importer back
    cyclic = synthetic(
        {
            "pkg/": "from .api import Api\n",
            "pkg.api": "from pkg.core import f\n",
            "pkg.core": "from pkg import V\n",
        }
    )
    assert import_cycles(cyclic) == [
        "pkg -> pkg.api (pkg/__init__.py:1) -> pkg.core (pkg/api.py:1) -> pkg (pkg/core.py:1)"
    ]
    chain = synthetic({"pkg/": "", "pkg.a": "from pkg.b import x\n", "pkg.b": "import pkg.c\n", "pkg.c": ""})
    assert import_cycles(chain) == []


def test_a_cycle_through_a_parent_package_initialised_on_the_way_is_found():
    # `import pkg.x` runs pkg.sub.a's parent pkg.sub/__init__, which imports pkg.sub.b, which imports pkg.x back
    sources = synthetic(
        {
            "pkg/": "",
            "pkg.sub/": "from .b import B\n",
            "pkg.sub.a": "A = 1\n",
            "pkg.sub.b": "from pkg.x import X\n",
            "pkg.x": "from pkg.sub.a import A\n",
        }
    )
    assert import_cycles(sources) == [
        "pkg.sub -> pkg.sub.b (pkg/sub/__init__.py:1) -> pkg.x (pkg/sub/b.py:1) -> pkg.sub (pkg/x.py:1)"
    ]


def test_the_shortest_cycle_of_a_group_is_reported_with_its_other_members():
    sources = synthetic(
        {
            "m.a": "import m.b\nimport m.c\n",
            "m.b": "import m.a\n",
            "m.c": "import m.d\n",
            "m.d": "import m.a\n",
        }
    )
    assert import_cycles(sources) == ["m.a -> m.b (m/a.py:1) -> m.a (m/b.py:1); same group: m.c, m.d"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("import torch\ntorch.load(p, weights_only=False)\n", "torch.load(weights_only=False)"),
        ("import torch\ntorch.load(p)\n", "torch.load() without weights_only=True"),
        ("import torch\ntorch.load(p, **kw)\n", "torch.load() without weights_only=True"),
        ("from torch import load\nload(p, weights_only=flag)\n", "torch.load(weights_only=flag)"),
        ("def f():\n    import pickle as pk\n    pk.loads(b)\n", "pickle.loads()"),
        ("from pickle import Unpickler\nUnpickler(f)\n", "pickle.Unpickler()"),
        ("import numpy as np\nnp.load(p, allow_pickle=True)\n", "numpy.load(allow_pickle=True)"),
        ("import joblib\njoblib.load(p)\n", "joblib.load()"),
    ],
)
def test_a_load_that_may_unpickle_is_found(text, expected):
    line = text.count("\n")
    assert unsafe_loads(synthetic({"pkg.mod": text})) == [f"pkg/mod.py:{line} {expected}"]


def test_safe_loads_are_not_flagged():
    text = """\
        import json, pickle, torch
        import numpy as np
        torch.load(p, map_location="cpu", weights_only=True)
        np.load(p)
        np.load(p, allow_pickle=False)
        json.load(f)
        isinstance(e, pickle.UnpicklingError)
        """
    assert unsafe_loads(synthetic({"pkg.mod": text})) == []


# --- the bars on src/mole_trainer ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sources() -> dict[str, Source]:
    found = package_sources()
    assert f"{PACKAGE}.stages" in found and f"{PACKAGE}.train.loop" in found  # really the source tree
    return found


def test_no_function_in_src_is_over_100_lines(sources):
    too_long = long_functions(sources)
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines (split them):\n" + "\n".join(too_long)


def test_src_has_no_import_cycle(sources):
    cycles = import_cycles(sources)
    assert not cycles, "modules that import each other in a circle:\n" + "\n".join(cycles)


def test_nothing_in_src_unpickles_arbitrary_objects(sources):
    unsafe = unsafe_loads(sources)
    assert not unsafe, "loads that may unpickle arbitrary objects:\n" + "\n".join(unsafe)
