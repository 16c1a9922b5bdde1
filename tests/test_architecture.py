"""The package's shape: layers with one direction, no import cycles, small files.

Every import of a cppo_native module by another is collected from the source (module
level and inside functions alike), then:

- the graph has no cycle;
- private layers never import public faces: ``_core`` imports nothing of cppo_native
  but ``_core`` (and the compiled ``_native``), ``_backends`` only ``_core`` and
  ``_backends``, ``_io`` only ``_core``, ``_backends`` and ``_io``;
- no Python module is over 500 lines and no Rust file over 900.

Run ``python tests/test_architecture.py`` to print the import graph.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python" / "cppo_native"
PYTHON_MAX_LINES = 500
RUST_MAX_LINES = 900

# Layer of each private package: what it may import (besides itself).
ALLOWED = {
    "cppo_native._core": ("cppo_native._core", "cppo_native._native"),
    "cppo_native._backends": ("cppo_native._core", "cppo_native._backends", "cppo_native._native"),
    "cppo_native._io": ("cppo_native._core", "cppo_native._backends", "cppo_native._io", "cppo_native._native"),
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(current: str, is_package: bool, level: int, target: str | None) -> str:
    base = current.split(".") if is_package else current.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(name: str, path: Path, known: set) -> set:
    """cppo_native modules imported anywhere in the file (``from x import y`` counts y
    when y is a module, else x)."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("cppo_native"):
                    out.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _resolve(name, is_package, node.level, node.module)
            elif node.module and node.module.startswith("cppo_native"):
                base = node.module
            else:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if (sub in known or sub.endswith("._native")) else base)
    out.discard(name)
    return out


def import_graph() -> dict:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def _find_cycle(graph: dict):
    state: dict = {}
    stack: list = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle():
    cycle = _find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_private_layers_import_only_below():
    bad = []
    for name, targets in import_graph().items():
        for layer, allowed in ALLOWED.items():
            if name == layer or name.startswith(layer + "."):
                for t in targets:
                    if not any(t == a or t.startswith(a + ".") for a in allowed):
                        bad.append(f"{name} imports {t}")
    assert not bad, "layering violations:\n" + "\n".join(bad)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    # A function-level relative import is an edge too (a checker that missed it could
    # never fail on the cycles this test exists for).
    pkg = PACKAGE
    mods = modules()
    name = "cppo_native._backends.dispatch"
    edges = imports_of(name, mods[name], set(mods))
    assert "cppo_native._backends.cpu" in edges  # imported inside run_mask
    assert "cppo_native._backends.cuda.mask" in edges
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert pkg.is_dir()


def test_file_sizes():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        n = len(path.read_text().splitlines())
        if n > PYTHON_MAX_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {n} lines > {PYTHON_MAX_LINES}")
    for path in sorted((ROOT / "rust").rglob("*.rs")):
        n = len(path.read_text().splitlines())
        if n > RUST_MAX_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {n} lines > {RUST_MAX_LINES}")
    assert not too_long, "\n".join(too_long)


if __name__ == "__main__":  # print the graph
    for mod, targets in sorted(import_graph().items()):
        print(mod, "->", ", ".join(sorted(targets)) or "-")
    cycle = _find_cycle(import_graph())
    print("cycle:", cycle)
    sys.exit(1 if cycle else 0)
