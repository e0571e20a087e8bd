"""The supervisor's decisions, one check at a time, against a fake broker process."""

from __future__ import annotations

import pytest

from edgefleet.control_plane.broker.supervisor import BrokerSupervisor
from edgefleet.shared.errors import BrokerError


class FakeBroker:
    kind = "mosquitto"
    url = "mqtt://127.0.0.1:41883"

    def __init__(self) -> None:
        self.running = True
        self.restarts = 0
        self.fail_restarts = 0

    def is_running(self) -> bool:
        return self.running

    def restart(self, timeout_s: float = 5.0) -> None:
        if self.fail_restarts:
            self.fail_restarts -= 1
            raise BrokerError("address already in use")
        self.restarts += 1
        self.running = True

    def log_tail(self, max_bytes: int = 4_000) -> str:
        return "1234: mosquitto version 2.0 terminating"


@pytest.fixture
def clock() -> list[float]:
    return [0.0]


def _supervisor(broker: FakeBroker, clock: list[float], events: list[str]) -> BrokerSupervisor:
    return BrokerSupervisor(
        broker,
        check_interval_s=1.0,
        restart_max_delay_s=4.0,
        on_down=lambda: events.append("down"),
        on_up=lambda: events.append("up"),
        clock=lambda: clock[0],
    )


def test_a_running_broker_is_left_alone(clock: list[float]) -> None:
    broker, events = FakeBroker(), []
    supervisor = _supervisor(broker, clock, events)
    supervisor.check()
    assert (broker.restarts, events, supervisor.up) == (0, [], True)


def test_a_dead_broker_is_reported_and_restarted(clock: list[float], caplog: pytest.LogCaptureFixture) -> None:
    broker, events = FakeBroker(), []
    supervisor = _supervisor(broker, clock, events)
    broker.running = False
    supervisor.check()
    assert (broker.restarts, events, supervisor.up, supervisor.restarts) == (1, ["down", "up"], True, 1)
    assert "died" in caplog.text and "terminating" in caplog.text  # the broker's own last words


def test_failed_restarts_back_off_and_the_broker_counts_as_down_until_one_works(clock: list[float]) -> None:
    broker, events = FakeBroker(), []
    supervisor = _supervisor(broker, clock, events)
    broker.running, broker.fail_restarts = False, 2
    supervisor.check()  # fails: next try in 1 s
    assert (supervisor.up, events) == (False, ["down"])
    clock[0] = 0.5
    supervisor.check()  # too early: not tried
    clock[0] = 1.0
    supervisor.check()  # fails again: next try in 2 s
    clock[0] = 2.9
    supervisor.check()
    assert broker.restarts == 0 and not supervisor.up
    clock[0] = 3.0
    supervisor.check()
    assert (broker.restarts, events, supervisor.up) == (1, ["down", "up"], True)
