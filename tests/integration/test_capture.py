"""Capture daemon against real MariaDB + Kafka (in-process daemon; see test_capture_faults.py for
kill -9, fencing and refused starts)."""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid
from collections import defaultdict
from decimal import Decimal
from typing import Any

import pytest

from binlog_capture.testing import read_events, running, settings_for
from wmb.event import ChangeEvent, Op

pytestmark = pytest.mark.integration


def _name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:6]}"


class Workload:
    """Runs transactions on the master and records the events each must produce."""

    def __init__(self, mariadb: Any) -> None:
        self.conn = mariadb.connect(autocommit=False)
        self.expected: list[tuple[Any, ...]] = []

    def txn(self, statements: list[tuple[str, Any]], events: list[tuple[Any, ...]]) -> str:
        with self.conn.cursor() as cur:
            for sql, params in statements:
                if isinstance(params, list):
                    cur.executemany(sql, params)
                else:
                    cur.execute(sql, params)
            self.conn.commit()
            cur.execute("SELECT @@last_gtid")
            row = cur.fetchone()
            assert row is not None
            gtid = str(row[0])
        n = len(events)
        for i, ev in enumerate(events):
            self.expected.append((gtid, i, i == n - 1, *ev))
        return gtid


def _row(ev: ChangeEvent) -> tuple[Any, ...]:
    return (
        ev.txn.id,
        ev.txn.seq,
        ev.txn.last,
        ev.op,
        ev.database,
        ev.table,
        dict(ev.pk),
        dict(ev.before) if ev.before is not None else None,
        dict(ev.after) if ev.after is not None else None,
        ev.ddl,
    )


def _norm_sql(sql: str | None) -> str:
    """The server rewrites some DDL (quotes names, appends a comment)."""
    return re.sub(r"/\*.*?\*/", "", sql or "").replace("`", "").strip().lower()


def _data_events(events: list[tuple[int, ChangeEvent]]) -> list[tuple[int, ChangeEvent]]:
    return [(p, e) for p, e in events if e.op is not Op.HEARTBEAT]


def _check_partition_order(events: list[tuple[int, ChangeEvent]]) -> None:
    by_part: dict[int, list[ChangeEvent]] = defaultdict(list)
    db_part: dict[str, int] = {}
    for p, e in events:
        by_part[p].append(e)
        if e.op is not Op.HEARTBEAT:
            assert db_part.setdefault(e.database, p) == p, f"database {e.database} in two partitions"
    for p, evs in by_part.items():
        versions = [(e.version.seq, e.txn.seq) for e in evs if e.op is not Op.HEARTBEAT]
        assert versions == sorted(versions), f"partition {p} out of order"


def test_mixed_workload_exactly_the_expected_events(mariadb_master: Any, kafka_bj: Any) -> None:
    a, b = _name("mxa"), _name("mxb")
    source = _name("mixed")
    mariadb_master.execute(f"CREATE DATABASE {a}")
    mariadb_master.execute(f"CREATE DATABASE {b}")
    mariadb_master.execute(f"CREATE TABLE {a}.items (id INT PRIMARY KEY, name VARCHAR(50), qty INT)")
    mariadb_master.execute(f"CREATE TABLE {b}.orders (id INT PRIMARY KEY, item INT, note TEXT)")
    settings = settings_for(mariadb_master, kafka_bj, source, include=(f"{a}.*", f"{b}.*"))
    w = Workload(mariadb_master)

    def item(i: int, name: str, qty: int, **more: Any) -> dict[str, Any]:
        return {"id": i, "name": name, "qty": qty, **more}

    def order(i: int) -> dict[str, Any]:
        return {"id": i, "item": i % 7, "note": f"n{i}"}

    big = 10_000
    with running(settings, start="now") as daemon:
        w.txn(
            [(f"INSERT INTO {a}.items VALUES (1,'a',1),(2,'b',2)", None)],
            [
                (Op.INSERT, a, "items", {"id": 1}, None, item(1, "a", 1), None),
                (Op.INSERT, a, "items", {"id": 2}, None, item(2, "b", 2), None),
            ],
        )
        w.txn(
            [(f"UPDATE {a}.items SET qty=10 WHERE id=1", None)],
            [(Op.UPDATE, a, "items", {"id": 1}, item(1, "a", 1), item(1, "a", 10), None)],
        )
        w.txn(  # primary key update
            [(f"UPDATE {a}.items SET id=100 WHERE id=2", None)],
            [(Op.UPDATE, a, "items", {"id": 2}, item(2, "b", 2), item(100, "b", 2), None)],
        )
        w.txn(  # multi-statement, two databases
            [
                (f"INSERT INTO {b}.orders VALUES (1, 1, 'x')", None),
                (f"UPDATE {a}.items SET qty=qty-1 WHERE id=1", None),
                (f"DELETE FROM {a}.items WHERE id=100", None),
            ],
            [
                (Op.INSERT, b, "orders", {"id": 1}, None, {"id": 1, "item": 1, "note": "x"}, None),
                (Op.UPDATE, a, "items", {"id": 1}, item(1, "a", 10), item(1, "a", 9), None),
                (Op.DELETE, a, "items", {"id": 100}, item(100, "b", 2), None, None),
            ],
        )
        ddl = f"ALTER TABLE {a}.items ADD COLUMN price DECIMAL(10,2)"
        w.txn([(ddl, None)], [(Op.DDL, a, "items", {}, None, None, ddl)])
        w.txn(
            [(f"INSERT INTO {a}.items VALUES (3,'c',3,9.99)", None)],
            [(Op.INSERT, a, "items", {"id": 3}, None, item(3, "c", 3, price=Decimal("9.99")), None)],
        )
        w.txn(
            [(f"DELETE FROM {b}.orders WHERE id=1", None)],
            [(Op.DELETE, b, "orders", {"id": 1}, {"id": 1, "item": 1, "note": "x"}, None, None)],
        )
        w.txn(  # one 10k-row source transaction
            [
                (
                    f"INSERT INTO {b}.orders VALUES (%s, %s, %s)",
                    [(i, i % 7, f"n{i}") for i in range(1, big + 1)],
                )
            ],
            [(Op.INSERT, b, "orders", {"id": i}, None, order(i), None) for i in range(1, big + 1)],
        )
        w.txn(
            [(f"DELETE FROM {b}.orders WHERE id > 9990", None)],
            [(Op.DELETE, b, "orders", {"id": i}, order(i), None, None) for i in range(9991, big + 1)],
        )
        trunc = f"TRUNCATE TABLE {b}.orders"
        w.txn([(trunc, None)], [(Op.DDL, b, "orders", {}, None, None, trunc)])
        drop = f"DROP TABLE {a}.items"
        w.txn([(drop, None)], [(Op.DDL, a, "items", {}, None, None, drop)])
        want = len(w.expected)

        def done(evs: list[tuple[int, ChangeEvent]]) -> bool:
            return len(_data_events(evs)) >= want

        events = read_events(kafka_bj.bootstrap, source, until=done)
        assert daemon.last_checkpoint is not None

    data = _data_events(events)
    got = sorted((_row(e) for _, e in data), key=lambda r: (int(r[0].rsplit("-", 1)[1]), r[1]))
    expected = [(*r[:-1], r[-1] if r[3] is Op.DDL else None) for r in w.expected]
    # DDL "drop" comes from the server with a trailing comment; compare DDL by prefix.
    from collections import Counter

    assert Counter(r[0] for r in got) == Counter(r[0] for r in expected)
    for g, e in zip(got, expected, strict=True):
        if e[3] is Op.DDL:
            assert g[:9] == e[:9] and _norm_sql(g[9]) == _norm_sql(e[9]), (g, e)
        else:
            assert g == e, (g, e)
    assert len({(e.txn.id, e.txn.seq) for _, e in data}) == len(data), "an event appears twice"
    _check_partition_order(events)
    heartbeat_parts = {p for p, e in events if e.op is Op.HEARTBEAT}
    assert heartbeat_parts == {0, 1, 2}, "every partition carries heartbeats"


def test_schema_changes_never_mislabel_columns(mariadb_master: Any, kafka_bj: Any) -> None:
    db, source = _name("sc"), _name("schema")
    mariadb_master.execute(f"CREATE DATABASE {db}")
    mariadb_master.execute(f"CREATE TABLE {db}.t (id INT PRIMARY KEY, a INT, b VARCHAR(10))")
    settings = settings_for(mariadb_master, kafka_bj, source, include=(f"{db}.*",), partitions=1)
    steps: list[tuple[str, dict[str, Any] | None]] = [
        (f"INSERT INTO {db}.t VALUES (1, 1, 'x')", {"id": 1, "a": 1, "b": "x"}),
        (f"ALTER TABLE {db}.t ADD COLUMN c INT", None),
        (f"INSERT INTO {db}.t VALUES (2, 2, 'y', 3)", {"id": 2, "a": 2, "b": "y", "c": 3}),
        (f"ALTER TABLE {db}.t DROP COLUMN a", None),
        (f"INSERT INTO {db}.t VALUES (3, 'z', 4)", {"id": 3, "b": "z", "c": 4}),
        (f"ALTER TABLE {db}.t RENAME COLUMN b TO bb", None),
        (f"INSERT INTO {db}.t VALUES (4, 'w', 5)", {"id": 4, "bb": "w", "c": 5}),
        (f"ALTER TABLE {db}.t MODIFY c VARCHAR(20)", None),
        (f"INSERT INTO {db}.t VALUES (5, 'v', '5x')", {"id": 5, "bb": "v", "c": "5x"}),
        (f"ALTER TABLE {db}.t ADD COLUMN first_col INT FIRST", None),
        (f"INSERT INTO {db}.t VALUES (9, 6, 'u', 'q')", {"first_col": 9, "id": 6, "bb": "u", "c": "q"}),
    ]
    with running(settings, start="now"):
        for sql, _ in steps:
            mariadb_master.execute(sql)
        events = read_events(
            kafka_bj.bootstrap,
            source,
            until=lambda evs: sum(e.op is Op.INSERT for _, e in evs) >= 6,
        )
    rows = [e for _, e in events if e.op is not Op.HEARTBEAT]
    expected_ops = [Op.INSERT if after is not None else Op.DDL for _, after in steps]
    assert [e.op for e in rows] == expected_ops
    for e, (sql, after) in zip(rows, steps, strict=True):
        if after is None:
            assert _norm_sql(e.ddl) == _norm_sql(sql)
            continue
        assert dict(e.after or {}) == after, sql
        assert list(e.columns) == list(after), sql  # names and order from the table map
    retyped = rows[-3]
    assert retyped.columns["c"].startswith("text") and rows[4].columns["c"] == "int"


def test_filters_and_masks_apply_before_anything_leaves(mariadb_master: Any, kafka_bj: Any) -> None:
    db, other, source = _name("mf"), _name("mo"), _name("filter")
    for d in (db, other):
        mariadb_master.execute(f"CREATE DATABASE {d}")
    mariadb_master.execute(
        f"CREATE TABLE {db}.users (id INT PRIMARY KEY, email VARCHAR(64), phone VARCHAR(20),"
        " password VARCHAR(64))"
    )
    mariadb_master.execute(f"CREATE TABLE {db}.secret (id INT PRIMARY KEY, v INT)")
    mariadb_master.execute(f"CREATE TABLE {other}.t (id INT PRIMARY KEY)")
    settings = settings_for(
        mariadb_master,
        kafka_bj,
        source,
        include=(f"{db}.*",),
        exclude=(f"{db}.secret",),
        exclude_columns=(f"{db}.users.password",),
        mask_columns={f"{db}.users.email": "hash", f"{db}.users.phone": "null"},
        mask_key="test-mask-key",
        partitions=1,
    )
    with running(settings, start="now"):
        mariadb_master.execute(f"INSERT INTO {other}.t VALUES (1)")
        mariadb_master.execute(f"INSERT INTO {db}.secret VALUES (1, 1)")
        mariadb_master.execute(f"INSERT INTO {db}.users VALUES (1, 'a@b.c', '555', 'hunter2')")
        mariadb_master.execute(f"UPDATE {db}.users SET email=NULL WHERE id=1")
        events = read_events(
            kafka_bj.bootstrap, source, until=lambda evs: sum(e.op is Op.UPDATE for _, e in evs) >= 1
        )
    rows = [e for _, e in events if e.op is not Op.HEARTBEAT]
    assert [(e.op, e.database, e.table) for e in rows] == [(Op.INSERT, db, "users"), (Op.UPDATE, db, "users")]
    ins, upd = rows
    digest = hmac.new(b"test-mask-key", b"a@b.c", hashlib.sha256).hexdigest()  # keyed: not a lookup
    assert dict(ins.after or {}) == {"id": 1, "email": digest, "phone": None}
    assert "password" not in ins.columns
    assert dict(upd.before or {})["email"] == digest and dict(upd.after or {})["email"] is None


def test_binlog_connection_loss_resumes_after_last_complete_transaction(
    mariadb_master: Any, kafka_bj: Any
) -> None:
    """Kill the server side of the replication connection mid-stream, repeatedly (library issue #252:
    a reconnect inside a transaction must neither skip nor repeat any part of it)."""
    import threading
    import time

    db, source = _name("rc"), _name("reconnect")
    mariadb_master.execute(f"CREATE DATABASE {db}")
    mariadb_master.execute(f"CREATE TABLE {db}.t (id INT PRIMARY KEY, v VARCHAR(200))")
    settings = settings_for(mariadb_master, kafka_bj, source, include=(f"{db}.*",), partitions=2)
    committed: dict[str, int] = {}
    halt = threading.Event()

    def load() -> None:
        conn = mariadb_master.connect(autocommit=False)
        next_id = 0
        with conn.cursor() as cur:
            while not halt.is_set():
                n = 2000 if next_id % 7 == 0 else 3
                cur.executemany(
                    f"INSERT INTO {db}.t VALUES (%s, %s)", [(next_id + i, "v" * 150) for i in range(n)]
                )
                next_id += n
                conn.commit()
                cur.execute("SELECT @@last_gtid")
                committed[str(cur.fetchone()[0])] = n
        conn.close()

    with running(settings, start="now"):
        worker = threading.Thread(target=load, daemon=True)
        worker.start()
        kills = 0
        deadline = time.monotonic() + 60
        while kills < 6 and time.monotonic() < deadline:
            time.sleep(0.4)
            for row in mariadb_master.query("SHOW PROCESSLIST"):
                if row[4] == "Binlog Dump" and row[1] == mariadb_master.user:
                    mariadb_master.execute(f"KILL CONNECTION {int(row[0])}")
                    kills += 1
        halt.set()
        worker.join(30)
        expected = dict(committed)
        events = read_events(
            kafka_bj.bootstrap,
            source,
            until=lambda evs: sum(e.op is Op.INSERT for _, e in evs) >= sum(expected.values()),
            timeout_s=180,
        )
    assert kills >= 3
    rows = [e for _, e in events if e.op is Op.INSERT]
    keys = [(e.txn.id, e.txn.seq) for e in rows]
    assert len(keys) == len(set(keys)), "an event appears twice"
    per_txn: dict[str, int] = defaultdict(int)
    for e in rows:
        per_txn[e.txn.id] += 1
    assert dict(per_txn) == expected


def test_metrics_and_health_endpoint(mariadb_master: Any, kafka_bj: Any) -> None:
    import time
    import urllib.request

    import orjson

    source = _name("metrics")
    settings = settings_for(mariadb_master, kafka_bj, source, metrics_port=0, partitions=2)
    with running(settings, start="now") as daemon:
        assert daemon.metrics_port
        base = f"http://127.0.0.1:{daemon.metrics_port}"
        deadline = time.monotonic() + 60
        text = ""
        while time.monotonic() < deadline:
            text = urllib.request.urlopen(f"{base}/metrics").read().decode()
            if f'wmb_capture_kafka_commit_seconds_count{{source="{source}"}}' in text and (
                f'wmb_capture_events_total{{source="{source}"}} 0.0' not in text
            ):
                break
            time.sleep(0.3)
        for name in (
            "wmb_capture_events_total",
            "wmb_capture_transactions_total",
            "wmb_capture_bytes_total",
            "wmb_capture_last_gtid_seq",
            "wmb_capture_last_info",
            "wmb_capture_seconds_behind_source",
            "wmb_capture_kafka_commit_seconds_bucket",
        ):
            assert name in text, name
        health = orjson.loads(urllib.request.urlopen(f"{base}/health").read())
        assert health["ok"] is True and health["reader_alive"] is True


def test_applier_transactions_are_never_shipped_again(mariadb_master: Any, kafka_bj: Any) -> None:
    """A database that a wmb applier writes (a replica, later captured after a failover or in a
    two-way setup) holds the applier's marker row in each of its transactions, and a comment on its
    DDL: the capturer reads them and drops those transactions, while application writes still flow."""
    db, source = _name("loop"), _name("loop")
    mariadb_master.execute(f"CREATE DATABASE {db}")
    mariadb_master.execute(f"CREATE TABLE {db}.t (id INT PRIMARY KEY, v INT)")
    mariadb_master.execute("CREATE DATABASE IF NOT EXISTS wmb")
    mariadb_master.execute(
        "CREATE TABLE IF NOT EXISTS wmb.wmb_apply_marker (applier VARCHAR(64) PRIMARY KEY, txn_count BIGINT)"
    )
    settings = settings_for(mariadb_master, kafka_bj, source, include=(f"{db}.*",), partitions=1)
    work = Workload(mariadb_master)
    with running(settings, start="now"):
        # what an applier commits: the marker row first, then the rows it applies
        work.txn(
            [
                (
                    "INSERT INTO wmb.wmb_apply_marker VALUES ('gz', 1) "
                    "ON DUPLICATE KEY UPDATE txn_count = txn_count + 1",
                    None,
                ),
                (f"INSERT INTO {db}.t VALUES (1, 1)", None),
            ],
            [],
        )
        mariadb_master.execute(f"/* wmb:applier */ ALTER TABLE {db}.t ADD COLUMN w INT NULL")
        # an application's own write
        work.txn([(f"INSERT INTO {db}.t VALUES (2, 2, NULL)", None)], [])
        events = read_events(
            kafka_bj.bootstrap, source, until=lambda evs: any(e.op is Op.INSERT for _, e in evs)
        )
    rows = [e for _, e in _data_events(events)]
    assert [(e.op, dict(e.pk)) for e in rows] == [(Op.INSERT, {"id": 2})], rows
