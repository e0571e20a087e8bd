"""``python -m edgefleet.agent`` = ``edgefleet-agent``."""

from edgefleet.agent.cli import main

main()
