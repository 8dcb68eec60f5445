"""The import structure of ``src/difflab``, read with ``ast``: layers import only downward, the
maths layer reaches nothing above it, and no module imports itself back through others (no
cycles), function-local imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import difflab

ROOT = Path(difflab.__file__).parent

#: Each top-level part of the package and its layer; a module may import its own layer or below.
LAYERS = {
    "errors": 0, "files": 0, "version": 0,
    "gaussian": 1, "discrete": 1, "nets": 1, "data": 1, "evaluate": 1, "viz": 1,
    "config": 2,
    "train": 3,
    "recipes": 4,
    "cli": 5, "explore": 5, "__main__": 5, "__init__": 5,
}  # fmt: skip
#: The maths layer reaches nothing of these, directly or not.
MATHS, ABOVE_MATHS = ("gaussian", "discrete", "nets"), ("recipes", "train", "config", "cli")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """``module -> the package's modules it imports`` (anywhere in the file, relative imports
    resolved) for every module under ``root``."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                found |= {base, *(f"{base}.{a.name}" for a in node.names)}
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def part(module: str) -> str:
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "__init__"


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} -> {i}" for m, targets in graph.items() for i in targets
            if part(i) != "__init__" and LAYERS[part(i)] > LAYERS[part(m)]]  # fmt: skip


def maths_reaching_above(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for start in (m for m in graph if part(m) in MATHS):
        seen, stack = set(), [start]
        while stack:
            for nxt in graph[stack.pop()] - seen:
                seen.add(nxt)
                stack.append(nxt)
        bad += [f"{start} reaches {m}" for m in sorted(seen) if part(m) in ABOVE_MATHS]
    return bad


def cycles(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    found = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for nxt in sorted(graph[m]):
            if state.get(nxt) == 1:
                found.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


GRAPH = import_graph(ROOT)


def test_every_part_has_a_layer():
    assert {part(m) for m in GRAPH} <= set(LAYERS)


def test_layers_import_only_downward():
    assert upward_imports(GRAPH) == []


def test_the_maths_layer_reaches_nothing_above_it():
    assert maths_reaching_above(GRAPH) == []


def test_no_import_cycles():
    assert cycles(GRAPH) == []


def test_the_checks_find_an_upward_import_and_a_cycle(tmp_path):
    """The same checks on a small made-up package with one of each fault."""
    root = tmp_path / "difflab"
    for rel, text in {
        "__init__.py": "",
        "gaussian/__init__.py": "",
        "gaussian/a.py": "def f():\n    from difflab.recipes import r\n",
        "gaussian/b.py": "from . import c\n",
        "gaussian/c.py": "from difflab.gaussian.b import x\n",
        "recipes/__init__.py": "",
        "recipes/r.py": "from difflab.gaussian import a\n",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    graph = import_graph(root)
    assert "difflab.gaussian.a -> difflab.recipes.r" in upward_imports(graph)
    assert "difflab.gaussian.a reaches difflab.recipes.r" in maths_reaching_above(graph)
    assert not any("gaussian.b" in m for m in upward_imports(graph) + maths_reaching_above(graph))
    found = cycles(graph)
    assert "difflab.gaussian.a -> difflab.recipes.r -> difflab.gaussian.a" in found
    assert "difflab.gaussian.b -> difflab.gaussian.c -> difflab.gaussian.b" in found
