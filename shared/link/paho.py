"""paho-mqtt client construction: the one place that tunes a paho client for edgefleet.

Two settings matter more than they look (measured, see docs/architecture.md): TCP_NODELAY on the
socket (without it a QoS-1 request/response stalls 44-88 ms on Nagle + delayed ACK) and a
moderate in-flight window (paho is slower with large ones). :func:`client_for` builds a client
from :class:`~edgefleet.shared.link.base.LinkOptions`; :func:`make_client` is the same for code
that drives paho's own loop (tests, tools).
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.shared.errors import ConfigError
from edgefleet.shared.link.base import QOS, LinkOptions


def set_nodelay(sock: Any) -> None:
    """Turn Nagle off on a client socket (a no-op for sockets that are not TCP)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass  # not a TCP socket (e.g. websockets/unix): nothing to tune


def _set_nodelay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    set_nodelay(sock)


def make_client(
    client_id: str,
    *,
    clean_session: bool = False,
    username: str | None = None,
    password: str | None = None,
    tls_ca_file: str | None = None,
    tls_cert_file: str | None = None,
    tls_key_file: str | None = None,
    reconnect_min_s: float = 0.5,
    reconnect_max_s: float = 30.0,
    max_inflight: int = 20,
    manual_ack: bool = False,
) -> mqtt.Client:
    """A paho 2.x client (callback API v2, MQTT 3.1.1) tuned for edgefleet.

    MQTT 3.1.1 because it is what every broker speaks, the embedded one included; nothing in the
    protocol needs MQTT 5.

    TLS is on when any ``tls_*`` file is given (see :func:`configure_tls`).

    Raises:
        ConfigError: Only one of ``tls_cert_file`` and ``tls_key_file``, or TLS files that
            cannot be read or do not belong together.
    """
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=clean_session,
        protocol=mqtt.MQTTv311,
        manual_ack=manual_ack,
    )
    client.on_socket_open = _set_nodelay
    client.max_inflight_messages_set(max_inflight)
    client.max_queued_messages_set(0)  # unbounded: our own layers bound what they queue
    # paho takes whole seconds; sub-second minimums round up to 1.
    client.reconnect_delay_set(min_delay=max(1, int(reconnect_min_s)), max_delay=max(1, int(reconnect_max_s)))
    if username is not None:
        client.username_pw_set(username, password)
    configure_tls(client, tls_ca_file=tls_ca_file, tls_cert_file=tls_cert_file, tls_key_file=tls_key_file)
    return client


def client_for(options: LinkOptions) -> mqtt.Client:
    """A client configured by ``options``: session, credentials, TLS, window, last will.

    Raises:
        ConfigError: TLS files that cannot be read or do not belong together.
    """
    client = make_client(
        options.client_id,
        clean_session=options.clean_session,
        username=options.username,
        password=options.password,
        tls_ca_file=options.tls_ca_file,
        tls_cert_file=options.tls_cert_file,
        tls_key_file=options.tls_key_file,
        reconnect_min_s=options.reconnect_min_s,
        reconnect_max_s=options.reconnect_max_s,
        max_inflight=options.max_inflight,
        manual_ack=options.manual_ack,
    )
    if options.will is not None:
        client.will_set(options.will.topic, options.will.payload, qos=QOS, retain=options.will.retain)
    return client


def check_tls_files(tls_cert_file: str | None, tls_key_file: str | None) -> None:
    """Refuse a client certificate without its key or the other way round.

    Raises:
        ConfigError: Exactly one of the two is given.
    """
    if (tls_cert_file is None) != (tls_key_file is None):
        raise ConfigError("a client certificate needs both tls_cert_file and tls_key_file")


def configure_tls(
    client: mqtt.Client,
    *,
    tls_ca_file: str | None = None,
    tls_cert_file: str | None = None,
    tls_key_file: str | None = None,
) -> bool:
    """Turn on TLS for ``client`` when any file is given; return whether it did.

    The broker's certificate is always verified, host name included, against ``tls_ca_file``
    (or the system's CAs when it is None: a broker with a public certificate). A client
    certificate is presented when ``tls_cert_file`` and ``tls_key_file`` are given.

    Raises:
        ConfigError: Only one of cert and key, or files that cannot be read or do not match.
    """
    check_tls_files(tls_cert_file, tls_key_file)
    if tls_ca_file is None and tls_cert_file is None:
        return False
    try:
        client.tls_set(ca_certs=tls_ca_file, certfile=tls_cert_file, keyfile=tls_key_file, cert_reqs=ssl.CERT_REQUIRED)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"cannot set up MQTT TLS: {exc}") from exc
    return True
