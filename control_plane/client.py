"""A small Python SDK for the control plane's REST API (used by the CLI, the demo and notebooks).

>>> from edgefleet.control_plane.client import EdgefleetClient
>>> with EdgefleetClient("http://127.0.0.1:8700") as ef:
...     ef.push_model("model.onnx", name="classifier", version="1.0.0")
...     ef.deploy("classifier", "1.0.0", devices=["pi-01"])

Every call but :meth:`EdgefleetClient.healthy` needs an API token. :func:`resolve_token` finds
one, first found wins: the ``token`` argument, ``$EDGEFLEET_TOKEN``, the file named by
``$EDGEFLEET_TOKEN_FILE``, the config file ``~/.config/edgefleet/token`` (``$XDG_CONFIG_HOME``
if set), and last the admin token a control plane on this machine wrote at its first start,
``<data dir>/admin-token`` (``$EDGEFLEET_DATA_DIR``, default ``.edgefleet``, as the server's).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from edgefleet.shared.errors import EdgefleetError, MessageError, NotFoundError, TransferError

DEFAULT_API_URL = "http://127.0.0.1:8700"
TOKEN_ENV = "EDGEFLEET_TOKEN"
TOKEN_FILE_ENV = "EDGEFLEET_TOKEN_FILE"
DEFAULT_DATA_DIR = ".edgefleet"  # the server's default data dir (ServerSettings.data_dir)
ADMIN_TOKEN_FILE = "admin-token"  # what the server writes there at its first start
MAX_TOKEN_FILE_BYTES = 4096  # bytes: a token file is one short line
_NO_TOKEN_HINT = (
    "no API token was sent: export EDGEFLEET_TOKEN=<token> (a control plane's first start writes an "
    "admin token to <data dir>/admin-token)"
)


def token_sources(env: Mapping[str, str] | None = None) -> list[Path]:
    """The files :func:`resolve_token` reads, in order, for this environment."""
    env = os.environ if env is None else env
    files = [Path(env[TOKEN_FILE_ENV])] if env.get(TOKEN_FILE_ENV) else []
    config_home = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    files.append(config_home / "edgefleet" / "token")
    files.append(Path(env.get("EDGEFLEET_DATA_DIR") or DEFAULT_DATA_DIR) / ADMIN_TOKEN_FILE)
    return files


def resolve_token(token: str | None = None, *, env: Mapping[str, str] | None = None) -> str | None:
    """The API token to send: the argument, ``$EDGEFLEET_TOKEN``, or the first readable token file.

    Args:
        token: A token given explicitly (wins over everything).
        env: The environment to read (default: the process's).

    Returns:
        The token, or None if there is none anywhere (calls then get 401).
    """
    env = os.environ if env is None else env
    if token:
        return token.strip()
    if env.get(TOKEN_ENV):
        return env[TOKEN_ENV].strip()
    for path in token_sources(env):
        try:
            with path.open("rb") as f:
                text = f.read(MAX_TOKEN_FILE_BYTES).decode("utf-8", errors="replace").strip()
        except OSError:
            continue
        if text:
            return text
    return None


class ApiError(EdgefleetError):
    """The control plane answered with an error status."""

    code = "api_error"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class EdgefleetClient:
    """Thin, typed wrapper over ``/api/v1``; errors become :class:`ApiError`."""

    def __init__(self, base_url: str = DEFAULT_API_URL, *, token: str | None = None, timeout_s: float = 30.0) -> None:
        """Connect to the control plane at ``base_url`` with ``token`` (default: :func:`resolve_token`)."""
        resolved = resolve_token(token)
        headers = {"Authorization": f"Bearer {resolved}"} if resolved else {}
        self._has_token = resolved is not None
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout_s, headers=headers)

    def __enter__(self) -> EdgefleetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise TransferError(f"cannot reach the control plane at {self._http.base_url}: {exc}") from exc
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = None
            detail = body.get("detail", response.text) if isinstance(body, dict) else response.text
            if isinstance(detail, dict):
                detail = detail.get("message", detail)
            if response.status_code == 404:
                raise NotFoundError(str(detail))
            if response.status_code == 401 and not self._has_token:
                detail = _NO_TOKEN_HINT
            raise ApiError(response.status_code, str(detail))
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise MessageError(f"{self._http.base_url} answered {method} {path} with a body that is not JSON") from exc

    def healthy(self) -> bool:
        """True if the control plane answers its health check."""
        try:
            return self._http.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    def info(self) -> dict[str, Any]:
        """Server version, broker address and the public keys agents pin."""
        return self._call("GET", "/api/v1/info")

    def push_model(
        self, path: str | Path, *, name: str, version: str, runtime: str | None = None, description: str = ""
    ) -> dict[str, Any]:
        """Upload a model file; the control plane packs and signs it into a bundle."""
        path = Path(path)
        data = {"name": name, "version": version, "description": description}
        if runtime:
            data["runtime"] = runtime
        with path.open("rb") as f:
            return self._call("POST", "/api/v1/models", data=data, files={"file": (path.name, f)})

    def models(self) -> list[dict[str, Any]]:
        """Every published model version."""
        return self._call("GET", "/api/v1/models")

    def deploy(self, model: str, version: str, *, devices: list[str]) -> list[dict[str, Any]]:
        """Make ``devices`` run ``model`` at ``version``; returns one deployment per device."""
        return self._call("POST", "/api/v1/deployments", json={"model": model, "version": version, "devices": devices})

    def deployments(self, *, device: str | None = None, model: str | None = None) -> list[dict[str, Any]]:
        """Deployments, optionally filtered."""
        params = {k: v for k, v in (("device", device), ("model", model)) if v}
        return self._call("GET", "/api/v1/deployments", params=params)

    def deployment(self, deployment_id: int) -> dict[str, Any]:
        """One deployment by id."""
        return self._call("GET", f"/api/v1/deployments/{deployment_id}")

    def shadow(self, model: str, version: str, *, devices: list[str], sample_rate: float) -> list[dict[str, Any]]:
        """Run ``version`` as a shadow beside the serving version of ``model`` on ``devices``."""
        body = {"model": model, "version": version, "devices": devices, "sample_rate": sample_rate}
        return self._call("POST", "/api/v1/shadows", json=body)

    def shadows(self, *, model: str | None = None, device: str | None = None) -> list[dict[str, Any]]:
        """Shadows asked for or reported, with each device's latest report, optionally filtered."""
        params = {k: v for k, v in (("model", model), ("device", device)) if v}
        return self._call("GET", "/api/v1/shadows", params=params)

    def remove_shadow(self, model: str, *, devices: list[str]) -> None:
        """Stop the shadow of ``model`` on ``devices``."""
        self._call("DELETE", f"/api/v1/shadows/{model}", params={"device": devices})

    def create_enrollment(self, device_id: str, *, ttl_s: int = 3600) -> dict[str, Any]:
        """A one-time enrollment token for ``device_id`` (give it to ``edgefleet-agent enroll``)."""
        return self._call("POST", "/api/v1/enrollments", json={"device_id": device_id, "ttl_s": ttl_s})

    def push_bundle(self, path: str | Path) -> dict[str, Any]:
        """Upload a bundle signed with a publisher key (see ``edgefleet models push --key``)."""
        with Path(path).open("rb") as f:
            return self._call(
                "POST", "/api/v1/bundles", content=f.read(), headers={"content-type": "application/octet-stream"}
            )

    def trust(self) -> dict[str, Any]:
        """The current keyring, readable."""
        return self._call("GET", "/api/v1/trust")

    def rotate_keyring(self, **changes: Any) -> dict[str, Any]:
        """Issue the next keyring version (publisher_keys, publisher_threshold, rotate_online, rotate_root)."""
        return self._call("POST", "/api/v1/trust/rotate", json=changes)

    def create_token(self, *, name: str, role: str, expires_in_s: int | None = None) -> dict[str, Any]:
        """Create an API token (admin); the answer's ``token`` is shown this once."""
        return self._call("POST", "/api/v1/tokens", json={"name": name, "role": role, "expires_in_s": expires_in_s})

    def tokens(self) -> list[dict[str, Any]]:
        """Every API token, revoked and expired ones too (never the tokens themselves)."""
        return self._call("GET", "/api/v1/tokens")

    def revoke_token(self, token_id: int) -> dict[str, Any]:
        """Revoke the API token ``token_id``."""
        return self._call("DELETE", f"/api/v1/tokens/{token_id}")

    def audit(
        self, *, token_id: int | None = None, operation: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """The audit log, newest first (admin)."""
        params: dict[str, Any] = {"limit": limit}
        if token_id is not None:
            params["token_id"] = token_id
        if operation:
            params["operation"] = operation
        return self._call("GET", "/api/v1/audit", params=params)

    def devices(self) -> list[dict[str, Any]]:
        """Every known device."""
        return self._call("GET", "/api/v1/devices")

    def device(self, device_id: str) -> dict[str, Any]:
        """One device, with its reported state."""
        return self._call("GET", f"/api/v1/devices/{device_id}")

    def wait_for_deployments(self, ids: list[int], *, timeout_s: float = 60.0, poll_s: float = 0.2) -> list[dict]:
        """Poll until the deployments ``ids`` leave "pending"; return them. TransferError on timeout."""
        deadline = time.monotonic() + timeout_s
        done: dict[int, dict[str, Any]] = {}
        while True:
            for i in ids:
                if i not in done:
                    deployment = self.deployment(i)
                    if deployment["status"] != "pending":
                        done[i] = deployment
            if len(done) == len(ids):
                return [done[i] for i in ids]
            if time.monotonic() > deadline:
                raise TransferError(f"deployments {sorted(set(ids) - set(done))} still pending after {timeout_s:.0f} s")
            time.sleep(poll_s)
