"""Envelope codec throughput: ``wmb.codec`` encode/decode events/s vs plain ``orjson`` in-process.

The workload is what the consumers see most: 10-column ``update`` events (before + after images)
of one table, so every event repeats the same ``columns`` map.  Column types are a typical OLTP
mix: int, uint, two text, enum, decimal, double, datetime(6), timestamp, year.  A second, smaller
run decodes heartbeats.  The baseline is ``orjson.loads`` / ``orjson.dumps`` of the same bytes /
envelope dicts: the floor any JSON codec pays, so ``decode / loads`` is the cost of wmb's checks and
exact values.

    .venv/bin/python bench/bench_codec.py [--events 100000] [--repeat 3] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import gc
import pstats
import sys
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wmb import codec
from wmb.event import ChangeEvent, Op, Position, TxnInfo, Version

COLUMNS = {
    "id": "int",
    "account": "uint",
    "name": "text:utf8mb4",
    "email": "text:utf8mb4",
    "status": "enum",
    "balance": "decimal:12,2",
    "score": "double",
    "created": "datetime:6",
    "updated": "timestamp:0",
    "born": "year",
}


def row(i: int, bump: int) -> dict[str, object]:
    return {
        "id": i,
        "account": 10_000_000_000 + i,
        "name": f"user number {i}",
        "email": f"user{i}@example.com",
        "status": "active" if bump % 2 else "idle",
        "balance": Decimal(i * 7 + bump) / 100,
        "score": i / 3 + bump,
        "created": dt.datetime(2024, 1, 1, 12, 0, 0, 123456) + dt.timedelta(seconds=i),
        "updated": dt.datetime(2024, 6, 1) + dt.timedelta(seconds=i + bump),
        "born": 1970 + i % 50,
    }


def update_events(n: int) -> list[ChangeEvent]:
    out = []
    for i in range(n):
        gtid = f"0-1-{i + 1}"
        out.append(
            ChangeEvent(
                source="bj-main",
                origin="bj",
                server_id=1,
                op=Op.UPDATE,
                database="shop",
                table="accounts",
                ts_ms=1_700_000_000_000 + i,
                position=Position(gtid, "mb.000001", 4 + i * 300),
                txn=TxnInfo(gtid, 0, True),
                version=Version(1, i + 1, 0),
                pk={"id": i},
                before=row(i, 0),
                after=row(i, 1),
                columns=COLUMNS,
            )
        )
    return out


def heartbeat_events(n: int) -> list[ChangeEvent]:
    return [
        ChangeEvent(
            source="bj-main",
            origin="bj",
            server_id=1,
            op=Op.HEARTBEAT,
            database="wmb",
            table="heartbeat",
            ts_ms=1_700_000_000_000 + i,
            position=Position(f"0-1-{i + 1}", "mb.000001", 4 + i),
            txn=TxnInfo(f"0-1-{i + 1}", 0, True),
            version=Version(1, i + 1, 0),
        )
        for i in range(n)
    ]


def best_rate(n: int, repeat: int, fn: Callable[[], object]) -> float:
    """Events/s of the fastest of ``repeat`` runs (the machine is shared: the best run is the signal)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="print a cProfile of one decode pass")
    args = ap.parse_args()

    evs = update_events(args.events)
    raw = [codec.encode(e) for e in evs]
    docs = [codec.envelope(e) for e in evs]
    assert codec.decode(raw[0]) == evs[0], "round trip changed the event"
    hbs = heartbeat_events(args.events)
    hb_raw = [codec.encode(e) for e in hbs]

    # Results are dropped as they come (like a consumer does): keeping 100k events alive would time
    # the cyclic GC walking them.  The fixtures themselves are frozen out of the GC for the same reason.
    gc.collect()
    gc.freeze()

    def run_decode(data: list[bytes]) -> Callable[[], object]:
        def run() -> None:
            decode = codec.decode
            for b in data:
                decode(b)

        return run

    def run_loads(data: list[bytes]) -> Callable[[], object]:
        def run() -> None:
            loads = orjson.loads
            for b in data:
                loads(b)

        return run

    def run_encode(data: list[ChangeEvent]) -> Callable[[], object]:
        def run() -> None:
            encode = codec.encode
            for e in data:
                encode(e)

        return run

    def run_dumps(data: list[dict[str, object]]) -> Callable[[], object]:
        def run() -> None:
            dumps = orjson.dumps
            for d in data:
                dumps(d)

        return run

    n, rep = args.events, args.repeat
    results = {
        "decode": best_rate(n, rep, run_decode(raw)),
        "loads": best_rate(n, rep, run_loads(raw)),
        "encode": best_rate(n, rep, run_encode(evs)),
        "dumps": best_rate(n, rep, run_dumps(docs)),
        "hb_decode": best_rate(n, rep, run_decode(hb_raw)),
        "hb_loads": best_rate(n, rep, run_loads(hb_raw)),
    }
    size = sum(map(len, raw)) / len(raw)
    print(f"10-column update events (before+after), {size:.0f} bytes each, best of {rep} x {n}:")
    print(f"  decode  {results['decode']:>10.0f} events/s   orjson.loads {results['loads']:>10.0f} events/s")
    print(f"  encode  {results['encode']:>10.0f} events/s   orjson.dumps {results['dumps']:>10.0f} events/s")
    print(f"heartbeats: decode {results['hb_decode']:.0f} events/s, orjson.loads {results['hb_loads']:.0f}")
    print(
        f"ratio decode/loads {results['decode'] / results['loads']:.2f}; "
        f"encode/dumps {results['encode'] / results['dumps']:.2f}; "
        f"heartbeat decode/loads {results['hb_decode'] / results['hb_loads']:.2f}"
    )
    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(run_decode(raw))
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
