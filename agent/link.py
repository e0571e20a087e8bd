"""The agent's MQTT connection: persistent session, QoS 1, last will, reconnect with backoff.

It only moves bytes: received messages are handed to the owner's callbacks by leaf, and the
owner publishes through :meth:`MqttLink.publish`. Subscriptions are (re)made on every connect,
because a broker that lost its state (restart without persistence) forgets them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from edgefleet.agent.config import BrokerConfig
from edgefleet.shared.link.paho import make_client
from edgefleet.shared.wire.messages import DeviceStatus
from edgefleet.shared.wire.topics import DEVICE_SUBSCRIBES, KEYRING_ROOT, KEYRING_SUBSCRIPTION, Leaf, device_topic

log = logging.getLogger(__name__)


class MqttLink:
    """One device's connection to the broker."""

    def __init__(
        self,
        device_id: str,
        config: BrokerConfig,
        on_message: Callable[[Leaf, bytes], None],
        on_connected: Callable[[], None] | None = None,
        on_keyring: Callable[[bytes], None] | None = None,
    ) -> None:
        self._device_id = device_id
        self._on_keyring = on_keyring
        self._config = config
        self._on_message = on_message
        self._on_connected = on_connected
        self.connected = threading.Event()
        self._client = make_client(
            device_id,
            clean_session=False,
            username=config.username,
            password=config.password,
            tls_ca_file=config.tls_ca_file,
            tls_cert_file=config.tls_cert_file,
            tls_key_file=config.tls_key_file,
            reconnect_min_s=config.reconnect_min_s,
            reconnect_max_s=config.reconnect_max_s,
        )
        self._topics = {device_topic(device_id, leaf): leaf for leaf in DEVICE_SUBSCRIBES}
        offline = DeviceStatus(device_id=device_id, online=False, ts=time.time()).encode()
        self._client.will_set(device_topic(device_id, Leaf.STATUS), offline, qos=1, retain=True)
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_message = self._handle_message

    def start(self) -> None:
        """Connect in the background; paho's loop thread reconnects with backoff forever."""
        self._client.connect_async(self._config.host, self._config.port, keepalive=self._config.keepalive_s)
        self._client.loop_start()

    def stop(self) -> None:
        """Publish offline status, disconnect cleanly and stop the loop thread."""
        if self.connected.is_set():
            info = self.publish(
                Leaf.STATUS, DeviceStatus(device_id=self._device_id, online=False, ts=time.time()).encode(), retain=True
            )
            try:
                info.wait_for_publish(timeout=2.0)
            except (RuntimeError, ValueError):
                pass  # disconnected meanwhile: the last will says the same thing
        self._client.disconnect()
        self._client.loop_stop()

    def publish(self, leaf: Leaf, payload: bytes, *, retain: bool = False) -> mqtt.MQTTMessageInfo:
        """Publish on one of this device's topics at QoS 1 (queued by paho while offline)."""
        return self._client.publish(device_topic(self._device_id, leaf), payload, qos=1, retain=retain)

    def _handle_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.warning("broker refused connection: %s", reason)
            return
        subscriptions = [(topic, 1) for topic in self._topics]
        if self._on_keyring is not None:
            subscriptions.append((KEYRING_SUBSCRIPTION, 1))
        client.subscribe(subscriptions)
        self.publish(
            Leaf.STATUS, DeviceStatus(device_id=self._device_id, online=True, ts=time.time()).encode(), retain=True
        )
        self.connected.set()
        log.info(
            "connected to %s:%s (session present: %s)", self._config.host, self._config.port, flags.session_present
        )
        if self._on_connected is not None:
            self._on_connected()

    def _handle_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.connected.clear()
        log.info("disconnected from broker: %s", reason)

    def _handle_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        leaf = self._topics.get(msg.topic)
        try:
            if leaf is not None:
                self._on_message(leaf, msg.payload)
            elif self._on_keyring is not None and msg.topic.startswith(KEYRING_ROOT + "/"):
                self._on_keyring(msg.payload)
        except Exception:  # a bug in a handler must not kill paho's network thread
            log.exception("handler for %s failed", leaf)
