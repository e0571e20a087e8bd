"""One module per schema revision (see :mod:`edgefleet.control_plane.db.migrations`)."""
