"""``import instructx2x``'s lazy names: each comes from the module that defines it, and every
name whose module needs no torch imports without torch (a panel parses and validates first)."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import instructx2x

TORCH_FREE_CORE = {
    "EditParameters",
    "RegionMode",
    "ParsedInstruction",
    "parse_instruction",
    "EditJob",
    "read_provenance",
    "InstructX2XError",
    "ParameterError",
    "InputError",
}

_WITHOUT_TORCH = """
import importlib, json, sys
sys.modules["torch"] = None  # any import of torch fails
import instructx2x
result = {}
for name, module in instructx2x._LAZY.items():
    try:
        importlib.import_module("instructx2x." + module)
        home = True
    except ImportError:
        home = False
    try:
        getattr(instructx2x, name)
        package = True
    except ImportError:
        package = False
    result[name] = [home, package]
print(json.dumps(result))
"""


def test_every_public_name_comes_from_its_defining_module():
    for name, module in instructx2x._LAZY.items():
        value = getattr(instructx2x, name)
        assert value.__module__ == f"instructx2x.{module}", (name, value.__module__)
    assert sorted(instructx2x.__all__) == sorted(instructx2x._LAZY)


def test_every_name_whose_module_needs_no_torch_imports_without_torch():
    completed = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TORCH], capture_output=True, text=True, check=True
    )
    result = json.loads(completed.stdout)
    assert {name for name, (home, package) in result.items() if home and not package} == set()
    assert TORCH_FREE_CORE <= {name for name, (_home, package) in result.items() if package}


def _is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None) if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import that runs (module level or inside a function), skipping ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []
    pending = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.If) and _is_type_checking_block(node):
            children = list(node.orelse)
        pending.extend(children)
    return found


def _import_graph(package_root: Path) -> dict[str, set[str]]:
    """Module name -> the package's modules it imports at run time."""
    files = {}
    for path in package_root.rglob("*.py"):
        parts = path.relative_to(package_root.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            targets.update([base, *(f"{base}.{alias.name}" for alias in node.names)])
        graph[name] = {target for target in targets if target in files and target != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = lowlink[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                lowlink[module] = min(lowlink[module], lowlink[target])
            elif target in on_stack:
                lowlink[module] = min(lowlink[module], index[target])
        if lowlink[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return components


def test_cycle_finder_sees_a_runtime_cycle_and_ignores_type_checking_imports(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from .b import g\n")
    (package / "b.py").write_text("from pkg.a import f\n")
    (package / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n"
    )
    (package / "d.py").write_text("from . import c\n")
    graph = _import_graph(package)
    assert graph["pkg.c"] == set()
    assert graph["pkg.d"] == {"pkg", "pkg.c"}
    assert _cycles(graph) == [["pkg.a", "pkg.b"]]


def test_library_modules_import_each_other_without_cycles():
    """A rule of the package: no chain of run-time imports (module level or inside a function)
    leads back to where it started; an import under ``if TYPE_CHECKING:`` is a type only."""
    graph = _import_graph(Path(instructx2x.__file__).parent)
    assert "instructx2x.classifiers" in graph
    assert _cycles(graph) == []
