"""The two consumer daemons of cache_updater across a kill -9 and restart of their local Kafka.

Each test runs the real command (`wmb cache --dc gz`, `wmb apply --dc gz`) against a private Kafka,
keeps a loader writing source transactions to the master and producing their change events while
the Kafka is killed (SIGKILL), kept down ~8 s and started again on the same data dir; the daemon
must ride it out in process (no exit, no restart by the test), catch up, and leave its target equal
to the master: every cached key equal to its master row, every source transaction applied to the
replica exactly once (counted by the marker rows).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer

from cache_updater import dlq
from cache_updater.applier.testing import Raw, SqlChangeSource, topology_yaml, wait_until
from cache_updater.verify_cache import verify_caches
from cache_updater.verify_replica import format_report, verify_replica
from wmb import codec, topics
from wmb.event import ChangeEvent
from wmb.servers import KafkaServer, MariaDBServer, RedisServer, free_port
from wmb.topology import load_topology

from .test_apply import caught_up, conn_of, fresh, has_state, settings_for
from .test_apply_faults import counter_txn_ops, marker_count
from .test_cache_e2e import group_caught_up

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOWN_S = 8.0  # how long the local Kafka stays dead


def _health(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
            body: dict[str, Any] = json.loads(resp.read())
            return body
    except OSError:
        return None


def _counter(port: int, name: str) -> int:
    body = _health(port)
    return int(body[name]) if body and body.get(name) is not None else -1


def _spawn(command: str, topo: Path, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    log = open(log_path, "ab")  # noqa: SIM115 - the child holds it; closed with the test's tmp dir
    args = ["--dc", "gz", "--topology", str(topo), "--metrics-port", str(port)]
    return subprocess.Popen(
        [sys.executable, "-m", "wmb.cli", command, *args],
        cwd=ROOT,
        env=dict(os.environ, WMB_LOG_LEVEL="INFO"),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


class Loader:
    """Runs source transactions on the master and produces their events, until stopped.

    The producer is idempotent (acks=all, the kafka-python default then), so its own retries across
    the broker's death never write a record twice: any duplicate the daemon shows is its own.
    Every ``POISON_EVERY`` transactions it also sends an undecodable record (on partition
    ``n % partitions``): each must end up in the dead-letter topic, even if the daemon meets it
    while its Kafka is down.
    """

    POISON_EVERY = 97

    def __init__(
        self,
        sim: SqlChangeSource,
        producer: KafkaProducer,
        topic: str,
        ops: Callable[[int], list[tuple[Any, ...]]],
        partition_of: Callable[[ChangeEvent], int],
        partitions: int = 1,
        pace_s: float = 0.004,
    ) -> None:
        self.sim, self.producer, self.topic = sim, producer, topic
        self.ops, self.partition_of, self.pace_s = ops, partition_of, pace_s
        self.partitions = partitions
        self.txns = 0
        self.poison: list[Any] = []  # futures of the undecodable records
        self.errors: list[BaseException] = []
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loader", daemon=True)

    def start(self) -> Loader:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._halt.is_set():
                for ev in self.sim.txn(self.ops(self.txns)):
                    future = self.producer.send(
                        self.topic,
                        value=codec.encode(ev),
                        key=ev.database.encode(),
                        partition=self.partition_of(ev),
                    )
                    future.add_errback(self.errors.append)
                self.txns += 1
                if self.txns % self.POISON_EVERY == 0:
                    part = (self.txns // self.POISON_EVERY) % self.partitions
                    self.poison.append(self.producer.send(self.topic, value=b"\x00garbage{", partition=part))
                self._halt.wait(self.pace_s)
        except BaseException as exc:
            self.errors.append(exc)

    def stop(self) -> int:
        """Stop, wait until Kafka acknowledged every event; the number of source transactions run."""
        self._halt.set()
        self._thread.join(60)
        assert not self._thread.is_alive(), "loader did not stop"
        self.producer.flush(timeout=120)
        assert not self.errors, f"the test's producer failed: {self.errors[:3]}"
        return self.txns

    def poison_offsets(self) -> set[tuple[int, int]]:
        """(partition, offset) of every undecodable record sent."""
        return {(m.partition, m.offset) for m in (f.get(timeout=10) for f in self.poison)}


def _dead_letters(kafka: KafkaServer, topic: str, stage: str) -> set[tuple[int, int]]:
    return {
        (e.partition, e.offset)
        for e in dlq.read_dlq(kafka.bootstrap, "gz")
        if e.topic == topic and e.stage == stage
    }


def _kill_and_restart(kafka: KafkaServer, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    kafka.kill()  # SIGKILL of the broker under load
    deadline = time.monotonic() + DOWN_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"daemon exited while Kafka was down:\n{log_path.read_text()[-4000:]}"
        time.sleep(0.25)
    kafka.restart()


def _stop(proc: subprocess.Popen[bytes], log_path: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"daemon ignored SIGTERM:\n{log_path.read_text()[-4000:]}") from None
    assert code == 0, f"exit {code}:\n{log_path.read_text()[-4000:]}"


# --------------------------------------------------------------------------- cache daemon

CACHE_TOPOLOGY = """
version: 1
datacenters:
  bj:
    kafka: {{bootstrap: "{kafka}", wan_bootstrap: "{kafka}"}}
    mysql:
      master: {{host: {host}, port: {port}, user: {user}, password: "{password}", server_id: 1}}
  gz:
    kafka: {{bootstrap: "{kafka}"}}
    redis: {{url: "{redis}"}}
sources:
  {source}: {{dc: bj, partitions: 2}}
routes:
  - {{from: bj, to: gz, topic_prefix: ""}}
caches:
  - dc: gz
    name: c1
    source: {source}
    tombstone_ttl_s: 3600
    tables:
      {db}.users: {{key: "{db}:u:{{id}}", primary_key: [id]}}
      {db}.ctr: {{key: "{db}:c:{{id}}", primary_key: [id], format: json}}
"""


def _cache_ops(db: str, i: int) -> list[tuple[Any, ...]]:
    """Hot counters updated by every transaction; users inserted, renamed, deleted, re-inserted."""
    ops: list[tuple[Any, ...]] = [
        ("update", db, "ctr", {"id": i % 10}, {"n": Raw("n+1")}),
        ("insert", db, "users", {"id": 1000 + i, "name": f"u{i}", "n": i, "v": os.urandom(8)}),
    ]
    if i >= 30 and i % 3 == 0:
        ops.append(("delete", db, "users", {"id": 1000 + i - 30}))
    if i % 5 == 0:
        ops.append(("update", db, "users", {"id": 1000 + i // 2}, {"name": f"r{i}", "n": Raw("n+7")}))
    return ops


def test_cache_daemon_rides_out_local_kafka_kill9_under_load(
    server_factory: Any, mariadb_master: MariaDBServer, tmp_path: Path
) -> None:
    kafka: KafkaServer = server_factory.kafka(name="kafka_gz_cache")
    redis_server: RedisServer = server_factory.redis(name="redis_gz_cache")
    source, db = f"ckr{os.getpid()}", f"cache_kafka_restart_{os.getpid()}"
    topic = topics.changes_topic(source)
    kafka.create_topic(topic, partitions=2)
    mariadb_master.execute(f"DROP DATABASE IF EXISTS `{db}`")
    mariadb_master.execute(f"CREATE DATABASE `{db}`")
    mariadb_master.execute(f"CREATE TABLE `{db}`.ctr (id INT PRIMARY KEY, n BIGINT NOT NULL)")
    mariadb_master.execute(
        f"CREATE TABLE `{db}`.users "
        "(id INT PRIMARY KEY, name VARCHAR(32) NOT NULL, n BIGINT, v VARBINARY(16))"
    )
    master = conn_of(mariadb_master)
    topo = tmp_path / "topology.yaml"
    topo.write_text(
        CACHE_TOPOLOGY.format(
            kafka=kafka.bootstrap,
            host=master.host,
            port=master.port,
            user=master.user,
            password=master.password,
            redis=redis_server.url,
            source=source,
            db=db,
        )
    )
    topology = load_topology(topo, env={})
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", linger_ms=5)
    sim = SqlChangeSource(master, source=source)
    for ev in sim.txn([("insert", db, "ctr", {"id": i, "n": 0}) for i in range(10)]):
        producer.send(topic, value=codec.encode(ev), key=b"seed", partition=0)
    producer.flush()

    port, log_path = free_port(), tmp_path / "cache.log"
    proc = _spawn("cache", topo, port, log_path)
    # ordering: row - each row's events in one partition (per-row order), a transaction over both
    loader = Loader(
        sim, producer, topic, lambda i: _cache_ops(db, i), lambda ev: int(ev.pk["id"]) % 2, partitions=2
    )
    try:
        wait_until(lambda: _counter(port, "events") > 0, timeout_s=60, what="cache daemon up")
        loader.start()
        wait_until(
            lambda: _counter(port, "applied") >= 300, timeout_s=60, what="cache writes before the kill"
        )
        before = _counter(port, "events")
        _kill_and_restart(kafka, proc, log_path)
        # Progress after the restart, with the loader still producing.
        wait_until(
            lambda: _counter(port, "events") >= before + 300, timeout_s=120, what="cache events after restart"
        )
        time.sleep(2.0)
        n_txns = loader.stop()
        assert n_txns > 300
        wait_until(
            lambda: group_caught_up(kafka, "wmb-cache-gz", topic) or proc.poll() is not None,
            timeout_s=180,
            what="cache daemon caught up",
        )
        assert proc.poll() is None, log_path.read_text()[-4000:]
        report = verify_caches(topology, "gz", strict=True)
        assert report.ok, report.as_json()["diffs"][:5]
        assert report.master_rows > 300 and report.checked_keys == report.master_rows
        # Every poison record parked (at least once: a redelivery may park one again), none lost.
        poison = loader.poison_offsets()
        assert poison and _dead_letters(kafka, topic, "cache") == poison
        _stop(proc, log_path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sim.close()
        producer.close()
    assert mariadb_master.query(f"SELECT SUM(n) FROM `{db}`.ctr") == [(n_txns,)]


# --------------------------------------------------------------------------- replica applier


@pytest.mark.parametrize("workers", [0, 4], ids=["serial", "parallel4"])
def test_applier_rides_out_local_kafka_kill9_under_load_exactly_once(
    server_factory: Any,
    mariadb_master: MariaDBServer,
    mariadb_replica: MariaDBServer,
    tmp_path: Path,
    workers: int,
) -> None:
    kafka: KafkaServer = server_factory.kafka(name="kafka_gz_apply")
    source, db = f"akr{workers}x{os.getpid()}", f"apply_kafka_restart_{workers}"
    fresh(mariadb_master, mariadb_replica, kafka, source, db)
    topic = f"wmb.{source}.changes"
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", linger_ms=5)
    sim = SqlChangeSource(conn_of(mariadb_master), source=source)
    schema = [
        sim.ddl("", f"CREATE DATABASE {db}"),
        sim.ddl(db, "CREATE TABLE ctr (id INT PRIMARY KEY, n BIGINT NOT NULL)"),
        sim.ddl(
            db, "CREATE TABLE evlog (id INT PRIMARY KEY, k VARCHAR(20) NOT NULL UNIQUE, ctr INT, v BLOB)"
        ),
        sim.txn([("insert", db, "ctr", {"id": i, "n": 0}) for i in range(10)]),
    ]
    for events in schema:
        for ev in events:
            producer.send(topic, value=codec.encode(ev), key=db.encode(), partition=0)
    producer.flush()
    topo = tmp_path / "topology.yaml"
    topo.write_text(
        topology_yaml(
            kafka_bootstrap=kafka.bootstrap,
            master=conn_of(mariadb_master),
            replica=conn_of(mariadb_replica),
            source=source,
            tables=[f"{db}.*"],
            max_txns=20,
            max_ms=10,
            parallel_workers=workers,
        )
    )
    settings = settings_for(source, mariadb_master, mariadb_replica, kafka, parallel_workers=workers)
    marker_before = marker_count(mariadb_replica) if has_state(mariadb_replica) else 0

    port, log_path = free_port(), tmp_path / "apply.log"
    proc = _spawn("apply", topo, port, log_path)
    loader = Loader(sim, producer, topic, lambda i: counter_txn_ops(db, i), lambda _ev: 0)
    try:
        wait_until(lambda: _counter(port, "txns") >= 1, timeout_s=60, what="applier up")
        loader.start()
        wait_until(lambda: _counter(port, "txns") >= 200, timeout_s=60, what="applier busy before the kill")
        before = _counter(port, "txns")
        _kill_and_restart(kafka, proc, log_path)
        wait_until(
            lambda: _counter(port, "txns") >= before + 200, timeout_s=120, what="applier txns after restart"
        )
        time.sleep(2.0)
        n_txns = loader.stop()
        wait_until(
            lambda: caught_up(mariadb_replica, settings, kafka) or proc.poll() is not None,
            timeout_s=180,
            what="applier caught up",
        )
        assert proc.poll() is None, log_path.read_text()[-4000:]
        poison = loader.poison_offsets()
        assert poison and _dead_letters(kafka, topic, "apply") == poison
        _stop(proc, log_path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sim.close()
        producer.close()

    # Every source transaction applied exactly once (+ the ctr seed), and the replica equal to the master.
    assert marker_count(mariadb_replica) - marker_before == n_txns + 1
    report = verify_replica(settings.master, settings.replica, [f"{db}.*"])  # type: ignore[arg-type]
    assert report.ok, format_report(report)
    assert mariadb_replica.query(f"SELECT SUM(n) FROM {db}.ctr") == [(n_txns,)]
