"""edgefleet: signed ML model bundles for fleets of edge devices.

The distribution installs this one namespace. Its parts live in the repository's top-level
folders and are mapped here at install time (see ``pyproject.toml``):

- ``edgefleet.shared``: what both sides use (bundle format, signing, wire schemas, runtimes).
- ``edgefleet.agent``: the device agent.
- ``edgefleet.control_plane``: the server, its CLI and the SDK client.

The SDK is one import: ``from edgefleet import Client``. It is resolved lazily so that importing
the namespace (as every submodule import does) costs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Client"]

if TYPE_CHECKING:
    from edgefleet.control_plane.client import EdgefleetClient as Client


def __getattr__(name: str) -> Any:
    if name == "Client":
        from edgefleet.control_plane.client import EdgefleetClient

        return EdgefleetClient
    raise AttributeError(f"module 'edgefleet' has no attribute {name!r}")
