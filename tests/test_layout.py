"""The house rules a reader relies on, read from the source with `ast`: modules import only downward,
in the layer order the README's "Layout" documents, without cycles; an import inside a function is
only ever for an optional dependency, or in the command line, which loads what a command runs only
when it runs; every function fits in a reader's head (under 80 lines)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "src" / "cvt"

# lowest first; a module may import from its own layer or any layer below it
LAYERS = [
    ["errors", "constants", "config", "files", "storage", "native", "outputs", "torch_registry"],
    ["variants", "convert"],
    ["hub"],
    ["weights"],
    ["modeling"],
    ["factory", "images", "processing", "onnx_graph", "modeling_tf", "attention"],
    ["engines", "export"],
    ["inference"],
    ["predictions", "ray", "serve_http"],
    ["predict", "training", "keras_data", "serve"],
    ["benchmark"],
    ["cli", "__main__", "__init__"],
]
# the package-internal imports allowed inside a function: TensorFlow and Ray are optional extras;
# and the command line imports what a command runs only when it runs (`cvt --help` loads no torch)
# (and a variant's config: transformers, which CvtConfig builds on, imports torch, and the
# variants' names are read by `cvt --help`)
LAZY_OPTIONAL = {("__init__", "modeling_tf"), ("export", "modeling_tf"), ("predict", "ray"),
                 ("variants", "config")}
LAZY_PACKAGES = {"cli"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> int:
    top = module.split(".")[0]
    return next(i for i, names in enumerate(LAYERS) if top in names)


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


def test_every_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        layer(module_name(path) if module_name(path) else "__init__")


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
