"""The change event: the only thing that crosses a stage boundary.

A :class:`ChangeEvent` is built by ``binlog_capture`` from one row of one binlog rows event (or from
one DDL statement, or from a heartbeat), serialized by :mod:`wmb.codec` into the versioned JSON
envelope documented in ``docs/event-format.md``, and rebuilt by every consumer (relay, cache
updater, replica applier) from those bytes.  No stage hands a library's row dict or a Kafka record
to another.

Row values inside ``pk``, ``before`` and ``after`` are *exact* Python values (``Decimal``,
``bytes``, ``datetime``, ``timedelta``, ``str`` for SET ...), such that a replica that writes them
through pymysql stores what the master stores; ``columns`` names each column's wmb type so the codec
can carry them through JSON without loss (see :mod:`wmb.values`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ENVELOPE_VERSION = 1


class Op(enum.StrEnum):
    INSERT = "insert"
    UPDATE = "update"
    DELETE = "delete"
    DDL = "ddl"
    HEARTBEAT = "heartbeat"


ROW_OPS = frozenset({Op.INSERT, Op.UPDATE, Op.DELETE})


@dataclass(frozen=True, slots=True, order=True)
class Version:
    """Monotonic per row: (source epoch, GTID sequence, row index within the transaction).

    The epoch is raised by a failover, so versions keep growing when the master moves and its GTID
    sequence numbers restart or jump.  Tuple order is the "newer than" order the cache's Lua guard
    and the replica applier use.
    """

    epoch: int
    seq: int
    row: int

    def newer_than(self, other: Version | None) -> bool:
        return other is None or (self.epoch, self.seq, self.row) > (other.epoch, other.seq, other.row)

    def as_list(self) -> list[int]:
        return [self.epoch, self.seq, self.row]

    def as_score(self) -> str:
        """A fixed-width string whose byte order equals the version order (for Redis/Lua)."""
        return f"{self.epoch:010d}.{self.seq:020d}.{self.row:010d}"


@dataclass(frozen=True, slots=True)
class Gtid:
    """A MariaDB GTID ``domain-server-seq``.  Ordered by (domain, seq): the server id is not an order."""

    domain: int
    server_id: int
    seq: int

    @classmethod
    def parse(cls, text: str) -> Gtid:
        try:
            domain, server_id, seq = (int(p) for p in text.strip().split("-"))
        except ValueError as exc:
            raise ValueError(f"not a MariaDB GTID (domain-server-seq): {text!r}") from exc
        return cls(domain, server_id, seq)

    def __str__(self) -> str:
        return f"{self.domain}-{self.server_id}-{self.seq}"


@dataclass(frozen=True, slots=True)
class Position:
    """Where a source transaction sits in the binlog: GTID first, file/offset as the fallback.

    ``gtid`` is the MariaDB ``domain-server-seq`` (or MySQL ``uuid:n``) of the transaction; ``file``
    and ``pos`` are the binlog coordinates of its *end* (the next transaction starts there), which is
    what a file/pos resume needs.
    """

    gtid: str | None
    file: str
    pos: int

    def newer_than(self, other: Position | None) -> bool:
        """True if this transaction comes after ``other`` in the same source's history."""
        if other is None:
            return True
        if self.gtid and other.gtid and "-" in self.gtid and "-" in other.gtid:
            mine, theirs = Gtid.parse(self.gtid), Gtid.parse(other.gtid)
            if mine.domain == theirs.domain:
                return mine.seq > theirs.seq
        return (self.file, self.pos) > (other.file, other.pos)


@dataclass(frozen=True, slots=True)
class TxnInfo:
    """Which source transaction an event belongs to and where in it."""

    id: str  # the GTID, or "file:pos" of the transaction start when GTIDs are off
    seq: int  # 0-based index of this event within the transaction
    last: bool  # True on the transaction's last event: a consumer may commit after it


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    """One committed row change, DDL statement or heartbeat of one source."""

    source: str
    origin: str  # datacenter whose master produced the change
    server_id: int
    op: Op
    database: str
    table: str
    ts_ms: int  # source commit timestamp, milliseconds since the epoch
    position: Position
    txn: TxnInfo
    version: Version
    pk: Mapping[str, Any] = field(default_factory=dict)
    before: Mapping[str, Any] | None = None
    after: Mapping[str, Any] | None = None
    columns: Mapping[str, str] = field(default_factory=dict)  # column -> wmb type (wmb.values)
    ddl: str | None = None
    v: int = ENVELOPE_VERSION

    @property
    def id(self) -> str:
        """Unique and stable: (source, transaction, event index), like BookKeeper's <ledger, entry>."""
        return f"{self.source}:{self.txn.id}:{self.txn.seq}"

    @property
    def row(self) -> Mapping[str, Any] | None:
        """The row as it is after the change (None after a delete)."""
        return self.after if self.op != Op.DELETE else None
