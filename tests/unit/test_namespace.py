"""The one-line SDK import the README shows works, and importing the namespace stays cheap."""

from __future__ import annotations

import subprocess
import sys


def test_the_readme_sdk_import_gives_the_rest_client() -> None:
    from edgefleet import Client
    from edgefleet.control_plane.client import EdgefleetClient

    assert Client is EdgefleetClient


def test_unknown_namespace_attributes_raise_attribute_error() -> None:
    import edgefleet

    try:
        edgefleet.NoSuchThing  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("edgefleet.NoSuchThing resolved")


def test_importing_the_namespace_loads_no_runtime_or_server_code() -> None:
    # A notebook that imports the SDK must not pay for onnxruntime, FastAPI or the agent.
    code = (
        "import sys, edgefleet; from edgefleet import Client; "
        "heavy = [m for m in ('onnxruntime', 'fastapi', 'sqlmodel', 'edgefleet.agent') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
