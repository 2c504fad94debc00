"""Pure transaction assembly and group-commit bookkeeping (no I/O, unit tested with fakes).

A Kafka partition carries the events of whole source transactions in commit order; ``txn.last``
marks the end of one.  :class:`TxnAssembler` turns one partition's records into complete
:class:`SourceTxn` objects; :class:`GroupBuffer` collects whole source transactions until the group
commit bound (count or age) says "commit now".  A source transaction is never split.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from wmb import log
from wmb.event import ChangeEvent, Op

_log = log.get("wmb.apply.txn")


@dataclass(frozen=True, slots=True)
class SourceTxn:
    """One complete source transaction as read from one partition."""

    topic: str
    partition: int
    events: tuple[ChangeEvent, ...]
    first_offset: int
    last_offset: int

    @property
    def source(self) -> str:
        return self.events[-1].source

    @property
    def gtid(self) -> str | None:
        return self.events[-1].position.gtid

    @property
    def txn_id(self) -> str:
        return self.events[-1].txn.id

    @property
    def ts_ms(self) -> int:
        return self.events[-1].ts_ms

    @property
    def next_offset(self) -> int:
        return self.last_offset + 1

    @property
    def is_ddl(self) -> bool:
        return any(e.op == Op.DDL for e in self.events)

    @property
    def row_count(self) -> int:
        return sum(1 for e in self.events if e.op in (Op.INSERT, Op.UPDATE, Op.DELETE))


@dataclass(slots=True)
class TxnAssembler:
    """Buffers one partition's events until the end of their source transaction."""

    topic: str
    partition: int
    _events: list[ChangeEvent] = field(default_factory=list)
    _first: int = -1
    _last: int = -1

    def feed(self, offset: int, event: ChangeEvent | None) -> list[SourceTxn]:
        """Add the record at ``offset`` (``event`` None = a poison record already dead-lettered).

        Returns the transactions this record completed (usually zero or one; two when a transaction
        id changes without the previous one's ``last`` flag, which only a broken producer does).
        """
        done: list[SourceTxn] = []
        if event is None:
            # A poison record is covered by the next position row written after it (the next
            # transaction's range starts later, and the row stores its end).  If the applier stops
            # before another transaction arrives, the record is re-read and dead-lettered again.
            if self._events:
                self._last = offset
            return done
        if self._events and self._events[-1].txn.id != event.txn.id:
            _log.warning(
                "txn_without_last_flag",
                topic=self.topic,
                partition=self.partition,
                txn=self._events[-1].txn.id,
                next_txn=event.txn.id,
            )
            done.append(self._close())
        if not self._events:
            self._first = offset
        self._events.append(event)
        self._last = offset
        if event.txn.last:
            done.append(self._close())
        return done

    @property
    def pending(self) -> int:
        return len(self._events)

    def reset(self) -> None:
        self._events.clear()
        self._first = self._last = -1

    def _close(self) -> SourceTxn:
        txn = SourceTxn(self.topic, self.partition, tuple(self._events), self._first, self._last)
        self.reset()
        return txn


@dataclass(slots=True)
class GroupBuffer:
    """Whole source transactions waiting for one replica transaction (the group commit)."""

    max_txns: int
    max_ms: int
    txns: list[SourceTxn] = field(default_factory=list)
    _opened_at: float = 0.0

    def add(self, txn: SourceTxn) -> None:
        if not self.txns:
            self._opened_at = time.monotonic()
        self.txns.append(txn)

    def ready(self, now: float | None = None) -> bool:
        if not self.txns:
            return False
        if len(self.txns) >= self.max_txns:
            return True
        now = time.monotonic() if now is None else now
        return (now - self._opened_at) * 1000.0 >= self.max_ms

    def take(self) -> list[SourceTxn]:
        out, self.txns = self.txns, []
        return out

    def clear(self) -> None:
        self.txns = []


def next_offsets(txns: list[SourceTxn]) -> dict[tuple[str, int], SourceTxn]:
    """The last transaction per (topic, partition): what the position rows advance to."""
    last: dict[tuple[str, int], SourceTxn] = {}
    for t in txns:
        key = (t.topic, t.partition)
        if key not in last or t.last_offset > last[key].last_offset:
            last[key] = t
    return last
