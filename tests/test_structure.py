"""Who may import whom (ARCHITECTURE.md, "Rooms"), read from the source, lazy imports included.

- ``service.core`` imports nothing of the gateway, the workers or the engine, and no web framework;
- the gateway (the rest of ``service``) never imports ``worker``; only ``service.cli`` and
  ``service.up`` know every part;
- ``worker`` never imports the gateway, only the core and the engine;
- ``adapters`` (the engine) imports nothing of the service;
- no import circle among the project's modules.

And the engine's public surface is the one docs/engine-api.md describes.
"""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import adapters

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("adapters", "service", "worker")
WEB = ("fastapi", "starlette", "uvicorn")
KNOWS_EVERY_PART = ("service.cli", "service.up")


def _modules() -> dict[str, Path]:
    paths = [path for package in PACKAGES for path in (REPO / package).rglob("*.py")]
    return {
        ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): path for path in paths
    }


MODULES = _modules()


def _imported_names(module: str, path: Path) -> set[str]:
    """Every module name an import statement anywhere in the file names, inside functions too."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _project_module(name: str) -> str | None:
    """The project module an imported name lands in (``a.b.C`` -> ``a.b``), or None for a library."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


IMPORTS = {module: _imported_names(module, path) for module, path in MODULES.items()}
# Edges between project modules; a module's own package's __init__ is where it lives, not an import.
GRAPH = {
    module: {
        target
        for name in names
        if (target := _project_module(name)) is not None and target != module and not module.startswith(target + ".")
    }
    for module, names in IMPORTS.items()
}


def _circles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in GRAPH[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in GRAPH:
        if module not in index:
            visit(module)
    return circles


def _room(module: str) -> str:
    if module == "service.core" or module.startswith("service.core."):
        return "core"
    if module in KNOWS_EVERY_PART:
        return "cli"
    return {"adapters": "engine", "service": "gateway", "worker": "worker"}[module.split(".")[0]]


def test_the_graph_sees_lazy_imports() -> None:
    # The gateway loads the engine only inside the import route; a walk of the top level would miss it.
    assert "adapters" in GRAPH["service.bundles"]


def test_no_import_circle_among_the_projects_modules() -> None:
    assert _circles() == []


@pytest.mark.parametrize(
    ("room", "may_not_import"),
    [
        ("core", ("gateway", "worker", "engine", "cli")),
        ("gateway", ("worker", "cli")),
        ("worker", ("gateway", "cli")),
        ("engine", ("core", "gateway", "worker", "cli")),
    ],
)
def test_each_room_imports_only_what_it_may(room: str, may_not_import: tuple[str, ...]) -> None:
    wrong = {
        module: sorted(target for target in targets if _room(target) in may_not_import)
        for module, targets in GRAPH.items()
        if _room(module) == room
    }
    assert {module: targets for module, targets in wrong.items() if targets} == {}


def test_the_core_names_no_web_framework_and_no_model_library() -> None:
    forbidden = (*WEB, "torch", "diffusers")
    found = {
        module: sorted(name for name in names if name.split(".")[0] in forbidden)
        for module, names in IMPORTS.items()
        if _room(module) == "core"
    }
    assert {module: names for module, names in found.items() if names} == {}


def _loaded_by(statement: str, watched: tuple[str, ...]) -> list[str]:
    """Which of ``watched`` a fresh interpreter has loaded after running ``statement``."""
    probe = f"import sys\n{statement}\nprint(','.join(m for m in {watched!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [name for name in result.stdout.strip().split(",") if name]


def test_a_worker_process_loads_no_web_framework() -> None:
    assert _loaded_by("import worker.tasks, worker.app", WEB) == []


def test_the_core_loads_neither_a_web_framework_nor_torch() -> None:
    core = sorted(module for module in MODULES if _room(module) == "core")
    assert _loaded_by("\n".join(f"import {module}" for module in core), (*WEB, "torch")) == []


def test_the_engine_api_page_names_every_export() -> None:
    documented = set(re.findall(r"^\s{4}(\w+),", (REPO / "docs" / "engine-api.md").read_text(), re.MULTILINE))
    assert documented == set(adapters.__all__)
