"""The package's import graph: acyclic, and every layer imports only the layers below it (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "nsn_peft"

# What each part of the package may import of the package (besides itself). Keep in step with
# docs/architecture.md: a new dependency is a design decision, made there first.
ALLOWED: dict[str, set[str]] = {
    "linalg": set(),
    "naming": set(),
    "io": set(),
    "devices": set(),
    "data": set(),
    "gguf_models": {"io"},  # the converted folder is saved through the one save protocol
    "benchmark_data": {"io", "gguf_models"},  # the embedded model's cache, the one save protocol
    "calibrate": {"linalg", "naming", "io", "data", "devices"},
    "tuner": {"linalg", "calibrate", "naming", "io", "devices"},
    "planning": {"tuner", "calibrate", "linalg", "naming", "io"},
    "export": {"tuner", "linalg", "naming", "io", "devices"},
    # task accuracy loads adapters and exports (hub), runs operating points (tuner) and reads the packaged tasks
    "evaluation": {"data", "devices", "io", "gguf_models", "benchmark_data", "tuner", "export", "linalg", "hub"},
    "lm_eval_cli": {"evaluation"},
    "training": {"tuner", "planning", "linalg", "naming", "io", "data", "gguf_models"},
    "refine": {"tuner", "planning", "calibrate", "training", "linalg", "naming", "io", "data", "devices"},
    "sequential": {"refine", "tuner", "planning", "calibrate", "training", "linalg", "naming", "io", "data", "devices"},
    "hub": {"tuner", "export", "io", "devices", "data", "gguf_models"},
    "cli": {"*"},
    "__init__": {"*"},
    "__main__": {"cli"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__") or "__init__"


def _imports(path: Path) -> set[str]:
    """Package-internal modules imported anywhere in ``path`` (function-level imports included)."""
    module = _module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    if module == "__init__":
        package = []
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [])
                names = [target] if node.module else [target + [a.name] for a in node.names]
            elif node.module and node.module.split(".")[0] == "nsn_peft":
                names = [node.module.split(".")[1:]]
            else:
                continue
            for parts in names:
                if parts:
                    found.add(".".join(parts))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("nsn_peft."):
                    found.add(alias.name.removeprefix("nsn_peft."))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path):
            # `from . import decompose` names a module; `from .flops import x` names x's module.
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def _top(module: str) -> str:
    return module.split(".")[0]


def test_every_part_has_a_layer_rule():
    assert {_top(m) for m in _graph()} <= set(ALLOWED)


def test_layers_import_only_what_they_may():
    bad = []
    for module, targets in _graph().items():
        allowed = ALLOWED[_top(module)]
        for target in targets:
            if _top(target) != _top(module) and "*" not in allowed and _top(target) not in allowed:
                bad.append(f"{module} -> {target}")
    assert not bad, "imports that break the layering of docs/architecture.md:\n" + "\n".join(sorted(bad))


def test_import_graph_is_acyclic():
    graph = _graph()
    # Package __init__ files re-export their children; edges into a package from its own children are the
    # re-export direction only when the child imports the package itself, which is what we look for too.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if state.get(target) is None:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if state.get(node) is None:
            visit(node)


def test_math_layer_imports_no_model_library():
    """linalg is pure tensor math: no transformers, no PEFT, nothing of ours."""
    for path in (PACKAGE / "linalg").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for name in names:
                    assert name.split(".")[0] not in {"transformers", "peft", "nsn_peft"}, f"{path.name} imports {name}"


def test_modules_stay_readable():
    """No module over ~400 lines unless listed here as one idea that reads better whole."""
    whole = {"calibrate.collect", "planning.allocate", "io"}  # io: the one save protocol
    long = [
        f"{_module_name(p)} ({n} lines)"
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > 420 and _module_name(p) not in whole
    ]
    assert not long, long
