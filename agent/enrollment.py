"""Enrollment: trade a one-time token for an identity (broker credentials) and a keyring to pin."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx

from edgefleet.agent.config import AgentConfig, render_config
from edgefleet.shared.errors import EdgefleetError, TransferError, TrustError
from edgefleet.shared.files import atomic_write_bytes
from edgefleet.shared.trust.keyring import Keyring

PINNED_KEYRING_FILE = "pinned-keyring.json"


@dataclass(frozen=True)
class Enrolled:
    """What the control plane hands a device at enrollment."""

    device_id: str
    broker_host: str
    broker_port: int
    username: str
    password: str
    keyring: Keyring


def enroll_device(server: str, token: str, *, timeout_s: float = 30.0) -> Enrolled:
    """Consume ``token`` at the control plane ``server``.

    Raises:
        TransferError: The control plane cannot be reached (retryable).
        TrustError: The token was refused, or the keyring does not verify against itself.
    """
    try:
        response = httpx.post(f"{server.rstrip('/')}/api/v1/enroll", json={"token": token}, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise TransferError(f"cannot reach {server}: {exc}") from exc
    if response.status_code != 200:
        raise TrustError(f"enrollment refused ({response.status_code}): {response.text[:500]}")
    try:
        body = response.json()
        keyring = Keyring.load_trusted(body["keyring"].encode())
        broker = body["broker"]
        return Enrolled(
            device_id=body["device_id"],
            broker_host=broker["host"],
            broker_port=int(broker["port"]),
            username=broker["username"],
            password=broker["password"],
            keyring=keyring,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise TrustError(f"malformed enrollment response: {exc}") from exc
    except EdgefleetError as exc:
        raise TrustError(f"the control plane sent an invalid keyring: {exc}") from exc


def write_enrolled_config(enrolled: Enrolled, config_path: Path, template: AgentConfig) -> AgentConfig:
    """Pin the keyring beside ``config_path`` and write the agent config (mode 0600: it holds a password).

    ``template`` supplies everything enrollment does not decide (data dir, API port, limits).
    """
    config_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(config_path.parent / PINNED_KEYRING_FILE, enrolled.keyring.raw)
    config = template.replace(
        device_id=enrolled.device_id,
        broker=template.broker.replace(
            host=enrolled.broker_host,
            port=enrolled.broker_port,
            username=enrolled.username,
            password=enrolled.password,
        ),
        # the pinned keyring replaces static keys; the template's trust limits stay
        trust=template.trust.replace(pinned_keyring_file=PINNED_KEYRING_FILE, publisher_keys=(), online_keys=()),
    )
    atomic_write_bytes(config_path, render_config(config).encode(), mode=0o600)
    return config
