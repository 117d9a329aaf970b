"""edgefleet cloud_controller."""
