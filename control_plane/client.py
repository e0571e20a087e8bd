"""A small Python SDK for the control plane's REST API (used by the CLI, the demo and notebooks).

>>> from edgefleet.control_plane.client import EdgefleetClient
>>> with EdgefleetClient("http://127.0.0.1:8700") as ef:
...     ef.push_model("model.onnx", name="classifier", version="1.0.0")
...     ef.deploy("classifier", "1.0.0", devices=["pi-01"])
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from edgefleet.shared.errors import EdgefleetError, NotFoundError, TransferError

DEFAULT_API_URL = "http://127.0.0.1:8700"


class ApiError(EdgefleetError):
    """The control plane answered with an error status."""

    code = "api_error"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class EdgefleetClient:
    """Thin, typed wrapper over ``/api/v1``; errors become :class:`ApiError`."""

    def __init__(self, base_url: str = DEFAULT_API_URL, *, timeout_s: float = 30.0) -> None:
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout_s)

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
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            if isinstance(detail, dict):
                detail = detail.get("message", detail)
            if response.status_code == 404:
                raise NotFoundError(str(detail))
            raise ApiError(response.status_code, str(detail))
        return response.json() if response.content else None

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
