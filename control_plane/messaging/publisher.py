"""The one seam between the control plane's services and the MQTT broker."""

from __future__ import annotations

from typing import Protocol


class MessagePublisher(Protocol):
    """Publishes a message at QoS 1; implemented by :class:`~control_plane.mqtt_bridge.MqttBridge`.

    Implementations queue the message and return at once (paho resends it after a reconnect):
    callers never wait for the broker.
    """

    def publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        """Queue ``payload`` for ``topic`` at QoS 1, retained or not."""
        ...
