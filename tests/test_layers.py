"""The package's layers (README "Development map"): every import, function-local ones included, goes
to the same layer or a lower one, the engine imports none of data/models/losses/strategies, and no
set of modules imports itself around a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "imgtrain"

# module (or package prefix) -> layer; the longest matching prefix decides
LAYERS = {
    "imgtrain.config": 0, "imgtrain.io": 0, "imgtrain.tta_views": 0, "imgtrain.recipe_errors": 0,
    "imgtrain.recipe_files": 0, "imgtrain.search_space": 0,
    "imgtrain.engine": 1, "imgtrain.data": 1, "imgtrain.models": 1, "imgtrain.losses": 1,
    "imgtrain.strategies": 2,
    "imgtrain.evaluation": 3, "imgtrain.tracking": 3,
    "imgtrain.api": 4, "imgtrain.tuning": 4,
    "imgtrain.cli": 5, "imgtrain.doctor": 5, "imgtrain.tools": 5, "imgtrain.__main__": 5, "imgtrain": 5,
}
# siblings in layer 1 the engine must not import: it receives models, losses and loaders as arguments
ENGINE_MUST_NOT_IMPORT = ("imgtrain.data", "imgtrain.models", "imgtrain.losses")


def module_files() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


MODULES = module_files()


def resolve(name: str) -> str:
    """The module an import names (`from imgtrain.x import y` may name module imgtrain.x.y)."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def imports_of(module: str) -> set[str]:
    """Every imgtrain module `module` imports, anywhere in its file."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {resolve(alias.name) for alias in node.names if alias.name.startswith("imgtrain")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package upwards
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if not base.startswith("imgtrain"):
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(resolve(full) if full in MODULES else resolve(base))
    found.discard(module)
    return found


def layer_of(module: str) -> int:
    best = max((prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")), key=len)
    return LAYERS[best]


GRAPH = {module: imports_of(module) for module in MODULES}


def test_every_module_has_a_layer():
    assert all(layer_of(m) is not None for m in MODULES)
    assert "imgtrain.api" in GRAPH and "imgtrain.engine.loop" in GRAPH


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_goes_up_a_layer(module):
    up = sorted(f"{target} (layer {layer_of(target)})" for target in GRAPH[module]
                if layer_of(target) > layer_of(module))
    assert not up, f"{module} (layer {layer_of(module)}) imports from a higher layer: {', '.join(up)}"


def test_the_engine_knows_no_data_model_loss_or_strategy():
    offending = sorted((module, target) for module, targets in GRAPH.items() if module.startswith("imgtrain.engine")
                       for target in targets if target.startswith(ENGINE_MUST_NOT_IMPORT + ("imgtrain.strategies",)))
    assert not offending


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (a list of modules, first == last), or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = {node: WHITE for node in graph}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = GREY
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if colour.get(target, BLACK) == GREY:
                return stack[stack.index(target):] + [target]
            if colour.get(target) == WHITE:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        colour[node] = BLACK
        return None

    for node in sorted(graph):
        if colour[node] == WHITE:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_circle():
    # a package's __init__ re-exporting its modules is no circle unless a module imports the
    # package itself back; both are edges here, so such a loop would be caught
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_checker_finds_what_it_looks_for():
    # the checks above can fail: a made-up graph with a circle and an upward import
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("imgtrain.engine.loop") < layer_of("imgtrain.strategies.ema") < layer_of("imgtrain.api")
    assert "imgtrain.models.trained" in GRAPH["imgtrain.evaluation.inference"]
