"""diffopt's modules import each other without a cycle: every ``import`` statement counted, at the
top of a module, inside a function or under ``TYPE_CHECKING`` alike (a cycle hidden in a function
still ties the two modules together)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "diffopt"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The diffopt modules ``path`` imports: ``from diffopt import unroll`` names the submodule,
    ``from diffopt.inner import InnerLoop`` the module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("diffopt"):
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            found |= {name for name in names if name in modules}
            if any(name not in modules for name in names):
                found.add(node.module)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (module -> modules it imports), or None."""
    visiting, done = [], set()

    def visit(module: str) -> list[str] | None:
        visiting.append(module)
        for target in sorted(graph[module]):
            if target in visiting:
                return visiting[visiting.index(target):] + [target]
            if target not in done and (cycle := visit(target)):
                return cycle
        visiting.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        if module not in done and (cycle := visit(module)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_diffopt_module_imports_one_that_imports_it_back():
    modules = _modules()
    assert {"diffopt.inner", "diffopt.unroll", "diffopt.recompute"} <= set(modules)
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    assert "diffopt.unroll" in graph["diffopt.inner"]  # the finder sees real imports
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)
