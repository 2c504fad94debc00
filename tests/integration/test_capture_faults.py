"""Capture as a subprocess: kill -9 under load, fencing, SIGTERM, and refused starts (exit codes)."""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, TopicPartition

from binlog_capture.testing import producer_processes, read_events, settings_for, spawn, wait_log
from wmb import topics
from wmb.errors import ExitCode
from wmb.event import ChangeEvent, Op

pytestmark = pytest.mark.integration


def _name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:6]}"


def _finish(proc: subprocess.Popen[bytes], timeout_s: float = 60) -> int:
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def _refused(settings: Any, tmp_path: Path, *args: str) -> tuple[int, str]:
    proc = spawn(settings, tmp_path, *args, log_name="refused")
    code = _finish(proc, 120)
    return code, (tmp_path / "refused.log").read_text()


# ------------------------------------------------------------------------------------------------
# fencing + SIGTERM


def test_second_capturer_fences_the_first(mariadb_master: Any, kafka_bj: Any, tmp_path: Path) -> None:
    source = _name("fence")
    settings = settings_for(mariadb_master, kafka_bj, source, partitions=1)
    first = spawn(settings, tmp_path, "--from-now", log_name="first")
    try:
        wait_log(tmp_path / "first.log", "binlog_stream_open", proc=first)
        time.sleep(1.5)  # let it commit a few heartbeat transactions
        second = spawn(settings, tmp_path, log_name="second")
        try:
            assert _finish(first, 90) == ExitCode.FENCED
            assert "fenced_exiting" in (tmp_path / "first.log").read_text()
            wait_log(tmp_path / "second.log", "binlog_stream_open", proc=second)
            time.sleep(1.0)
            t0 = time.monotonic()
            second.send_signal(signal.SIGTERM)
            assert _finish(second, 30) == ExitCode.OK
            assert time.monotonic() - t0 < 10, "SIGTERM must commit and exit within 10 s"
            assert "capture_stopped" in (tmp_path / "second.log").read_text()
        finally:
            if second.poll() is None:
                second.kill()
    finally:
        if first.poll() is None:
            first.kill()


# ------------------------------------------------------------------------------------------------
# refused starts


@pytest.mark.parametrize(
    ("variable", "value", "needle"),
    [
        ("binlog_format", "STATEMENT", "binlog_format is STATEMENT"),
        ("binlog_row_image", "MINIMAL", "binlog_row_image is MINIMAL"),
        ("binlog_row_metadata", "MINIMAL", "binlog_row_metadata is MINIMAL"),
    ],
)
def test_bad_binlog_settings_are_refused(
    server_factory: Any, kafka_bj: Any, tmp_path: Path, variable: str, value: str, needle: str
) -> None:
    db = server_factory.mariadb(server_id=11)
    db.execute(f"SET GLOBAL {variable}={value}")  # new sessions (the capture's) see it
    code, log = _refused(settings_for(db, kafka_bj, _name("bad")), tmp_path)
    assert code == ExitCode.PREFLIGHT, log
    assert needle in log and f"SET GLOBAL {variable}=" in log, log


def test_missing_replication_grant_is_refused(server_factory: Any, kafka_bj: Any, tmp_path: Path) -> None:
    db = server_factory.mariadb(server_id=12)
    db.execute("CREATE USER 'norepl'@'127.0.0.1' IDENTIFIED BY 'pw'")
    db.execute("GRANT SELECT, REPLICATION CLIENT ON *.* TO 'norepl'@'127.0.0.1'")
    settings = settings_for(db, kafka_bj, _name("grant"), mysql_user="norepl", mysql_password="pw")
    code, log = _refused(settings, tmp_path)
    assert code == ExitCode.PREFLIGHT, log
    assert "lacks REPLICATION SLAVE" in log, log


def test_replication_client_alias_is_accepted() -> None:
    from binlog_capture.preflight import parse_grants

    privs = parse_grants(["GRANT SELECT, REPLICATION SLAVE, BINLOG MONITOR ON *.* TO `u`@`%`"])
    assert {"SELECT", "REPLICATION SLAVE", "BINLOG MONITOR"} <= privs


def test_purged_checkpoint_is_position_lost(server_factory: Any, kafka_bj: Any, tmp_path: Path) -> None:
    db = server_factory.mariadb(server_id=13)
    db.execute("CREATE DATABASE p")
    db.execute("CREATE TABLE p.t (id INT PRIMARY KEY)")
    settings = settings_for(db, kafka_bj, _name("purge"), partitions=1)
    proc = spawn(settings, tmp_path, "--from-now", log_name="first")
    wait_log(tmp_path / "first.log", "binlog_stream_open", proc=proc)
    db.execute("INSERT INTO p.t VALUES (1)")
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    assert _finish(proc) == ExitCode.OK
    # The checkpoint now points into binlog 1; rotate, write more, purge it.
    db.execute("DROP TABLE wmb.wmb_heartbeat")  # nothing writes heartbeats while we purge
    for i in range(2, 5):
        db.execute(f"INSERT INTO p.t VALUES ({i})")
    db.execute("FLUSH BINARY LOGS")
    db.execute("INSERT INTO p.t VALUES (10)")
    current = db.query("SHOW MASTER STATUS")[0][0]
    db.execute(f"PURGE BINARY LOGS TO '{current}'")
    code, log = _refused(settings, tmp_path)
    assert code == ExitCode.POSITION_LOST, log
    assert "purged" in log, log
    # --from-gtid of a purged GTID is refused the same way.
    code, log = _refused(settings, tmp_path, "--from-gtid", "0-13-1")
    assert code == ExitCode.POSITION_LOST, log


def test_unknown_gtid_domain_is_position_lost(mariadb_master: Any, kafka_bj: Any, tmp_path: Path) -> None:
    settings = settings_for(mariadb_master, kafka_bj, _name("domain"), partitions=1)
    code, log = _refused(settings, tmp_path, "--from-gtid", "77-1-5")
    assert code == ExitCode.POSITION_LOST, log
    assert "domain 77" in log, log


# ------------------------------------------------------------------------------------------------
# kill -9 under load


class _Load(threading.Thread):
    """Random small transactions; records each committed GTID and its row count."""

    def __init__(self, mariadb: Any, db: str) -> None:
        super().__init__(daemon=True)
        self.conn = mariadb.connect(autocommit=False)
        self.db = db
        self.halt = threading.Event()
        self.committed: dict[str, int] = {}
        self.next_id = 1_000_000
        self.rng = random.Random(7)

    def one(self, rows: int) -> None:
        with self.conn.cursor() as cur:
            ids = list(range(self.next_id, self.next_id + rows))
            self.next_id += rows
            cur.executemany(f"INSERT INTO {self.db}.t VALUES (%s, %s)", [(i, "x" * 40) for i in ids])
            self.conn.commit()
            cur.execute("SELECT @@last_gtid")
            row = cur.fetchone()
            assert row is not None
            self.committed[str(row[0])] = rows

    def run(self) -> None:
        while not self.halt.is_set():
            self.one(self.rng.choice((1, 1, 2, 5, 20)))
            self.halt.wait(0.003)


class _UnderLoad:
    """A capture subprocess (``--from-now``) of a fresh database ``db`` (table ``t`` and any
    ``extra_tables``) with :class:`_Load` writing into ``db.t``."""

    def __init__(
        self, mariadb: Any, kafka: Any, tmp_path: Path, prefix: str, *extra_tables: str, **settings: Any
    ) -> None:
        self.db = self.source = _name(prefix)
        mariadb.execute(f"CREATE DATABASE {self.db}")
        for table in ("t (id INT PRIMARY KEY, v VARCHAR(64))", *extra_tables):
            mariadb.execute(f"CREATE TABLE {self.db}.{table}")
        self.settings = settings_for(
            mariadb, kafka, self.source, include=(f"{self.db}.*",), partitions=2, **settings
        )
        self.log = tmp_path / "capture.log"
        self.proc = spawn(self.settings, tmp_path, "--from-now")
        wait_log(self.log, "binlog_stream_open", proc=self.proc)
        self.load = _Load(mariadb, self.db)
        self.load.start()


def test_kill_minus_9_keeps_every_transaction_exactly_once(
    mariadb_master: Any, kafka_bj: Any, tmp_path: Path
) -> None:
    run = _UnderLoad(mariadb_master, kafka_bj, tmp_path, "crash", "big (id INT PRIMARY KEY, v VARCHAR(600))")
    db, source, settings, log, proc, load = run.db, run.source, run.settings, run.log, run.proc, run.load
    kills = 0
    killed_inside_big = 0
    big_gtids: list[str] = []
    try:
        # 1) kill inside the production of a 10k-row transaction: its records are in the log
        #    (high watermark) but not committed (last stable offset).  A kill that lands after the
        #    commit is no kill inside it: write another big transaction and try again.
        for _ in range(4):
            with mariadb_master.connect(autocommit=False) as conn, conn.cursor() as cur:
                first = 10_000 * len(big_gtids)
                cur.executemany(
                    f"INSERT INTO {db}.big VALUES (%s, %s)",
                    [(first + i, "b" * 500) for i in range(10_000)],
                )
                conn.commit()
                cur.execute("SELECT @@last_gtid")
                big_gtids.append(str(cur.fetchone()[0]))
            _kill_inside_open_transaction(
                proc, kafka_bj.bootstrap, source, min_open_records=1000, committed_by=10_000
            )
            kills += 1
            committed = read_events(kafka_bj.bootstrap, source)
            proc = spawn(settings, tmp_path)
            wait_log(log, "binlog_stream_open", proc=proc)
            if not any(e.txn.id == big_gtids[-1] for _, e in committed):
                killed_inside_big += 1
                print(f"\nkilled inside a 10k-row transaction at attempt {len(big_gtids)}")
                break
        # 2) random kills under the running load
        rng = random.Random(11)
        for _ in range(5):
            time.sleep(rng.uniform(0.3, 2.0))
            producers = producer_processes(proc.pid)
            proc.kill()
            proc.wait()
            kills += 1
            _assert_gone(producers)
            proc = spawn(settings, tmp_path)
            time.sleep(rng.uniform(0.0, 0.5))  # sometimes during start-up
        load.halt.set()
        load.join(30)
        final = dict(load.committed)
        final.update(dict.fromkeys(big_gtids, 10_000))
        wait_log(log, "binlog_stream_open", proc=proc)

        def complete(evs: list[tuple[int, ChangeEvent]]) -> bool:
            # every row of every transaction (a transaction's rows may span several polls)
            return sum(e.op is Op.INSERT for _, e in evs) >= sum(final.values())

        events = read_events(kafka_bj.bootstrap, source, until=complete, timeout_s=240)
    finally:
        load.halt.set()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            _finish(proc, 30)
    assert kills >= 6 and killed_inside_big >= 1, (kills, killed_inside_big)
    master_rows = sum(mariadb_master.query(f"SELECT COUNT(*) FROM {db}.{t}")[0][0] for t in ("t", "big"))
    _assert_exactly_once(events, final, master_rows)


def _kill_inside_open_transaction(
    proc: subprocess.Popen[bytes], bootstrap: str, source: str, *, min_open_records: int, committed_by: int
) -> None:
    """kill -9 ``proc`` as soon as the changes topic holds ``min_open_records`` records past its
    last stable offset, i.e. while a large Kafka transaction is produced but not committed; or,
    if the stable offsets moved ``committed_by`` records first (the window was missed), then."""
    tps_topic = topics.changes_topic(source)
    uncommitted = KafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_uncommitted")
    committed = KafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
    try:
        tps = [
            TopicPartition(tps_topic, p) for p in sorted(uncommitted.partitions_for_topic(tps_topic) or ())
        ]
        assert tps, f"no partitions for {tps_topic}"
        deadline = time.monotonic() + 120
        start = sum(committed.end_offsets(tps).values())
        while True:
            high = uncommitted.end_offsets(tps)
            stable = committed.end_offsets(tps)
            if (
                sum(high[tp] - stable[tp] for tp in tps) >= min_open_records
                or sum(stable.values()) - start >= committed_by
            ):
                proc.kill()
                proc.wait()
                return
            assert proc.poll() is None, f"capture exited {proc.returncode}"
            assert time.monotonic() < deadline, "no large open transaction seen in 120 s"
            time.sleep(0.002)
    finally:
        uncommitted.close()
        committed.close()


def _assert_gone(pids: list[int], timeout_s: float = 10.0) -> None:
    """The producer process of a killed capture must die with it (PR_SET_PDEATHSIG)."""
    deadline = time.monotonic() + timeout_s
    while any(Path(f"/proc/{pid}").exists() for pid in pids):
        assert time.monotonic() < deadline, f"producer process(es) {pids} outlived their capture"
        time.sleep(0.05)


def _assert_exactly_once(
    events: list[tuple[int, ChangeEvent]], final: dict[str, int], master_rows: int
) -> None:
    """Every committed source transaction (GTID -> rows) exactly once, whole, in order."""
    rows = [e for _, e in events if e.op is Op.INSERT]
    ids = Counter((e.txn.id, e.txn.seq) for e in rows)
    dupes = [k for k, n in ids.items() if n > 1]
    assert not dupes, f"{len(dupes)} events twice, e.g. {dupes[:3]}"
    per_txn: dict[str, list[ChangeEvent]] = defaultdict(list)
    for e in rows:
        per_txn[e.txn.id].append(e)
    assert set(per_txn) == set(final), "transactions missing or unknown"
    for gtid, n in final.items():
        evs = per_txn[gtid]
        assert len(evs) == n, f"{gtid}: {len(evs)} of {n} rows"
        assert [e.txn.seq for e in sorted(evs, key=lambda e: e.txn.seq)] == list(range(n))
        assert sum(e.txn.last for e in evs) == 1
    assert len(rows) == master_rows


def _wait_recoveries(log: Path, proc: subprocess.Popen[bytes], count: int, timeout_s: float = 120) -> None:
    """Until the capture has logged ``count`` in-process recoveries (and is still running)."""
    deadline = time.monotonic() + timeout_s
    while log.read_text().count("local_kafka_recovered") < count:
        assert proc.poll() is None, f"capture exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no recovery {count}:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)


def _wait_flowing(bootstrap: str, source: str, more: int) -> None:
    """Until ``more`` events beyond those committed now are committed."""
    seen = len(read_events(bootstrap, source, timeout_s=120))
    read_events(bootstrap, source, until=lambda evs: len(evs) > seen + more, timeout_s=120)


def _stop_load(
    load: _Load, bootstrap: str, source: str
) -> tuple[dict[str, int], list[tuple[int, ChangeEvent]]]:
    """Stop the load; its committed transactions and, once all their rows arrived, the events."""
    load.halt.set()
    load.join(30)
    final = dict(load.committed)
    events = read_events(
        bootstrap,
        source,
        until=lambda evs: sum(e.op is Op.INSERT for _, e in evs) >= sum(final.values()),
        timeout_s=240,
    )
    return final, events


def test_local_kafka_outage_recovers_in_process_exactly_once(
    mariadb_master: Any, server_factory: Any, tmp_path: Path
) -> None:
    """The local Kafka is killed (-9) for longer than a transactional call may block: the capture
    must recover in process (new producer, resume after the committed checkpoint), not exit and
    not read the broker's abort of its open transaction as fencing, and lose or repeat nothing."""
    kafka = server_factory.kafka(name="bj_capture_private")
    run = _UnderLoad(mariadb_master, kafka, tmp_path, "kout", kafka_call_timeout_s=3.0)
    db, source, log, proc, load = run.db, run.source, run.log, run.proc, run.load
    try:
        read_events(kafka.bootstrap, source, until=lambda evs: len(evs) > 200, timeout_s=120)
        for outage in range(2):
            kafka.kill()
            time.sleep(10.0)  # > kafka_call_timeout_s: the open transaction cannot commit
            kafka.restart()
            restarted = time.monotonic()
            _wait_recoveries(log, proc, outage + 1)
            print(f"\noutage {outage + 1}: recovered {time.monotonic() - restarted:.1f} s after the restart")
            _wait_flowing(kafka.bootstrap, source, 200)
        final, events = _stop_load(load, kafka.bootstrap, source)
        assert proc.poll() is None, f"capture exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        text = log.read_text()
        assert text.count("local_kafka_recovered") >= 2, text[-3000:]
        assert "fenced" not in text, text[-3000:]
    finally:
        load.halt.set()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            assert _finish(proc, 30) == 0, log.read_text()[-3000:]
    master_rows = mariadb_master.query(f"SELECT COUNT(*) FROM {db}.t")[0][0]
    _assert_exactly_once(events, final, master_rows)


def test_producer_process_killed_recovers_exactly_once(
    mariadb_master: Any, kafka_bj: Any, tmp_path: Path
) -> None:
    """kill -9 of the capture's producer process (the child that hosts the Kafka producer) under
    load: the daemon must start a new one and resume after the committed checkpoint in process,
    losing or repeating nothing."""
    run = _UnderLoad(mariadb_master, kafka_bj, tmp_path, "pkill")
    db, source, log, proc, load = run.db, run.source, run.log, run.proc, run.load
    try:
        read_events(kafka_bj.bootstrap, source, until=lambda evs: len(evs) > 200, timeout_s=120)
        for kill in range(3):
            producers = producer_processes(proc.pid)
            assert len(producers) == 1, producers
            subprocess.run(["kill", "-9", str(producers[0])], check=True)
            _wait_recoveries(log, proc, kill + 1)
            assert producer_processes(proc.pid) not in ([], producers)
            _wait_flowing(kafka_bj.bootstrap, source, 100)
        final, events = _stop_load(load, kafka_bj.bootstrap, source)
        assert proc.poll() is None, f"capture exited {proc.returncode}:\n{log.read_text()[-3000:]}"
    finally:
        load.halt.set()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            assert _finish(proc, 30) == 0, log.read_text()[-3000:]
    assert "producer process lost" in log.read_text()
    master_rows = mariadb_master.query(f"SELECT COUNT(*) FROM {db}.t")[0][0]
    _assert_exactly_once(events, final, master_rows)
