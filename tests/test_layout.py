"""The house rules a reader relies on, read from the source with `ast`: modules import only downward,
through the layers the directories make (CONTRIBUTING.md, "Layers and layout"), without cycles; an
import inside a function is only ever for an optional dependency, or in the command line, which
loads what a command runs only when it runs; every function fits in a reader's head (under 80
lines)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "src" / "cvt"

# The layers are the directories: the modules at the top of src/cvt are the base every layer shares
# (errors, constants, files, the config, the variants, the output container); each package above
# it is one layer, in this order, lowest first; `__init__` and `__main__` share the top one with
# `cli`. A module imports from its own package, the base, or a package before its own.
LAYERS = ["checkpoints", "images", "modeling", "tf", "engines", "inference", "ray", "predict", "serve",
          "training", "bench", "cli"]
ENTRY = {"__init__", "__main__"}
# the package-internal imports allowed inside a function: TensorFlow and Ray are optional extras;
# and the command line imports what a command runs only when it runs (`cvt --help` loads no torch)
# (and a variant's config: transformers, which CvtConfig builds on, imports torch, and the
# variants' names are read by `cvt --help`)
LAZY_OPTIONAL = {("engines.export", "tf"), ("predict", "ray"), ("variants", "config")}
LAZY_PACKAGES = {"cli"}


def packages() -> set[str]:
    return {p.parent.name for p in PACKAGE.glob("*/__init__.py")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> int:
    """0 for the base; 1 + its package's place in LAYERS for the rest."""
    top = "cli" if module in ENTRY else module.split(".")[0]
    if top in LAYERS:
        return LAYERS.index(top) + 1
    assert top not in packages(), f"the package cvt.{top} has no place in LAYERS"
    return 0


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """The cvt modules an `from ... import ...` names (relative imports resolved)."""
    if node.level == 0:
        if not (node.module or "").startswith("cvt"):
            return []
        base = node.module.removeprefix("cvt").lstrip(".")
    else:
        parts = module.split(".") if module != "__init__" else []
        anchor = parts if is_package else parts[:-1]
        anchor = anchor[:len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([node.module] if node.module else []))
    known = {module_name(p) for p in PACKAGE.rglob("*.py")}
    targets = []
    for alias in node.names:
        candidate = f"{base}.{alias.name}" if base else alias.name
        targets.append(candidate if candidate in known else (base or "__init__"))
    return targets


def edges() -> list[tuple[str, str, bool]]:
    """(importer, imported, inside a function) for every import between cvt modules."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for target in resolve(module, path.name == "__init__.py", node):
                    if target != module:
                        found.append((module, target, id(node) in local))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("cvt."):
                        found.append((module, alias.name.removeprefix("cvt."), id(node) in local))
    return found


def test_every_package_is_a_layer():
    assert sorted(LAYERS) == sorted(packages()), "LAYERS lists each package of src/cvt once"


def test_imports_only_go_downward():
    upward = [(a, b) for a, b, _ in edges() if layer(b) > layer(a)]
    assert upward == [], f"imports against the layer order: {upward}"


def test_no_import_cycle():
    graph: dict[str, set[str]] = {}
    for a, b, _ in edges():
        graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join(path + [node, nxt])}"
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_function_local_imports_are_only_for_optional_dependencies():
    hidden = [(a, b) for a, b, local in edges()
              if local and (a, b) not in LAZY_OPTIONAL and a.split(".")[0] not in LAZY_PACKAGES]
    assert hidden == [], f"package imports hidden inside functions: {hidden}"


def test_every_function_is_under_80_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines >= 80:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []
