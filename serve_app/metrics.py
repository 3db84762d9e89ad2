"""Application metrics, exported through Ray's Prometheus endpoint (prefixed `ray_` there)."""

from __future__ import annotations

import collections
from collections.abc import Iterable

_LATENCY_BOUNDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
_BATCH_BOUNDS = [1, 2, 4, 8, 16, 32, 64, 128]


class ServeMetrics:
    """Created inside each replica (metrics objects belong to the process that records them)."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        self.requests = Counter(
            "sentiment_requests_total", "HTTP requests by endpoint and status", tag_keys=("endpoint", "status")
        )
        self.latency = Histogram(
            "sentiment_request_latency_s",
            "request latency in the replica (s)",
            boundaries=_LATENCY_BOUNDS,
            tag_keys=("endpoint",),
        )
        self.batch_size = Histogram("sentiment_batch_size", "texts per model forward batch", boundaries=_BATCH_BOUNDS)
        self.labels = Counter("sentiment_predictions_total", "predicted labels", tag_keys=("label",))
        self.version = Gauge("sentiment_model_version", "registered model version served (0: a local folder)")
        self.failed_swaps = Counter(
            "sentiment_model_swap_failures_total", "hot swaps a replica could not make (it kept its model)"
        )
        self.restarts = Gauge("sentiment_model_restarts", "model processes replaced in this replica since it started")
        self.poisoned = Gauge("sentiment_poison_texts", "texts the model raised on in this replica since it started")
        # Per served version (slot: champion | challenger), for shadow and canary.
        self.version_texts = Counter(
            "sentiment_version_texts_total",
            "texts each served version scored (answered or mirrored)",
            tag_keys=("slot", "version"),
        )
        self.version_latency = Histogram(
            "sentiment_version_batch_latency_s",
            "model time of the batches each served version ran (s)",
            boundaries=_LATENCY_BOUNDS,
            tag_keys=("slot", "version"),
        )
        self.mirror_skipped = Counter(
            "sentiment_mirror_skipped_total", "texts not mirrored: the other version was busy, gone or failed"
        )

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.inc(1, tags={"endpoint": endpoint, "status": str(status)})
        self.latency.observe(seconds, tags={"endpoint": endpoint})

    def observe_batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def count_labels(self, labels: Iterable[str]) -> None:
        # One record per label and batch, not per text: each record is a call into Ray's metrics agent.
        for label, n in collections.Counter(labels).items():
            self.labels.inc(n, tags={"label": label})

    def set_model_version(self, version: str) -> None:
        self.version.set(float(version) if version.isdigit() else 0.0)

    def count_failed_swap(self) -> None:
        self.failed_swaps.inc(1)

    def set_restarts(self, n: int, poisoned: int = 0) -> None:
        self.restarts.set(float(n))
        self.poisoned.set(float(poisoned))

    def observe_version_batch(self, slot: str, version: str, size: int, seconds: float) -> None:
        tags = {"slot": slot, "version": version}
        self.version_texts.inc(size, tags=tags)
        self.version_latency.observe(seconds, tags=tags)

    def count_mirror_skipped(self, n: int) -> None:
        self.mirror_skipped.inc(n)


class LiveMetrics:
    """Created in the live evidence store's replica (serve_app.rollout): per served version."""

    def __init__(self) -> None:
        from ray.util.metrics import Gauge

        tags = ("slot", "version")
        self.f1 = Gauge("sentiment_live_f1", "F1 on the labelled live requests the version scored", tag_keys=tags)
        self.labelled = Gauge("sentiment_live_labelled", "labelled live requests the version scored", tag_keys=tags)
        self.agreement = Gauge(
            "sentiment_live_agreement", "challenger: share of requests with the champion's label", tag_keys=tags
        )
        self.confidence_diff = Gauge(
            "sentiment_live_confidence_diff", "challenger: mean confidence minus the champion's", tag_keys=tags
        )

    def set_version(self, slot: str, stats: dict) -> None:
        tags = {"slot": slot, "version": stats["version"]}
        self.labelled.set(float(stats["live"]["labelled"]), tags=tags)
        if stats["live"]["f1"] is not None:
            self.f1.set(stats["live"]["f1"], tags=tags)
        if stats.get("agreement") is not None:
            self.agreement.set(stats["agreement"], tags=tags)
            self.confidence_diff.set(stats["confidence_diff"], tags=tags)


class DriftMetrics:
    """Created in the drift monitor's replica (serve_app.drift_monitor)."""

    def __init__(self) -> None:
        from ray.util.metrics import Gauge

        self.p_value = Gauge(
            "sentiment_drift_p_value", "p-value of each drift test on the last full window", tag_keys=("test",)
        )
        self.alarm = Gauge("sentiment_drift_alarm", "1 while the last full window alarmed (drift), else 0")

    def set_p_values(self, p_values: dict[str, float]) -> None:
        for test, p in p_values.items():
            self.p_value.set(p, tags={"test": test})

    def set_alarm(self, on: bool) -> None:
        self.alarm.set(1.0 if on else 0.0)
