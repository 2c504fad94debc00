"""Parallel apply: whole source transactions on N replica connections, keyed by their write sets.

Why it stays exact (the protocol, in three rules):

1. **Write sets.**  A source transaction's write set is every ``(db.table, pk)`` it touches (the
   before *and* after key of an update), every secondary unique key value of its before/after
   images (two transactions on different rows can still collide on a unique key), and one
   whole-table key for tables without a primary key.
2. **Dispatch in partition order.**  :class:`Dispatcher` places transactions strictly in the order
   they were read.  A transaction whose keys are in flight on exactly one worker joins that worker's
   FIFO queue (it runs after them, in order); keys in flight on two or more workers make it *wait*
   (head-of-line: nothing later overtakes it); no overlap sends it to the least loaded worker.  So two
   transactions sharing a key commit in source order, always.  DDL is a barrier: the runner drains
   every worker first.
3. **Position = low watermark + done rows.**  A worker commits each group together with one
   ``wmb_apply_done`` row per source transaction (and its own marker row), never the position row.
   The coordinator moves ``wmb_apply_state`` to the low watermark (the end of each partition's
   contiguous committed prefix) and deletes the done rows below it, in one transaction.  After a
   crash the runner seeks to the watermark and *skips* the transactions that have a done row: those
   committed beyond the watermark are neither lost nor applied twice (the marker count stays exact),
   and the re-applied ones never overtake a committed newer version of a key, because everything
   re-applied was uncommitted and is dispatched again under rule 2.

The :class:`Dispatcher` is pure (unit tested); :class:`WorkerPool` adds threads and connections.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cache_updater.applier.mariadb import GroupStats, MariaDBReplica
from cache_updater.applier.txn import SourceTxn
from cache_updater.apply_settings import ApplySettings
from wmb import log
from wmb.event import Op

_log = log.get("wmb.apply.parallel")

Key = tuple[Hashable, ...]
TxnId = tuple[str, int, int]  # (topic, partition, first_offset)
UniqueKeysOf = Callable[[str, str], Sequence[tuple[str, tuple[str, ...]]]]  # -> [(index, columns)]


def txn_id(txn: SourceTxn) -> TxnId:
    return (txn.topic, txn.partition, txn.first_offset)


def _h(value: Any) -> Hashable:
    return value if isinstance(value, Hashable) else repr(value)


def write_set(txn: SourceTxn, unique_keys_of: UniqueKeysOf) -> frozenset[Key]:
    """The keys ``txn`` writes (see rule 1 of the module docstring)."""
    keys: set[Key] = set()
    for ev in txn.events:
        if ev.op not in (Op.INSERT, Op.UPDATE, Op.DELETE):
            continue
        table = (ev.database, ev.table)
        if not ev.pk:
            keys.add(("table", *table))
            continue
        keys.add(("pk", *table, tuple(_h(v) for v in ev.pk.values())))
        if ev.after is not None:
            keys.add(("pk", *table, tuple(_h(ev.after.get(c)) for c in ev.pk)))
        for index, cols in unique_keys_of(*table):
            for image in (ev.before, ev.after):
                if image is not None:
                    keys.add(("uk", *table, index, tuple(_h(image.get(c)) for c in cols)))
    return frozenset(keys)


@dataclass(slots=True)
class _Slot:
    txn: SourceTxn
    done: bool = False


@dataclass(slots=True)
class Dispatcher:
    """Pure scheduling state: which worker may run which transaction, and the low watermarks."""

    workers: int
    _holders: dict[Key, list[int]] = field(default_factory=dict)  # key -> [worker, txns holding it]
    _keys: dict[TxnId, frozenset[Key]] = field(default_factory=dict)
    _load: list[int] = field(default_factory=list)
    _order: dict[tuple[str, int], deque[_Slot]] = field(default_factory=dict)
    _slots: dict[TxnId, _Slot] = field(default_factory=dict)
    _watermark: dict[tuple[str, int], SourceTxn] = field(default_factory=dict)
    _dirty: set[tuple[str, int]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._load = [0] * self.workers

    @property
    def in_flight(self) -> int:
        return len(self._slots)

    def load(self, worker: int) -> int:
        return self._load[worker]

    def place(self, txn: SourceTxn, keys: frozenset[Key]) -> int | None:
        """The worker to run ``txn`` on (and mark its keys in flight), or None = wait for commits."""
        holders = {self._holders[k][0] for k in keys if k in self._holders}
        if len(holders) > 1:
            return None
        worker = holders.pop() if holders else min(range(self.workers), key=self._load.__getitem__)
        for k in keys:
            h = self._holders.get(k)
            if h is None:
                self._holders[k] = [worker, 1]
            else:
                h[1] += 1
        self._keys[txn_id(txn)] = keys
        self._load[worker] += 1
        self._track(txn)
        return worker

    def skip(self, txn: SourceTxn) -> None:
        """``txn`` is already committed (a done row found on recovery): it only moves watermarks."""
        slot = self._track(txn)
        slot.done = True
        self._advance((txn.topic, txn.partition))

    def complete(self, txn: SourceTxn, worker: int) -> None:
        """``txn`` committed on ``worker``: release its keys, advance its partition's watermark."""
        tid = txn_id(txn)
        for k in self._keys.pop(tid, frozenset()):
            h = self._holders[k]
            h[1] -= 1
            if h[1] == 0:
                del self._holders[k]
        self._load[worker] -= 1
        self._slots[tid].done = True
        self._advance((txn.topic, txn.partition))

    def _track(self, txn: SourceTxn) -> _Slot:
        slot = _Slot(txn)
        self._slots[txn_id(txn)] = slot
        self._order.setdefault((txn.topic, txn.partition), deque()).append(slot)
        return slot

    def _advance(self, part: tuple[str, int]) -> None:
        q = self._order[part]
        while q and q[0].done:
            slot = q.popleft()
            del self._slots[txn_id(slot.txn)]
            self._watermark[part] = slot.txn
            self._dirty.add(part)

    def watermark(self, topic: str, partition: int) -> SourceTxn | None:
        """The last transaction of the partition's contiguous committed prefix (None: none yet)."""
        return self._watermark.get((topic, partition))

    def take_watermarks(self) -> list[SourceTxn]:
        """Watermarks that moved since the last call (what the position rows should advance to)."""
        out = [self._watermark[p] for p in sorted(self._dirty)]
        self._dirty.clear()
        return out

    def reset(self) -> None:
        self._holders.clear()
        self._keys.clear()
        self._load = [0] * self.workers
        self._order.clear()
        self._slots.clear()
        self._watermark.clear()
        self._dirty.clear()


class WorkerFailed(Exception):
    """A worker stopped on an error; ``__cause__`` is that error."""


class WorkerPool:
    """N worker threads, each with its own replica connection and FIFO queue, fed by the runner.

    All scheduling state is guarded by one condition variable; workers only hold it to take a group
    from their queue and to report a commit.
    """

    def __init__(
        self,
        settings: ApplySettings,
        workers: int,
        on_commit: Callable[[list[SourceTxn], GroupStats], None],
        max_in_flight: int | None = None,
    ) -> None:
        self.settings = settings
        self.n = workers
        self.dispatcher = Dispatcher(workers)
        self.replicas = [MariaDBReplica(settings) for _ in range(workers)]
        self._queues: list[deque[SourceTxn]] = [deque() for _ in range(workers)]
        self._queued_at: list[float] = [0.0] * workers  # when a worker's queue last became non-empty
        self._waiting = 0  # the coordinator waits for commits: workers should not hold back groups
        self._cond = threading.Condition()
        self._stopping = False
        self._error: BaseException | None = None
        self._threads: list[threading.Thread] = []
        self._on_commit = on_commit
        self._max_group = max(1, settings.group_max_txns)
        self._max_wait_s = max(0, settings.group_max_ms) / 1000.0
        self._max_in_flight = max_in_flight or workers * self._max_group * 2

    # --- lifecycle --------------------------------------------------------------------------
    def connect(self) -> None:
        for r in self.replicas:
            r.connect()

    def start(self) -> None:
        with self._cond:
            self._stopping = False
            self._error = None
            self.dispatcher.reset()
            for q in self._queues:
                q.clear()
        self._threads = [
            threading.Thread(target=self._work, args=(i,), name=f"wmb-apply-w{i}", daemon=True)
            for i in range(self.n)
        ]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """Stop the threads (a group in progress finishes or fails) and drop what is queued."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()
        self._threads = []

    def close(self) -> None:
        for r in self.replicas:
            r.rollback_quietly()
            r.close()

    def forget_meta(self) -> None:
        for r in self.replicas:
            r.forget_meta()

    # --- the coordinator's side --------------------------------------------------------------
    def _check(self) -> None:
        if self._error is not None:
            raise WorkerFailed(str(self._error)) from self._error

    def submit(self, txn: SourceTxn, keys: frozenset[Key], stop: Callable[[], bool]) -> bool:
        """Queue ``txn`` in order; blocks while it conflicts with 2+ workers or too much is in flight.

        Returns False if ``stop()`` became true while waiting (nothing queued).  Raises
        :class:`WorkerFailed` if a worker failed.
        """
        with self._cond:
            while True:
                self._check()
                full = self.dispatcher.in_flight >= self._max_in_flight
                if not full:
                    worker = self.dispatcher.place(txn, keys)
                    if worker is not None:
                        q = self._queues[worker]
                        if not q:
                            self._queued_at[worker] = time.monotonic()
                        q.append(txn)
                        if len(q) == 1 or len(q) >= self._max_group:  # wake it: start the clock / go
                            self._cond.notify_all()
                        return True
                if stop():
                    return False
                if full:  # backpressure only: full groups are queued, no need to hurry the workers
                    self._cond.wait(0.1)
                else:  # a conflict: the workers holding its keys must commit now
                    self._wait_for_commits()

    def skip(self, txn: SourceTxn) -> None:
        with self._cond:
            self.dispatcher.skip(txn)

    def drain(self, stop: Callable[[], bool] | None = None) -> bool:
        """Wait until every queued transaction committed (a barrier).  False if stopped first."""
        with self._cond:
            while self.dispatcher.in_flight:
                self._check()
                if stop is not None and stop():
                    return False
                self._wait_for_commits()
            self._check()
            return True

    def _wait_for_commits(self) -> None:
        self._waiting += 1
        self._cond.notify_all()
        try:
            self._cond.wait(0.1)
        finally:
            self._waiting -= 1

    def take_watermarks(self) -> list[SourceTxn]:
        with self._cond:
            self._check()
            return self.dispatcher.take_watermarks()

    def idle(self) -> bool:
        with self._cond:
            return self.dispatcher.in_flight == 0

    # --- workers ----------------------------------------------------------------------------
    def _work(self, i: int) -> None:
        replica = self.replicas[i]
        marker = self.settings.dc if i == 0 else f"{self.settings.dc}#w{i}"
        q = self._queues[i]
        while True:
            with self._cond:
                # Group commit per worker: take a full group, or what is there once the oldest
                # queued transaction waited group_max_ms, or at once when the coordinator waits.
                while not self._stopping:
                    if q:
                        age = time.monotonic() - self._queued_at[i]
                        if len(q) >= self._max_group or self._waiting or age >= self._max_wait_s:
                            break
                        self._cond.wait(self._max_wait_s - age)
                    else:
                        self._cond.wait()
                if self._stopping:
                    return
                group = [q.popleft() for _ in range(min(len(q), self._max_group))]
                self._queued_at[i] = time.monotonic()
            try:
                stats = replica.apply_group(group, marker_key=marker, done_rows=True)
            except BaseException as exc:
                with self._cond:
                    if self._error is None:
                        self._error = exc
                    self._stopping = True
                    self._cond.notify_all()
                return
            with self._cond:
                for t in group:
                    self.dispatcher.complete(t, i)
                self._cond.notify_all()
            self._on_commit(group, stats)


def table_unique_keys(replica: MariaDBReplica) -> UniqueKeysOf:
    """``unique_keys_of`` backed by the coordinator connection's cached table metadata."""

    def of(database: str, table: str) -> Sequence[tuple[str, tuple[str, ...]]]:
        return tuple(replica.table_meta(database, table).unique_keys.items())

    return of


__all__ = [
    "Dispatcher",
    "Key",
    "WorkerFailed",
    "WorkerPool",
    "table_unique_keys",
    "txn_id",
    "write_set",
]
