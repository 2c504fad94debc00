"""The binlog side: hands over COMPLETE source transactions only, and knows where to resume.

python-mysql-replication streams events; it has no notion of a transaction, and its own reconnect
(on errors 2013/2006) re-sends the position it was *created* with (issue #252: a reconnect in the
middle of a transaction can skip or repeat parts of it).  So this module:

* groups Gtid .. Xid/COMMIT (or Gtid + one standalone DDL query) into a :class:`SourceTxn` and hands
  it over only once it is complete; a partial transaction is dropped when the stream breaks;
* keeps the GTID state *after the last handed-over transaction* and, on reconnect, restarts exactly
  there (it also pushes that state into the library so the library's own reconnect is correct);
* refuses positions the server cannot serve (purged -> error 1236, or an unknown GTID domain, which
  the server would otherwise answer by streaming the whole binlog) with :class:`PositionLostError`.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pymysql
from pymysqlreplication import BinLogStreamReader
from pymysqlreplication.event import (
    GtidEvent,
    MariadbGtidEvent,
    QueryEvent,
    RotateEvent,
    XidEvent,
)
from pymysqlreplication.row_event import DeleteRowsEvent, UpdateRowsEvent, WriteRowsEvent

from binlog_capture import rowdecode, tablemap_cache
from wmb import log
from wmb.errors import PositionLostError
from wmb.event import Gtid, Op

_log = log.get("binlog_capture.reader")

ER_MASTER_FATAL_ERROR_READING_BINLOG = 1236
_MARIADB_FL_STANDALONE = 0x01  # GTID event flag: a single statement with no BEGIN/COMMIT (DDL)


class ReaderClosed(Exception):
    """The reader was closed (stop requested); ends the transaction iterator quietly."""


@dataclass(slots=True)
class RowsItem:
    """One rows event of a transaction, rows already decoded by the library."""

    op: Op
    schema: str
    table: str
    columns: list[Any]  # the library's Column objects (name, type, ...) from the table map
    primary_key: Any  # "", a column name, or a tuple of names (library convention)
    rows: list[dict[str, Any]]


@dataclass(slots=True)
class DdlItem:
    schema: str
    query: str


@dataclass(slots=True)
class SourceTxn:
    """A complete source transaction; ``file``/``pos`` are the binlog coordinates of its end."""

    gtid: str | None
    start_file: str
    start_pos: int
    file: str = ""
    pos: int = 0
    ts_s: int = 0
    #: the resume state right after this transaction (what its checkpoint stores)
    gtid_state: str | None = None
    items: list[RowsItem | DdlItem] = field(default_factory=list)

    @property
    def txn_id(self) -> str:
        return self.gtid or f"{self.start_file}:{self.start_pos}"

    @property
    def row_count(self) -> int:
        return sum(len(i.rows) for i in self.items if isinstance(i, RowsItem))


class GtidState:
    """The resume point: MariaDB ``domain -> last gtid``, or MySQL ``uuid -> last n``.

    Rendered as ``@slave_connect_state`` (``0-1-10,1-2-7``) or a MySQL GTID set (``uuid:1-10``).
    """

    def __init__(self, text: str = "", *, mariadb: bool = True) -> None:
        self.mariadb = mariadb
        self._mdb: dict[int, Gtid] = {}
        self._mysql: dict[str, int] = {}
        for part in (p.strip() for p in text.split(",")):
            if part:
                self.advance(part)

    def advance(self, gtid: str) -> None:
        if self.mariadb:
            g = Gtid.parse(gtid)
            self._mdb[g.domain] = g
        else:
            uuid, _, n = gtid.rpartition(":")
            last = n.split("-")[-1]
            self._mysql[uuid] = max(self._mysql.get(uuid, 0), int(last))

    def seen(self, gtid: str) -> bool:
        """True if ``gtid`` is at or before this state (a replay after a library reconnect)."""
        if self.mariadb:
            g = Gtid.parse(gtid)
            cur = self._mdb.get(g.domain)
            return cur is not None and g.seq <= cur.seq
        uuid, _, n = gtid.rpartition(":")
        return int(n) <= self._mysql.get(uuid, 0)

    @property
    def domains(self) -> dict[int, Gtid]:
        return dict(self._mdb)

    def __bool__(self) -> bool:
        return bool(self._mdb or self._mysql)

    def __str__(self) -> str:
        if self.mariadb:
            return ",".join(str(self._mdb[d]) for d in sorted(self._mdb))
        return ",".join(f"{u}:1-{n}" for u, n in sorted(self._mysql.items()))

    def copy(self) -> GtidState:
        return GtidState(str(self), mariadb=self.mariadb)


@dataclass(frozen=True)
class StartPoint:
    """Where the stream starts: after ``gtid_state`` if set, else at ``file``/``pos``."""

    gtid_state: str | None
    file: str | None = None
    pos: int | None = None


def check_gtid_servable(conn: pymysql.connections.Connection, state: GtidState) -> None:
    """Refuse a GTID state the MariaDB server would mis-serve.

    Unknown domain: MariaDB answers by streaming that connection's *whole* binlog (python-mysql-
    replication does not notice), so check the domain exists in ``@@gtid_binlog_state``.  A
    sequence number beyond the server's own (restored/reset server) cannot be served either.
    Purged positions are caught when the dump starts (error 1236).
    """
    with conn.cursor() as cur:
        cur.execute("SELECT @@GLOBAL.gtid_binlog_state")
        row = cur.fetchone()
    server = GtidState(str(row[0] or "") if row else "")
    server_domains = server.domains
    for domain, gtid in state.domains.items():
        if domain not in server_domains:
            raise PositionLostError(
                f"checkpoint GTID {gtid} is in domain {domain}, which the server does not know "
                f"(gtid_binlog_state={server or 'empty'}); the saved position cannot be served. "
                "Re-snapshot and restart with --from-now, or --from-gtid <a GTID the server has>."
            )
        if gtid.seq > server_domains[domain].seq:
            raise PositionLostError(
                f"checkpoint GTID {gtid} is ahead of the server's {server_domains[domain]} in domain "
                f"{domain} (server reset or restored?); restart with --from-now or --from-gtid."
            )


def current_gtid_state(conn: pymysql.connections.Connection) -> str:
    with conn.cursor() as cur:
        cur.execute("SELECT @@GLOBAL.gtid_binlog_pos")
        row = cur.fetchone()
    return str(row[0] or "") if row else ""


def current_file_pos(conn: pymysql.connections.Connection) -> tuple[str, int]:
    with conn.cursor() as cur:
        cur.execute("SHOW MASTER STATUS")
        row = cur.fetchone()
    if not row:
        raise PositionLostError("SHOW MASTER STATUS is empty: log_bin is off")
    return str(row[0]), int(row[1])


class TxnReader:
    """Iterates complete :class:`SourceTxn` from one binlog stream.

    Not thread-safe; one reader thread owns it.  :meth:`close` may be called from another thread to
    unblock a read (the stream's socket is closed).
    """

    def __init__(
        self,
        connection: dict[str, Any],
        server_id: int,
        start: StartPoint,
        *,
        mariadb: bool = True,
        only_schemas: list[str] | None = None,
        table_filter: Callable[[str, str], bool] | None = None,
        blocking: bool = True,
        use_tablemap_cache: bool = True,
    ) -> None:
        self._connection = connection
        self._server_id = server_id
        self._mariadb = mariadb
        self._only_schemas = only_schemas
        self._blocking = blocking
        self._use_cache = use_tablemap_cache
        self.state = GtidState(start.gtid_state or "", mariadb=mariadb)
        self._use_gtid = start.gtid_state is not None
        self.file = start.file or ""
        self.pos = start.pos or 4
        self._stream: Any = None
        self._lock = threading.Lock()
        self._closed = False
        if use_tablemap_cache:
            tablemap_cache.install(table_filter)

    # -- stream lifecycle -------------------------------------------------------------------------
    def _open(self) -> Any:
        kwargs: dict[str, Any] = dict(
            connection_settings=dict(self._connection),
            server_id=self._server_id,
            blocking=self._blocking,
            only_events=[
                MariadbGtidEvent,
                GtidEvent,
                QueryEvent,
                XidEvent,
                RotateEvent,
                WriteRowsEvent,
                UpdateRowsEvent,
                DeleteRowsEvent,
            ],
            only_schemas=self._only_schemas,
            enable_logging=False,
            # Column names must come from the table map (binlog_row_metadata=FULL, checked at
            # preflight), never from the information_schema cache: it mislabels after ALTER.
            use_column_name_cache=False,
            slave_heartbeat=5,
            # The library reconnects by itself on errors 2013/2006, also after close() from another
            # thread; this wrapper stops that once the reader is closed.
            pymysql_wrapper=self._connect,
        )
        if self._use_gtid and self.state:
            kwargs.update(auto_position=str(self.state), is_mariadb=self._mariadb)
        elif self._use_gtid and self._mariadb:
            # Empty state (fresh server, no GTID yet): stream from the beginning of the binlog.
            kwargs.update(auto_position="", is_mariadb=True)
        else:
            kwargs.update(resume_stream=True, log_file=self.file, log_pos=self.pos, is_mariadb=False)
        stream = BinLogStreamReader(**kwargs)
        if self._use_cache:
            tablemap_cache.enable_on(stream)
        with self._lock:
            self._stream = stream
        _log.info("binlog_stream_open", start=str(self.state) or f"{self.file}:{self.pos}")
        return stream

    def _connect(self, **kwargs: Any) -> Any:
        if self._closed:
            raise ReaderClosed()
        return pymysql.connect(**kwargs)

    def close(self) -> None:
        """Close the stream (from any thread) and keep it closed.

        Also puts the library's table-map parser back: the memo and its table filter are process
        global, and another reader in this process (a test, a tool) must not inherit them.
        """
        self._closed = True
        self._close_stream()
        if self._use_cache:
            tablemap_cache.uninstall()

    def _close_stream(self) -> None:
        with self._lock:
            stream, self._stream = self._stream, None
        if stream is None:
            return
        # A graceful pymysql close (COM_QUIT) blocks while another thread sits in a read on the same
        # socket; shut the socket down first so that read fails at once and close cannot hang.
        sock = getattr(getattr(stream, "_stream_connection", None), "_sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        try:
            stream.close()
        except Exception as exc:
            _log.debug("binlog_stream_close_failed", error=repr(exc))

    # -- transactions -----------------------------------------------------------------------------
    def transactions(self) -> Iterator[SourceTxn]:
        """Complete transactions after the current state; ends when a non-blocking stream ends.

        A connection error propagates (the caller retries by calling this again: it reopens the
        stream at the state after the last transaction yielded, dropping any partial one).
        """
        if self._closed:
            return
        stream = self._open()
        try:
            yield from self._iterate(stream)
        except ReaderClosed:
            return
        except pymysql.err.MySQLError as exc:
            if self._closed:
                return
            if exc.args and exc.args[0] == ER_MASTER_FATAL_ERROR_READING_BINLOG:
                raise PositionLostError(
                    f"the server cannot serve the saved position {self.state or (self.file, self.pos)}: "
                    f"{exc.args[1] if len(exc.args) > 1 else exc} (purged from the binlog?). Re-snapshot "
                    "and restart with --from-now, or --from-gtid <a GTID the server still has>."
                ) from exc
            raise
        finally:
            self._close_stream()

    def _iterate(self, stream: Any) -> Iterator[SourceTxn]:
        txn: SourceTxn | None = None
        standalone = False
        skipping = False
        for ev in stream:
            if self._closed:
                return
            cls = type(ev)
            if cls is RotateEvent:
                self.file, self.pos = ev.next_binlog, ev.position
                continue
            if cls is MariadbGtidEvent or cls is GtidEvent:
                gtid = ev.gtid
                # The library's own reconnect re-sends its start position: skip what we handed over.
                skipping = bool(gtid) and self.state.seen(gtid)
                txn = SourceTxn(gtid=gtid or None, start_file=stream.log_file, start_pos=self.pos)
                txn.ts_s = ev.timestamp
                standalone = cls is MariadbGtidEvent and bool(ev.flags & _MARIADB_FL_STANDALONE)
                continue
            if txn is None:
                if cls is QueryEvent and not self._use_gtid:
                    # file/pos mode without GTIDs: a BEGIN opens the transaction.
                    txn = SourceTxn(gtid=None, start_file=stream.log_file, start_pos=self.pos)
                    txn.ts_s = ev.timestamp
                    standalone = _query_text(ev).upper() != "BEGIN"
                    if not standalone:
                        continue
                else:
                    continue  # the tail of a transaction whose start we did not see
            if cls is QueryEvent:
                query = _query_text(ev)
                upper = query.upper()
                if upper == "BEGIN":
                    continue
                if upper == "COMMIT" or upper.startswith("XA COMMIT"):
                    done = txn
                else:
                    txn.items.append(DdlItem(schema=_schema(ev), query=query))
                    if not standalone:
                        continue
                    done = txn
            elif cls is XidEvent:
                done = txn
            else:
                if skipping:
                    continue
                op = (
                    Op.INSERT if cls is WriteRowsEvent else Op.UPDATE if cls is UpdateRowsEvent else Op.DELETE
                )
                txn.items.append(
                    RowsItem(op, ev.schema, ev.table, ev.columns, ev.primary_key, rowdecode.rows(ev))
                )
                continue
            # the transaction is complete
            txn = None
            self.file, self.pos = stream.log_file, stream.log_pos
            done.file, done.pos = self.file, self.pos
            done.ts_s = ev.timestamp or done.ts_s
            if skipping:
                continue
            if done.gtid:
                self.state.advance(done.gtid)
                done.gtid_state = str(self.state)
                if stream.auto_position:
                    stream.auto_position = done.gtid_state
            yield done


def _query_text(ev: Any) -> str:
    q = ev.query
    if isinstance(q, bytes):
        q = q.decode("utf-8", "replace")
    return str(q).strip()


def _schema(ev: Any) -> str:
    s = ev.schema
    if isinstance(s, bytes):
        s = s.decode("utf-8", "replace")
    return str(s)
