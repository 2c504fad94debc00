"""A memo of parsed TableMapEvents, and early filtering of excluded tables.

Why: python-mysql-replication parses every TABLE_MAP_EVENT from scratch (column types, optional
metadata, charsets, names: ~100 us each).  MariaDB writes one table map before the rows of every
table in every transaction, so on 1-row transactions the parse dominates and the bare library tops
out around 7k rows/s.  A table map's body (everything after the 19-byte event header, minus the
trailing checksum) fully determines the parse result, and ALTER TABLE changes the body (new column
types/names, and MariaDB allocates a new table id), so memoizing the parse on the exact body bytes
can never mislabel a column: a changed schema is a different key.

The library builds events through a name-mangled class map inside ``BinLogPacketWrapper``; this
module swaps in :class:`CachedTableMapEvent` there, and nowhere else touches library internals.
The class map is process-global, so :func:`install` is idempotent, and a reader must also be passed
to :func:`enable_on` (the library's allow-list holds classes by identity); the bare-library benchmark
calls :func:`uninstall` first.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from pymysqlreplication import packet as _packet
from pymysqlreplication.constants import BINLOG
from pymysqlreplication.row_event import TableMapEvent

# (db, table) -> keep? ; set by the daemon, None = keep everything.
TableFilter = Callable[[str, str], bool]

_MAX_ENTRIES = 4096
_cache: OrderedDict[bytes, Any] = OrderedDict()
_filter: TableFilter | None = None
_EVENT_MAP_ATTR = "_BinLogPacketWrapper__event_map"


class CachedTableMapEvent(TableMapEvent):  # type: ignore[misc]
    """TableMapEvent whose parse result is memoized on the event body bytes."""

    def __init__(self, from_packet: Any, event_size: int, table_map: Any, ctl_connection: Any, **kwargs: Any):
        raw = from_packet.packet  # pymysql MysqlPacket positioned just after the event header
        start = raw._position
        end = len(raw._data) - (BINLOG.BINLOG_CHECKSUM_LEN if kwargs.get("use_checksum") else 0)
        key = bytes(raw._data[start:end])
        hit = _cache.get(key)
        if hit is None:
            # Cheap pre-parse of schema/table names so excluded tables cost nothing further: their
            # rows events then find no table map entry and the library skips them unparsed.
            if _filter is not None:
                schema, table = _peek_names(key, kwargs.get("post_header_lengths"))
                if schema is not None and not _filter(schema, table):
                    self._init_skipped(from_packet, event_size, table_map, ctl_connection, kwargs)
                    _remember(key, _SKIP)
                    return
            super().__init__(from_packet, event_size, table_map, ctl_connection, **kwargs)
            if getattr(self, "_processed", False):
                state = self.__dict__.copy()
                for transient in ("packet", "table_map", "_ctl_connection"):
                    state.pop(transient, None)
                _remember(key, state)
            return
        if hit is _SKIP:
            self._init_skipped(from_packet, event_size, table_map, ctl_connection, kwargs)
            return
        # Hit: take the parsed state; the Table/Column objects are shared (the library never mutates
        # them after the parse), only the per-event header fields are refreshed.
        self.__dict__.update(hit)
        self.packet = from_packet
        self.timestamp = from_packet.timestamp
        self.event_size = event_size
        self.table_map = table_map
        self._ctl_connection = ctl_connection
        table_map[hit["table_id"]] = hit["table_obj"]
        raw._position = end  # consume the body as a parse would

    def _init_skipped(
        self, from_packet: Any, event_size: int, table_map: Any, ctl_connection: Any, kwargs: dict[str, Any]
    ) -> None:
        self.packet = from_packet
        self.table_map = table_map
        self.event_type = from_packet.event_type
        self.timestamp = from_packet.timestamp
        self.event_size = event_size
        self._ctl_connection = ctl_connection
        self._processed = False
        self.complete = True
        self.table_id = struct.unpack("<Q", self.packet.read(6) + b"\x00\x00")[0]
        # A reused table id must not keep an older, included table's map.
        table_map.pop(self.table_id, None)


_SKIP = object()


def _remember(key: bytes, value: Any) -> None:
    _cache[key] = value
    if len(_cache) > _MAX_ENTRIES:
        _cache.popitem(last=False)


def _peek_names(body: bytes, post_header_lengths: Any) -> tuple[str | None, str]:
    """Schema and table name from a TABLE_MAP body: table_id(6) flags(2) [extra] len name 0 len name."""
    try:
        post_len = 8
        if post_header_lengths and len(post_header_lengths) >= BINLOG.TABLE_MAP_EVENT:
            post_len = max(8, post_header_lengths[BINLOG.TABLE_MAP_EVENT - 1])
        pos = post_len
        slen = body[pos]
        schema = body[pos + 1 : pos + 1 + slen].decode()
        pos += 1 + slen + 1
        tlen = body[pos]
        table = body[pos + 1 : pos + 1 + tlen].decode()
        return schema, table
    except (IndexError, UnicodeDecodeError):
        return None, ""


def install(table_filter: TableFilter | None = None) -> None:
    """Use the memoizing table map parser (and ``table_filter``) for every stream in this process."""
    global _filter
    _filter = table_filter
    _cache.clear()
    event_map = getattr(_packet.BinLogPacketWrapper, _EVENT_MAP_ATTR)
    event_map[BINLOG.TABLE_MAP_EVENT] = CachedTableMapEvent


def uninstall() -> None:
    global _filter
    _filter = None
    _cache.clear()
    getattr(_packet.BinLogPacketWrapper, _EVENT_MAP_ATTR)[BINLOG.TABLE_MAP_EVENT] = TableMapEvent


def enable_on(reader: Any) -> None:
    """Let one ``BinLogStreamReader`` build :class:`CachedTableMapEvent` (its packet-level allow-list
    holds classes by identity, and lists only the library's own TableMapEvent)."""
    attr = "_BinLogStreamReader__allowed_events_in_packet"
    setattr(reader, attr, frozenset(getattr(reader, attr)) | {CachedTableMapEvent})
