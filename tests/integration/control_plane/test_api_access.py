"""Who may call what: every operation of the OpenAPI document, called by every kind of caller.

The table is generated from the app's routes: each operation's declared access rule
(:func:`edgefleet.control_plane.api.access.declared_access`) gives the answer each caller must
get, so a route added without a rule fails here, and so does one whose rule is not enforced.
Allowed callers send requests that cannot succeed (empty bodies, ids that do not exist): what
is asserted is only that they get past the door (neither 401 nor 403).
"""

from __future__ import annotations

import json
import os
import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.auth import admin_token, bearer
from support.serve import serving
from typer.testing import CliRunner

from edgefleet.control_plane.api.access import PUBLIC, Access, api_routes, declared_access
from edgefleet.control_plane.api.routes import ROUTERS
from edgefleet.control_plane.app import create_app
from edgefleet.control_plane.broker.embedded import MosquittoBroker
from edgefleet.control_plane.cli.main import app as cli_app
from edgefleet.control_plane.services.auth import ADMIN_TOKEN_FILE, Role
from edgefleet.control_plane.settings import ServerSettings

DOOR = {401, 403}


@dataclass
class Server:
    base_url: str
    data_dir: Path
    tokens: dict[str, str]  # caller name -> token
    device: tuple[str, str]  # an enrolled device's broker user name and password
    openapi: dict[str, Any]

    def client(self, headers: dict[str, str] | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=30, headers=headers or {})


@pytest.fixture(scope="module")
def server(mosquitto: MosquittoBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("control-plane")
    settings = ServerSettings(
        data_dir=data_dir,
        broker_host=mosquitto.host,
        broker_port=mosquitto.port,
        client_id_suffix=f"test-{uuid.uuid4().hex[:8]}",
    )
    with serving(create_app(settings)) as base_url:
        admin = admin_token(data_dir)
        tokens = {"admin": admin}
        with httpx.Client(base_url=base_url, timeout=30, headers=bearer(admin)) as http:
            for role in ("viewer", "operator", "publisher"):
                created = http.post("/api/v1/tokens", json={"name": f"test-{role}", "role": role})
                assert created.status_code == 201, created.text
                tokens[role] = created.json()["token"]
            revoked = http.post("/api/v1/tokens", json={"name": "gone", "role": "admin"}).json()
            assert http.delete(f"/api/v1/tokens/{revoked['id']}").status_code == 200
            tokens["revoked admin"] = revoked["token"]
            enrollment = http.post("/api/v1/enrollments", json={"device_id": "door-device"}).json()
            enrolled = http.post("/api/v1/enroll", json={"token": enrollment["token"]}).json()
            openapi = http.get("/openapi.json").json()
        yield Server(
            base_url=base_url,
            data_dir=data_dir,
            tokens=tokens,
            device=(enrolled["broker"]["username"], enrolled["broker"]["password"]),
            openapi=openapi,
        )


# --- the table, from the routes ---------------------------------------------------------------


def _rules() -> dict[tuple[str, str], list[Access]]:
    return {
        (route.path, method.lower()): declared_access(route)
        for route in api_routes(ROUTERS)
        for method in route.methods
    }


RULES = _rules()


def _operations() -> list[tuple[str, str]]:
    # The document as the app serves it, without starting it: the same routes, the same generator.
    spec = create_app(ServerSettings(data_dir=Path(os.devnull))).openapi()
    return sorted((path, method) for path, ops in spec["paths"].items() for method in ops)


OPERATIONS = _operations()
CALLERS = ("nobody", "bad token", "revoked admin", "device", "viewer", "operator", "publisher", "admin")


def _expected(access: Access, caller: str) -> str:
    """What ``caller`` must get: "in" (past the door), 401 or 403."""
    if access.role == PUBLIC:
        return "in"
    assert isinstance(access.role, Role)
    if caller in ("nobody", "bad token", "revoked admin"):
        return "401"
    if caller == "device":
        return "in" if access.devices else "401"
    return "in" if Role(caller).includes(access.role) else "403"


def _url(server: Server, path: str, method: str) -> str:
    operation = server.openapi["paths"][path][method]
    for parameter in operation.get("parameters", []):
        if parameter["in"] == "path":
            value = "999999" if parameter["schema"].get("type") == "integer" else "no-such-thing"
            path = path.replace("{" + parameter["name"] + "}", value)
    return path


def _call(server: Server, path: str, method: str, caller: str) -> httpx.Response:
    if caller == "nobody":
        headers: dict[str, str] = {}
    elif caller == "bad token":
        headers = bearer("ef_" + "x" * 43)
    elif caller == "device":
        username, password = server.device
        headers = {"Authorization": httpx.BasicAuth(username, password)._auth_header}
    else:
        headers = bearer(server.tokens[caller])
    content = server.openapi["paths"][path][method].get("requestBody", {}).get("content", {})
    kwargs: dict[str, Any] = {"json": {}} if "application/json" in content else {}
    with server.client(headers) as http:
        return http.request(method.upper(), _url(server, path, method), **kwargs)


def test_every_operation_declares_exactly_one_access_rule() -> None:
    assert len(OPERATIONS) >= 20
    undeclared = [op for op in OPERATIONS if len(RULES.get(op, [])) != 1]
    assert undeclared == [], "routes need exactly one of require(Role.X), device_or(Role.X), public()"


def test_only_healthz_and_the_enrollment_exchange_are_public() -> None:
    public = {op for op in OPERATIONS if RULES[op][0].role == PUBLIC}
    assert public == {("/healthz", "get"), ("/api/v1/enroll", "post")}


def test_only_bundle_downloads_take_device_credentials() -> None:
    assert {op for op in OPERATIONS if RULES[op][0].devices} == {("/api/v1/bundles/{digest}", "get")}


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize(("path", "method"), OPERATIONS)
def test_each_caller_gets_exactly_the_answer_its_role_allows(
    server: Server, path: str, method: str, caller: str
) -> None:
    expected = _expected(RULES[(path, method)][0], caller)
    response = _call(server, path, method, caller)
    if expected == "in":
        assert response.status_code not in DOOR, (caller, method, path, response.text)
        return
    assert response.status_code == int(expected), (caller, method, path, response.text)
    body = response.json()
    assert set(body) == {"detail"} and set(body["detail"]) == {"code", "message", "retryable"}, body
    assert body["detail"]["code"] == ("unauthenticated" if expected == "401" else "forbidden")
    assert body["detail"]["retryable"] is False
    if expected == "401":
        assert "Bearer" in response.headers["www-authenticate"]


# --- the document ------------------------------------------------------------------------------


def test_the_openapi_document_declares_the_schemes_and_the_401_and_403_answers(server: Server) -> None:
    schemes = server.openapi["components"]["securitySchemes"]
    assert schemes["apiToken"] == {**schemes["apiToken"], "type": "http", "scheme": "bearer"}
    assert schemes["deviceCredentials"]["scheme"] == "basic"
    for path, method in OPERATIONS:
        operation = server.openapi["paths"][path][method]
        if RULES[(path, method)][0].role == PUBLIC:
            assert "security" not in operation, (method, path)
            assert not {"401", "403"} & set(operation["responses"]), (method, path)
            continue
        assert {"apiToken": []} in operation["security"], (method, path)
        for status_code in ("401", "403"):
            schema = operation["responses"][status_code]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path)


# --- tokens, the first one, the audit log ---------------------------------------------------------


def test_the_first_start_wrote_an_admin_token_readable_only_by_its_owner(server: Server) -> None:
    path = server.data_dir / ADMIN_TOKEN_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with server.client(bearer(admin_token(server.data_dir))) as http:
        first = http.get("/api/v1/tokens").json()[0]
    assert (first["id"], first["role"]) == (1, "admin")


def test_tokens_are_listed_without_their_secret_and_a_revoked_one_stops_working(server: Server) -> None:
    with server.client(bearer(server.tokens["admin"])) as admin:
        created = admin.post("/api/v1/tokens", json={"name": "short-lived", "role": "viewer", "expires_in_s": 600})
        assert created.status_code == 201
        token = created.json()["token"]
        listed = admin.get("/api/v1/tokens").json()
        assert all("token" not in row and "token_sha256" not in row for row in listed)
        assert token not in admin.get("/api/v1/tokens").text
        with server.client(bearer(token)) as viewer:
            assert viewer.get("/api/v1/devices").status_code == 200
            assert admin.delete(f"/api/v1/tokens/{created.json()['id']}").json()["revoked_at"]
            assert viewer.get("/api/v1/devices").status_code == 401


def test_the_audit_log_records_who_changed_what_and_refused_attempts_but_not_reads(server: Server) -> None:
    with server.client(bearer(server.tokens["admin"])) as admin:
        tokens = {row["name"]: row["id"] for row in admin.get("/api/v1/tokens").json()}
        with server.client(bearer(server.tokens["viewer"])) as viewer:
            assert viewer.post("/api/v1/devices", json={"id": "audited-device"}).status_code == 403
            assert viewer.get("/api/v1/devices").status_code == 200
        assert admin.post("/api/v1/devices", json={"id": "audited-device"}).status_code == 201
        entries = admin.get("/api/v1/audit", params={"operation": "register_device"}).json()
    allowed, refused = entries[0], entries[1]  # newest first
    assert (allowed["token_id"], allowed["status_code"], allowed["target"]) == (1, 201, "device=audited-device")
    assert allowed["actor"] == "token 1 (first-start admin)"
    assert (refused["token_id"], refused["status_code"]) == (tokens["test-viewer"], 403)
    with server.client() as nobody:
        assert nobody.post("/api/v1/devices", json={"id": "anonymous-try"}).status_code == 401
    with server.client(bearer(server.tokens["admin"])) as admin:
        everything = admin.get("/api/v1/audit", params={"limit": 10_000}).json()
    operations = {e["operation"] for e in everything}
    assert "list_devices" not in operations
    # Refusals of callers who proved no identity are not stored: anyone could fill the disk with them.
    assert [e for e in everything if e["token_id"] is None and e["status_code"] >= 400] == []
    assert {"create_token", "revoke_token", "create_enrollment", "enroll"} <= operations


def test_a_device_downloads_its_bundles_with_its_broker_credentials_and_nothing_else(server: Server) -> None:
    username, password = server.device
    digest = "sha256:" + "0" * 64
    with server.client() as http:
        assert http.get(f"/api/v1/bundles/{digest}", auth=(username, password)).status_code == 404  # past the door
        assert http.get(f"/api/v1/bundles/{digest}", auth=(username, "wrong")).status_code == 401
        assert http.get(f"/api/v1/bundles/{digest}", auth=("nobody", password)).status_code == 401
        assert http.get("/api/v1/devices", auth=(username, password)).status_code == 401


# --- the CLI -------------------------------------------------------------------------------------


def test_the_cli_creates_lists_and_revokes_tokens_and_shows_the_audit_log(server: Server) -> None:
    env = {"EDGEFLEET_TOKEN": server.tokens["admin"], "EDGEFLEET_API_URL": server.base_url}
    runner = CliRunner()
    created = runner.invoke(cli_app, ["tokens", "create", "--role", "operator", "--name", "cli-made", "-q"], env=env)
    assert created.exit_code == 0, created.output
    token = created.stdout.strip()
    with server.client(bearer(token)) as http:
        assert http.get("/api/v1/deployments").status_code == 200
        assert http.post("/api/v1/trust/rotate", json={}).status_code == 403
    listed = runner.invoke(cli_app, ["tokens", "list", "--json"], env=env)
    assert listed.exit_code == 0, listed.output
    [row] = [r for r in json.loads(listed.stdout) if r["name"] == "cli-made"]
    assert token not in listed.stdout and row["role"] == "operator"
    revoked = runner.invoke(cli_app, ["tokens", "revoke", str(row["id"])], env=env)
    assert revoked.exit_code == 0, revoked.output
    with server.client(bearer(token)) as http:
        assert http.get("/api/v1/deployments").status_code == 401
    audit = runner.invoke(cli_app, ["audit", "--operation", "revoke_token", "--json"], env=env)
    assert audit.exit_code == 0, audit.output
    assert json.loads(audit.stdout)[0]["target"] == f"token_id={row['id']}"
    anonymous = runner.invoke(cli_app, ["tokens", "list"], env={"EDGEFLEET_API_URL": server.base_url,
                                                               "EDGEFLEET_DATA_DIR": str(server.data_dir / "none")})
    assert anonymous.exit_code == 1 and "EDGEFLEET_TOKEN" in anonymous.output
