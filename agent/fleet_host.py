"""Many agents in one process: one MQTT network thread, one timer and one step pool for all.

A simulator (or a gateway that stands in for many devices) builds an :class:`AgentHost`, adds
agents, and starts them together. Each agent keeps its own data directory, state store, models
and broker session; only the threads are shared. The agents' local HTTP APIs are the caller's
business: a host of hundreds wants them off (one port each otherwise).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.fleet_resources import STEP_WORKERS, FleetResources
from edgefleet.agent.service import Agent
from edgefleet.shared.errors import ConfigError

log = logging.getLogger(__name__)

START_WORKERS = 4  # threads that recover and load agents' models at start (disk and runtimes, not network)


class AgentHost:
    """Runs N agents on one :class:`FleetResources`."""

    def __init__(self, configs: Iterable[AgentConfig] = (), *, step_workers: int = STEP_WORKERS) -> None:
        """Create the host and its agents (nothing runs until :meth:`start`).

        Args:
            configs: One configuration per agent (distinct device ids and data directories).
            step_workers: Threads running reconciler steps for all agents.
        """
        self.resources = FleetResources(step_workers=step_workers)
        self.agents: dict[str, Agent] = {}
        for config in configs:
            self.add(config)

    def add(self, config: AgentConfig) -> Agent:
        """Create one more agent on the shared machinery (start it with :meth:`start`).

        Raises:
            ConfigError: The device id is hosted already, or its TLS files are unusable.
        """
        if config.device_id in self.agents:
            raise ConfigError(f"device {config.device_id!r} is already hosted")
        agent = Agent(config, resources=self.resources)
        self.agents[config.device_id] = agent
        return agent

    def start(self) -> None:
        """Start the shared threads, then every agent."""
        self.resources.start()
        self._each(Agent.start)

    def stop(self) -> None:
        """Stop every agent (each says goodbye to the broker), then the shared threads."""
        self._each(Agent.stop)
        self.resources.stop()

    def _each(self, action: Callable[[Agent], None]) -> None:
        with ThreadPoolExecutor(max_workers=START_WORKERS, thread_name_prefix="edgefleet-host") as pool:
            for agent, future in [(a, pool.submit(action, a)) for a in self.agents.values()]:
                exc = future.exception()
                if exc is not None:
                    log.error("agent %s: %s failed: %s", agent.config.device_id, action.__name__, exc)
