"""The replica applier against real MariaDB (master + replica) and Kafka: exactness, DDL, conflicts."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from cache_updater.applier.testing import Raw, SqlChangeSource, produce, wait_until
from cache_updater.apply import (
    ApplyRunner,
    ApplySettings,
    ConflictPolicy,
    MariaDBReplica,
    ReplicaConn,
    is_applier_transaction,
)
from cache_updater.verify_replica import format_report, verify_replica
from wmb.errors import ExitCode, HaltedError
from wmb.runtime import StopToken
from wmb.servers import KafkaServer, MariaDBServer

pytestmark = pytest.mark.integration


def conn_of(server: MariaDBServer) -> ReplicaConn:
    return ReplicaConn(server.host, server.port, server.user, server.password)


def settings_for(
    source: str, master: MariaDBServer, replica: MariaDBServer, kafka: KafkaServer, **kw: Any
) -> ApplySettings:
    kw.setdefault("group_max_ms", 10)
    return ApplySettings(
        dc="gz",
        replica=conn_of(replica),
        master=conn_of(master),
        kafka_bootstrap=kafka.bootstrap,
        topics=((source, f"wmb.{source}.changes"),),
        consumer_group=f"wmb-apply-test-{source}",
        **kw,
    )


def end_offsets(kafka: KafkaServer, topic: str) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=kafka.bootstrap, isolation_level="read_committed")
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        return {tp.partition: off for tp, off in consumer.end_offsets(tps).items()}
    finally:
        consumer.close()


def caught_up(replica: MariaDBServer, settings: ApplySettings, kafka: KafkaServer) -> bool:
    source, topic = settings.topics[0]
    if not has_state(replica):
        return False
    rows = replica.query(
        "SELECT kafka_partition, next_offset FROM wmb.wmb_apply_state WHERE source=%s AND topic=%s",
        source,
        topic,
    )
    have = {int(p): int(o) for p, o in rows}
    return all(have.get(p, 0) >= o for p, o in end_offsets(kafka, topic).items() if o > 0)


class Running:
    """An ApplyRunner in a thread; ``stop()`` is the SIGTERM path."""

    def __init__(self, settings: ApplySettings) -> None:
        self.token = StopToken()
        self.runner = ApplyRunner(settings, self.token)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.runner.run()
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self.token.stop("test")
        self.thread.join(60)
        assert not self.thread.is_alive()


@pytest.fixture
def producer(kafka_gz: KafkaServer) -> Iterator[KafkaProducer]:
    p = KafkaProducer(bootstrap_servers=kafka_gz.bootstrap, acks="all")
    yield p
    p.close()


def fresh(
    master: MariaDBServer, replica: MariaDBServer, kafka: KafkaServer, source: str, db: str, parts: int = 1
) -> None:
    for server in (master, replica):
        server.execute(f"DROP DATABASE IF EXISTS `{db}`")
        server.execute("CREATE DATABASE IF NOT EXISTS wmb")
        server.execute("DELETE FROM wmb.wmb_apply_state WHERE source=%s", source) if has_state(
            server
        ) else None
    kafka.create_topic(f"wmb.{source}.changes", partitions=parts, exist_ok=True)


def has_state(server: MariaDBServer) -> bool:
    return bool(
        server.query(
            "SELECT 1 FROM information_schema.TABLES "
            "WHERE TABLE_SCHEMA='wmb' AND TABLE_NAME='wmb_apply_state'"
        )
    )


ALL_TYPES_DDL = """CREATE TABLE alltypes (
  id INT NOT NULL PRIMARY KEY,
  ti TINYINT, tiu TINYINT UNSIGNED, si SMALLINT, siu SMALLINT UNSIGNED,
  mi MEDIUMINT, miu MEDIUMINT UNSIGNED, i INT, iu INT UNSIGNED, bi BIGINT, biu BIGINT UNSIGNED,
  d DECIMAL(65,30), f FLOAT, dbl DOUBLE, b1 BIT(1), b64 BIT(64),
  u VARCHAR(50) CHARACTER SET utf8mb4, l VARCHAR(50) CHARACTER SET latin1,
  bn BINARY(4), vb VARBINARY(20), bl BLOB, j JSON, dd DATE, dtm DATETIME(6),
  ts TIMESTAMP(6) NULL DEFAULT NULL, tm TIME(6), y YEAR, e ENUM('a','b','c'), s SET('x','y','z'),
  g GEOMETRY, t TEXT
) ENGINE=InnoDB"""

ALL_TYPES_ROWS: list[dict[str, Any]] = [
    {
        "id": 1,
        "ti": -128,
        "tiu": 255,
        "si": -32768,
        "siu": 65535,
        "mi": -8388608,
        "miu": 16777215,
        "i": -2147483648,
        "iu": 4294967295,
        "bi": -9223372036854775808,
        "biu": 18446744073709551615,
        "d": Decimal("-99999999999999999999999999999999999.999999999999999999999999999999"),
        "f": 3.14159,
        "dbl": 2.2250738585072014e-308,
        "b1": b"\x01",
        "b64": b"\xff" * 8,
        "u": "emoji \U0001f600 ünï",
        "l": "caf\u00e9 \u00bf",
        "bn": b"\x00\x01\x00\x00",
        "vb": b"\x00",
        "bl": b"\x00\xff\x00'\\",
        "j": '{"a": [1, 2.5, "x"], "b": null}',
        "dd": dt.date(1000, 1, 1),
        "dtm": dt.datetime(9999, 12, 31, 23, 59, 59, 999999),
        "ts": dt.datetime(2038, 1, 19, 3, 14, 7, 999999),
        "tm": -dt.timedelta(hours=838, minutes=59, seconds=58, microseconds=999999),
        "y": 2155,
        "e": "c",
        "s": "x,z",
        "g": Raw("ST_GeomFromText('POLYGON((0 0,1 0,1 1,0 0))')"),
        "t": "line\nbreak\ttab",
    },
    {
        "id": 2,
        "ti": 127,
        "tiu": 0,
        "si": 32767,
        "siu": 0,
        "mi": 8388607,
        "miu": 0,
        "i": 2147483647,
        "iu": 0,
        "bi": 9223372036854775807,
        "biu": 0,
        "d": Decimal("0.000000000000000000000000000001"),
        "f": -1.17549435e-38,
        "dbl": -1.7976931348623157e308,
        "b1": b"\x00",
        "b64": b"\x00" * 8,
        "u": "",
        "l": "",
        "bn": b"",
        "vb": b"",
        "bl": b"",
        "j": "[]",
        "dd": dt.date(2024, 2, 29),
        "dtm": dt.datetime(1000, 1, 1, 0, 0, 0),
        "ts": dt.datetime(1970, 1, 1, 0, 0, 1),
        "tm": dt.timedelta(hours=838, minutes=59, seconds=59),
        "y": 1901,
        "e": "a",
        "s": "",
        "g": Raw("ST_GeomFromText('POINT(1.5 -2.25)')"),
        "t": "",
    },
    {"id": 3},  # every other column NULL
]


def test_all_types_exact_and_ddl_in_order(
    mariadb_master: MariaDBServer,
    mariadb_replica: MariaDBServer,
    kafka_gz: KafkaServer,
    producer: KafkaProducer,
) -> None:
    source, db = "aptypes", "apply_types"
    fresh(mariadb_master, mariadb_replica, kafka_gz, source, db)
    settings = settings_for(source, mariadb_master, mariadb_replica, kafka_gz)
    sim = SqlChangeSource(conn_of(mariadb_master), source=source)
    topic = f"wmb.{source}.changes"
    # The schema reaches the replica only through DDL events, in order with the rows.
    produce(producer, topic, sim.ddl("", f"CREATE DATABASE {db}"))
    produce(producer, topic, sim.ddl(db, ALL_TYPES_DDL))
    for row in ALL_TYPES_ROWS:
        produce(producer, topic, sim.txn([("insert", db, "alltypes", row)]))
    produce(
        producer,
        topic,
        sim.txn([("update", db, "alltypes", {"id": 2}, {"u": "changed \U0001f680", "f": 0.1})]),
    )
    produce(producer, topic, sim.ddl(db, "ALTER TABLE alltypes ADD COLUMN extra INT NULL DEFAULT 7"))
    produce(
        producer,
        topic,
        sim.txn([("update", db, "alltypes", {"id": 3}, {"extra": 8, "b64": b"\x80" + b"\x00" * 7})]),
    )
    producer.flush()

    running = Running(settings)
    try:
        wait_until(
            lambda: caught_up(mariadb_replica, settings, kafka_gz) or running.error, what="apply caught up"
        )
    finally:
        running.stop()
    assert running.error is None, running.error
    report = verify_replica(settings.master, settings.replica, [f"{db}.*"])  # type: ignore[arg-type]
    assert report.ok, format_report(report)
    # Values read back by pymysql are equal too (not only the checksums).
    sel = "SELECT * FROM apply_types.alltypes ORDER BY id"
    assert mariadb_master.query(sel) == mariadb_replica.query(sel)
    sim.close()


@pytest.mark.parametrize("workers", [0, 4], ids=["serial", "parallel4"])
def test_mixed_workload_group_commit_marker_and_pk_change(
    mariadb_master: MariaDBServer,
    mariadb_replica: MariaDBServer,
    kafka_gz: KafkaServer,
    producer: KafkaProducer,
    workers: int,
) -> None:
    source, db = ("apmixed", "apply_mixed") if not workers else (f"apmixedp{workers}", f"apply_pmix{workers}")
    fresh(mariadb_master, mariadb_replica, kafka_gz, source, db, parts=2)
    settings = settings_for(
        source, mariadb_master, mariadb_replica, kafka_gz, group_max_txns=7, parallel_workers=workers
    )
    sim = SqlChangeSource(conn_of(mariadb_master), source=source)
    topic = f"wmb.{source}.changes"
    produce(producer, topic, sim.ddl("", f"CREATE DATABASE {db}"), partition=0)
    produce(producer, topic, sim.ddl("", f"CREATE DATABASE {db}b"), partition=1)
    for d, part in ((db, 0), (db + "b", 1)):
        produce(
            producer,
            topic,
            sim.ddl(d, "CREATE TABLE kv (id INT PRIMARY KEY, v VARCHAR(20), n INT NOT NULL)"),
            part,
        )
        produce(
            producer,
            topic,
            sim.ddl(
                d,
                "CREATE TABLE acct (id INT PRIMARY KEY, email VARCHAR(40) NOT NULL UNIQUE, "
                "bal DECIMAL(12,2))",
            ),
            part,
        )
        produce(producer, topic, sim.ddl(d, "CREATE TABLE hot (id INT PRIMARY KEY, n INT NOT NULL)"), part)
        produce(producer, topic, sim.txn([("insert", d, "hot", {"id": h, "n": 0}) for h in range(3)]), part)
    dml = 2
    for i in range(120):
        for d, part in ((db, 0), (db + "b", 1)):
            ops: list[tuple[Any, ...]] = [("insert", d, "kv", {"id": i, "v": f"v{i}", "n": 0})]
            if i % 2 == 0:  # hot keys: many transactions write the same few rows
                ops.append(("update", d, "hot", {"id": i % 3}, {"n": Raw("n+1")}))
            if i % 3 == 0:
                ops.append(("insert", d, "acct", {"id": i, "email": f"u{i}@x", "bal": Decimal("1.50")}))
            if i > 5:
                ops.append(("update", d, "kv", {"id": i - 5}, {"n": Raw("n+1"), "v": f"w{i}"}))
            if i > 10 and i % 4 == 0:
                ops.append(("delete", d, "kv", {"id": i - 10}))
            if i > 12 and i % 3 == 0:
                ops.append(("update", d, "acct", {"id": i - 12}, {"email": f"e{i}@y", "bal": Raw("bal*2")}))
            if i % 10 == 9:
                ops.append(("update", d, "kv", {"id": i}, {"id": 10_000 + i}))  # primary key change
            produce(producer, topic, sim.txn(ops), part)
            dml += 1
    # Free a unique value and reuse it in the next transaction (order matters for the replica).
    produce(producer, topic, sim.txn([("update", db, "acct", {"id": 3}, {"email": "moved@x"})]), 0)
    produce(producer, topic, sim.txn([("insert", db, "acct", {"id": 999, "email": "u3@x", "bal": None})]), 0)
    dml += 2
    producer.flush()
    before = (
        mariadb_replica.query("SELECT COALESCE(SUM(txn_count),0) FROM wmb.wmb_apply_marker")
        if has_state(mariadb_replica)
        else [(0,)]
    )

    running = Running(settings)
    try:
        wait_until(
            lambda: caught_up(mariadb_replica, settings, kafka_gz) or running.error, what="apply caught up"
        )
    finally:
        running.stop()
    assert running.error is None, running.error
    assert running.runner.status.commits < dml  # group commit shared replica transactions
    report = verify_replica(settings.master, settings.replica, [f"{db}*.*"])  # type: ignore[arg-type]
    assert report.ok, format_report(report)
    after = mariadb_replica.query("SELECT COALESCE(SUM(txn_count),0) FROM wmb.wmb_apply_marker")
    assert int(after[0][0]) - int(before[0][0]) == dml  # every DML source txn marked exactly once
    assert is_applier_transaction(["wmb.wmb_apply_marker", f"{db}.kv"])
    assert not is_applier_transaction([(db, "kv")])
    sim.close()


@pytest.mark.parametrize("workers", [0, 4], ids=["serial", "parallel4"])
def test_conflict_policies(
    mariadb_master: MariaDBServer,
    mariadb_replica: MariaDBServer,
    kafka_gz: KafkaServer,
    producer: KafkaProducer,
    workers: int,
) -> None:
    source, db = ("apconf", "apply_conf") if not workers else (f"apconfp{workers}", f"apply_pconf{workers}")
    fresh(mariadb_master, mariadb_replica, kafka_gz, source, db)
    sim = SqlChangeSource(conn_of(mariadb_master), source=source)
    topic = f"wmb.{source}.changes"
    produce(producer, topic, sim.ddl("", f"CREATE DATABASE {db}"))
    for t in ("h", "s", "o"):
        produce(
            producer,
            topic,
            sim.ddl(db, f"CREATE TABLE {t} (id INT PRIMARY KEY, u VARCHAR(10) UNIQUE, v INT)"),
        )
        produce(
            producer,
            topic,
            sim.txn([("insert", db, t, {"id": i, "u": f"u{i}", "v": i}) for i in range(1, 4)]),
        )
    producer.flush()
    per = {f"{db}.s": ConflictPolicy.SKIP, f"{db}.o": ConflictPolicy.OVERWRITE}
    settings = settings_for(
        source, mariadb_master, mariadb_replica, kafka_gz, conflict_per_table=per, parallel_workers=workers
    )
    running = Running(settings)
    wait_until(lambda: caught_up(mariadb_replica, settings, kafka_gz) or running.error, what="setup applied")
    running.stop()
    assert running.error is None

    # Make the replica diverge: row 1 gone, a stray row holding the unique value 'new'.
    for t in ("s", "o"):
        mariadb_replica.execute(f"DELETE FROM {db}.{t} WHERE id=1")
        mariadb_replica.execute(f"INSERT INTO {db}.{t} VALUES (50, 'new', 0)")
    for t in ("s", "o"):
        produce(producer, topic, sim.txn([("update", db, t, {"id": 1}, {"v": 100})]))  # update_missing
        produce(
            producer, topic, sim.txn([("insert", db, t, {"id": 9, "u": "new", "v": 9})])
        )  # duplicate_unique
        produce(producer, topic, sim.txn([("delete", db, t, {"id": 1})]))  # delete_missing
    producer.flush()
    running = Running(settings)
    wait_until(
        lambda: caught_up(mariadb_replica, settings, kafka_gz) or running.error, what="conflicts applied"
    )
    running.stop()
    assert running.error is None, running.error
    kinds = mariadb_replica.query(
        "SELECT kind FROM wmb.wmb_apply_conflicts WHERE source=%s AND tbl='s' ORDER BY id", source
    )
    expected = ["update_missing", "duplicate_unique", "delete_missing"]
    if workers:  # independent transactions (disjoint write sets) may commit in either order
        assert sorted(k for (k,) in kinds) == sorted(expected)
    else:
        assert [k for (k,) in kinds] == expected
    assert mariadb_replica.query(f"SELECT id FROM {db}.s WHERE u='new'") == [(50,)]  # skipped
    # overwrite: the stray row lost its unique value to the master's row 9
    assert mariadb_replica.query(f"SELECT id, v FROM {db}.o WHERE u='new'") == [(9, 9)]
    assert running.runner.status.conflicts.get("duplicate_unique") == 2

    # halt (the default): an update of a row missing on the replica stops with exit 7, naming the event.
    mariadb_replica.execute(f"DELETE FROM {db}.h WHERE id=2")
    events = sim.txn([("update", db, "h", {"id": 2}, {"v": 200})])
    produce(producer, topic, events)
    producer.flush()
    running = Running(settings)
    wait_until(lambda: running.error is not None, what="halt")
    running.stop()
    assert isinstance(running.error, HaltedError)
    assert running.error.exit_code == ExitCode.HALTED
    msg = str(running.error)
    for part in (source, str(events[0].position.gtid), f"{db}.h", '"id":2', "update_missing"):
        assert part in msg, msg
    # nothing of the halted transaction is committed and the position did not move past it
    replica = MariaDBReplica(settings)
    replica.connect()
    pos = replica.read_positions([source])
    replica.close()
    assert pos[(topic, 0)][0] == end_offsets(kafka_gz, topic)[0] - 1
    sim.close()
