"""lmforge's imports follow the layers written in docs/architecture.md, and form no cycle.

Every import counts, at module level or inside a function (a lazy import is still a
dependency), read from the source with `ast`.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lmforge"


def layer_table(text: str) -> list[list[str]]:
    """The module prefixes of each layer, top row first, from the document's layer table."""
    block = re.search(r"<!-- layers -->(.*?)<!-- /layers -->", text, re.S).group(1)
    rows = [line for line in block.splitlines() if line.startswith("|")][2:]
    return [re.findall(r"`([\w.]+)`", row.split("|")[2]) for row in rows]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str, modules: set[str]) -> set[str]:
    """The lmforge modules `path` imports (a `from pkg import mod` names the module)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]
        else:
            continue
        found.update(t for t in targets if t.split(".")[0] == "lmforge")
    return found - {name}


def import_graph(root: Path) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    return {name: imports_of(path, name, set(files)) for name, path in files.items()}


def layer_of(module: str, layers: list[list[str]]) -> int:
    """Index of the layer whose longest matching prefix names `module` (the bare package
    name, `lmforge`, names its __init__ only)."""
    best, index = "", None
    for i, prefixes in enumerate(layers):
        for prefix in prefixes:
            covers = module == prefix or ("." in prefix and module.startswith(prefix + "."))
            if covers and len(prefix) > len(best):
                best, index = prefix, i
    if index is None:
        raise AssertionError(f"{module} is in no layer of docs/architecture.md: add it there")
    return index


def upward_imports(graph: dict[str, set[str]], layers: list[list[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                  if layer_of(b, layers) > layer_of(a, layers))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_no_module_imports_against_the_layers():
    layers = layer_table((ROOT / "docs" / "architecture.md").read_text())
    assert upward_imports(import_graph(PACKAGE), layers) == []


def test_no_import_cycles():
    assert cycles(import_graph(PACKAGE)) == []


def test_the_checks_see_a_cycle_and_an_upward_import(tmp_path):
    pkg = tmp_path / "lmforge"
    (pkg / "train").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "train" / "__init__.py").write_text("")
    (pkg / "modeldir.py").write_text("def f():\n    from lmforge.train import loop\n")
    (pkg / "train" / "loop.py").write_text("from lmforge import modeldir\n")
    graph = import_graph(pkg)
    assert graph["lmforge.modeldir"] == {"lmforge.train.loop"}
    assert cycles(graph) == [["lmforge.modeldir", "lmforge.train.loop"]]
    layers = [["lmforge.modeldir"], ["lmforge.train"], ["lmforge"]]
    assert upward_imports(graph, layers) == ["lmforge.modeldir -> lmforge.train.loop"]
