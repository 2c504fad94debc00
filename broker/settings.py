"""RelaySettings: everything one relay process needs, independent of the topology model.

The relay core takes this frozen dataclass only; :func:`settings_from_topology` is the one place
that knows the shape of ``topology.yaml``.  ``to_json``/``from_json`` let a supervisor (or a test)
start the relay as a subprocess: ``python -m broker --settings-json FILE``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from wmb.errors import ConfigError

DEFAULT_TOPIC_REGEX = r"^wmb\.[^.]+\.changes$"
MiB = 1024 * 1024


@dataclass(frozen=True)
class RelaySettings:
    """One route ``src_dc:dst_dc``; the relay process runs in ``dst_dc``.

    Fetch sizes are chosen for a ~40 ms RTT: kafka-python keeps one fetch in flight per broker and
    pipelines the next one as soon as the previous response is drained, so a partition moves at most
    ``max_partition_fetch_bytes`` per (RTT + transfer time).  16 MiB per partition keeps the RTT share
    under 5 % at 20 MB/s.
    """

    route: str  # "bj:gz"
    src_dc: str
    dst_dc: str
    src_bootstrap: str  # the source cluster's WAN address (through the link)
    dst_bootstrap: str  # the local cluster
    topics: tuple[str, ...] = ()  # explicit source topics; empty = match topic_regex
    topic_regex: str = DEFAULT_TOPIC_REGEX
    topic_prefix: str = ""  # destination topic = topic_prefix + source topic
    compression: str | None = "zstd"  # local produce; WAN bytes are the source's stored batches
    max_bytes_per_s: int | None = None  # static throttle; the control topic can override it
    fetch_max_bytes: int = 64 * MiB
    max_partition_fetch_bytes: int = 16 * MiB
    fetch_max_wait_ms: int = 500
    receive_buffer_bytes: int | None = 4 * MiB
    request_timeout_ms: int = 30_000  # must exceed fetch_max_wait_ms
    probe_timeout_ms: int = 5_000  # end-offset probe: how fast a blackholed link is noticed
    probe_interval_s: float = 2.0
    max_poll_records: int = 50_000
    topic_refresh_s: float = 10.0
    retry_max_elapsed_s: float | None = None  # None = retry the link forever
    retry_max_backoff_s: float = 10.0
    loop_protection: bool = True  # never ship into a datacenter the message has visited
    commit_group_offsets: bool = True  # best effort, for `wmb lag` on the source side
    metrics_port: int | None = None  # None = no endpoint, 0 = any free port
    dst_replication_factor: int = -1  # -1 = the destination broker's default
    # The destination coordinator aborts a transaction left open this long, and kafka-python then
    # reports the relay as fenced (exit 5, which the supervisor does not restart).  Ten minutes, so
    # that a destination outage shorter than that ends in abort + re-seek instead; it must stay below
    # the broker's transaction.max.timeout.ms (15 min by default).
    transaction_timeout_ms: int = 600_000
    # A local send not acknowledged in this time fails its transaction (abort + re-seek).
    delivery_timeout_ms: int = 120_000
    # The local flush, and then the commit, of one relay transaction may each take this long before
    # the relay gives the producer up (abort + re-seek).  kafka-python's transactional producer can
    # stay wedged after the destination Kafka restarts (observed: 2 min, until the delivery timeout)
    # and its commit waits without any bound; a fresh producer recovers at once.
    local_txn_timeout_s: float = 20.0

    def __post_init__(self) -> None:
        if self.route != f"{self.src_dc}:{self.dst_dc}":
            raise ConfigError(f"route {self.route!r} must be '<src_dc>:<dst_dc>'")
        if self.src_dc == self.dst_dc:
            raise ConfigError(f"route {self.route!r} goes nowhere")
        if self.request_timeout_ms <= self.fetch_max_wait_ms:
            raise ConfigError("request_timeout_ms must be larger than fetch_max_wait_ms")
        try:
            re.compile(self.topic_regex)
        except re.error as exc:
            raise ConfigError(f"topic_regex {self.topic_regex!r}: {exc}") from exc

    @property
    def transactional_id(self) -> str:
        """Derived from the route, so a second relay for the same route fences the first."""
        return f"wmb-relay-{self.src_dc}-{self.dst_dc}"

    @property
    def group_id(self) -> str:
        """Consumer group on the *source* cluster: offsets committed there for monitoring only."""
        return f"wmb-relay-{self.src_dc}-{self.dst_dc}"

    def wants_topic(self, topic: str) -> bool:
        if self.topics:
            return topic in self.topics
        return re.match(self.topic_regex, topic) is not None

    def dst_topic(self, src_topic: str) -> str:
        return self.topic_prefix + src_topic

    def replace(self, **changes: Any) -> RelaySettings:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> bytes:
        return orjson.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, data: bytes | str) -> RelaySettings:
        raw = orjson.loads(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(f"unknown relay settings: {sorted(unknown)}")
        raw["topics"] = tuple(raw.get("topics") or ())
        return cls(**raw)

    @classmethod
    def from_file(cls, path: str | Path) -> RelaySettings:
        return cls.from_json(Path(path).read_bytes())


def parse_route(route: str) -> tuple[str, str]:
    """``bj:gz`` or ``bj->gz`` -> ("bj", "gz")."""
    for sep in ("->", ":"):
        if sep in route:
            src, dst = route.split(sep, 1)
            if src and dst:
                return src, dst
    raise ConfigError(f"route {route!r}: expected SRC:DST (e.g. bj:gz)")


def settings_from_topology(topology: Any, route: str, metrics_port: int | None = None) -> RelaySettings:
    """The settings of ``route`` ("bj:gz") from a :class:`wmb.topology.Topology`.

    The relay fetches through the source cluster's ``wan_bootstrap`` and carries the changes topics
    of every source that reaches the source datacenter and that the route carries.
    """
    src_dc, dst_dc = parse_route(route)
    matches = [r for r in topology.routes if r.from_ == src_dc and r.to == dst_dc]
    if not matches:
        raise ConfigError(f"route {src_dc}:{dst_dc} is not in the topology")
    r = matches[0]
    carried = tuple(
        sorted(
            topology.topic_in(s.name, src_dc) for s in topology.sources_reaching(src_dc) if r.carries(s.name)
        )
    )
    if not carried:
        raise ConfigError(f"route {src_dc}:{dst_dc}: no source reaches {src_dc}, nothing to relay")
    return RelaySettings(
        route=f"{src_dc}:{dst_dc}",
        src_dc=src_dc,
        dst_dc=dst_dc,
        src_bootstrap=topology.dc(src_dc).kafka.remote_bootstrap,
        dst_bootstrap=topology.dc(dst_dc).kafka.bootstrap,
        topics=carried,
        topic_prefix=r.topic_prefix,
        compression=None if str(r.compression) == "none" else str(r.compression),
        max_bytes_per_s=r.max_bytes_per_s,
        fetch_max_bytes=r.fetch_max_bytes,
        max_partition_fetch_bytes=r.max_partition_fetch_bytes,
        fetch_max_wait_ms=r.fetch_max_wait_ms,
        receive_buffer_bytes=r.socket_receive_buffer_bytes,
        max_poll_records=r.commit_max_messages,
        loop_protection=r.loop_protection,
        retry_max_elapsed_s=r.retry.max_elapsed_s,
        retry_max_backoff_s=r.retry.max_backoff_s,
        metrics_port=metrics_port,
        dst_replication_factor=topology.dc(dst_dc).kafka.replication_factor,
    )
