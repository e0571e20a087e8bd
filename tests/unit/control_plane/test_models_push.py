"""``edgefleet models push`` without --key sends every publish option (they were silently dropped)."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from edgefleet.control_plane.cli import main as cli
from edgefleet.control_plane.client import EdgefleetClient

PUBLISHED = {"name": "m", "version": "1.2.0", "runtime": "onnx", "bundle_digest": "sha256:" + "0" * 64,
             "bundle_size": 1}


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[httpx.Request]:
    """The requests the CLI sends, answered as the control plane would."""
    requests: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(201, json=PUBLISHED)

    def client(api_url: str) -> EdgefleetClient:
        sdk = EdgefleetClient(api_url)
        sdk._http = httpx.Client(base_url=api_url, transport=httpx.MockTransport(answer))
        return sdk

    monkeypatch.setattr(cli, "_client", client)
    monkeypatch.delenv("EDGEFLEET_PUBLISHER_KEY", raising=False)
    monkeypatch.delenv("EDGEFLEET_PUBLISHER_KEY_PEM", raising=False)
    return requests


def _form_field(body: bytes, name: str) -> bytes:
    marker = f'name="{name}"\r\n\r\n'.encode()
    assert marker in body, f"no form field {name!r}"
    return body.split(marker, 1)[1].split(b"\r\n", 1)[0]


def test_push_without_a_key_sends_the_floor_the_budget_and_the_health_inputs(
    sent: list[httpx.Request], tmp_path: Path
) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"model bytes")
    samples = tmp_path / "samples.npz"
    np.savez(samples, input=np.ones((1, 4), np.float32))

    result = CliRunner().invoke(cli.app, [
        "models", "push", str(model), "--name", "m", "--version", "1.2.0", "--min-version", "1.0.0",
        "--latency-budget-ms", "40", "--health-inputs", str(samples), "--api-url", "http://cp.test",
    ])

    assert result.exit_code == 0, result.output
    [request] = sent
    assert (request.method, request.url.path) == ("POST", "/api/v1/models")
    body = request.read()
    assert _form_field(body, "name") == b"m"
    assert _form_field(body, "min_version") == b"1.0.0"
    assert float(_form_field(body, "latency_budget_ms")) == 40.0
    assert b'name="file"; filename="m.onnx"' in body
    assert b'name="health_inputs"; filename="samples.npz"' in body
    assert samples.read_bytes() in body


def test_push_without_options_sends_only_the_form_it_always_sent(sent: list[httpx.Request], tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"model bytes")

    result = CliRunner().invoke(cli.app, ["models", "push", str(model), "--name", "m", "--version", "1",
                                          "--api-url", "http://cp.test"])

    assert result.exit_code == 0, result.output
    body = sent[0].read()
    for absent in (b"min_version", b"latency_budget_ms", b"health_inputs", b'name="runtime"'):
        assert absent not in body
