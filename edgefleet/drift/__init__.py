"""Drift: references built from training-side data, live sketches, statistics and decisions.

Only numpy: this package ships in the core install and runs on the gateway.
"""

from edgefleet.drift.decision import DriftConfig, DriftDecision, FeatureDrift, decide
from edgefleet.drift.reference import ReferenceError, build_reference, validate_reference
from edgefleet.drift.sketch import Sketch, SketchError, merge_dicts

__all__ = [
    "DriftConfig",
    "DriftDecision",
    "FeatureDrift",
    "ReferenceError",
    "Sketch",
    "SketchError",
    "build_reference",
    "decide",
    "merge_dicts",
    "validate_reference",
]
