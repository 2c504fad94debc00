"""``bootstrap``: seed the replica from a consistent dump, continue from Kafka with no gap/overlap."""

from __future__ import annotations

from typing import Any

import pytest
from kafka import KafkaProducer

from cache_updater.applier.testing import Raw, SqlChangeSource, produce, wait_until
from cache_updater.bootstrap import bootstrap_replica, gtid_after, parse_gtid_pos
from cache_updater.verify_replica import format_report, verify_replica
from wmb.servers import KafkaServer, MariaDBServer

from .test_apply import Running, caught_up, conn_of, fresh, settings_for

pytestmark = pytest.mark.integration


def test_bootstrap_then_apply_no_gap_no_overlap(
    mariadb_master: MariaDBServer, mariadb_replica: MariaDBServer, kafka_gz: KafkaServer
) -> None:
    source, db = "apboot", "apply_boot"
    fresh(mariadb_master, mariadb_replica, kafka_gz, source, db, parts=2)
    topic = f"wmb.{source}.changes"
    producer = KafkaProducer(bootstrap_servers=kafka_gz.bootstrap, acks="all")
    sim = SqlChangeSource(conn_of(mariadb_master), source=source)
    produce(producer, topic, sim.ddl("", f"CREATE DATABASE {db}"))
    produce(
        producer, topic, sim.ddl(db, "CREATE TABLE t (id INT PRIMARY KEY, n INT NOT NULL, b VARBINARY(8))")
    )

    def txn(i: int) -> list[Any]:
        ops: list[tuple[Any, ...]] = [("insert", db, "t", {"id": i, "n": 0, "b": b"\x00" + bytes([i % 256])})]
        if i > 3:  # same partition (parity): partitions are ordered independently
            ops.append(("update", db, "t", {"id": i - 2}, {"n": Raw("n+1")}))
        return sim.txn(ops)

    for i in range(40):
        produce(producer, topic, txn(i), partition=i % 2)
    producer.flush()
    settings = settings_for(source, mariadb_master, mariadb_replica, kafka_gz, tables=(f"{db}.*",))
    result = bootstrap_replica(settings)
    assert parse_gtid_pos(result.gtid_pos)[0] >= 1
    after_dump = 25
    for i in range(40, 40 + after_dump):
        produce(producer, topic, txn(i), partition=i % 2)
    producer.flush()
    # both partitions start exactly at their first post-dump transaction
    assert set(result.positions) == {f"{topic}[0]", f"{topic}[1]"}

    running = Running(settings)
    wait_until(lambda: caught_up(mariadb_replica, settings, kafka_gz) or running.error, what="caught up")
    running.stop()
    assert running.error is None, running.error
    assert running.runner.status.txns == after_dump  # no overlap: nothing from before the dump re-applied
    report = verify_replica(settings.master, settings.replica, [f"{db}.*"])  # type: ignore[arg-type]
    assert report.ok, format_report(report)  # no gap
    sim.close()
    producer.close()


def test_gtid_after() -> None:
    pos = parse_gtid_pos("0-1-10,2-5-7")
    assert not gtid_after("0-1-10", pos)
    assert gtid_after("0-2-11", pos)
    assert gtid_after("1-1-1", pos)  # a domain the snapshot never saw
    assert not gtid_after("2-5-3", pos)
