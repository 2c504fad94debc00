"""``consistency: after-replica``: the cache is refreshed only once the replica applied the offset."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from cache_updater.cache_daemon import CacheDaemon
from cache_updater.cache_settings import ReplicaSettings, TableCache
from wmb.runtime import StopToken
from wmb.servers import KafkaServer, MariaDBServer, RedisServer

from .test_cache_e2e import History, names, produce, settings_for, wait_until  # noqa: F401

pytestmark = pytest.mark.integration

STATE_DDL = """CREATE TABLE IF NOT EXISTS wmb.wmb_apply_state (
  source VARCHAR(255) NOT NULL, topic VARCHAR(255) NOT NULL, kafka_partition INT NOT NULL,
  next_offset BIGINT NOT NULL, gtid VARCHAR(255) NULL, updated_at DATETIME(6) NOT NULL,
  PRIMARY KEY (source, topic, kafka_partition)) ENGINE=InnoDB"""


def _set_position(replica: MariaDBServer, source: str, topic: str, next_offset: int) -> None:
    replica.execute(
        "REPLACE INTO wmb.wmb_apply_state VALUES (%s, %s, 0, %s, NULL, NOW(6))", source, topic, next_offset
    )


@pytest.mark.parametrize("max_wait_s", [600.0, 0.5])
def test_after_replica_waits_for_the_replica(
    kafka_gz: KafkaServer,
    redis_gz: RedisServer,
    mariadb_replica: MariaDBServer,
    names: tuple[str, str, str],  # noqa: F811
    max_wait_s: float,
) -> None:
    source, db, topic = names
    kafka_gz.create_topic(topic, partitions=1)
    mariadb_replica.execute("CREATE DATABASE IF NOT EXISTS wmb")
    mariadb_replica.execute(STATE_DDL)
    _set_position(mariadb_replica, source, topic, 0)
    history = History(source, db)
    txns = [history.txn(size=2, keyspace=5, hot=2) for _ in range(5)]
    produce(kafka_gz, topic, txns, f"tx-{source}")
    table = TableCache(
        table=f"{db}.users", key=f"{db}:user:{{id}}", primary_key=("id",), consistency="after-replica"
    )
    settings = settings_for(
        kafka_gz,
        redis_gz,
        topic,
        db,
        tables={f"{db}.users": (table,)},
        replica=ReplicaSettings(
            host=mariadb_replica.host, port=mariadb_replica.port, user="root", max_wait_s=max_wait_s
        ),
    )
    stop = StopToken()
    daemon = CacheDaemon(settings, stop=stop)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            daemon.run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    client = redis_gz.client()
    keys: Any = lambda: list(client.scan_iter(match=f"{db}:user:*"))  # noqa: E731
    try:
        wait_until(lambda: daemon.metrics.snapshot()["events"] >= 10, what="all records taken")
        if max_wait_s > 60:
            assert keys() == []  # the replica is behind: nothing cached yet
            assert daemon.metrics.snapshot()["applied"] == 0
            _set_position(mariadb_replica, source, topic, 10**9)
        wait_until(lambda: len(keys()) == len(history.rows), what="cache refreshed")
        if max_wait_s < 60:
            assert daemon.metrics.replica_timeouts._value.get() > 0
    finally:
        stop.stop("test")
        thread.join(timeout=60)
        client.close()
    assert not errors, errors
