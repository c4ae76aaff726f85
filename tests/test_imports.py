"""The library's import graph has no circles (read from the source, torch never imported).

Every import counts: module level, inside functions, under ``if TYPE_CHECKING``, and
``importlib.import_module("literal")``. Relative imports are resolved. An edge goes from
the importing module to the module it names:

- ``import a.b.c`` and ``from a.b import c`` where ``a.b.c`` is a module: an edge to
  ``a.b.c``; ``from a.b import name`` where ``name`` is an attribute: an edge to ``a.b``.
- The parent packages Python initialises on the way (``a`` and ``a.b`` for ``a.b.c``) are
  not edges: every module would otherwise depend on its package's ``__init__`` and a
  package could never import its own submodules. A package's ``__init__`` importing its
  submodules is a normal edge ``pkg -> pkg.sub``; a submodule that imports names from its
  package back (``from metaensemble.methods import x`` inside ``methods/kd/``) closes a
  real circle, since it reads the package half-initialised when the package is what was
  imported first.

Imports by a computed name are plugin lookups and invisible here: the method registry
imports every ``methods/<name>/config.py`` it finds, and the model registry the modules
of architectures that live with a method. Neither imports back what finds it (a method
config imports only ``config``; the plugin modules register into ``models.registry``);
the last test imports the registry for real.

On top of "no circles", the layering ARCHITECTURE.md asks for: ``config`` (the schema)
imports nothing of the library but ``errors`` (a leaf: exception classes, no imports,
where ``ConfigError`` lives for every layer); one method's folder never imports
another's (shared helpers live beside them, ``methods/base.py``, ``methods/distill.py``,
or below them, ``models/batchnorm.py``, ``transport.py``); a method never imports its
own job: no ``methods/<x>/method.py`` reaches ``methods/<x>/experiment.py``, directly,
inside a function or through other modules (what both need lives in a module both import,
``fusion/parents.py``, ``latentbe/teachers.py``, ``learngene/teacher.py``); the method
registry, and the method config modules it discovers, import no torch (nor ray or mlflow).

``python tests/test_imports.py`` prints the strongly connected components and the
offending edges.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "platform"
PKG = "metaensemble"
REGISTRY = "metaensemble.methods.registry"
HEAVY = ("torch", "torchvision", "timm", "ray", "mlflow")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / PKG).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Every absolute module name ``name``'s source imports: library modules resolved as
    the module docstring says, outside ones as written."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join([*base, mod] if mod else base)
            for a in node.names:
                found.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
    return found


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(library module -> library modules it imports, library module -> outside top-level packages)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    outside: dict[str, set[str]] = {}
    for name, path in mods.items():
        imported = _imports(name, path, mods)
        ours = {m for m in imported if m.split(".")[0] == PKG}
        unknown = sorted(ours - set(mods))
        assert not unknown, f"{name} imports {unknown}: no module of the library"
        graph[name] = ours - {name}
        outside[name] = {m.split(".")[0] for m in imported - ours}
    return graph, outside


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components with more than one module, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def shortest_cycle(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """One shortest circle through the component's first module (for the message)."""
    start, members = comp[0], set(comp)
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def _method_folder(mod: str) -> str | None:
    parts = mod.split(".")
    if len(parts) >= 3 and parts[1] == "methods" and (ROOT / PKG / "methods" / parts[2]).is_dir():
        return parts[2]
    return None


def _engine_method_folder(mod: str) -> str | None:
    """The method folder of ``mod`` if that folder registers an engine method (it has a
    ``config.py``); a folder of plain functions for every job (``methods/soups``) is a
    library other methods may import."""
    folder = _method_folder(mod)
    return folder if folder and (ROOT / PKG / "methods" / folder / "config.py").is_file() else None


def cross_method_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                  if _method_folder(a) and _engine_method_folder(b) and _method_folder(a) != _method_folder(b))


def shortest_path(graph: dict[str, set[str]], start: str, goal: str) -> list[str] | None:
    prev: dict[str, str] = {start: start}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ())):
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    if goal not in prev:
        return None
    path = [goal]
    while path[-1] != start:
        path.append(prev[path[-1]])
    return path[::-1]


def method_to_own_experiment(graph: dict[str, set[str]]) -> list[str]:
    """Every ``methods.<x>.method`` that imports ``methods.<x>.experiment``, directly or
    through other modules, as the shortest such chain."""
    out = []
    for m in sorted(graph):
        folder = _method_folder(m)
        if folder and m == f"{PKG}.methods.{folder}.method":
            path = shortest_path(graph, m, f"{PKG}.methods.{folder}.experiment")
            if path:
                out.append(" -> ".join(path))
    return out


def closure(graph: dict[str, set[str]], roots: list[str]) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        v = todo.pop()
        if v not in seen:
            seen.add(v)
            todo += graph.get(v, ())
    return seen


def _method_configs(graph: dict[str, set[str]]) -> list[str]:
    return sorted(m for m in graph if _method_folder(m) and m.endswith(".config"))


# ---- the tests ---------------------------------------------------------------------------
def test_no_import_circles():
    graph, _ = import_graph()
    comps = strongly_connected(graph)
    assert not comps, "import circles:\n" + "\n".join(" -> ".join(shortest_cycle(graph, c)) for c in comps)


def test_config_imports_nothing_of_the_library():
    graph, _ = import_graph()
    assert graph["metaensemble.config"] <= {"metaensemble.errors"}, graph["metaensemble.config"]
    assert graph["metaensemble.errors"] == set(), "errors must stay a leaf"


def test_no_method_imports_another_methods_folder():
    graph, _ = import_graph()
    assert cross_method_imports(graph) == []


def test_no_method_imports_its_own_experiment():
    graph, _ = import_graph()
    methods = [m for m in graph if _method_folder(m) and m.endswith(".method")]
    assert len(methods) > 3 and f"{PKG}.methods.fusion.experiment" in graph
    assert method_to_own_experiment(graph) == [], "a method imports its own job (issue 25 item 2)"


def test_method_registry_and_method_configs_import_no_torch():
    graph, outside = import_graph()
    roots = [REGISTRY, *_method_configs(graph)]
    assert REGISTRY in graph and len(roots) > 3
    heavy = sorted(f"{m} imports {p}" for m in closure(graph, roots) for p in outside[m] & set(HEAVY))
    assert heavy == []


def test_method_registry_discovers_every_method_without_torch():
    # The static check cannot see the registry's discovery (pkgutil): import it for real.
    code = ("import sys; from metaensemble.methods import registry; n = registry.names(); "
            f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}); "
            "assert not heavy, heavy; print(' '.join(n))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert {"supervised", "kd", "latentbe", "weightformer", "fusion"} <= set(out.stdout.split())


def main() -> None:
    graph, _ = import_graph()
    comps = strongly_connected(graph)
    print(f"{len(graph)} modules, {sum(len(v) for v in graph.values())} edges, "
          f"{len(comps)} strongly connected components with a circle")
    for c in comps:
        print(f"\n[{len(c)} modules] " + ", ".join(m.removeprefix(PKG + ".") for m in c))
        print("  e.g. " + " -> ".join(m.removeprefix(PKG + ".") for m in shortest_cycle(graph, c)))
        inner = sorted((a, b) for a in c for b in graph[a] if b in c)
        for a, b in inner:
            print(f"    {a.removeprefix(PKG + '.')} -> {b.removeprefix(PKG + '.')}")
    print("\nconfig imports:", sorted(graph["metaensemble.config"]))
    print("cross-method imports:", *cross_method_imports(graph), sep="\n  ")
    print("methods importing their own experiment:", *method_to_own_experiment(graph), sep="\n  ")
    try:
        import networkx as nx

        g = nx.DiGraph([(a, b) for a, bs in graph.items() for b in bs])
        print("elementary circles:", sum(1 for _ in nx.simple_cycles(g)))
    except ImportError:
        pass


if __name__ == "__main__":
    main()
