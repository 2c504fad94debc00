"""Pure parts of parallel apply: write sets, overlap ordering, low watermarks (no servers)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from cache_updater.applier.parallel import Dispatcher, Key, write_set
from cache_updater.applier.txn import SourceTxn
from wmb.event import ChangeEvent, Op, Position, TxnInfo, Version

NO_UNIQUE: Any = lambda db, table: ()  # noqa: E731


def _ev(op: Op, table: str, pk: int, before: Any = None, after: Any = None, seq: int = 1) -> ChangeEvent:
    return ChangeEvent(
        source="s",
        origin="bj",
        server_id=1,
        op=op,
        database="d",
        table=table,
        ts_ms=0,
        position=Position(f"0-1-{seq}", "b.000001", 4),
        txn=TxnInfo(f"0-1-{seq}", 0, True),
        version=Version(1, seq, 0),
        pk={"id": pk},
        before=before,
        after=after,
        columns={"id": "int", "u": "int"},
    )


def _txn(offset: int, *events: ChangeEvent, partition: int = 0) -> SourceTxn:
    return SourceTxn("t", partition, tuple(events), offset, offset)


def _ins(pk: int, table: str = "x", u: int = 0) -> ChangeEvent:
    return _ev(Op.INSERT, table, pk, after={"id": pk, "u": u})


def test_write_set_has_before_and_after_pk_and_unique_keys() -> None:
    upd = _ev(Op.UPDATE, "x", 1, before={"id": 1, "u": 10}, after={"id": 2, "u": 11})
    keys = write_set(_txn(0, upd), lambda db, t: (("uq_u", ("u",)),))
    assert ("pk", "d", "x", (1,)) in keys and ("pk", "d", "x", (2,)) in keys
    assert ("uk", "d", "x", "uq_u", (10,)) in keys and ("uk", "d", "x", "uq_u", (11,)) in keys
    pkless = _ev(Op.DELETE, "nopk", 0, before={"a": 1})
    pkless = ChangeEvent(**{**{f: getattr(pkless, f) for f in pkless.__dataclass_fields__}, "pk": {}})
    assert write_set(_txn(1, pkless), NO_UNIQUE) == {("table", "d", "nopk")}


def test_disjoint_txns_spread_over_workers() -> None:
    d = Dispatcher(3)
    placed = [d.place(_txn(i, _ins(i)), write_set(_txn(i, _ins(i)), NO_UNIQUE)) for i in range(3)]
    assert sorted(p for p in placed if p is not None) == [0, 1, 2]


def test_overlap_with_one_worker_queues_behind_it_and_with_two_waits() -> None:
    d = Dispatcher(2)
    t0, t1 = _txn(0, _ins(1)), _txn(1, _ins(2))
    w0 = d.place(t0, write_set(t0, NO_UNIQUE))
    w1 = d.place(t1, write_set(t1, NO_UNIQUE))
    assert w0 is not None and w1 is not None and w0 != w1
    t2 = _txn(2, _ins(1), _ins(3))  # shares key 1 with t0 only: same worker, FIFO after it
    assert d.place(t2, write_set(t2, NO_UNIQUE)) == w0
    t3 = _txn(3, _ins(2), _ins(3))  # keys in flight on both workers: must wait
    k3 = write_set(t3, NO_UNIQUE)
    assert d.place(t3, k3) is None
    d.complete(t1, w1)
    assert d.place(t3, k3) == w0  # now only w0 holds key 3


def test_watermark_is_the_committed_prefix() -> None:
    d = Dispatcher(3)
    ts = [_txn(10 * i, _ins(i)) for i in range(4)]
    ws = [d.place(t, write_set(t, NO_UNIQUE)) for t in ts]
    assert d.watermark("t", 0) is None
    d.complete(ts[2], ws[2])  # type: ignore[arg-type]
    d.complete(ts[1], ws[1])  # type: ignore[arg-type]
    assert d.watermark("t", 0) is None and d.take_watermarks() == []
    d.complete(ts[0], ws[0])  # type: ignore[arg-type]
    assert d.watermark("t", 0) is ts[2]
    assert d.take_watermarks() == [ts[2]] and d.take_watermarks() == []
    d.skip(_txn(40, _ins(9)))  # committed before a crash: only moves the watermark, after ts[3]
    assert d.watermark("t", 0) is ts[2]
    d.complete(ts[3], ws[3])  # type: ignore[arg-type]
    assert d.watermark("t", 0).first_offset == 40  # type: ignore[union-attr]
    assert d.in_flight == 0


def test_watermarks_are_per_partition() -> None:
    d = Dispatcher(2)
    a, b = _txn(0, _ins(1), partition=0), _txn(0, _ins(2), partition=1)
    wa, wb = d.place(a, write_set(a, NO_UNIQUE)), d.place(b, write_set(b, NO_UNIQUE))
    d.complete(b, wb)  # type: ignore[arg-type]
    assert d.watermark("t", 0) is None and d.watermark("t", 1) is b
    d.complete(a, wa)  # type: ignore[arg-type]
    assert [t.partition for t in d.take_watermarks()] == [0, 1]


def _simulate(seed: int, workers: int, txns: Sequence[SourceTxn]) -> list[tuple[Key, int]]:
    """Random interleaving of worker commits; returns the (key, offset) commit log."""
    rnd = random.Random(seed)
    d = Dispatcher(workers)
    queues: list[list[SourceTxn]] = [[] for _ in range(workers)]
    log: list[tuple[Key, int]] = []
    pending = list(txns)
    committed: set[int] = set()
    while pending or any(queues):
        if pending and rnd.random() < 0.6:
            t = pending[0]
            w = d.place(t, write_set(t, NO_UNIQUE))
            if w is not None:
                queues[w].append(pending.pop(0))
                continue
        busy = [i for i, q in enumerate(queues) if q]
        if not busy:
            continue
        w = rnd.choice(busy)
        t = queues[w].pop(0)
        for k in write_set(t, NO_UNIQUE):
            log.append((k, t.first_offset))
        committed.add(t.first_offset)
        d.complete(t, w)
        mark = d.watermark("t", 0)
        if mark is not None:  # the watermark never passes an uncommitted transaction
            assert all(o in committed for o in range(mark.first_offset + 1))
    assert d.in_flight == 0
    return log


def test_random_schedules_keep_per_key_order_and_watermark() -> None:
    rnd = random.Random(1)
    txns = [_txn(i, *[_ins(rnd.choice([1, 2, 3, rnd.randint(4, 60)])) for _ in range(3)]) for i in range(300)]
    for seed in range(20):
        log = _simulate(seed, 4, txns)
        last: dict[Key, int] = {}
        for key, offset in log:
            assert last.get(key, -1) < offset, f"key {key} committed out of order"
            last[key] = offset
