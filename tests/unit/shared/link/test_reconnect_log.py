"""Every failed reconnect is logged with the broker's address and the next delay.

A port on loopback that nobody listens on refuses at once: no broker is needed to see the log.
"""

from __future__ import annotations

import logging
import re
import time

import pytest

from edgefleet.control_plane.broker.embedded import free_port
from edgefleet.shared.link.base import LinkHandlers, LinkOptions
from edgefleet.shared.link.driver import PahoDriver


def test_each_failed_reconnect_names_the_address_and_the_next_delay(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nobody listens there: every connect is refused
    driver = PahoDriver()
    link = driver.link(
        LinkOptions(client_id="dev-1", host="127.0.0.1", port=port, reconnect_min_s=0.1, reconnect_max_s=0.4),
        LinkHandlers(on_message=lambda _m: None),
    )
    caplog.set_level(logging.WARNING, logger="edgefleet.shared.link.driver")
    driver.start()
    link.start()
    try:
        deadline = time.monotonic() + 5.0
        while len(caplog.records) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        link.stop()
        driver.stop()

    lines = [r.getMessage() for r in caplog.records if r.name == "edgefleet.shared.link.driver"][:3]
    assert len(lines) == 3
    assert all(f"dev-1 cannot reach the MQTT broker at 127.0.0.1:{port}" in line for line in lines)
    delays = [float(re.search(r"next try in ([0-9.]+) s", line)[1]) for line in lines]  # type: ignore[index]
    assert delays == [0.1, 0.2, 0.4]  # the backoff, doubling
