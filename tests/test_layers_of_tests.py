"""The test tree's own layering: no module under tests/ imports a test module (``test_*.py``) or a
conftest. What tests share lives in helper modules (tests/service/helpers.py, tests/harness/, ...)
and fixtures in conftest.py files, which pytest finds without an import; a test module imported by
another is collected twice in spirit, and its fixtures leak into the importer."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def forbidden_imports(source: str, package: str) -> list[str]:
    """The modules named ``test_*`` or ``conftest`` that ``source`` imports (absolute or relative, at any
    depth in the file), as dotted names; ``package`` is the importing module's package, for relative imports."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        found += [name for name in names if name and name.split(".")[-1].startswith(("test_", "conftest"))]
    return found


def test_no_module_of_the_tests_imports_a_test_module_or_a_conftest():
    offenders = {}
    for path in sorted(TESTS.rglob("*.py")):
        package = ".".join(("tests", *path.relative_to(TESTS).parent.parts))
        if found := forbidden_imports(path.read_text(encoding="utf-8"), package):
            offenders[str(path.relative_to(TESTS.parent))] = found
    assert not offenders, f"import helpers from helper modules, not from test modules or conftests: {offenders}"


def test_the_check_sees_every_form_of_such_an_import():
    """Shown to fail on each way a test module was imported before the helpers moved out."""
    cases = {
        "from tests.service.test_api import make_settings": ["tests.service.test_api"],
        "from tests.service.conftest import free_port": ["tests.service.conftest"],
        "from tests.service import conftest as harness": ["tests.service.conftest"],
        "from .test_ram import ram_checkpoint": ["tests.extractors.test_ram"],
        "from . import test_ram": ["tests.extractors.test_ram"],
        "import tests.test_hub_weights": ["tests.test_hub_weights"],
        "def f():\n    from tests.test_hub_weights import EXTRA\n": ["tests.test_hub_weights"],
    }
    for source, expected in cases.items():
        assert forbidden_imports(source, "tests.extractors") == expected, source
    allowed = "from tests.service.helpers import png\nfrom .ram_layout import RANK\nimport pytest\n"
    assert forbidden_imports(allowed, "tests.extractors") == []
