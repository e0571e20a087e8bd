"""The one exception tree: every exception class edgefleet defines is in it, and it is drawn truly.

The drawing in :mod:`edgefleet.shared.errors`' docstring is the reference a caller reads, so it
is checked against the code: the classes, their parents, their HTTP status and retry flag.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import pkgutil
import re
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

import pytest

from edgefleet.control_plane.api.errors import edgefleet_error_handler
from edgefleet.shared import errors
from edgefleet.shared.errors import EdgefleetError

# The namespace's own module and the three source folders it maps (see pyproject.toml): the
# editable install's finder maps the folders, so edgefleet.__path__ alone does not list them.
PACKAGES = ("edgefleet", "edgefleet.agent", "edgefleet.control_plane", "edgefleet.shared")

# Exception classes allowed outside the tree: none (the set stays, empty, as the one place to
# name a deliberate exception).
KNOWN_OUTSIDE: set[str] = set()

# One line of the drawing: tree glyphs, the class name (private ones too), its HTTP status,
# "retry" if retryable, then a description. The name's column gives its depth.
_TREE_LINE = re.compile(r"^(?P<indent>[ │├└─]*)(?P<name>_?[A-Z]\w*)\s+(?P<status>\d{3})(?P<retry> retry)?\s{2,}\S")


@dataclass(frozen=True)
class Drawn:
    """One class as the docstring draws it."""

    name: str
    parent: str | None
    http_status: int
    retryable: bool


def _modules() -> Iterator[ModuleType]:
    seen: set[str] = set()
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        names = [package_name] + [info.name for info in pkgutil.walk_packages(package.__path__, package_name + ".")]
        for name in names:
            # python -m entry points run their CLI when imported, and alembic's migration scripts
            # run only inside alembic (they define no exceptions).
            if name in seen or name.endswith(".__main__") or ".db.migrations" in name:
                continue
            seen.add(name)
            yield importlib.import_module(name)


def _defined_exceptions() -> dict[str, type[BaseException]]:
    """Every exception class defined in edgefleet, by qualified name (module.Class)."""
    found: dict[str, type[BaseException]] = {}
    for module in _modules():
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and issubclass(cls, BaseException):
                found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return found


def _drawn_tree() -> dict[str, Drawn]:
    doc = errors.__doc__ or ""
    block = doc.split("The tree", 1)[1].split("::", 1)[1]
    drawn: dict[str, Drawn] = {}
    parents: list[str] = []  # the chain of names above the current line, one per depth
    for line in block.strip("\n").splitlines():
        if not line.strip():
            break
        match = _TREE_LINE.match(line.strip("\n")[4:])  # the block is indented by four spaces
        assert match, f"not a line of the tree: {line!r}"
        depth = len(match["indent"]) // 4
        name = match["name"]
        assert name not in drawn, f"{name} is drawn twice"
        del parents[depth:]
        assert len(parents) == depth, f"{name} is drawn deeper than the line above it"
        drawn[name] = Drawn(name, parents[-1] if parents else None, int(match["status"]), bool(match["retry"]))
        parents.append(name)
    return drawn


DEFINED = _defined_exceptions()
DRAWN = _drawn_tree()
IN_TREE = {qualified: cls for qualified, cls in DEFINED.items() if qualified not in KNOWN_OUTSIDE}


def test_the_drawing_is_parsed() -> None:
    assert next(iter(DRAWN)) == "EdgefleetError"
    assert DRAWN["SignatureError"].parent == "TrustError"
    assert DRAWN["TransferError"].retryable
    assert len(DRAWN) >= 20


@pytest.mark.parametrize("qualified", sorted(IN_TREE))
def test_every_exception_derives_from_the_root(qualified: str) -> None:
    assert issubclass(IN_TREE[qualified], EdgefleetError), f"{qualified} must derive from EdgefleetError"


@pytest.mark.parametrize("qualified", sorted(IN_TREE))
def test_every_exception_is_drawn_under_its_parent(qualified: str) -> None:
    cls = IN_TREE[qualified]
    assert cls.__name__ in DRAWN, f"{qualified} is not drawn in the tree in edgefleet.shared.errors"
    drawn = DRAWN[cls.__name__]
    if cls is EdgefleetError:
        assert drawn.parent is None
        return
    bases = [base.__name__ for base in cls.__bases__ if issubclass(base, BaseException)]
    assert bases == [drawn.parent], f"{qualified} derives from {bases}, the tree draws it under {drawn.parent}"


@pytest.mark.parametrize("qualified", sorted(IN_TREE))
def test_the_drawing_shows_each_class_status_and_retry_flag(qualified: str) -> None:
    cls = IN_TREE[qualified]
    assert issubclass(cls, EdgefleetError)
    drawn = DRAWN[cls.__name__]
    assert (cls.http_status, cls.retryable) == (drawn.http_status, drawn.retryable), qualified


def test_the_drawing_names_no_class_that_does_not_exist() -> None:
    defined = {cls.__name__ for cls in IN_TREE.values()}
    assert set(DRAWN) - defined == set()


def test_class_names_are_unique_so_the_drawing_is_unambiguous() -> None:
    names = [cls.__name__ for cls in DEFINED.values()]
    assert sorted(name for name in set(names) if names.count(name) > 1) == []


def test_known_outside_lists_only_classes_that_exist() -> None:
    # An entry whose class was moved or renamed must leave the set, so the set only shrinks.
    assert KNOWN_OUTSIDE - set(DEFINED) == set()


def test_each_class_has_its_own_unique_code() -> None:
    codes: dict[str, str] = {}
    for qualified, cls in IN_TREE.items():
        assert "code" in vars(cls), f"{qualified} inherits its code; events could not tell it from its parent"
        code = vars(cls)["code"]
        assert re.fullmatch(r"[a-z][a-z_]*", code), f"{qualified}.code = {code!r}"
        assert code not in codes, f"{qualified} and {codes[code]} share the code {code!r}"
        codes[code] = qualified


@pytest.mark.parametrize("cls", [cls for cls in IN_TREE.values() if issubclass(cls, EdgefleetError)])
def test_statuses_are_errors_and_only_retryable_errors_ask_for_a_retry(cls: type[EdgefleetError]) -> None:
    assert 400 <= cls.http_status <= 599
    assert (cls.http_status == 503) == cls.retryable


@pytest.mark.parametrize("cls", [cls for cls in IN_TREE.values() if issubclass(cls, EdgefleetError)])
def test_only_transfers_are_retryable(cls: type[EdgefleetError]) -> None:
    assert cls.retryable == issubclass(cls, errors.TransferError)


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (errors.NotFoundError("x"), 404),
        (errors.ConflictError("x"), 409),
        (errors.TooLargeError("x"), 413),
        (errors.UnknownSchemaError("x"), 400),
        (errors.SignatureError("x"), 400),
        (errors.DowngradeError("x"), 400),
        (errors.RuntimeLoadError("x"), 400),
        (errors.ConfigError("x"), 400),
        (errors.InferenceError("x"), 400),
        (errors.TransferError("x"), 503),
        (errors.BrokerError("x"), 500),
        (EdgefleetError("x"), 500),
    ],
)
def test_the_api_answers_with_the_class_status(error: EdgefleetError, status: int) -> None:
    response = asyncio.run(edgefleet_error_handler(None, error))  # type: ignore[arg-type]
    assert response.status_code == status
    assert json.loads(bytes(response.body)) == {
        "detail": {"code": error.code, "message": "x", "retryable": error.retryable}
    }
