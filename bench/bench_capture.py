"""Capture throughput vs the bare python-mysql-replication library, on the same binlog, same process.

    .venv/bin/python bench/bench_capture.py [--big-txns 100] [--small-txns 10000] [--compression zstd]

Starts a private MariaDB and Kafka (wmb.servers) in a temp dir, writes two workloads (500-row
transactions and 1-row transactions), then for each one reads the same binlog range:

* ``bare``: ``BinLogStreamReader`` decoding every row (``event.rows``);
* ``capture + kafka``: the daemon's own pipeline (``CaptureDaemon.pipe``): the reader thread
  (TxnReader with the table-map memo and filtering -> EventBuilder -> codec.encode) feeding the
  main thread, which ships the messages to the transactional Kafka producer and commits every
  10 ms / 5000 events with the checkpoint.  Twice: with the producer in its child process (the
  default) and in-process (the design it replaced, whose commits wait for the reader's GIL);
* ``capture-nokafka``: TxnReader -> EventBuilder -> codec.encode in one thread, no producer (what the
  binlog side costs).

Every reader streams in blocking mode (as the daemon does) and stops at the workload's last GTID.
Non-blocking mode is not used: against MariaDB 10.11 its dump connection is reset every few dozen
packets, and the library's own reconnect then restarts from its *first* position, so a non-blocking
bare reader re-reads (and would count) the same rows again.

Prints rows/s and the ratios, and the Kafka commit latency (p50/p99).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pymysqlreplication import BinLogStreamReader
from pymysqlreplication.row_event import DeleteRowsEvent, UpdateRowsEvent, WriteRowsEvent

from binlog_capture import tablemap_cache
from binlog_capture.daemon import CaptureDaemon, tune_gc
from binlog_capture.events import EventBuilder
from binlog_capture.reader import SourceTxn, StartPoint, TxnReader
from binlog_capture.settings import CaptureSettings
from binlog_capture.sink import Checkpoint
from wmb import codec, values
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


_DEFAULT_GC = gc.get_threshold()


class _UntilReader(TxnReader):
    """A blocking TxnReader whose stream ends after the transaction ``end_gtid``."""

    def __init__(self, *args: Any, end_gtid: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._end_gtid = end_gtid

    def transactions(self) -> Iterator[SourceTxn]:
        for txn in super().transactions():
            yield txn
            if txn.gtid == self._end_gtid:
                return


def bare(db: MariaDBServer, start: str, rows: int) -> float:
    tablemap_cache.uninstall()
    # The library as a user would run it: CPython's default collector (the daemon tunes its own).
    gc.unfreeze()
    gc.set_threshold(*_DEFAULT_GC)
    conn = dict(host=db.host, port=db.port, user=db.user, password=db.password)
    stream = BinLogStreamReader(
        connection_settings=conn,
        server_id=777001,
        auto_position=start,
        is_mariadb=True,
        blocking=True,
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
    end: str,
    rows: int,
    source: str,
    commit_interval_ms: int = 10,
    compression: str = "zstd",
    producer_process: bool = True,
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
        compression=compression,  # type: ignore[arg-type]
    )
    reader_conn = dict(host=db.host, port=db.port, user=db.user, password=db.password)
    if kafka is None:
        return _capture_nokafka(settings, reader_conn, start, rows), []
    daemon = CaptureDaemon(settings)
    daemon.sink.producer_process = producer_process
    daemon._master_server_id = 1
    daemon.sink.ensure_topics()
    daemon.sink.start()
    latencies: list[float] = []
    sink_commit = daemon.sink.commit

    def timed_commit(cp: Checkpoint) -> float:
        latency = sink_commit(cp)
        latencies.append(latency)
        return latency

    daemon.sink.commit = timed_commit  # type: ignore[method-assign,assignment]
    reader = _UntilReader(
        reader_conn,
        settings.server_id,
        StartPoint(start),
        table_filter=daemon.builder.filter,
        end_gtid=end,
    )
    t0 = time.perf_counter()
    try:
        daemon.pipe(reader)  # returns once the reader has passed ``end`` and all is committed
        dt = time.perf_counter() - t0
    finally:
        daemon.sink.close()
    seen = int(daemon.metrics.registry.get_sample_value("wmb_capture_events_total", {"source": source}) or 0)
    assert seen == rows, (seen, rows)
    return rows / dt, latencies


def _capture_nokafka(settings: CaptureSettings, conn: dict[str, Any], start: str, rows: int) -> float:
    builder = EventBuilder(settings)
    tune_gc()
    reader = TxnReader(conn, settings.server_id, StartPoint(start), table_filter=builder.filter)
    encode, key_of, headers_of = codec.encode, codec.message_key, codec.headers
    t0 = time.perf_counter()
    seen = 0
    for txn in reader.transactions():
        for m in builder.build(txn, 1):
            encode(m.event)
            key_of(m.event, "database")
            headers_of(m.event)
            seen += 1
        if seen >= rows:
            break
    dt = time.perf_counter() - t0
    reader.close()
    assert seen == rows, (seen, rows)
    return rows / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--big-txns", type=int, default=100, help="500-row transactions")
    ap.add_argument("--small-txns", type=int, default=10_000, help="1-row transactions")
    ap.add_argument("--repeat", type=int, default=3, help="best of N")
    ap.add_argument("--commit-interval-ms", type=int, default=10, help="Kafka transaction cadence")
    ap.add_argument(
        "--compression", default="zstd", choices=["none", "gzip", "lz4", "zstd"], help="producer codec"
    )
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
                start, end, rows = write_workload(db, schema, txns, per)
                b = max(bare(db, start, rows) for _ in range(args.repeat))
                c0 = max(
                    capture(db, None, start, end, rows, f"bench{schema}0")[0] for _ in range(args.repeat)
                )
                variants = {"producer process": True, "in-process producer": False}
                runs: dict[str, list[tuple[float, list[float]]]] = {name: [] for name in variants}
                for _ in range(args.repeat):  # interleaved, so drift hits both alike
                    for name, in_child in variants.items():
                        source = f"bench{schema}{'p' if in_child else 't'}"  # topics reused: warm
                        runs[name].append(
                            capture(
                                db,
                                kafka,
                                start,
                                end,
                                rows,
                                source,
                                args.commit_interval_ms,
                                args.compression,
                                producer_process=in_child,
                            )
                        )
                print(f"{label}: {rows} rows (compression {args.compression}, best of {args.repeat})")
                print(f"  bare library                 {b:10.0f} rows/s")
                print(f"  capture, no kafka            {c0:10.0f} rows/s  ratio {c0 / b:5.2f}")
                for name, results in runs.items():
                    ck = max(r[0] for r in results)
                    lat = sorted(x for r in results for x in r[1])
                    p50 = statistics.median(lat) * 1000 if lat else float("nan")
                    p99 = lat[max(0, int(len(lat) * 0.99) - 1)] * 1000 if lat else float("nan")
                    print(
                        f"  capture + kafka, {name:<20}{ck:8.0f} rows/s  ratio {ck / b:5.2f}"
                        f"   commit p50 {p50:6.1f} ms  p99 {p99:6.1f} ms  ({len(lat)} commits)"
                    )
        finally:
            kafka.stop()
            db.stop()


if __name__ == "__main__":
    main()
