"""Drift: references built from training-side data, live sketches, statistics and decisions.

Only numpy: this package ships in the core install and runs on the gateway.
"""

from edgefleet.drift.reference import ReferenceError, build_reference, validate_reference

__all__ = ["ReferenceError", "build_reference", "validate_reference"]
