"""The package's import contract, read statically from the source (lazy and TYPE_CHECKING imports count).

Layers, lowest first: a module may import its own layer and the ones below, never one above.
The organisms are a plug-in: they may import any generic layer, and no generic module imports them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "mechsteer"
LAYERS: tuple[str, ...] = (
    "mechsteer.core",
    "mechsteer.interventions",
    "mechsteer.engines",
    "mechsteer.grading",
    "mechsteer.data",
    "mechsteer.activations",
    "mechsteer.taxonomy",
    "mechsteer.steering",
    "mechsteer.hybrid",
    "mechsteer.causal",
    "mechsteer.experiment",
    "mechsteer.export",
    "mechsteer.cli",
)
PLUGIN = "mechsteer.organisms"
# Optional heavy dependencies may be imported inside functions; mechsteer's own modules may not.
MAX_MODULE_LINES = 600


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE_ROOT.rglob("*.py"))}


def imported_modules(name: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The mechsteer modules an import statement loads (a `from package import submodule` counts)."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        if node.level:
            base = name.split(".")
            if MODULES[name].name != "__init__.py":
                base = base[:-1]
            base = base[: len(base) - (node.level - 1)]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
    return [target for target in targets if target in MODULES]


def imports_of(name: str) -> list[tuple[str, bool]]:
    """(imported module, inside a function) for every mechsteer import of ``name``."""
    tree = ast.parse(MODULES[name].read_text())
    in_function: set[int] = set()
    for function in ast.walk(tree):
        if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            in_function.update(id(node) for node in ast.walk(function) if isinstance(node, ast.Import | ast.ImportFrom))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            for target in imported_modules(name, node):
                # A module's own parent packages are not a dependency of it.
                if target != name and not name.startswith(target + "."):
                    found.append((target, id(node) in in_function))
    return found


def layer_of(name: str) -> int | None:
    for index, layer in enumerate(LAYERS):
        if name == layer or name.startswith(layer + "."):
            return index
    return None


def test_every_module_is_in_a_layer_or_the_plugin():
    loose = [name for name in MODULES if name != "mechsteer" and layer_of(name) is None
             and not name.startswith(PLUGIN)]
    assert loose == []


def test_no_module_imports_a_higher_layer_or_the_plugin():
    violations = []
    for name in MODULES:
        own = layer_of(name)
        if own is None:
            continue
        for target, _ in imports_of(name):
            if target.startswith(PLUGIN):
                violations.append(f"{name} imports the plug-in {target}")
            elif (other := layer_of(target)) is not None and other > own:
                violations.append(f"{name} ({LAYERS[own]}) imports {target} ({LAYERS[other]})")
    assert violations == []


def test_no_import_cycles():
    graph = {name: {target for target, _ in imports_of(name)} for name in MODULES}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for name in MODULES:
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_mechsteer_modules_are_imported_at_module_top():
    lazy = [f"{name} -> {target}" for name in MODULES for target, inside in imports_of(name) if inside]
    assert lazy == []


def test_only_the_command_line_imports_argparse():
    users = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import) and any(alias.name == "argparse" for alias in node.names) or \
                    isinstance(node, ast.ImportFrom) and node.module == "argparse":
                users.append(name)
    assert sorted({name for name in users if not (name.startswith("mechsteer.cli") or name.endswith(".cli"))}) == []


# Libraries that take seconds to import: a generic module imports them where a model or tokenizer
# loads (or under TYPE_CHECKING, for annotations), so that the command line starts fast.
SLOW_LIBRARIES = ("transformers", "transformer_lens", "datasets")


def test_generic_modules_import_the_slow_libraries_only_where_they_are_used():
    eager = []
    for name, path in MODULES.items():
        if name.startswith(PLUGIN):
            continue
        for node in ast.parse(path.read_text()).body:  # module level, outside `if TYPE_CHECKING:`
            modules = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            eager += [f"{name} imports {module}" for module in modules if module.split(".")[0] in SLOW_LIBRARIES]
    assert eager == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size(name):
    assert sum(1 for _ in MODULES[name].open()) <= MAX_MODULE_LINES


def test_the_contract_catches_a_violation(tmp_path, monkeypatch):
    # A core module importing the experiment layer must be reported.
    fake = tmp_path / "bad.py"
    fake.write_text("from mechsteer.experiment.config import RunConfig\n")
    monkeypatch.setitem(MODULES, "mechsteer.core.bad", fake)
    monkeypatch.setitem(MODULES, "mechsteer.experiment.config", fake)
    with pytest.raises(AssertionError):
        test_no_module_imports_a_higher_layer_or_the_plugin()


def test_the_contract_catches_a_cycle_through_a_lazy_import(tmp_path, monkeypatch):
    first, second = tmp_path / "first.py", tmp_path / "second.py"
    first.write_text("def load():\n    from mechsteer.core.second import value\n    return value\n")
    second.write_text("from mechsteer.core.first import load\n")
    monkeypatch.setitem(MODULES, "mechsteer.core.first", first)
    monkeypatch.setitem(MODULES, "mechsteer.core.second", second)
    with pytest.raises(AssertionError):
        test_no_import_cycles()
    with pytest.raises(AssertionError):
        test_mechsteer_modules_are_imported_at_module_top()


def test_the_public_api_is_what_all_names():
    import mechsteer

    assert len(mechsteer.__all__) == len(set(mechsteer.__all__))
    missing = [name for name in mechsteer.__all__ if not hasattr(mechsteer, name)]
    assert missing == []
    # The facade re-exports; it defines nothing of its own but the version.
    own = {name for name, value in vars(mechsteer).items()
           if not name.startswith("_") and getattr(value, "__module__", "mechsteer").startswith("mechsteer.")}
    assert set(mechsteer.__all__) - {"DEMO_CONFIG"} <= own
