"""The house's floors, read from the source (ast): no import cycles, no upward imports, and the
worker and the job system never load the FastAPI app.

Floors, bottom to top: the core library (``megasr_core``) < the service's shared foundation
(settings, contracts, storage, logging, ...) < the job system (``service.jobsystem``) < the
worker and the HTTP layer, side by side and blind to each other < the entry points (the CLI,
``service.api_server``). A module-level import goes down or sideways within its floor; an import
inside a function (a lazy one) too, except in an entry point, which may reach any floor.

A new module must be given a floor below (:data:`FOUNDATION`, :data:`HTTP`, :data:`ENTRY` or a
prefix rule of :func:`floor_of`); the test names it until it has one. Each check is also run on a
small synthetic tree that breaks it, so none of them can pass by construction.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("megasr_core", "service", "worker")

CORE, FOUNDATION_FLOOR, JOBSYSTEM, WORKER, HTTP_FLOOR, ENTRY_FLOOR = (
    "core",
    "foundation",
    "jobsystem",
    "worker",
    "http",
    "entry",
)
#: height of each floor; worker and http share one height but never import each other
RANK = {CORE: 0, FOUNDATION_FLOOR: 1, JOBSYSTEM: 2, WORKER: 3, HTTP_FLOOR: 3, ENTRY_FLOOR: 4}

#: service modules both the API and the worker use (no FastAPI, no job system)
FOUNDATION = frozenset(
    {
        "service",
        "service.config",
        "service.contracts",
        "service.storage",
        "service.logging_setup",
        "service.tracing",
        "service.faults",
        "service.decode_budget",
        "service.rate_limit",
        "service.webhooks",
        "service.webhook_http",
        "service.webhook_policy",
        "service.models_registry",
        "service.redis_health",
        "service.local_workers",
        "service.anonymity",
    }
)
#: the HTTP layer at service/'s top level (``service.routes.*`` is HTTP by prefix)
HTTP = frozenset(
    {
        "service.app",
        "service.deps",
        "service.errors",
        "service.body_limits",
        "service.events",
        "service.event_poller",
        "service.hosts",
        "service.http_protocol",
        "service.images",
        "service.prometheus",
        "service.prefer_wait",
        "service.probes",
        "service.request_limits",
        "service.stream_slots",
        "service.server_options",
    }
)
#: processes' entry points besides the CLI (``megasr_core.cli*``): the API server, the API load benchmark
ENTRY = frozenset({"service.api_server", "megasr_core.benchmarks.load_api"})

#: what the worker and the job system never import, at any level
FORBIDDEN = ("fastapi", "starlette", "service.app", "service.deps", "service.routes")


def floor_of(module: str) -> str | None:
    """The floor of a module of this repository, or None when no rule places it."""
    if module == "megasr_core.cli" or module.startswith("megasr_core.cli.") or module in ENTRY:
        return ENTRY_FLOOR
    if module == "megasr_core" or module.startswith("megasr_core."):
        return CORE
    if module == "service.jobsystem" or module.startswith("service.jobsystem."):
        return JOBSYSTEM
    if module == "service.routes" or module.startswith("service.routes."):
        return HTTP_FLOOR
    if module == "worker" or module.startswith("worker."):
        return WORKER
    if module in ENTRY:
        return ENTRY_FLOOR
    if module in HTTP:
        return HTTP_FLOOR
    if module in FOUNDATION:
        return FOUNDATION_FLOOR
    return None


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (the nearest of this repository's, else the name as written)
    line: int
    lazy: bool  # inside a function
    type_checking: bool  # under ``if TYPE_CHECKING:``

    def __str__(self) -> str:
        kind = "lazy " if self.lazy else "type-checking " if self.type_checking else ""
        return f"{self.source}:{self.line} {kind}imports {self.target}"


def find_modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Every module of ``packages`` under ``root``, by dotted name (a package by its own name)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _nearest(name: str, modules: dict[str, Path]) -> str:
    """``name`` or its nearest enclosing module of this repository; the name itself if none."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return name


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool, type_checking: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            lazy = True
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, lazy, True)
            for child in node.orelse:
                visit(child, lazy, type_checking)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(module, _nearest(alias.name, modules), node.lineno, lazy, type_checking))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - (node.level - 1)])
                origin = f"{base}.{node.module}" if node.module else base
            else:
                origin = node.module or ""
            for alias in node.names:
                submodule = f"{origin}.{alias.name}"
                target = submodule if submodule in modules else _nearest(origin, modules)
                found.append(Import(module, target, node.lineno, lazy, type_checking))
        for child in ast.iter_child_nodes(node):
            visit(child, lazy, type_checking)

    visit(tree, False, False)
    return [i for i in found if i.target != module]


def all_imports(root: Path, packages: tuple[str, ...] = PACKAGES) -> list[Import]:
    modules = find_modules(root, packages)
    return [i for name, path in modules.items() for i in imports_of(name, path, modules)]


def _ours(target: str, packages: tuple[str, ...] = PACKAGES) -> bool:
    return target.split(".")[0] in packages


# ---------------------------------------------------------------- the checks


def unplaced_modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    return [name for name in find_modules(root, packages) if floor_of(name) is None]


def import_cycles(imports: list[Import]) -> list[list[str]]:
    """Strongly connected groups (2+ modules) of the module-level import graph (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for i in imports:
        if not i.lazy and not i.type_checking and _ours(i.target):
            graph.setdefault(i.source, set()).add(i.target)
            graph.setdefault(i.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        for node in sorted(graph):
            if node not in index:
                connect(node)
    finally:
        sys.setrecursionlimit(limit)
    return cycles


def upward_imports(imports: list[Import]) -> list[str]:
    """Imports that go up a floor, or across between the worker and the HTTP layer (lazy ones too,
    except from an entry point)."""
    wrong = []
    for i in imports:
        if not _ours(i.target):
            continue
        source, target = floor_of(i.source), floor_of(i.target)
        if source is None or target is None or source == ENTRY_FLOOR:
            continue  # unplaced modules have their own failure
        if RANK[target] > RANK[source] or (RANK[target] == RANK[source] and target != source):
            wrong.append(f"{i} ({source} -> {target})")
    return wrong


def forbidden_imports(imports: list[Import]) -> list[str]:
    """Imports of FastAPI, Starlette or the HTTP app from the worker or the job system, at any level."""
    wrong = []
    for i in imports:
        if floor_of(i.source) not in (WORKER, JOBSYSTEM):
            continue
        if any(i.target == name or i.target.startswith(name + ".") for name in FORBIDDEN):
            wrong.append(str(i))
    return wrong


def core_imports_of_the_service(imports: list[Import]) -> list[str]:
    """Module-level imports of ``service`` or ``worker`` from anywhere in ``megasr_core``."""
    return [
        str(i)
        for i in imports
        if i.source.split(".")[0] == "megasr_core"
        and not i.lazy
        and not i.type_checking
        and i.target.split(".")[0] in ("service", "worker")
    ]


def loaded_after_import(modules: list[str], watched: tuple[str, ...], cwd: Path = ROOT) -> list[str]:
    """Which of ``watched`` are in ``sys.modules`` after a fresh interpreter imports ``modules``."""
    script = (
        f"import importlib, json, sys\nfor name in {modules!r}:\n    importlib.import_module(name)\n"
        f"print(json.dumps([m for m in {list(watched)!r} if m in sys.modules]))"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- on the real tree


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return all_imports(ROOT)


def test_every_module_has_a_floor():
    unplaced = unplaced_modules(ROOT)
    assert not unplaced, (
        f"modules without a floor: {unplaced}; add each to FOUNDATION, HTTP or ENTRY in tests/test_layers.py "
        "(or give its package a prefix rule in floor_of)"
    )


def test_no_import_cycles(imports):
    assert import_cycles(imports) == []


def test_no_upward_imports(imports):
    assert upward_imports(imports) == []


def test_the_worker_and_the_job_system_never_import_fastapi_or_the_app(imports):
    assert forbidden_imports(imports) == []


def test_the_core_library_never_imports_the_service_at_module_level(imports):
    assert core_imports_of_the_service(imports) == []


def test_importing_the_worker_and_the_job_system_loads_no_fastapi_and_no_app():
    jobsystem = sorted(name for name in find_modules(ROOT, ("service",)) if floor_of(name) == JOBSYSTEM)
    assert "service.jobsystem.services" in jobsystem
    modules = ["worker.main", "worker.runtime", "worker.tasks", "worker.batching", *jobsystem]
    assert loaded_after_import(modules, ("fastapi", "starlette", "service.app", "service.deps")) == []


# ---------------------------------------------------------------- each check fails on a broken tree


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    for package in PACKAGES:
        (root / package).mkdir(exist_ok=True)
    return root


def test_the_checks_pass_a_clean_synthetic_tree(tmp_path):
    root = _tree(
        tmp_path,
        {
            "megasr_core/__init__.py": "",
            "megasr_core/geometry.py": "import math\n",
            "service/__init__.py": "",
            "service/contracts.py": "from megasr_core.geometry import math\n",
            "service/jobsystem/__init__.py": "",
            "service/jobsystem/store.py": "from service.contracts import x\nfrom . import keys\n",
            "service/jobsystem/keys.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .store import y\n"
            ),
            "service/app.py": "import fastapi\nfrom .jobsystem import store\n",
            "worker/__init__.py": "",
            "worker/tasks.py": (
                "from service.jobsystem.store import z\ndef f():\n    from megasr_core import geometry\n"
            ),
            "service/api_server.py": "from .app import a\n",
            "megasr_core/cli/__init__.py": "def serve():\n    from service.app import create_app\n",
        },
    )
    found = all_imports(root)
    assert unplaced_modules(root) == []
    assert import_cycles(found) == []
    assert upward_imports(found) == []
    assert forbidden_imports(found) == []
    assert core_imports_of_the_service(found) == []


def test_a_module_without_a_floor_is_named(tmp_path):
    root = _tree(tmp_path, {"service/__init__.py": "", "service/newcomer.py": ""})
    assert unplaced_modules(root) == ["service.newcomer"]


def test_a_cycle_is_found_but_not_through_lazy_or_type_checking_imports(tmp_path):
    root = _tree(
        tmp_path,
        {
            "service/jobsystem/__init__.py": "",
            "service/jobsystem/a.py": "from . import b\n",
            "service/jobsystem/b.py": "from .c import x\n",
            "service/jobsystem/c.py": "import service.jobsystem.a\n",
            "service/jobsystem/d.py": "from . import e\n",
            "service/jobsystem/e.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import d\n"
            "def f():\n    from . import d\n",
        },
    )
    assert import_cycles(all_imports(root)) == [["service.jobsystem.a", "service.jobsystem.b", "service.jobsystem.c"]]


def test_upward_and_sideways_imports_are_found(tmp_path):
    root = _tree(
        tmp_path,
        {
            "megasr_core/geometry.py": "def f():\n    from service.contracts import x\n",
            "service/contracts.py": "",
            "service/config.py": "from service.jobsystem import store\n",
            "service/jobsystem/__init__.py": "",
            "service/jobsystem/store.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import worker.tasks\n"
            ),
            "worker/tasks.py": "from service import images\n",
            "service/images.py": "def f():\n    import worker.tasks\n",
            "service/api_server.py": "import worker.tasks\nfrom service import images\n",
        },
    )
    wrong = upward_imports(all_imports(root))
    assert [line.split(" ")[0] for line in wrong] == [
        "megasr_core.geometry:2",
        "service.config:1",
        "service.images:2",
        "service.jobsystem.store:3",
        "worker.tasks:1",
    ]


def test_fastapi_or_the_app_in_the_worker_or_the_job_system_is_found_even_lazily(tmp_path):
    root = _tree(
        tmp_path,
        {
            "service/jobsystem/__init__.py": "",
            "service/jobsystem/services.py": "def f():\n    from starlette.requests import Request\n",
            "worker/runtime.py": "from service.app import build_services\n",
            "worker/tasks.py": "def f():\n    import fastapi\n",
            "worker/main.py": "from service.routes.jobs import x\n",
            "service/deps.py": "import fastapi\n",  # the HTTP layer may
        },
    )
    assert sorted(forbidden_imports(all_imports(root))) == [
        "service.jobsystem.services:2 lazy imports starlette.requests",
        "worker.main:1 imports service.routes.jobs",
        "worker.runtime:1 imports service.app",
        "worker.tasks:2 lazy imports fastapi",
    ]


def test_a_module_level_import_of_the_service_from_the_core_is_found(tmp_path):
    root = _tree(
        tmp_path,
        {
            "megasr_core/cli/__init__.py": "import worker.main\ndef serve():\n    import service.app\n",
            "megasr_core/weights.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from service import config\n",
        },
    )
    assert core_imports_of_the_service(all_imports(root)) == ["megasr_core.cli:1 imports worker.main"]


def test_the_runtime_check_sees_what_an_import_loads():
    assert loaded_after_import(["service.app"], ("fastapi", "service.app")) == ["fastapi", "service.app"]
