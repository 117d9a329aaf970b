"""Prometheus metrics of the agent (one registry per Agent, so tests can run several)."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "edgefleet_inference_requests",
            "Inference requests",
            ["model", "version", "protocol"],
            registry=r,
        )
        self.errors = Counter(
            "edgefleet_inference_errors", "Failed inference requests", ["model", "code"], registry=r
        )
        self.latency = Histogram(
            "edgefleet_inference_latency_seconds",
            "Inference latency, request parse to response encode",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_info = Gauge(
            "edgefleet_model_info",
            "1 for the version each model serves",
            ["model", "version"],
            registry=r,
        )
        self.updates = Counter(
            "edgefleet_updates",
            "Finished updates by outcome",
            ["outcome", "reason_code"],
            registry=r,
        )
        self.transitions = Counter(
            "edgefleet_update_transitions", "Update state transitions", ["state"], registry=r
        )

    def set_serving(self, model: str, version: str | None, previous: str | None) -> None:
        if previous is not None and previous != version:
            with contextlib.suppress(KeyError):
                self.model_info.remove(model, previous)
        if version is not None:
            self.model_info.labels(model, version).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
