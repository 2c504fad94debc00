"""What the cache updater needs to know, as plain frozen dataclasses.

The core (:mod:`cache_updater.cache`) depends only on these, not on the topology model, so it can be
tested with hand-built settings; :func:`settings_from_topology` maps ``topology.yaml`` onto them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Mode = Literal["refresh", "invalidate"]
Format = Literal["hash", "json"]
Consistency = Literal["immediate", "after-replica"]

_PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_$]+)\}")


@dataclass(frozen=True, slots=True)
class TableCache:
    """How one source table is cached: ``key`` is a template over primary-key columns (``user:{id}``)."""

    table: str  # "db.table"
    key: str
    primary_key: tuple[str, ...] = ()
    mode: Mode = "refresh"
    format: Format = "hash"
    ttl_s: float | None = None
    columns: tuple[str, ...] | None = None  # None = every column
    consistency: Consistency = "immediate"
    cache: str = "default"  # the topology's cache name (for logs and metrics)
    source: str | None = None  # only events of this source (None = any)

    def key_columns(self) -> tuple[str, ...]:
        """The columns the key template names, in order of appearance."""
        return tuple(_PLACEHOLDER.findall(self.key))


@dataclass(frozen=True, slots=True)
class RedisSettings:
    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    tls_ca_file: str | None = None
    tls_insecure: bool = False  # skip certificate verification (sandbox only)
    cluster: bool = False


@dataclass(frozen=True, slots=True)
class ReplicaSettings:
    """Where the dc's read replica lives, for ``consistency: after-replica``."""

    host: str
    port: int
    user: str
    password: str | None = field(default=None, repr=False)
    database: str = "wmb"  # the schema holding wmb_apply_state
    max_wait_s: float = 30.0  # then the write goes ahead (the cache is never older than the master)


@dataclass(frozen=True, slots=True)
class CacheSettings:
    dc: str
    bootstrap: str
    topics: tuple[str, ...]  # the change topics to consume in this dc's Kafka
    tables: Mapping[str, tuple[TableCache, ...]]  # "db.table" -> how each cache keeps it
    redis: RedisSettings
    tombstone_ttl_s: float = 300.0
    group_id: str = ""
    replica: ReplicaSettings | None = None
    batch_max_events: int = 5000
    flush_interval_s: float = 0.05
    metrics_port: int | None = None
    # A consumer that owns no partition this long is replaced by a new one.  A join legitimately
    # waits up to the session timeout (45 s) for a killed member's partitions, so this stays above
    # twice that.  Seen in CI: kafka-python 3.0.12 can stay "coordinator unknown" for good.
    assignment_timeout_s: float = 120.0

    @property
    def consumer_group(self) -> str:
        return self.group_id or f"wmb-cache-{self.dc}"


def settings_from_topology(topology: Any, dc: str, **overrides: Any) -> CacheSettings:
    """Map a ``wmb.topology.Topology`` onto :class:`CacheSettings` for datacenter ``dc``.

    Every cache of ``dc`` is served by this one daemon (one consumer group per datacenter); the
    caches all live in the dc's Redis.  ``after-replica`` tables wait on the dc's first replica.
    """
    from wmb.errors import ConfigError

    site = topology.dc(dc)
    caches = topology.caches_in(dc)
    if not caches:
        raise ConfigError(f"datacenter {dc!r} keeps no caches (topology `caches`)")
    if site.redis is None:
        raise ConfigError(f"datacenters.{dc}.redis: required by the caches of {dc!r}")
    tables: dict[str, list[TableCache]] = {}
    topics: list[str] = []
    tombstone_ttl_s = 0.0
    for cache in caches:
        source = topology.source_for(cache)
        topic = topology.topic_in(source.name, dc)
        if topic not in topics:
            topics.append(topic)
        tombstone_ttl_s = max(tombstone_ttl_s, float(cache.tombstone_ttl_s))
        for name, t in cache.tables.items():
            tables.setdefault(name, []).append(
                TableCache(
                    table=name,
                    key=t.key,
                    primary_key=tuple(t.primary_key),
                    mode=str(t.mode),  # type: ignore[arg-type]
                    format=str(t.format),  # type: ignore[arg-type]
                    ttl_s=float(t.ttl_s) if t.ttl_s else None,
                    columns=tuple(t.columns) if t.columns is not None else None,
                    consistency=str(t.consistency),  # type: ignore[arg-type]
                    cache=cache.name,
                    source=source.name,
                )
            )
    r = site.redis
    redis_settings = RedisSettings(
        url=r.url,
        username=r.username,
        password=r.password.get_secret_value() if r.password is not None else None,
        tls=bool(r.use_tls),
        # The topology model has no CA field yet (the default trust store, or OpenSSL's
        # SSL_CERT_FILE, verifies the server); picked up as soon as it grows one.
        tls_ca_file=getattr(r, "tls_ca_file", None),
        cluster=bool(r.cluster),
    )
    replica: ReplicaSettings | None = None
    for rep in topology.replicas_in(dc):
        server = topology.server(dc, rep.server)
        replica = ReplicaSettings(
            host=server.host,
            port=int(server.port),
            user=server.user,
            password=server.password.get_secret_value() or None,
        )
        break
    conf: dict[str, Any] = {
        "dc": dc,
        "bootstrap": site.kafka.bootstrap,
        "topics": tuple(topics),
        "tables": {k: tuple(v) for k, v in tables.items()},
        "redis": redis_settings,
        "tombstone_ttl_s": tombstone_ttl_s,
        "replica": replica,
    }
    conf.update(overrides)
    return CacheSettings(**conf)
