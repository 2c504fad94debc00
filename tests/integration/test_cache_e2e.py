"""Cache updater end to end on real Kafka, Redis and MariaDB (no capture/relay: events are produced here).

A synthetic history (inserts, many updates of hot keys, deletes, re-inserts) is produced in Kafka
transactions into ``kafka_gz``; its final state is written to ``mariadb_master``; the daemon must
leave Redis equal to the master, replays must change nothing, and faults must not leave it stale.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition

from cache_updater import dlq
from cache_updater.cache_cli import dlq_group
from cache_updater.cache_daemon import CacheDaemon
from cache_updater.cache_settings import CacheSettings, RedisSettings, TableCache
from cache_updater.verify_cache import verify_tables
from wmb import codec, topics
from wmb.event import ChangeEvent, Op, Position, TxnInfo, Version
from wmb.runtime import StopToken
from wmb.servers import KafkaServer, MariaDBServer, RedisServer

pytestmark = pytest.mark.integration

COLUMNS = {
    "id": "int",
    "name": "text:utf8mb4",
    "balance": "decimal:12,2",
    "data": "binary",
    "updated": "datetime:6",
    "nick": "text:utf8mb4",
}
DDL = """CREATE TABLE `{db}`.users (
  id INT PRIMARY KEY, name VARCHAR(64) NOT NULL, balance DECIMAL(12,2) NOT NULL,
  data BLOB, updated DATETIME(6) NOT NULL, nick VARCHAR(32) NULL)"""
_counter = itertools.count(1)


def wait_until(cond: Callable[[], bool], timeout_s: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


class History:
    """Generates transactions of row changes over one table, and remembers the final rows."""

    def __init__(self, source: str, db: str, seed: int = 7) -> None:
        self.source, self.db = source, db
        self.rng = random.Random(seed)
        self.seq = 0
        self.rows: dict[int, dict[str, Any]] = {}

    def _row(self, pk: int) -> dict[str, Any]:
        r = self.rng
        return {
            "id": pk,
            "name": f"user-{pk}-{r.randrange(10**6)}",
            "balance": (Decimal(r.randrange(-(10**6), 10**6)) / 100).quantize(Decimal("0.01")),
            "data": bytes(r.randrange(256) for _ in range(r.randrange(0, 8))),
            "updated": dt.datetime(2024, 1, 1) + dt.timedelta(microseconds=r.randrange(10**12)),
            "nick": None if r.random() < 0.3 else f"n{r.randrange(100)}",
        }

    def txn(self, size: int, keyspace: int, hot: int) -> list[ChangeEvent]:
        self.seq += 1
        gtid = f"0-1-{self.seq}"
        events: list[ChangeEvent] = []
        for i in range(size):
            pk = (
                self.rng.randrange(1, hot + 1)
                if self.rng.random() < 0.5
                else self.rng.randrange(1, keyspace + 1)
            )
            before = self.rows.get(pk)
            if before is None:
                op, after = Op.INSERT, self._row(pk)
            elif self.rng.random() < 0.1:
                op, after = Op.DELETE, None
            else:
                op, after = Op.UPDATE, self._row(pk)
            if after is None:
                self.rows.pop(pk)
            else:
                self.rows[pk] = after
            events.append(
                ChangeEvent(
                    source=self.source,
                    origin="bj",
                    server_id=1,
                    op=op,
                    database=self.db,
                    table="users",
                    ts_ms=int(time.time() * 1000),
                    position=Position(gtid, "bin.000001", 1000 + self.seq),
                    txn=TxnInfo(gtid, i, i == size - 1),
                    version=Version(1, self.seq, i),
                    pk={"id": pk},
                    before=before,
                    after=after,
                    columns=COLUMNS,
                )
            )
        return events


def produce(kafka: KafkaServer, topic: str, txns: list[list[ChangeEvent]], tx_id: str) -> None:
    """Kafka transactions of several whole source transactions, keyed by pk (per-row order)."""
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, transactional_id=tx_id, linger_ms=5)
    producer.init_transactions()
    for group in (txns[i : i + 20] for i in range(0, len(txns), 20)):
        producer.begin_transaction()
        for events in group:
            for e in events:
                producer.send(topic, key=str(e.pk["id"]).encode(), value=codec.encode(e))
        producer.commit_transaction()
    producer.close()


def write_master(master: MariaDBServer, db: str, rows: dict[int, dict[str, Any]]) -> None:
    master.execute(f"DROP DATABASE IF EXISTS `{db}`")
    master.execute(f"CREATE DATABASE `{db}`")
    master.execute(DDL.format(db=db))
    conn = master.connect(db)
    try:
        with conn.cursor() as cur:
            cols = list(COLUMNS)
            cur.executemany(
                f"INSERT INTO users ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(cols))})",
                [tuple(r[c] for c in cols) for r in rows.values()],
            )
        conn.commit()
    finally:
        conn.close()


def settings_for(
    kafka: KafkaServer, redis_server: RedisServer, topic: str, db: str, **kw: Any
) -> CacheSettings:
    table = TableCache(table=f"{db}.users", key=f"{db}:user:{{id}}", primary_key=("id",))
    jtable = TableCache(
        table=f"{db}.users",
        key=f"{db}:juser:{{id}}",
        primary_key=("id",),
        format="json",
        columns=("id", "name"),
    )
    conf: dict[str, Any] = {
        "dc": "gz",
        "bootstrap": kafka.bootstrap,
        "topics": (topic,),
        "tables": {f"{db}.users": (table, jtable)},
        "redis": RedisSettings(url=redis_server.url),
        "tombstone_ttl_s": 3600,
        "group_id": f"cache-{db}",
        "batch_max_events": 2000,
    }
    conf.update(kw)
    return CacheSettings(**conf)


def group_caught_up(kafka: KafkaServer, group: str, topic: str) -> bool:
    admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    consumer = KafkaConsumer(bootstrap_servers=kafka.bootstrap)
    try:
        committed = admin.list_group_offsets(group).get(group, {})
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        ends = consumer.end_offsets(tps)
        return all(tp in committed and committed[tp].offset >= ends[tp] for tp in tps)
    finally:
        admin.close()
        consumer.close()


@pytest.fixture
def names() -> Iterator[tuple[str, str, str]]:
    n = next(_counter)
    source = f"c{os.getpid()}x{n}"
    yield source, f"cdb_{os.getpid()}_{n}", topics.changes_topic(source)


def _check(
    redis_server: RedisServer, master: MariaDBServer, settings: CacheSettings, strict: bool = True
) -> Any:
    client = redis_server.client()
    conn = master.connect()
    try:
        return verify_tables(client, conn, settings, strict=strict)
    finally:
        client.close()
        conn.close()


def test_end_to_end_verify_corruption_and_replay(
    kafka_gz: KafkaServer, redis_gz: RedisServer, mariadb_master: MariaDBServer, names: tuple[str, str, str]
) -> None:
    source, db, topic = names
    kafka_gz.create_topic(topic, partitions=3)
    history = History(source, db)
    txns = [history.txn(size=history.rng.randrange(1, 12), keyspace=300, hot=10) for _ in range(600)]
    produce(kafka_gz, topic, txns, f"tx-{source}")
    write_master(mariadb_master, db, history.rows)
    settings = settings_for(kafka_gz, redis_gz, topic, db)

    first = CacheDaemon(settings).run(max_idle_polls=20)
    assert first.applied > 0
    report = _check(redis_gz, mariadb_master, settings)
    assert report.ok, report.as_json()["diffs"][:5]
    assert report.checked_keys == 2 * len(history.rows)

    # Corrupt one key: verify names it.
    victim = f"{db}:user:{next(iter(history.rows))}"
    client = redis_gz.client()
    client.hset(victim, "name", "corrupted")
    bad = _check(redis_gz, mariadb_master, settings)
    assert not bad.ok and [(d.key, d.kind) for d in bad.diffs] == [(victim, "mismatched")]
    client.hset(victim, "name", history.rows[int(victim.rsplit(":", 1)[1])]["name"])
    client.close()

    # Replay the whole topic from offset 0 (a fresh group): every write is rejected as stale.
    replay = CacheDaemon(settings_for(kafka_gz, redis_gz, topic, db, group_id=f"replay-{db}")).run(
        max_idle_polls=20
    )
    assert replay.applied == 0
    assert replay.stale == first.applied + first.stale
    assert _check(redis_gz, mariadb_master, settings).ok


def test_dead_letters_and_pipeline_goes_on(
    kafka_gz: KafkaServer, redis_gz: RedisServer, mariadb_master: MariaDBServer, names: tuple[str, str, str]
) -> None:
    source, db, topic = names
    kafka_gz.create_topic(topic, partitions=1)
    history = History(source, db)
    good = [history.txn(size=3, keyspace=20, hot=5) for _ in range(10)]
    no_pk = _with(good[0][0], pk={}, txn=TxnInfo("x-1", 0, True))
    wrong_v = codec.encode(good[0][0]).replace(b'"v":1', b'"v":99')
    producer = KafkaProducer(bootstrap_servers=kafka_gz.bootstrap, acks="all")
    producer.send(topic, key=b"g", value=b"\x00garbage{")
    producer.send(topic, key=b"v", value=wrong_v)
    producer.send(topic, key=b"p", value=codec.encode(no_pk))
    producer.flush()
    producer.close()
    produce(kafka_gz, topic, good, f"tx-{source}")
    write_master(mariadb_master, db, history.rows)
    settings = settings_for(kafka_gz, redis_gz, topic, db, dc=f"gz{source}")

    daemon = CacheDaemon(settings)
    daemon.run(max_idle_polls=20)
    assert daemon.metrics.snapshot()["dlq"] == 3
    assert _check(redis_gz, mariadb_master, settings).ok

    entries = dlq.read_dlq(kafka_gz.bootstrap, settings.dc)
    assert [(e.reason, e.topic, e.offset, e.stage) for e in entries] == [
        ("decode", topic, 0, "cache"),
        ("version", topic, 1, "cache"),
        ("no-pk", topic, 2, "cache"),
    ]
    assert entries[0].value == b"\x00garbage{" and entries[0].key == b"g"
    out = CliRunner().invoke(
        dlq_group, ["list", "--dc", settings.dc, "--bootstrap", kafka_gz.bootstrap, "--json"]
    )
    assert out.exit_code == 0, out.output
    assert '"reason":"no-pk"' in out.output
    out = CliRunner().invoke(
        dlq_group, ["replay", "--dc", settings.dc, "--bootstrap", kafka_gz.bootstrap, "--offset", "0"]
    )
    assert out.exit_code == 0 and "replayed 1" in out.output
    CacheDaemon(settings).run(max_idle_polls=20)  # the replayed garbage is parked again, nothing breaks
    assert [e.reason for e in dlq.read_dlq(kafka_gz.bootstrap, settings.dc)] == [
        "decode",
        "version",
        "no-pk",
        "decode",
    ]


def _with(event: ChangeEvent, **changes: Any) -> ChangeEvent:
    from dataclasses import replace

    return replace(event, **changes)


DAEMON_SCRIPT = """
import sys, orjson
from cache_updater.cache_daemon import CacheDaemon
from cache_updater.cache_settings import CacheSettings, RedisSettings, TableCache
from wmb.runtime import StopToken
c = orjson.loads(sys.argv[1])
def table(t):
    cols = tuple(t["columns"]) if t["columns"] else None
    return TableCache(**{**t, "primary_key": tuple(t["primary_key"]), "columns": cols})
tables = {k: tuple(table(t) for t in v) for k, v in c["tables"].items()}
redis_settings = RedisSettings(**c["redis"])
s = CacheSettings(**{**c, "topics": tuple(c["topics"]), "tables": tables, "redis": redis_settings})
CacheDaemon(s, stop=StopToken().install()).run()
"""


def _spawn(settings: CacheSettings, log_path: Path) -> subprocess.Popen[bytes]:
    from dataclasses import asdict

    import orjson

    conf = orjson.dumps(asdict(settings)).decode()
    log = open(log_path, "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-c", DAEMON_SCRIPT, conf],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=Path(__file__).parents[2],
    )


def test_kill_9_daemon_under_load_then_restart(
    kafka_gz: KafkaServer,
    redis_gz: RedisServer,
    mariadb_master: MariaDBServer,
    names: tuple[str, str, str],
    tmp_path: Path,
) -> None:
    source, db, topic = names
    kafka_gz.create_topic(topic, partitions=3)
    history = History(source, db)
    settings = settings_for(kafka_gz, redis_gz, topic, db)
    proc = _spawn(settings, tmp_path / "daemon.log")
    try:
        produce(kafka_gz, topic, [history.txn(8, 400, 20) for _ in range(400)], f"tx-{source}")
        wait_until(
            lambda: next(redis_gz.client().scan_iter(match=f"{db}:user:*"), None) is not None, what="writes"
        )
        proc.kill()  # SIGKILL mid-stream: no flush, no commit
        proc.wait()
        produce(kafka_gz, topic, [history.txn(8, 400, 20) for _ in range(400)], f"tx-{source}")
        proc = _spawn(settings, tmp_path / "daemon.log")
        wait_until(lambda: group_caught_up(kafka_gz, settings.consumer_group, topic), what="catch-up")
        proc.terminate()  # SIGTERM: drain, commit, exit 0
        assert proc.wait(timeout=60) == 0, (tmp_path / "daemon.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    write_master(mariadb_master, db, history.rows)
    report = _check(redis_gz, mariadb_master, settings)
    assert report.ok, report.as_json()["diffs"][:5]


def test_redis_killed_and_restarted_empty_under_load(
    kafka_gz: KafkaServer,
    server_factory: Any,
    mariadb_master: MariaDBServer,
    names: tuple[str, str, str],
) -> None:
    source, db, topic = names
    kafka_gz.create_topic(topic, partitions=2)
    redis_server: RedisServer = server_factory.redis()
    history = History(source, db)
    settings = settings_for(kafka_gz, redis_server, topic, db)
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
    try:
        produce(kafka_gz, topic, [history.txn(8, 200, 10) for _ in range(300)], f"tx-{source}")
        wait_until(lambda: daemon.metrics.snapshot()["applied"] > 0, what="first writes")
        redis_server.kill()
        produce(kafka_gz, topic, [history.txn(8, 200, 10) for _ in range(300)], f"tx-{source}")
        time.sleep(1.0)  # let the daemon hit the dead Redis and back off
        redis_server.restart()  # empty: no persistence
        produce(kafka_gz, topic, [history.txn(8, 200, 10) for _ in range(300)], f"tx-{source}")
        wait_until(lambda: group_caught_up(kafka_gz, settings.consumer_group, topic), what="catch-up")
    finally:
        stop.stop("test")
        thread.join(timeout=120)
    assert not errors, errors
    write_master(mariadb_master, db, history.rows)
    # Rows untouched since the restart are simply missing (a miss is fine); none may be stale.
    report = _check(redis_server, mariadb_master, settings, strict=False)
    assert report.ok and report.checked_keys > 0, report.as_json()["diffs"][:5]


def test_a_consumer_left_without_partitions_is_replaced(
    kafka_gz: KafkaServer, redis_gz: RedisServer, names: tuple[str, str, str]
) -> None:
    """A consumer that owns nothing past ``assignment_timeout_s`` is replaced by a fresh one (CI saw
    kafka-python stay "coordinator unknown" for good).  Here another member of the group holds the
    topic's only partition, so the daemon's consumer legitimately owns nothing, and must be replaced
    again and again without losing its way: once the other member leaves, the daemon takes over."""
    _, db, topic = names
    kafka_gz.create_topic(topic, partitions=1)
    settings = settings_for(kafka_gz, redis_gz, topic, db, assignment_timeout_s=2.0)
    holder = KafkaConsumer(bootstrap_servers=kafka_gz.bootstrap, group_id=settings.consumer_group)
    holder.subscribe([topic])
    deadline = time.monotonic() + 60
    while not holder.assignment():
        assert time.monotonic() < deadline, "the holder never got the partition"
        holder.poll(timeout_ms=200)
    stop = StopToken()
    daemon = CacheDaemon(settings, stop=stop)
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while daemon.metrics.consumer_replaced._value.get() < 2:
            assert time.monotonic() < deadline and thread.is_alive(), "no consumer was replaced"
            holder.poll(timeout_ms=200)  # keep the holder's membership alive
        holder.close()
        deadline = time.monotonic() + 90
        while not (daemon._consumer is not None and daemon._consumer.assignment()):
            assert time.monotonic() < deadline and thread.is_alive(), "the daemon never took over"
            time.sleep(0.2)
    finally:
        stop.stop("test")
        thread.join(30)
    assert not thread.is_alive()
