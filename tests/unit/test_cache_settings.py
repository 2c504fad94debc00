"""settings_from_topology: the cache daemon's part of topology.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest

from cache_updater.cache_settings import settings_from_topology
from wmb.errors import ConfigError
from wmb.topology import load_topology

ROOT = Path(__file__).resolve().parents[2]


def test_example_topology_gz() -> None:
    topo = load_topology(ROOT / "topology.yaml", env={"REDIS_GZ_PASSWORD": "s3cret"})
    s = settings_from_topology(topo, "gz")
    assert s.topics == ("wmb.main.changes",)
    assert s.bootstrap == "127.0.0.1:9093"
    assert s.redis.url == "redis://127.0.0.1:6380/0" and s.redis.password == "s3cret"
    assert "s3cret" not in repr(s)
    users, orders = s.tables["app.users"][0], s.tables["app.orders"][0]
    assert (users.key, users.mode, users.format, users.ttl_s, users.columns) == (
        "user:{id}",
        "refresh",
        "hash",
        None,
        None,
    )
    assert (orders.format, orders.consistency, orders.source, orders.cache) == (
        "json",
        "after-replica",
        "main",
        "usercache",
    )
    assert s.tombstone_ttl_s == 3600
    assert s.replica is not None and (s.replica.host, s.replica.port) == ("127.0.0.1", 3307)
    assert s.consumer_group == "wmb-cache-gz"


def test_dc_without_caches_is_refused() -> None:
    topo = load_topology(ROOT / "topology.yaml", env={})
    with pytest.raises(ConfigError):
        settings_from_topology(topo, "bj")
