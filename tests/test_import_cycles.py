"""The library's import graph has no cycles: between modules, and between the rooms of ``facerec/``
(``export``, ``runtime``, ``data``, ...), counting imports made inside functions too.

Read from the source with ``ast`` (nothing is imported), so it also sees the lazy imports that a
reader or an import linter would miss. Run it as a script to print the room-level graph and any
cycle: ``python tests/test_import_cycles.py [REPOSITORY]`` (default: this checkout).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "facerec"


def module_names(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file of every module of the package (``__init__`` as the package itself)."""
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module a dotted import name refers to."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its file (top level or in a function)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, up level - 1
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # "from pkg import sub" imports the submodule when there is one, else a name of pkg.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                resolved = _resolve(target, modules)
                if resolved and resolved != name:
                    found.add(resolved)
    return found


def module_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = module_names(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def room(module: str) -> str:
    """``facerec.export.onnx`` -> ``export``; a top-level module (``facerec.bundle``) is its own room."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else PACKAGE


def room_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    rooms: dict[str, set[str]] = {}
    for src, targets in graph.items():
        edges = rooms.setdefault(room(src), set())
        # The package root (facerec/__init__: the version string) is no room to climb into.
        edges.update(room(t) for t in targets if room(t) not in (room(src), PACKAGE))
    return rooms


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_no_module_imports_itself_back():
    assert cycles(module_graph()) == []


def test_the_rooms_of_the_library_import_downhill_only():
    assert cycles(room_graph(module_graph())) == []


def test_export_sits_below_runtime_and_both_read_the_folder_through_the_bundle():
    """The cycle this test was written for: export -> runtime (metadata keys) and runtime ->
    export (the torch artefact). The metadata keys and readers live in ``facerec.bundle`` now;
    the runtime still loads a torch artefact with the exporter's loader, downhill."""
    rooms = room_graph(module_graph())
    assert "runtime" not in rooms["export"]
    assert "bundle" in rooms["export"] and "bundle" in rooms["runtime"]


def test_the_checker_sees_lazy_imports_and_cycles(tmp_path):
    """The checker itself: an import inside a function counts, and a circle is found."""
    pkg = tmp_path / PACKAGE
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("def f():\n    from facerec.b import y\n")
    (pkg / "b.py").write_text("from facerec.a import x\n")
    graph = module_graph(tmp_path)
    assert graph["facerec.a.x"] == {"facerec.b"} and graph["facerec.b"] == {"facerec.a.x"}
    assert cycles(graph) == [["facerec.a.x", "facerec.b"]]
    assert cycles(room_graph(graph)) == [["a", "b"]]


if __name__ == "__main__":
    g = module_graph(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT)
    rooms = room_graph(g)
    for name in sorted(rooms):
        print(f"{name:10s} -> {', '.join(sorted(rooms[name])) or '-'}")
    print("module cycles:", cycles(g) or "none")
    print("room cycles:", cycles(room_graph(g)) or "none")
