"""Benchmark of the replica applier: single-connection rows/s on 100-row source transactions.

Starts its own Kafka and MariaDB servers (loopback, private tmp dirs, stopped at the end), writes a
backlog of N synthetic 100-row insert transactions to a change topic, then times ``ApplyRunner``
from start until the position row reaches the end of the topic.  With ``--native`` (default) it
also times MariaDB's own replication (a second mariadbd, ``CHANGE MASTER TO ... MASTER_USE_GTID``)
applying the same workload from a master's binlog through the same 20 ms link emulator, and
prints the ratio.

    .venv/bin/python bench/bench_apply.py [--txns 1000] [--rows 100] [--workers 4] [--no-native]

``--workers N`` (N > 1) turns on parallel apply with N worker connections (the synthetic inserts
have disjoint write sets, so this is the best case for it).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache_updater.applier.runner import ApplyRunner
from cache_updater.applier.testing import produce, synthetic_insert_txn
from cache_updater.apply_settings import ApplySettings, ReplicaConn
from wmb import log
from wmb.linkemu import LinkEmulator
from wmb.runtime import StopToken
from wmb.servers import KafkaServer, MariaDBServer

DDL = "CREATE TABLE bench.t (id BIGINT PRIMARY KEY, k INT, v VARCHAR(64), n BIGINT) ENGINE=InnoDB"


def wait(pred: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def bench_wmb(root: Path, txns: int, rows: int, workers: int = 0) -> dict[str, float]:
    kafka = KafkaServer(root / "kafka").start()
    replica = MariaDBServer(root / "replica", server_id=2).start()
    try:
        replica.execute("CREATE DATABASE bench")
        replica.execute(DDL)
        topic = "wmb.bench.changes"
        kafka.create_topic(topic, partitions=1)
        producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, linger_ms=20, batch_size=256 * 1024)
        for i in range(txns):
            produce(producer, topic, synthetic_insert_txn("bench", i + 1, "bench", "t", i * rows, rows))
        producer.flush()
        producer.close()
        consumer = KafkaConsumer(bootstrap_servers=kafka.bootstrap)
        end = consumer.end_offsets([TopicPartition(topic, 0)])[TopicPartition(topic, 0)]
        consumer.close()
        settings = ApplySettings(
            dc="gz",
            replica=ReplicaConn(replica.host, replica.port, replica.user, replica.password),
            kafka_bootstrap=kafka.bootstrap,
            topics=(("bench", topic),),
            group_max_txns=100,
            group_max_ms=50,
            parallel_workers=workers,
        )
        stop = StopToken()
        runner = ApplyRunner(settings, stop)
        thread = threading.Thread(target=runner.run, daemon=True)
        t0 = time.monotonic()
        thread.start()

        first: list[tuple[float, int]] = []

        def done() -> bool:
            if not first and runner.status.commits:
                first.append((time.monotonic(), runner.status.rows))
            rows_ = (
                replica.query("SELECT next_offset FROM wmb.wmb_apply_state") if runner.status.commits else []
            )
            return bool(rows_) and int(rows_[0][0]) >= end

        wait(done, 600, "applier to catch up")
        elapsed = time.monotonic() - t0
        stop.stop("bench")
        thread.join(30)
        assert replica.query("SELECT COUNT(*) FROM bench.t") == [(txns * rows,)]
        t_first, rows_first = first[0]
        steady = (txns * rows - rows_first) / max(1e-9, t0 + elapsed - t_first)
        return {
            "wmb_s": elapsed,  # from process start (connects, topic metadata, first fetch) to caught up
            "wmb_rows_per_s": txns * rows / elapsed,
            "wmb_steady_rows_per_s": steady,  # from the first replica commit on
            "wmb_commits": runner.status.commits,
        }
    finally:
        replica.stop()
        kafka.stop()


LINK_DELAY_MS = 20.0


def bench_native(root: Path, txns: int, rows: int) -> dict[str, float]:
    master = MariaDBServer(root / "nmaster", server_id=11).start()
    slave = MariaDBServer(root / "nslave", server_id=12).start()
    try:
        master.execute("CREATE DATABASE bench")
        master.execute(DDL)
        payload = "x" * 40
        with master.connect() as conn, conn.cursor() as cur:
            for i in range(txns):
                values = ",".join(
                    f"({i * rows + j},{(i * rows + j) % 1000},'{payload}',{i + 1})" for j in range(rows)
                )
                cur.execute(f"INSERT INTO bench.t VALUES {values}")  # autocommit: one txn = 100 row events
        target = master.gtid_binlog_pos()
        # The native replica pulls the binlog through the same 20 ms link a remote datacenter has.
        link = LinkEmulator("127.0.0.1", master.port, delay_ms=LINK_DELAY_MS, name="native").start()
        try:
            slave.execute(
                f"CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT={link.port}, MASTER_USER='root', "
                "MASTER_PASSWORD='', MASTER_USE_GTID=slave_pos"
            )
            t0 = time.monotonic()
            slave.execute("START SLAVE")
            wait(lambda: slave.query("SELECT @@gtid_slave_pos")[0][0] == target, 600, "native replica")
            elapsed = time.monotonic() - t0
            assert slave.query("SELECT COUNT(*) FROM bench.t") == [(txns * rows,)]
            slave.execute("STOP SLAVE")
        finally:
            link.stop()
        return {"native_s": elapsed, "native_rows_per_s": txns * rows / elapsed}
    finally:
        slave.stop()
        master.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--txns", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--workers", type=int, default=0, help="parallel apply workers (0/1 = off)")
    ap.add_argument("--native", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    log.configure("WARNING", json=False)
    out: dict[str, float | int] = {"txns": args.txns, "rows_per_txn": args.rows, "workers": args.workers}
    with tempfile.TemporaryDirectory(prefix="wmb-bench-apply-") as tmp:
        out.update(bench_wmb(Path(tmp), args.txns, args.rows, args.workers))
        if args.native:
            out.update(bench_native(Path(tmp), args.txns, args.rows))
            out["wmb_over_native"] = out["wmb_rows_per_s"] / out["native_rows_per_s"]
    print(orjson.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}).decode())


if __name__ == "__main__":
    main()
