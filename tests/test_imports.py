"""The import graph of `mtl/` stays layered: no circle (imports inside functions count; imports made only for type
hints may point back), and the model knows no routers, no AdapterHub interop and no Lightning."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mtl"


def _module_name(file: Path) -> str:
    parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    return skip


def import_graph() -> dict[str, set[str]]:
    """Module -> the mtl modules it imports anywhere in its body (type-checking-only imports left out); external
    top-level packages are kept as their bare names, e.g. 'lightning'."""
    modules = {_module_name(f): f for f in PACKAGE.rglob("*.py")}

    def resolve(name: str) -> str:
        while name not in modules and "." in name:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, file in modules.items():
        tree = ast.parse(file.read_text(encoding="utf-8"))
        skip, deps = _type_checking_nodes(tree), set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                deps.update(resolve(a.name) if a.name.startswith("mtl") else a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if not node.module.startswith("mtl"):
                    deps.add(node.module.split(".")[0])
                    continue
                for alias in node.names:  # `from mtl import storage` imports the module mtl.storage
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if full in modules else resolve(node.module))
        graph[name] = deps - {name}
    return graph


def _closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that import each other, directly or through others."""
    found = []
    for name in graph:
        reach = _closure(graph, name)
        if name in reach:
            group = sorted(m for m in reach if name in _closure(graph, m))
            if group not in found:
                found.append(group)
    return found


def test_the_walker_sees_imports_inside_functions_and_ignores_type_hints_only():
    graph = import_graph()
    assert "mtl.continual.cli" in graph["mtl.cli"]  # imported inside main()
    assert "mtl.model" not in graph["mtl.routing.base"]  # under `if TYPE_CHECKING:` only
    assert "mtl.model_files" in graph["mtl.model"] and "torch" in graph["mtl.model"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_mtl_has_no_import_circle():
    assert cycles(import_graph()) == []


def test_the_model_imports_no_router_no_interop_and_no_lightning():
    reach = _closure(import_graph(), "mtl.model")
    banned = sorted(m for m in reach if m.startswith(("mtl.routing", "mtl.interop", "mtl.serving", "mtl.continual"))
                    or m in ("lightning", "mtl.cli", "mtl.lit", "mtl.deployment"))
    assert banned == []
