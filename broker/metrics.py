"""Prometheus metrics of one relay; a registry per relay so two relays can share a test process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class RelayMetrics:
    """Counters are rates in Prometheus (``rate(wmb_relay_bytes_total[1m])`` = bytes/s)."""

    def __init__(self, route: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        labels = ["route"]
        self.records = Counter("wmb_relay_records", "Records shipped", labels, registry=r).labels(route)
        self.bytes = Counter("wmb_relay_bytes", "Key+value bytes shipped", labels, registry=r).labels(route)
        self.skipped_loop = Counter(
            "wmb_relay_skipped_loop", "Records not shipped: destination already visited", labels, registry=r
        ).labels(route)
        self.transactions = Counter(
            "wmb_relay_transactions", "Local transactions committed", labels, registry=r
        ).labels(route)
        self.local_resets = Counter(
            "wmb_relay_local_resets", "Local errors recovered by abort + re-seek", labels, registry=r
        ).labels(route)
        self.link_up = Gauge(
            "wmb_relay_link_up", "1 while the source cluster answers", labels, registry=r
        ).labels(route)
        self.paused = Gauge(
            "wmb_relay_paused", "1 while paused by the control topic", labels, registry=r
        ).labels(route)
        self.throttle = Gauge(
            "wmb_relay_throttle_bytes_per_s", "Active throttle (0 = unlimited)", labels, registry=r
        ).labels(route)
        self.lag_messages = Gauge(
            "wmb_relay_lag_messages",
            "Source end offset - checkpoint, summed over partitions",
            labels,
            registry=r,
        ).labels(route)
        self.lag_seconds = Gauge(
            "wmb_relay_lag_seconds",
            "Now - commit time of the last shipped event while behind",
            labels,
            registry=r,
        ).labels(route)
        self.fetch_latency = Histogram(
            "wmb_relay_fetch_latency_seconds",
            "Duration of a poll that returned records",
            labels,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        ).labels(route)
        self.link_up.set(0)
