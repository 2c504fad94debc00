"""Capture metrics (observer side: the hot loop calls a few methods, nothing else)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info


class CaptureMetrics:
    def __init__(self, source: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events = Counter(
            "wmb_capture_events", "Change events produced (committed)", ["source"], registry=r
        )
        self.txns = Counter(
            "wmb_capture_transactions", "Source transactions committed", ["source"], registry=r
        )
        self.bytes = Counter(
            "wmb_capture_bytes", "Envelope bytes produced (committed)", ["source"], registry=r
        )
        self.kafka_txns = Counter(
            "wmb_capture_kafka_transactions", "Kafka transactions committed", ["source"], registry=r
        )
        self.last_seq = Gauge(
            "wmb_capture_last_gtid_seq", "GTID seq of the last committed txn", ["source"], registry=r
        )
        self.last_gtid = Info("wmb_capture_last", "Last committed position", ["source"], registry=r)
        self.behind = Gauge(
            "wmb_capture_seconds_behind_source",
            "now - source commit time of the last committed transaction",
            ["source"],
            registry=r,
        )
        self.kafka_recoveries = Counter(
            "wmb_capture_kafka_recoveries",
            "Local Kafka failures recovered in process (new producer, resume after the checkpoint)",
            ["source"],
            registry=r,
        )
        self.commit_latency = Histogram(
            "wmb_capture_kafka_commit_seconds",
            "commit_transaction latency",
            ["source"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self._source = source
        self.last_commit_ts_ms: int | None = None
        self.last_commit_mono: float | None = None
        self.behind.labels(source).set_function(self.seconds_behind)

    def seconds_behind(self) -> float:
        if self.last_commit_ts_ms is None:
            return float("nan")
        return max(0.0, time.time() - self.last_commit_ts_ms / 1000.0)

    def committed(
        self, *, events: int, txns: int, nbytes: int, latency_s: float, gtid: str | None, seq: int, ts_ms: int
    ) -> None:
        s = self._source
        self.events.labels(s).inc(events)
        self.txns.labels(s).inc(txns)
        self.bytes.labels(s).inc(nbytes)
        self.kafka_txns.labels(s).inc()
        self.commit_latency.labels(s).observe(latency_s)
        self.last_seq.labels(s).set(seq)
        self.last_gtid.labels(s).info({"gtid": gtid or ""})
        self.last_commit_ts_ms = ts_ms
        self.last_commit_mono = time.monotonic()
