"""The core library stands on its own: nothing in ``megasr_core`` imports ``service`` or ``worker``
at module level (the CLI's serve and worker commands import them when they run), and loading the
``megasr`` command loads neither torch nor the [serve] extra."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "megasr_core"
UPPER_FLOORS = ("service", "worker")


def module_level_imports(tree: ast.Module) -> list[str]:
    """Top-level names imported outside any function (in ``if``/``try`` blocks too)."""
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.Import):
                names.extend(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names.append(child.module)
            visit(child)

    visit(tree)
    return names


def test_the_core_library_never_imports_service_or_worker_at_module_level():
    found = {}
    for path in sorted(CORE.rglob("*.py")):
        upward = [name for name in module_level_imports(ast.parse(path.read_text(encoding="utf-8")))
                  if name.split(".")[0] in UPPER_FLOORS]
        if upward:
            found[str(path.relative_to(CORE.parent))] = upward
    assert not found, f"module-level imports of service/worker in the core library: {found}"


def test_loading_the_cli_loads_neither_torch_nor_the_service():
    code = ("import sys, megasr_core.cli; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'service', 'worker', 'fastapi'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"
