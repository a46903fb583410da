"""The package's shape holds: no code outside `families/` asks which model version runs, and no module imports
itself back through others, not even from inside a function (a circle at import time breaks as soon as someone
imports the modules in another order; one hidden in a function is the same tangle, waiting).

One inversion is by design and not an import statement: `families.family(version)` loads a family's package by name
(a registry); the families use the shared core, and the core reaches a family only through that call."""

import ast
import re
from pathlib import Path

import dsocr_lightning

PACKAGE = Path(dsocr_lightning.__file__).parent
VERSION_NAME = re.compile(r"^v\d+$")


def modules() -> dict[str, Path]:
    """Dotted name -> file, every module of the package."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def version_literals(tree: ast.AST) -> list[int]:
    """Lines where code (docstrings aside) holds a version name such as "v2"."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                  and isinstance(node.body[0], ast.Expr)}  # fmt: skip
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and VERSION_NAME.match(node.value) and id(node) not in docstrings]  # fmt: skip


def test_no_code_outside_the_families_names_a_version():
    shared = {name: path for name, path in modules().items() if not name.startswith("dsocr_lightning.families")}
    offenders = {
        name: lines for name, path in shared.items() if (lines := version_literals(ast.parse(path.read_text())))
    }
    assert offenders == {}, "shared code branches on the model version: ask the family (families/base.py) instead"


def test_the_check_catches_a_version_test():
    assert version_literals(ast.parse('if version == "v2":\n    pass\n')) == [1]
    assert version_literals(ast.parse('def f():\n    """Only v2 docs."""\n')) == []


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules that `name` imports anywhere in its code, with the packages whose __init__ that runs."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            found |= {t for t in [target, *(f"{target}.{alias.name}" for alias in node.names)] if t in known}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
    own = set(ancestors(name))  # being initialised already when `name` runs
    return ({parent for target in found for parent in ancestors(target) if parent in known} | found) - own


def ancestors(name: str) -> list[str]:
    """A module's packages: importing it runs their __init__ first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
                on.discard(group[-1])
            if len(group) > 1:
                out.append(sorted(group))

    for node in graph:
        if node not in index:
            visit(node)
    return out


def test_no_import_circles():
    found = modules()
    graph = {name: imports(name, path, set(found)) - {name} for name, path in found.items()}
    assert circles(graph) == []


def test_the_check_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
