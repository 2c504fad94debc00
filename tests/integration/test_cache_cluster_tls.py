"""The cache updater on a real 3-master Redis Cluster and on a real TLS-only Redis with an ACL user.

Both go through the whole path an operator uses: ``topology.yaml`` names the Redis (``cluster: true``;
``rediss://`` + ``tls: true`` + username/password from the environment), :func:`settings_from_topology`
builds the daemon's settings, the daemon consumes a synthetic history from ``kafka_gz``, and
:func:`verify_caches` (the `wmb verify --caches` code) compares Redis with ``mariadb_master``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis

from cache_updater.cache import RedisCache, connect, plan
from cache_updater.cache_daemon import CacheDaemon
from cache_updater.cache_settings import CacheSettings, settings_from_topology
from cache_updater.verify_cache import verify_caches
from wmb.event import ChangeEvent, Op, Position, TxnInfo, Version
from wmb.servers import KafkaServer, MariaDBServer
from wmb.servers.redis import RedisClusterServers, RedisTlsServer
from wmb.topology import Topology, load_topology

from .test_cache_e2e import COLUMNS, History, names, produce, write_master  # noqa: F401

pytestmark = pytest.mark.integration

TOPOLOGY = """
version: 1
datacenters:
  bj:
    kafka: {{bootstrap: "{kafka}", wan_bootstrap: "{kafka}"}}
    mysql:
      master: {{host: 127.0.0.1, port: {master_port}, user: root, password: "", server_id: 1}}
  gz:
    kafka: {{bootstrap: "{kafka}"}}
    redis: {redis}
sources:
  {source}: {{dc: bj, partitions: 2}}
routes:
  - {{from: bj, to: gz, topic_prefix: ""}}
caches:
  - dc: gz
    name: c1
    source: {source}
    tombstone_ttl_s: 600
    tables:
      {db}.users: {{key: "{db}:u:{{id}}", primary_key: [id]}}
      {db}.users_json: {{key: "{db}:j:{{id}}", primary_key: [id], format: json, columns: [id, name]}}
"""


def _topology(
    tmp_path: Path,
    kafka: KafkaServer,
    master: MariaDBServer,
    names: tuple[str, str, str],  # noqa: F811
    redis_block: str,
    env: dict[str, str],
) -> Topology:
    source, db, _ = names
    path = tmp_path / "topology.yaml"
    path.write_text(
        TOPOLOGY.format(
            kafka=kafka.bootstrap, master_port=master.port, redis=redis_block, source=source, db=db
        )
    )
    return load_topology(path, env=env)


def _event(source: str, db: str, pk: int, version: Version, after: dict[str, Any] | None) -> ChangeEvent:
    return ChangeEvent(
        source=source,
        origin="bj",
        server_id=1,
        op=Op.UPDATE if after is not None else Op.DELETE,
        database=db,
        table="users",
        ts_ms=0,
        position=Position("0-1-0", "bin.000001", 4),
        txn=TxnInfo("0-1-0", 0, True),
        version=version,
        pk={"id": pk},
        before={"id": pk},
        after=after,
        columns=COLUMNS,
    )


def _workload(
    topo: Topology,
    kafka: KafkaServer,
    master: MariaDBServer,
    names: tuple[str, str, str],  # noqa: F811
) -> tuple[CacheSettings, History]:
    """Produce a history, run the daemon, verify, replay from offset 0, prove the guard; the settings."""
    source, db, topic = names
    kafka.create_topic(topic, partitions=2)
    history = History(source, db)
    txns = [history.txn(size=history.rng.randrange(1, 8), keyspace=200, hot=8) for _ in range(250)]
    produce(kafka, topic, txns, f"tx-{source}")
    write_master(master, db, history.rows)
    # users_json caches the same rows from a view, so the master has both tables verify reads.
    master.execute(f"CREATE VIEW `{db}`.users_json AS SELECT * FROM `{db}`.users")
    settings = settings_from_topology(topo, "gz", group_id=f"cache-{db}", batch_max_events=500)
    # One table, two caches: events of `users` fill both key spaces.
    users = settings.tables[f"{db}.users"] + settings.tables[f"{db}.users_json"]
    users = tuple(replace(t, table=f"{db}.users") for t in users)
    settings = replace(settings, tables={f"{db}.users": users})

    first = CacheDaemon(settings).run(max_idle_polls=20)
    assert first.applied > 0
    report = verify_caches(topo, "gz", strict=True)
    assert report.ok, report.as_json()["diffs"][:5]
    assert report.checked_keys == 2 * len(history.rows)

    # Replay the whole topic with a fresh group: every write is rejected as stale, nothing changes.
    replay = CacheDaemon(replace(settings, group_id=f"replay-{db}")).run(max_idle_polls=20)
    assert replay.applied == 0
    assert replay.stale == first.applied + first.stale
    assert verify_caches(topo, "gz", strict=True).ok

    # The guard on its own: an older write (and an older delete) of a live key is rejected ...
    pk = next(iter(history.rows))
    row = dict(history.rows[pk])
    old = Version(1, 0, 0)
    cache = RedisCache(connect(settings.redis))
    try:
        writes = [w for t in users for w in plan(_event(source, db, pk, old, {**row, "name": "old"}), t, 600)]
        writes += [w for t in users for w in plan(_event(source, db, pk, old, None), t, 600)]
        rejected = cache.apply(writes)
        assert (rejected.applied, rejected.stale) == (0, len(writes))
        assert verify_caches(topo, "gz", strict=True).ok
        # ... and a newer one is applied, which verify then reports as the one mismatched key.
        new = Version(2, 0, 0)
        newer = plan(_event(source, db, pk, new, {**row, "name": "newer"}), users[0], 600)
        assert cache.apply(newer).applied == 1
        bad = verify_caches(topo, "gz", strict=True)
        assert [(d.key, d.kind) for d in bad.diffs] == [(f"{db}:u:{pk}", "mismatched")]
    finally:
        cache.client.close()
    return settings, history


def test_cache_on_redis_cluster(
    kafka_gz: KafkaServer,
    mariadb_master: MariaDBServer,
    redis_cluster: RedisClusterServers,
    names: tuple[str, str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    redis_block = f'{{url: "{redis_cluster.url}", cluster: true}}'
    topo = _topology(tmp_path, kafka_gz, mariadb_master, names, redis_block, env={})
    settings, history = _workload(topo, kafka_gz, mariadb_master, names)
    assert settings.redis.cluster

    # The keys really are spread over the three masters, each row's tombstone in its key's slot.
    sizes = []
    for node in redis_cluster.nodes:
        client = node.client()
        try:
            sizes.append(int(client.dbsize()))
        finally:
            client.close()
    assert len(sizes) == 3 and all(n > 0 for n in sizes), sizes
    assert sum(sizes) >= 2 * len(history.rows)


def test_cache_on_tls_acl_redis(
    kafka_gz: KafkaServer,
    mariadb_master: MariaDBServer,
    redis_tls: RedisTlsServer,
    names: tuple[str, str, str],  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The topology has no CA field: the client trusts the throwaway CA through OpenSSL's standard
    # SSL_CERT_FILE, which Python's default context (what redis-py builds) reads.
    monkeypatch.setenv("SSL_CERT_FILE", str(redis_tls.ca_file))
    redis_block = (
        f'{{url: "{redis_tls.url}", tls: true, username: "${{WMB_REDIS_USER}}",'
        ' password: "${WMB_REDIS_PASSWORD}"}'
    )
    env = {"WMB_REDIS_USER": redis_tls.username, "WMB_REDIS_PASSWORD": str(redis_tls.password)}
    topo = _topology(tmp_path, kafka_gz, mariadb_master, names, redis_block, env=env)
    settings, _ = _workload(topo, kafka_gz, mariadb_master, names)
    assert settings.redis.tls and settings.redis.username == "wmbcache"

    # The ACL is real (the default user is off) and so is TLS (the port speaks nothing else).
    with pytest.raises(redis.AuthenticationError):
        connect(replace(settings.redis, username=None, password=None)).ping()
    with pytest.raises(redis.ConnectionError):
        redis.Redis(host=redis_tls.host, port=redis_tls.port, socket_timeout=5).ping()
