"""The layers cannot be crossed by accident: shared <- runtimes <- agent, shared <- runtimes <- control plane.

Every import statement of every module is read from the source (``ast``; nothing is imported),
inside functions and ``TYPE_CHECKING`` blocks too: a deferred import still ties the layers. The
same rules are an import-linter contract in pyproject.toml, run by ``make lint``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Source folder -> the package it is installed as (pyproject.toml's package-dir).
SOURCES = {
    "edgefleet": "edgefleet",
    "agent": "edgefleet.agent",
    "control_plane": "edgefleet.control_plane",
    "shared": "edgefleet.shared",
}
# Other Python files in the repository: they may import edgefleet, never the bare folders.
OTHER_PYTHON = ("tests", "bench", "docs")

AGENT = "edgefleet.agent"
CONTROL_PLANE = "edgefleet.control_plane"
SHARED = "edgefleet.shared"
RUNTIMES = "edgefleet.shared.runtimes"
BARE_TOP_LEVEL = {"agent", "control_plane", "shared"}

# Known crossings: none. Kept as the one place to list a deliberate, commented exception.
KNOWN_CROSSINGS: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    """The installed module name of a source file, e.g. ``agent/cli.py`` -> ``edgefleet.agent.cli``."""
    folder, *rest = path.relative_to(ROOT).with_suffix("").parts
    if rest[-1] == "__init__":
        rest = rest[:-1]
    return ".".join([SOURCES[folder], *rest])


def imported_modules(source: str, module: str, *, is_package: bool) -> Iterator[tuple[int, str]]:
    """``(line, module)`` for each import in ``source``, relative imports resolved against ``module``.

    ``from a import b`` yields ``a`` and ``a.b``: ``b`` may be a submodule, and a rule on ``a.b``
    must see it.
    """
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def crossing(importer: str, imported: str) -> str | None:
    """Why ``importer`` must not import ``imported``, or None if it may."""
    if imported.partition(".")[0] in BARE_TOP_LEVEL:
        return "the source folders are installed under edgefleet.*; import edgefleet.<side>..."
    if within(importer, SHARED):
        if within(imported, AGENT) or within(imported, CONTROL_PLANE):
            return "shared is imported by both sides and imports neither"
        if within(imported, RUNTIMES) and not within(importer, RUNTIMES):
            return "the runtimes build on the rest of shared, not the other way"
    if within(importer, CONTROL_PLANE) and within(imported, AGENT):
        return "the control plane drives agents as processes, never imports the agent package"
    if within(importer, AGENT) and within(imported, CONTROL_PLANE):
        return "the agent talks to the control plane over MQTT and HTTP only"
    return None


def _known(importer: str, imported: str) -> bool:
    return any(importer == known and within(imported, target) for known, target in KNOWN_CROSSINGS)


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    return imported_modules(path.read_text(), module_name(path), is_package=path.name == "__init__.py")


def violations(path: Path) -> list[str]:
    module = module_name(path)
    found = []
    for line, imported in _imports(path):
        reason = crossing(module, imported)
        if reason and not _known(module, imported):
            found.append(f"{path.relative_to(ROOT)}:{line}: {module} imports {imported}: {reason}")
    return found


def _python_files(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


SOURCE_FILES = [path for folder in SOURCES for path in _python_files(folder)]
OTHER_FILES = [path for folder in OTHER_PYTHON for path in _python_files(folder)]


def test_the_source_is_found() -> None:
    names = {module_name(path) for path in SOURCE_FILES}
    assert {"edgefleet", "edgefleet.shared.errors", "edgefleet.agent.cli", "edgefleet.control_plane.app"} <= names
    assert len(OTHER_FILES) > 20


@pytest.mark.parametrize("path", SOURCE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_source_module_crosses_a_layer(path: Path) -> None:
    assert violations(path) == []


@pytest.mark.parametrize("path", OTHER_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_tests_and_tools_import_the_installed_names(path: Path) -> None:
    bare = [
        f"{path.relative_to(ROOT)}:{line}: {imported}"
        for line, imported in imported_modules(path.read_text(), "tests", is_package=True)
        if imported.partition(".")[0] in BARE_TOP_LEVEL
    ]
    assert bare == []


def test_known_crossings_still_exist() -> None:
    # A crossing its owner removed must leave KNOWN_CROSSINGS (and pyproject's ignore_imports).
    present = {(module_name(path), imported) for path in SOURCE_FILES for _, imported in _imports(path)}
    assert KNOWN_CROSSINGS - present == set()


# --- the rules themselves, on made-up modules --------------------------------------------------


@pytest.mark.parametrize(
    ("importer", "source", "reason"),
    [
        ("edgefleet.shared.bundle.format", "from edgefleet.agent import cli", "imports neither"),
        ("edgefleet.shared.wire.topics", "import edgefleet.control_plane.app", "imports neither"),
        ("edgefleet.shared.trust.keyring", "from edgefleet.shared.runtimes import load_model", "runtimes build"),
        ("edgefleet.shared.errors", "from edgefleet.shared import runtimes", "runtimes build"),
        ("edgefleet.control_plane.services.x", "from edgefleet.agent.config import AgentConfig", "processes"),
        ("edgefleet.control_plane.api.x", "def f():\n    import edgefleet.agent.cli\n", "processes"),
        ("edgefleet.control_plane.x", "from ..agent import cli", "processes"),
        ("edgefleet.agent.deployment.x", "from edgefleet.control_plane.client import EdgefleetClient", "MQTT"),
        ("edgefleet.agent.x", "from shared.errors import EdgefleetError", "installed under edgefleet"),
        ("edgefleet.agent.x", "import control_plane", "installed under edgefleet"),
    ],
)
def test_a_crossing_is_caught(importer: str, source: str, reason: str) -> None:
    reasons = [crossing(importer, imported) for _, imported in imported_modules(source, importer, is_package=False)]
    assert any(r and reason in r for r in reasons), reasons


@pytest.mark.parametrize(
    ("importer", "source"),
    [
        ("edgefleet.agent.deployment.x", "from edgefleet.shared.runtimes import load_model"),
        ("edgefleet.control_plane.services.x", "from edgefleet.shared.runtimes.base import LoadedModel"),
        ("edgefleet.shared.runtimes.onnx_backend", "from edgefleet.shared.runtimes.base import LoadedModel"),
        ("edgefleet.shared.runtimes.base", "from edgefleet.shared.tensors import TensorSpec"),
        ("edgefleet.shared.runtimes.base", "from ..errors import InferenceError"),
        ("edgefleet.agent.cli", "from edgefleet.agent.config import AgentConfig"),
        ("edgefleet", "from edgefleet.control_plane.client import EdgefleetClient"),
    ],
)
def test_an_import_along_the_layers_is_allowed(importer: str, source: str) -> None:
    imported = [m for _, m in imported_modules(source, importer, is_package=False)]
    assert imported
    assert {m: crossing(importer, m) for m in imported} == dict.fromkeys(imported)


def test_relative_imports_resolve_against_the_package() -> None:
    source = "from . import a\nfrom .. import b\nfrom .c import d\n"
    assert [m for _, m in imported_modules(source, "edgefleet.shared.wire.x", is_package=False)] == [
        "edgefleet.shared.wire",
        "edgefleet.shared.wire.a",
        "edgefleet.shared",
        "edgefleet.shared.b",
        "edgefleet.shared.wire.c",
        "edgefleet.shared.wire.c.d",
    ]
    assert [m for _, m in imported_modules("from . import a", "edgefleet.shared", is_package=True)] == [
        "edgefleet.shared",
        "edgefleet.shared.a",
    ]
