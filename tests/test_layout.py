"""The layout follows the dependency: the boundaries sit below the domain."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("package", ["storage", "connectors", "errors"])
def test_boundary_packages_import_nothing_from_pipeline(package: str) -> None:
    offending = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for line, module in _imported_modules(path)
        if module == "pipeline" or module.startswith("pipeline.")
    ]
    assert offending == []


def test_error_tree_module_imports_only_the_standard_library() -> None:
    modules = {module.split(".")[0] for _, module in _imported_modules(ROOT / "errors" / "__init__.py")}
    assert modules <= {"__future__", "enum", "typing"}


def test_pipeline_errors_re_exports_the_same_classes() -> None:
    import errors
    import pipeline.errors

    for name in pipeline.errors.__all__:
        assert getattr(pipeline.errors, name) is getattr(errors, name)
