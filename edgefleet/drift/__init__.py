"""Drift: references built from training-side data, live sketches, statistics and decisions.

Only numpy: this package ships in the core install and runs on the gateway.
"""

from edgefleet.drift.decision import DriftConfig, DriftDecision, FeatureDrift, decide
from edgefleet.drift.power import Detectability, detectability, reference_warnings
from edgefleet.drift.reference import ReferenceError, build_reference, validate_reference
from edgefleet.drift.sketch import Sketch, SketchError, merge_dicts

__all__ = [
    "Detectability",
    "DriftConfig",
    "DriftDecision",
    "FeatureDrift",
    "ReferenceError",
    "Sketch",
    "SketchError",
    "build_reference",
    "decide",
    "detectability",
    "merge_dicts",
    "reference_warnings",
    "validate_reference",
]
