"""The package's layout, read from its source with `ast` (nothing is imported).

- The graph of npo_cli module imports has no cycle: every module imports only modules below it.
- No npo_cli import sits inside a function body, except of npo_cli.vllm_backend (an optional heavy
  extra: importing it is cheap, but that is where vLLM comes in).
- Imports under `if TYPE_CHECKING:` are annotations only and count for neither.

`python tests/test_layout.py` prints the import graph in layer order (lowest first) with each module's
line count.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "npo_cli"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
LAZY_ALLOWED = {f"{PACKAGE}.vllm_backend"}  # may be imported inside a function


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported npo_cli module
    line: int
    in_function: bool


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file for every .py file of the package (a package's own name for __init__.py)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The deepest package module that `name` (a dotted module path) is or lies in."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in modules:
            return ".".join(parts)
        parts.pop()
    return None


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_pkg: bool, modules: dict[str, Path]) -> list[str]:
    """The package modules one import statement loads."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names if a.name == PACKAGE or a.name.startswith(PACKAGE + ".")]
        return [t for t in (_resolve(n, modules) for n in names) if t]
    if node.level:  # relative: from . import x, from .x import y
        base = module.split(".") if is_pkg else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        name = ".".join(base + ([node.module] if node.module else []))
    else:
        name = node.module or ""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return []
    out = []
    for alias in node.names:  # from npo_cli import dist: the submodule itself
        sub = f"{name}.{alias.name}"
        if sub in modules:
            out.append(sub)
        elif (t := _resolve(name, modules)) is not None:
            out.append(t)
    return list(dict.fromkeys(out))


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every npo_cli import of one module, at any depth, outside `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child, in_function)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for target in _targets(node, module, is_pkg, modules):
                if target != module:
                    found.append(Import(module, target, node.lineno, in_function))
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return found


def import_graph(root: Path = ROOT) -> tuple[dict[str, set[str]], list[Import]]:
    """Module -> the package modules it imports (at any depth), and every import found."""
    modules = module_files(root)
    found = [imp for m, p in modules.items() for imp in imports_of(m, p, modules)]
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in found:
        graph[imp.source].add(imp.target)
    return graph, found


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, each sorted, in dependency order (a component comes
    after every component it imports)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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
            out.append(sorted(comp))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                connect(v)
    finally:
        sys.setrecursionlimit(limit)
    return out


def cycle_through(start: str, members: set[str], graph: dict[str, set[str]]) -> list[str]:
    """The shortest cycle from `start` through `members` back to it: [start, ..., start] ([] if none)."""
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
    return []


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles: for each strongly connected component of more than one module, the shortest
    cycle through each of its modules (each cycle once, written from its smallest module name)."""
    out: list[list[str]] = []
    for comp in strongly_connected(graph):
        if len(comp) < 2:
            continue
        for v in comp:
            c = cycle_through(v, set(comp), graph)[:-1]
            i = c.index(min(c))
            c = c[i:] + c[:i] + [c[i]]
            if c not in out:
                out.append(c)
    return out


def layers(graph: dict[str, set[str]]) -> dict[str, int]:
    """Module -> layer: 0 for a module that imports no package module, else one above the highest
    module it imports (the modules of one import cycle share a layer)."""
    layer: dict[str, int] = {}
    for comp in strongly_connected(graph):  # dependencies first
        below = {w for v in comp for w in graph[v]} - set(comp)
        n = 1 + max((layer[w] for w in below), default=-1)
        for v in comp:
            layer[v] = n
    return layer


def _short(module: str) -> str:
    return module.removeprefix(PACKAGE + ".") if module != PACKAGE else f"{PACKAGE} (__init__)"


def graph_text(root: Path = ROOT) -> str:
    """The import graph as text: one line per module, in layer order (lowest first), with its line
    count and the package modules it imports (`*`: inside a function only; `!`: in an import cycle)."""
    graph, found = import_graph(root)
    files = module_files(root)
    layer = layers(graph)
    lazy_only = {(i.source, i.target) for i in found if i.in_function} - {
        (i.source, i.target) for i in found if not i.in_function}
    in_cycle = {v for c in strongly_connected(graph) if len(c) > 1 for v in c}
    counts = {m: len(p.read_text().splitlines()) for m, p in files.items()}
    order = sorted(graph, key=lambda m: (layer[m], m))
    width = max(len(_short(m)) for m in graph) + 1
    lines = [f"{PACKAGE}: {len(graph)} modules, {sum(counts.values())} lines",
             f"{'layer':>5}  {'lines':>5}  {'module':<{width}} imports"]
    for m in order:
        deps = sorted(graph[m], key=lambda d: (layer[d], d))
        names = ", ".join(_short(d) + ("*" if (m, d) in lazy_only else "") for d in deps) or "-"
        mark = "!" if m in in_cycle else ""
        lines.append(f"{layer[m]:>5}  {counts[m]:>5}  {_short(m) + mark:<{width}} {names}")
    for c in cycles(graph):
        lines.append("cycle: " + " -> ".join(_short(v) for v in c))
    if lazy_only:
        lines.append("*: imported inside a function only")
    return "\n".join(lines)


def test_no_import_cycle():
    graph, _ = import_graph()
    found = cycles(graph)
    assert not found, "npo_cli import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_no_package_import_inside_a_function():
    _, found = import_graph()
    bad = [i for i in found if i.in_function and i.target not in LAZY_ALLOWED]
    where = [f"{ROOT.name}/{module_files()[i.source].relative_to(ROOT).as_posix()}:{i.line} imports {i.target}"
             for i in bad]
    assert not bad, "npo_cli imports inside a function body:\n" + "\n".join(where)


def test_layout_checks_catch_what_they_should(tmp_path):
    """The checks themselves, on a made-up package: a cycle through a lazy import, a relative import,
    `from pkg import mod`, and a TYPE_CHECKING import that counts for nothing."""
    pkg = tmp_path / PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text('__version__ = "0"\n')
    (pkg / "a.py").write_text("from npo_cli import b\n")
    (pkg / "b.py").write_text("def f():\n    from .c import g\n    return g\n")
    (pkg / "c.py").write_text("import npo_cli.a\nfrom npo_cli import __version__\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from npo_cli.e import X\n")
    (pkg / "e.py").write_text("from npo_cli.d import TYPE_CHECKING\n")
    graph, found = import_graph(pkg)
    assert graph == {"npo_cli": set(), "npo_cli.a": {"npo_cli.b"}, "npo_cli.b": {"npo_cli.c"},
                     "npo_cli.c": {"npo_cli.a", "npo_cli"}, "npo_cli.d": set(), "npo_cli.e": {"npo_cli.d"}}
    assert cycles(graph) == [["npo_cli.a", "npo_cli.b", "npo_cli.c", "npo_cli.a"]]
    assert [(i.source, i.line) for i in found if i.in_function] == [("npo_cli.b", 2)]
    assert layers(graph)["npo_cli.e"] == 1 and layers(graph)["npo_cli.a"] == 1
    assert "cycle: a -> b -> c -> a" in graph_text(pkg)


if __name__ == "__main__":
    print(graph_text())
