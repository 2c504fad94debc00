"""Cache updater throughput: guarded writes (Lua EVALSHA, pipelined) vs bare pipelined SET/HSET.

Starts a private redis-server on a free port, then in the same run measures:
  * guard      - pre-planned writes through ``RedisCache.apply`` (one EVALSHA per event, batches
                 of ``--batch``, ``transaction=False``): what the daemon's Redis edge does;
  * full path  - envelope bytes -> ``wmb.codec.decode`` -> ``plan`` -> guarded apply;
  * bare SET   - the same keys and JSON values with a pipelined SET (no guard), and
  * bare HSET  - the same hashes with a pipelined HSET (no guard, no DEL of old fields).
and prints events/s and the guard/bare ratios.  Target: guard >= 50k events/s.

    .venv/bin/python bench/bench_cache.py [--events 200000] [--keys 20000] [--batch 5000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache_updater.cache import GuardedWrite, RedisCache, _bulk, plan
from cache_updater.cache_settings import TableCache
from wmb import codec
from wmb.event import ChangeEvent, Op, Position, TxnInfo, Version
from wmb.servers import RedisServer

COLUMNS = {"id": "int", "name": "text:utf8mb4", "balance": "decimal:12,2", "updated": "datetime:6"}


def events(n: int, keys: int) -> list[ChangeEvent]:
    out = []
    base = dt.datetime(2024, 1, 1)
    for i in range(n):
        pk = i % keys
        row = {"id": pk, "name": f"user-{pk}-{i}", "balance": Decimal(i) / 100, "updated": base}
        out.append(
            ChangeEvent(
                source="bench",
                origin="bj",
                server_id=1,
                op=Op.UPDATE if i >= keys else Op.INSERT,
                database="app",
                table="users",
                ts_ms=1,
                position=Position(f"0-1-{i + 1}", "b.1", i),
                txn=TxnInfo(f"0-1-{i + 1}", 0, True),
                version=Version(1, i + 1, 0),
                pk={"id": pk},
                before=row if i >= keys else None,
                after=row,
                columns=COLUMNS,
            )
        )
    return out


def timed(label: str, n: int, fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - t0
    rate = n / elapsed
    print(f"{label:<34s} {n:>8d} events in {elapsed:6.2f} s = {rate:>9.0f} events/s")
    return rate


def chunks(seq: Sequence[GuardedWrite], size: int) -> list[Sequence[GuardedWrite]]:
    return [seq[i : i + size] for i in range(0, len(seq), size)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--keys", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--kafka", action="store_true", help="also time the daemon from a real Kafka topic")
    args = ap.parse_args()

    evs = events(args.events, args.keys)
    hash_table = TableCache(table="app.users", key="user:{id}", primary_key=("id",))
    json_table = TableCache(table="app.users", key="juser:{id}", primary_key=("id",), format="json")
    hash_writes = [w for e in evs for w in plan(e, hash_table, 3600)]
    json_writes = [w for e in evs for w in plan(e, json_table, 3600)]
    raw = [codec.encode(e) for e in evs]

    with tempfile.TemporaryDirectory(prefix="wmb-bench-cache-") as tmp:
        server = RedisServer(Path(tmp) / "redis").start()
        try:
            client = server.client()
            cache = RedisCache(client)
            cache.load()

            def guarded(writes: Sequence[GuardedWrite]) -> Callable[[], object]:
                def run() -> None:
                    for batch in chunks(writes, args.batch):
                        cache.apply(batch)

                return run

            def full_path() -> None:
                client.flushall()
                cache.load()
                for i in range(0, len(raw), args.batch):
                    ws = [w for b in raw[i : i + args.batch] for w in plan(codec.decode(b), hash_table, 3600)]
                    cache.apply(ws)

            def bare_set() -> None:
                for batch in chunks(json_writes, args.batch):
                    pipe = client.pipeline(transaction=False)
                    for w in batch:
                        pipe.set(w.key, w.args[0])
                    pipe.execute()

            def bare_set_packed() -> None:
                # Same hand packer and raw connection as the guard's fast path: the fair baseline.
                pool = client.connection_pool
                conn: Any = pool.get_connection()
                try:
                    for batch in chunks(json_writes, args.batch):
                        payload = b"".join(
                            b"*3\r\n$3\r\nSET\r\n" + _bulk(w.key) + _bulk(w.args[0]) for w in batch
                        )
                        conn.send_packed_command([payload], check_health=False)
                        for _ in batch:
                            conn.read_response()
                finally:
                    pool.release(conn)

            def bare_hset() -> None:
                for batch in chunks(hash_writes, args.batch):
                    pipe = client.pipeline(transaction=False)
                    for w in batch:
                        pairs = w.args[1:]
                        pipe.hset(w.key, mapping=dict(zip(pairs[::2], pairs[1::2], strict=True)))
                    pipe.execute()

            n = args.events
            g_hash = timed("guard, hash (EVALSHA pipelined)", n, guarded(hash_writes))
            g_json = timed("guard, json (EVALSHA pipelined)", n, guarded(json_writes))
            replay = cache.apply(hash_writes[: args.batch])
            assert replay.applied == 0 and replay.stale == args.batch, replay
            g_replay = timed("guard, replay (all stale)", n, guarded(hash_writes))
            full = timed("full path: decode+plan+guard", n, full_path)
            b_set_rp = timed("bare SET (redis-py pipeline)", n, bare_set)
            b_set = timed("bare SET (same packer as guard)", n, bare_set_packed)
            b_hset = timed("bare HSET (redis-py pipeline)", n, bare_hset)
            print(
                f"ratio guard json / bare SET (same packer): {g_json / b_set:.2f}; guard hash / same: "
                f"{g_hash / b_set:.2f}; replay: {g_replay / b_set:.2f}; full path: {full / b_set:.2f}; "
                f"(vs redis-py pipelined SET {g_json / b_set_rp:.2f}, HSET {g_hash / b_hset:.2f})"
            )
            print(f"target guard >= 50000 events/s: {'MET' if min(g_hash, g_json) >= 50_000 else 'NOT MET'}")
            if args.kafka:
                client.flushall()
                daemon_rate(Path(tmp), server, raw, n)
            client.close()
        finally:
            server.stop()


def daemon_rate(tmp: Path, redis_server: RedisServer, raw: list[bytes], n: int) -> None:
    """The whole daemon: Kafka (read_committed) -> decode -> plan -> guard -> commit."""
    from kafka import KafkaProducer

    from cache_updater.cache_daemon import CacheDaemon
    from cache_updater.cache_settings import CacheSettings, RedisSettings
    from wmb.servers import KafkaServer

    kafka = KafkaServer(tmp / "kafka").start()
    try:
        kafka.create_topic("wmb.bench.changes", partitions=4)
        producer = KafkaProducer(
            bootstrap_servers=kafka.bootstrap, transactional_id="bench", linger_ms=20, batch_size=256 * 1024
        )
        producer.init_transactions()
        for i in range(0, len(raw), 5000):
            producer.begin_transaction()
            for value in raw[i : i + 5000]:
                producer.send("wmb.bench.changes", value=value, key=value[-8:])
            producer.commit_transaction()
        producer.close()
        table = TableCache(table="app.users", key="user:{id}", primary_key=("id",))
        settings = CacheSettings(
            dc="bench",
            bootstrap=kafka.bootstrap,
            topics=("wmb.bench.changes",),
            tables={"app.users": (table,)},
            redis=RedisSettings(url=redis_server.url),
        )
        timed("daemon: Kafka -> guard -> commit", n, lambda: CacheDaemon(settings).run(max_idle_polls=5))
    finally:
        kafka.stop()


if __name__ == "__main__":
    main()
