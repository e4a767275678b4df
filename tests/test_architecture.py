"""The package's import graph: acyclic, and every layer imports only the layers below it (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Optional

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "nsn_peft"

# What each part of the package may import of the package (besides itself). Keep in step with
# docs/architecture.md: a new dependency is a design decision, made there first.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),  # the exception types: the bottom, importable by every part (see BOTTOM)
    "vocab": set(),  # token ids checked against the vocabulary: importable by every part (see BOTTOM)
    "linalg": set(),
    "naming": set(),
    "layer_selection": {"naming"},  # which layers an adapter's options select: shared by every layer above
    "io": set(),
    "devices": set(),
    "data": set(),
    "gguf_models": {"io"},  # the converted folder is saved through the one save protocol
    "benchmark_data": {"io", "gguf_models"},  # the embedded model's cache, the one save protocol
    "calibrate": {"linalg", "naming", "layer_selection", "io", "data", "devices"},
    "tuner": {"linalg", "calibrate", "naming", "layer_selection", "io", "devices"},
    "planning": {"tuner", "calibrate", "linalg", "naming", "layer_selection", "io"},
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


# Parts every other part may import: they import nothing of the package themselves.
BOTTOM = {"errors", "vocab"}


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
            if _top(target) in BOTTOM and _top(module) != "linalg":
                continue
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
                cycle = stack[stack.index(target) :] + [target]
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


def _statement_lines(path: Path) -> int:
    """Lines where a statement starts: a module's size independent of how the formatter wraps long calls."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return len({node.lineno for node in ast.walk(tree) if isinstance(node, ast.stmt)})


def test_modules_stay_readable():
    """No module over ~280 statements (about 400 lines of unwrapped code) unless listed as one idea that reads
    better whole."""
    whole = {"calibrate.collect", "planning.allocate", "io"}  # io: the one save protocol
    long = [
        f"{_module_name(p)} ({n} statements)"
        for p in PACKAGE.rglob("*.py")
        if (n := _statement_lines(p)) > 280 and _module_name(p) not in whole
    ]
    assert not long, long


# The state of an NSN layer that only the layer itself changes (through its own methods: ``set_rank``,
# ``set_runtime_options``, ``bypass_adapters``, ``merge``...). Writing one from outside skips what the method
# keeps consistent: a merged weight computing another rank, a layout the tuner does not know of.
LAYER_FIELDS = {
    "nsn_rank",
    "nsn_max_rank",
    "_nsn_rank_carrier",
    "runtime_options",
    "rank_major_storage",
    "use_kernels",
    "_disable_adapters",
    "base_weight_dropped",
    "merged_adapters",
    "_original_weight",
    "_merged_from_factors",
}
_MUTATORS = {
    "update",
    "pop",
    "popitem",
    "clear",
    "setdefault",
    "__setitem__",
    "__delitem__",
    "append",
    "extend",
    "remove",
    "insert",
}
_ROOT = PACKAGE.parents[1]


def _field_writes(path: Path, root: Path = _ROOT) -> list[str]:
    """``obj.field = ...``, ``obj.field[k] = ...``, ``del obj.field[k]``, ``obj.field.update(...)`` and
    ``setattr(obj, "field", ...)`` on a layer field, where ``obj`` is not ``self``."""

    def foreign(node: ast.AST) -> Optional[str]:
        while isinstance(node, ast.Subscript):
            node = node.value
        if isinstance(node, ast.Attribute) and node.attr in LAYER_FIELDS:
            if not (isinstance(node.value, ast.Name) and node.value.id == "self"):
                return node.attr
        return None

    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[ast.AST] = []
        if isinstance(node, (ast.Assign, ast.Delete)):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in _MUTATORS:
                targets = [func.value]
            elif isinstance(func, ast.Name) and func.id == "setattr" and len(node.args) >= 2:
                name = node.args[1]
                if isinstance(name, ast.Constant) and name.value in LAYER_FIELDS:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {name.value}")
        for target in targets:
            field = foreign(target)
            if field is not None:
                found.append(f"{path.relative_to(root)}:{node.lineno} {field}")
    return found


def test_no_module_writes_another_modules_layer_fields():
    """Ranks, runtime options and adapter state of NSN layers change through the layer's methods only."""
    files = [*PACKAGE.rglob("*.py"), *(_ROOT / "examples").rglob("*.py"), *(_ROOT / "benchmarks").rglob("*.py")]
    writes = [w for path in files for w in _field_writes(path)]
    assert not writes, "layer fields written from outside the layer:\n" + "\n".join(writes)


def test_the_field_check_sees_every_kind_of_write(tmp_path):
    source = tmp_path / "bad.py"
    source.write_text(
        "layer.nsn_rank['a'] = 3\nlayer.nsn_rank.update(a=3)\nNSNLinear.use_kernels = True\n"
        "setattr(layer, '_disable_adapters', True)\nlayer.rank_major_storage = True\ndel layer.nsn_rank['a']\n"
        "self.nsn_rank['a'] = 3\nprint(layer.nsn_rank['a'])\n"
    )
    assert sorted(_field_writes(source, tmp_path)) == [
        "bad.py:1 nsn_rank",
        "bad.py:2 nsn_rank",
        "bad.py:3 use_kernels",
        "bad.py:4 _disable_adapters",
        "bad.py:5 rank_major_storage",
        "bad.py:6 nsn_rank",
    ]


def _private_imports(path: Path, root: Path = _ROOT) -> list[str]:
    """Imports of a private nsn_peft module (``nsn_peft.x._y``) or private name (``from nsn_peft.x import _y``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "nsn_peft":
            modules, names = [node.module], [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            modules, names = [a.name for a in node.names if a.name.split(".")[0] == "nsn_peft"], []
        else:
            continue
        private = [m for m in modules if any(p.startswith("_") for p in m.split("."))]
        private += [n for n in names if n.startswith("_")]
        found += [f"{path.relative_to(root)}:{node.lineno} {name}" for name in private]
    return found


def test_examples_and_benchmarks_use_public_api_only():
    """Examples and benchmarks are what users copy: they import only public modules and names of nsn_peft."""
    files = [*(_ROOT / "examples").rglob("*.py"), *(_ROOT / "benchmarks").rglob("*.py")]
    private = [hit for path in files for hit in _private_imports(path)]
    assert not private, "private nsn_peft imports in examples/benchmarks:\n" + "\n".join(private)


def test_the_private_import_check_sees_every_form(tmp_path):
    source = tmp_path / "bad.py"
    source.write_text(
        "from nsn_peft.refine._common import mean_nll\nimport nsn_peft.training._lm_data\n"
        "from nsn_peft.hub import _resolve\nfrom nsn_peft.refine import mean_nll\nimport nsn_peft\n"
        "from nsn_peft.tuner import register as _register\n"
    )
    assert _private_imports(source, tmp_path) == [
        "bad.py:1 nsn_peft.refine._common",
        "bad.py:2 nsn_peft.training._lm_data",
        "bad.py:3 _resolve",
    ]
