"""``python -m control_plane`` = ``edgefleet``."""

from control_plane.cli import main

main()
