"""The agent's MQTT connection: one device's topics over a :class:`~edgefleet.shared.link.base.Link`.

It only moves bytes: received messages are handed to the owner's callbacks by leaf, and the
owner publishes through :meth:`MqttLink.publish`. The session rules (persistent session, QoS 1,
last will, backoff, TCP_NODELAY) are the shared link's; this adds the device's view: its topics,
the keyring topics, and the online/offline status (retained, with the offline form as last will).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from edgefleet.agent.config import BrokerConfig
from edgefleet.shared.link.base import Delivery, Link, LinkFactory, LinkHandlers, LinkOptions, Received, Will
from edgefleet.shared.link.driver import PahoDriver
from edgefleet.shared.wire.messages import DeviceStatus
from edgefleet.shared.wire.topics import DEVICE_SUBSCRIBES, KEYRING_ROOT, KEYRING_SUBSCRIPTION, Leaf, device_topic

log = logging.getLogger(__name__)

GOODBYE_TIMEOUT_S = 2.0  # seconds stop() waits for the offline status to be acknowledged


def device_link_options(device_id: str, config: BrokerConfig, *, keyring: bool, now: float) -> LinkOptions:
    """The connection rules of one device: persistent session, its topics, offline status as last will."""
    subscriptions = [device_topic(device_id, leaf) for leaf in DEVICE_SUBSCRIBES]
    if keyring:
        subscriptions.append(KEYRING_SUBSCRIPTION)
    offline = DeviceStatus(device_id=device_id, online=False, ts=now).encode()
    return LinkOptions(
        client_id=device_id,
        host=config.host,
        port=config.port,
        username=config.username,
        password=config.password,
        tls_ca_file=config.tls_ca_file,
        tls_cert_file=config.tls_cert_file,
        tls_key_file=config.tls_key_file,
        clean_session=False,
        keepalive_s=config.keepalive_s,
        reconnect_min_s=config.reconnect_min_s,
        reconnect_max_s=config.reconnect_max_s,
        max_inflight=config.max_inflight_count,
        will=Will(topic=device_topic(device_id, Leaf.STATUS), payload=offline, retain=True),
        subscriptions=tuple(subscriptions),
    )


class MqttLink:
    """One device's connection to the broker."""

    def __init__(
        self,
        device_id: str,
        config: BrokerConfig,
        on_message: Callable[[Leaf, bytes], None],
        on_connected: Callable[[], None] | None = None,
        on_keyring: Callable[[str, bytes], None] | None = None,
        *,
        link_factory: LinkFactory | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Create the link (nothing connects until :meth:`start`).

        Args:
            device_id: The device, its client id and its topics.
            config: Broker address, credentials and timing.
            on_message: Called with (leaf, payload) for each message on the device's topics.
            on_connected: Called after each (re)connect, once the online status is queued.
            on_keyring: Called with (topic, payload) of each keyring version; None: no keyring subscription.
            link_factory: Builds the underlying link; None: a paho driver of this link's own.
            clock: Unix seconds now, for the status messages.

        Raises:
            ConfigError: TLS files that cannot be read or do not belong together.
        """
        self._device_id = device_id
        self._on_message = on_message
        self._on_connected = on_connected
        self._on_keyring = on_keyring
        self._clock = clock
        self.connected = threading.Event()
        self._own_driver = PahoDriver(name=f"mqtt-{device_id}") if link_factory is None else None
        factory: LinkFactory = self._own_driver if self._own_driver is not None else link_factory  # type: ignore[assignment]
        self._topics = {device_topic(device_id, leaf): leaf for leaf in DEVICE_SUBSCRIBES}
        options = device_link_options(device_id, config, keyring=on_keyring is not None, now=clock())
        self._link: Link = factory(
            options,
            LinkHandlers(
                on_message=self._handle_message,
                on_connected=self._handle_connect,
                on_disconnected=self._handle_disconnect,
            ),
        )

    def start(self) -> None:
        """Connect in the background; the link reconnects with backoff until :meth:`stop`."""
        if self._own_driver is not None:
            self._own_driver.start()
        self._link.start()

    def stop(self) -> None:
        """Publish offline status, disconnect cleanly and let go of the connection."""
        if self.connected.is_set():
            self.publish_status(online=False).wait(GOODBYE_TIMEOUT_S)
        self.connected.clear()
        self._link.stop()
        if self._own_driver is not None:
            self._own_driver.stop()

    def publish(self, leaf: Leaf, payload: bytes, *, retain: bool = False) -> Delivery:
        """Publish on one of this device's topics at QoS 1 (queued while offline)."""
        return self._link.publish(device_topic(self._device_id, leaf), payload, retain=retain)

    def publish_status(self, *, online: bool) -> Delivery:
        """Publish the device's retained online/offline status."""
        status = DeviceStatus(device_id=self._device_id, online=online, ts=self._clock())
        return self.publish(Leaf.STATUS, status.encode(), retain=True)

    def _handle_connect(self, session_present: bool) -> None:
        self.publish_status(online=True)
        self.connected.set()
        log.info("%s connected to the broker (session present: %s)", self._device_id, session_present)
        if self._on_connected is not None:
            self._on_connected()

    def _handle_disconnect(self) -> None:
        self.connected.clear()

    def _handle_message(self, message: Received) -> None:
        leaf = self._topics.get(message.topic)
        if leaf is not None:
            self._on_message(leaf, message.payload)
        elif self._on_keyring is not None and message.topic.startswith(KEYRING_ROOT + "/"):
            self._on_keyring(message.topic, message.payload)
