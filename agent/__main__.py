"""``python -m agent`` = ``edgefleet-agent``."""

from agent.cli import main

main()
