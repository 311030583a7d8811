"""Prometheus metrics of the retrieval server, in a registry of its own (one per app, so
tests can run several apps in one process), exposed at ``/metrics``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets from 0.25 ms: the exact search of a small catalogue answers in about 1 ms.
LATENCY_BUCKETS = (0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0, 2.5)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "retrieval_requests", "HTTP calls answered, by route and status code",
            ["route", "status"], registry=self.registry,
        )
        self.errors = Counter(
            "retrieval_errors", "Calls answered with a 4xx or 5xx, by route and error code",
            ["route", "error_code"], registry=self.registry,
        )
        self.latency = Histogram(
            "retrieval_request_seconds", "Time from the request's body read to the answer built",
            ["route"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.model_version = Gauge(
            "retrieval_model_version", "The registered model version being served (0 before one is loaded)",
            registry=self.registry,
        )
        self.swaps = Counter("retrieval_model_swaps", "Versions swapped in after the first", registry=self.registry)
        self.refusals = Counter(
            "retrieval_model_refusals", "Versions refused (download, load or probe failed)", registry=self.registry
        )
        self.poll_failures = Counter(
            "retrieval_registry_poll_failures", "Looks at the registry that failed", registry=self.registry
        )

        self._children: dict[tuple[str, int], tuple] = {}

    def observe(self, route: str, status: int, seconds: float) -> None:
        """One answered call: its latency and its count by route and status."""
        children = self._children.get((route, status))
        if children is None:  # labels() looks the child up by hashing: done once per pair
            children = self._children[(route, status)] = (
                self.latency.labels(route), self.requests.labels(route, str(status))
            )
        children[0].observe(seconds)
        children[1].inc()

    def on_follower_event(self, event: str, fields: dict) -> None:
        if event in ("loaded", "swapped"):
            self.model_version.set(float(fields["version"]))
        if event == "swapped":
            self.swaps.inc()
        elif event == "refused":
            self.refusals.inc()
        elif event == "poll_failed":
            self.poll_failures.inc()
