"""Cache updater throughput: guarded writes (Lua EVALSHA, pipelined) vs bare pipelined SET/HSET.

Starts a private redis-server on a free port, then in the same run measures:
  * ceilings   - ``wmb.codec.decode`` alone, ``plan`` alone (the CPU stages of the daemon);
  * guard      - pre-planned writes through ``RedisCache.apply`` (one EVALSHA per event, batches
                 of ``--batch``, ``transaction=False``): "into Redis with the guard on";
  * full path  - envelope bytes -> ``wmb.codec.decode`` -> ``plan`` -> guarded apply;
  * bare SET   - the same keys and JSON values with a pipelined SET (no guard), and
  * bare HSET  - the same hashes with a pipelined HSET (no guard, no DEL of old fields);
  * with ``--kafka``: a private Kafka broker, the poll ceiling (a consumer with the daemon's
    options, no processing) and the daemon end to end (read_committed poll -> decode -> plan ->
    guard -> offset commit), timed from its first record to its last flush (group join and the
    idle tail excluded; the wall time including them is printed too).
and prints events/s and, side by side, bare SET / guarded apply / daemon with their ratios.
Target: guarded apply >= 50k events/s.

    .venv/bin/python bench/bench_cache.py [--events 200000] [--keys 20000] [--batch 5000] [--kafka]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
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
            dec = timed("ceiling: codec.decode only", n, lambda: [codec.decode(b) for b in raw])
            decoded = [codec.decode(b) for b in raw]
            pln = timed("ceiling: plan only", n, lambda: [plan(e, hash_table, 3600) for e in decoded])
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
                f"ratio to bare SET (same packer): guard json {g_json / b_set:.2f}, guard hash "
                f"{g_hash / b_set:.2f}, replay {g_replay / b_set:.2f}, full path {full / b_set:.2f} "
                f"(vs redis-py pipelined SET {g_json / b_set_rp:.2f}, HSET {g_hash / b_hset:.2f})"
            )
            poll = daemon = None
            if args.kafka:
                client.flushall()
                # The millions of objects planned above are not the daemon's: without this, every
                # full collection during its run walks them (measured: ~40% of its time).
                del decoded, evs, hash_writes, json_writes
                gc.collect()
                gc.freeze()
                poll, daemon = daemon_rate(Path(tmp), server, raw, n)
            guard = min(g_hash, g_json)
            print("\n---- summary (same run) ---------------------------------------------------")
            rows = [
                ("bare pipelined SET (same packer)", b_set),
                ("guarded apply (min of hash/json)", guard),
                ("in-process decode+plan+guard", full),
            ]
            if daemon is not None:
                rows.append(("daemon end to end (Kafka->Redis)", daemon))
            for label, rate in rows:
                print(f"{label:<36s} {rate:>9.0f} events/s   ratio to bare SET {rate / b_set:5.2f}")
            ceilings = f"decode {dec:.0f}/s, plan {pln:.0f}/s, guard {guard:.0f}/s"
            if poll is not None:
                ceilings += f", poll {poll:.0f}/s"
            print(f"ceilings: {ceilings}")
            print(f"target guarded apply >= 50000 events/s: {'MET' if guard >= 50_000 else 'NOT MET'}")
            if daemon is not None:
                print(f"daemon end to end >= 50000 events/s: {'MET' if daemon >= 50_000 else 'NOT MET'}")
            client.close()
        finally:
            server.stop()


def daemon_rate(tmp: Path, redis_server: RedisServer, raw: list[bytes], n: int) -> tuple[float, float]:
    """(poll ceiling, daemon end to end) in events/s, from a real Kafka topic (read_committed)."""
    from kafka import KafkaConsumer, KafkaProducer

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

        def settings(group: str) -> CacheSettings:
            return CacheSettings(
                dc="bench",
                bootstrap=kafka.bootstrap,
                topics=("wmb.bench.changes",),
                tables={"app.users": (table,)},
                redis=RedisSettings(url=redis_server.url),
                group_id=group,
            )

        # Poll ceiling: the daemon's consumer options, records counted and dropped.
        conf = CacheDaemon(settings("bench-poll")).consumer_config()
        consumer = KafkaConsumer("wmb.bench.changes", **conf)
        got, first = 0, 0.0
        while got < n:
            for records in consumer.poll(timeout_ms=100).values():
                first = first or time.perf_counter()
                got += len(records)
        poll_s = time.perf_counter() - first
        consumer.close(autocommit=False)
        poll = n / poll_s
        print(f"{'ceiling: Kafka poll only':<34s} {n:>8d} events in {poll_s:6.2f} s = {poll:>9.0f} events/s")

        # The daemon, timed from its first record to the end of its last flush.
        daemon = CacheDaemon(settings("bench-daemon"))
        marks: dict[str, float] = {}
        take, flush = daemon._take, daemon._flush

        def timed_take(*a: Any) -> None:
            marks.setdefault("first", time.perf_counter())
            take(*a)

        def timed_flush(*a: Any, **kw: Any) -> Any:
            result = flush(*a, **kw)
            if result.applied or result.stale:
                marks["last"] = time.perf_counter()
            return result

        daemon._take = timed_take  # type: ignore[method-assign,assignment]
        daemon._flush = timed_flush  # type: ignore[method-assign]
        t0 = time.perf_counter()
        result = daemon.run(max_idle_polls=5)
        wall = time.perf_counter() - t0
        assert result.applied + result.stale == n, result
        busy = marks["last"] - marks["first"]
        rate = n / busy
        print(
            f"{'daemon: Kafka -> guard -> commit':<34s} {n:>8d} events in {busy:6.2f} s = "
            f"{rate:>9.0f} events/s"
            f"  (wall incl. group join + idle tail {wall:.2f} s = {n / wall:.0f}/s)"
        )
        return poll, rate
    finally:
        kafka.stop()


if __name__ == "__main__":
    main()
