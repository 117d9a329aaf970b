"""edgefleet packager."""
