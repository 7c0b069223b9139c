"""Imports run one way (docs/architecture.md): a module imports only from its own layer or the
layers below, never upward, and no two module groups import each other (no cycle). Imports inside
functions count too: hiding an import in a function does not change the dependency."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "posttrain"

# Higher imports lower. Groups are the top-level modules and subpackages of posttrain/.
LAYERS: dict[str, int] = {
    "__main__": 6, "cli": 6, "report": 6,
    "trainer": 5, "server": 5,
    "rollout": 4, "sync": 4, "envs": 4, "cluster": 4,
    "engine": 3, "models": 3, "distributed": 3, "checkpoint": 3, "logging": 3,
    "algorithms": 2, "data": 2, "config": 2,
    "sampling": 1,
    "errors": 0, "__init__": 0,
}


def _group(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def import_edges() -> dict[tuple[str, str], list[str]]:
    """(importing group, imported group) -> ["file:line", ...] for every posttrain import."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                if target.startswith("posttrain.") and _group(target) != _group(module):
                    edges[(_group(module), _group(target))].append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return edges


def test_every_module_group_has_a_layer():
    groups = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
              if (p.is_file() and p.suffix == ".py") or (p.is_dir() and (p / "__init__.py").exists())}
    assert groups <= set(LAYERS), f"add {sorted(groups - set(LAYERS))} to LAYERS (and docs/architecture.md)"


def test_no_import_runs_upward():
    upward = {f"{a} -> {b}": where for (a, b), where in import_edges().items() if LAYERS[b] > LAYERS[a]}
    assert not upward, f"imports that run upward: {upward}"


def test_no_two_groups_import_each_other():
    edges = import_edges()
    cycles = {f"{a} <-> {b}": (edges[(a, b)], edges[(b, a)]) for (a, b) in edges if (b, a) in edges and a < b}
    assert not cycles, f"import cycles between module groups: {cycles}"


def _module_graph() -> dict[str, set[str]]:
    """Module -> the posttrain modules it imports (at module level or inside functions)."""
    modules = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in PACKAGE.rglob("*.py")}

    def resolve(name: str) -> str | None:  # `from pkg.mod import name`: the module itself
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                if target.startswith("posttrain") and (resolved := resolve(target)) not in (None, module):
                    graph[module].add(resolved)
    return graph


def test_no_module_import_cycles():
    """Not even inside one folder, and not through a package's __init__ (an import hidden in a
    function to dodge a cycle is still a cycle)."""
    graph, cycles = _module_graph(), []
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                cycles.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    assert not cycles, f"modules that import each other (directly or around a loop): {cycles}"


# Modules that may import posttrain modules inside functions, and why. Everywhere else an import
# inside a function is either a hidden cycle or needless.
LAZY_IMPORTS_ALLOWED = {
    "posttrain.cli": "each command loads its modules when it runs: --help and config errors stay fast",
    "posttrain.server.cli": "fastapi and uvicorn are the optional serve extra",
    "posttrain.server.proxy": "uvicorn is the optional serve extra",
    "posttrain.server.rollout_api": "uvicorn is the optional serve extra",
    "posttrain.config.fields": "the algorithm registries import torch; loading a config and --help wait for it only "
                               "where an option's choices are registered names",
}


def test_imports_inside_functions_only_where_allowed():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        if module in LAZY_IMPORTS_ALLOWED:
            continue
        for fn in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("posttrain"):
                        found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.module}")
    assert not found, f"posttrain imports inside functions (move them to the top, or explain in LAZY_IMPORTS_ALLOWED): {found}"
