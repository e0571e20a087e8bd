"""``python -m edgefleet.control_plane`` = ``edgefleet``."""

from edgefleet.control_plane.cli.main import main

main()
