"""Capture throughput vs the bare python-mysql-replication library, on the same binlog, same process.

    .venv/bin/python bench/bench_capture.py [--big-txns 100] [--small-txns 10000]

Starts a private MariaDB and Kafka (wmb.servers) in a temp dir, writes two workloads (500-row
transactions and 1-row transactions), then for each one reads the same binlog range:

* ``bare``: ``BinLogStreamReader`` (non-blocking) decoding every row (``event.rows``);
* ``capture``: the capture path - TxnReader (table-map memo, filtering) -> EventBuilder (values,
  masks) -> codec.encode -> transactional Kafka producer, committed every 10 ms / 5000 events with
  the checkpoint, exactly as the daemon does;
* ``capture-nokafka``: the same without the producer (what the binlog side costs).

Prints rows/s and the ratios, and the Kafka commit latency (p50/p99).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from pymysqlreplication import BinLogStreamReader
from pymysqlreplication.row_event import DeleteRowsEvent, UpdateRowsEvent, WriteRowsEvent

from binlog_capture import tablemap_cache
from binlog_capture.events import EventBuilder
from binlog_capture.reader import StartPoint, TxnReader
from binlog_capture.settings import CaptureSettings
from binlog_capture.sink import Checkpoint, KafkaTxnSink
from wmb import codec, topics, values
from wmb.servers import KafkaServer, MariaDBServer


def write_workload(db: MariaDBServer, schema: str, txns: int, rows_per_txn: int) -> tuple[str, str, int]:
    """Returns (gtid state before, gtid state after, rows)."""
    db.execute(f"CREATE DATABASE {schema}")
    db.execute(
        f"CREATE TABLE {schema}.t (id BIGINT PRIMARY KEY, a INT, b VARCHAR(64), c DECIMAL(12,2), d DATETIME)"
    )
    before = db.gtid_binlog_pos()
    conn = db.connect(autocommit=False)
    n = 0
    with conn.cursor() as cur:
        for _ in range(txns):
            batch = [
                (n + i, i, f"value-{n + i}", "12.34", "2024-01-02 03:04:05") for i in range(rows_per_txn)
            ]
            cur.executemany(f"INSERT INTO {schema}.t VALUES (%s,%s,%s,%s,%s)", batch)
            conn.commit()
            n += rows_per_txn
    conn.close()
    return before, db.gtid_binlog_pos(), n


def bare(db: MariaDBServer, start: str, rows: int) -> float:
    tablemap_cache.uninstall()
    conn = dict(host=db.host, port=db.port, user=db.user, password=db.password)
    stream = BinLogStreamReader(
        connection_settings=conn,
        server_id=777001,
        auto_position=start,
        is_mariadb=True,
        blocking=False,
        only_events=[WriteRowsEvent, UpdateRowsEvent, DeleteRowsEvent],
        enable_logging=False,
    )
    t0 = time.perf_counter()
    seen = 0
    for ev in stream:
        seen += len(ev.rows)
        if seen >= rows:
            break
    dt = time.perf_counter() - t0
    stream.close()
    assert seen == rows, (seen, rows)
    return rows / dt


def capture(
    db: MariaDBServer,
    kafka: KafkaServer | None,
    start: str,
    rows: int,
    source: str,
    commit_interval_ms: int = 10,
) -> tuple[float, list[float]]:
    settings = CaptureSettings(
        source=source,
        origin_dc="bj",
        mysql_host=db.host,
        mysql_port=db.port,
        mysql_user=db.user,
        mysql_password=db.password,
        kafka_bootstrap=kafka.bootstrap if kafka else "",
        server_id=777002,
        partitions=1,
        commit_interval_ms=commit_interval_ms,
    )
    builder = EventBuilder(settings)
    reader = TxnReader(
        dict(host=db.host, port=db.port, user=db.user, password=db.password),
        settings.server_id,
        StartPoint(start),
        table_filter=builder.filter,
        blocking=False,
    )
    sink = None
    if kafka is not None:
        sink = KafkaTxnSink(
            kafka.bootstrap,
            settings.transactional_id,
            topics.changes_topic(source),
            topics.capture_checkpoint_topic(source),
            partitions=1,
            source=source,
        )
        sink.ensure_topics()
        sink.start()
    latencies: list[float] = []
    encode, key_of, headers_of = codec.encode, codec.message_key, codec.headers
    interval_s = settings.commit_interval_ms / 1000
    t0 = time.perf_counter()
    seen = pending = 0
    batch_t0 = 0.0
    last = None
    for txn in reader.transactions():
        msgs = builder.build(txn, 1)
        if sink is not None and msgs:
            if not sink.in_transaction:
                sink.begin()
                batch_t0 = time.perf_counter()
            for m in msgs:
                key = key_of(m.event, "database")
                part = m.partition if m.partition is not None else sink.partition_for(key)
                sink.send(encode(m.event), key, part, headers_of(m.event))
        else:
            for m in msgs:
                encode(m.event)
        seen += sum(1 for m in msgs)
        pending += len(msgs)
        last = txn
        due = pending >= settings.commit_max_events or time.perf_counter() - batch_t0 >= interval_s
        if sink is not None and sink.in_transaction and due:
            latencies.append(sink.commit(_cp(source, last)))
            pending = 0
        if seen >= rows:
            break
    if sink is not None and sink.in_transaction and last is not None:
        latencies.append(sink.commit(_cp(source, last)))
    dt = time.perf_counter() - t0
    reader.close()
    if sink is not None:
        sink.close()
    assert seen == rows, (seen, rows)
    return rows / dt, latencies


def _cp(source: str, txn: Any) -> Checkpoint:
    return Checkpoint(source, txn.gtid_state, txn.gtid, txn.file, txn.pos, 1, txn.ts_s * 1000, 0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--big-txns", type=int, default=100, help="500-row transactions")
    ap.add_argument("--small-txns", type=int, default=10_000, help="1-row transactions")
    ap.add_argument("--repeat", type=int, default=3, help="best of N")
    ap.add_argument("--commit-interval-ms", type=int, default=10, help="Kafka transaction cadence")
    args = ap.parse_args()
    values.install_library_fixes()
    with tempfile.TemporaryDirectory(prefix="wmb-bench-") as tmp:
        db = MariaDBServer(Path(tmp) / "mariadb", server_id=1, die_with_parent=True).start()
        kafka = KafkaServer(Path(tmp) / "kafka", die_with_parent=True).start()
        try:
            for label, txns, per in (
                ("500-row txns", args.big_txns, 500),
                ("1-row txns", args.small_txns, 1),
            ):
                schema = "big" if per > 1 else "small"
                start, _end, rows = write_workload(db, schema, txns, per)
                b = max(bare(db, start, rows) for _ in range(args.repeat))
                c0 = max(capture(db, None, start, rows, f"bench{schema}0")[0] for _ in range(args.repeat))
                runs = [
                    capture(db, kafka, start, rows, f"bench{schema}{i}", args.commit_interval_ms)
                    for i in range(args.repeat)
                ]
                ck = max(r[0] for r in runs)
                lat = sorted(x for r in runs for x in r[1])
                p50 = statistics.median(lat) * 1000 if lat else float("nan")
                p99 = lat[int(len(lat) * 0.99) - 1] * 1000 if lat else float("nan")
                print(f"{label}: {rows} rows")
                print(f"  bare library      {b:10.0f} rows/s")
                print(f"  capture (no kafka){c0:10.0f} rows/s  ratio {c0 / b:5.2f}")
                print(f"  capture + kafka   {ck:10.0f} rows/s  ratio {ck / b:5.2f}")
                print(f"  kafka commit latency p50 {p50:.1f} ms  p99 {p99:.1f} ms  ({len(lat)} commits)")
        finally:
            kafka.stop()
            db.stop()


if __name__ == "__main__":
    main()
