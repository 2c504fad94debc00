"""The replica I/O edge: one pymysql connection that applies groups of source transactions.

Why these statements (see docs in :mod:`cache_updater.apply`):

* INSERT/UPDATE on a table **without** a unique secondary key: multi-row
  ``INSERT ... ON DUPLICATE KEY UPDATE`` of every column.  The PK is the only possible duplicate, so
  it is an exact, idempotent upsert and the fast path (one statement per run of rows).
* Tables **with** a unique secondary key: plain ``INSERT`` (a duplicate on ``PRIMARY`` is a replay
  and becomes an ``UPDATE`` by PK); a duplicate on another key is a *conflict*.  ODKU would silently
  update the *other* row; ``REPLACE`` would silently delete it, fire DELETE triggers and cascade
  foreign keys.  Neither is acceptable for an exact replica, so we detect and apply the policy.
* UPDATE under the skip/halt policies: ``UPDATE ... WHERE pk`` with ``CLIENT_FOUND_ROWS`` so that
  0 matched rows means "the row is not there" (a conflict).  A PK change deletes the old PK and
  inserts the new one.  DELETE by PK; 0 rows deleted is a conflict.
* Triggers on replica tables *do* fire (we write through SQL, unlike native row replication):
  keep replica tables trigger-free.

Session settings (every connection): ``time_zone='+00:00'`` (TIMESTAMP values travel as naive UTC),
``sql_mode='STRICT_ALL_TABLES,NO_AUTO_VALUE_ON_ZERO,NO_ENGINE_SUBSTITUTION'`` (strict: a value that
does not fit is an error, never a silent truncation; NO_AUTO_VALUE_ON_ZERO: an id 0 stays 0; no
NO_BACKSLASH_ESCAPES because pymysql escapes with backslashes; no NO_ZERO_DATE so zero dates copy),
``foreign_key_checks=0`` (the master enforced them; a group may order tables differently from a
cascade), ``unique_checks=1`` (we need duplicates reported) and READ COMMITTED (no gap locks).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import pymysql
from pymysql.constants import CLIENT

from cache_updater.applier import sql
from cache_updater.applier.marker import CONFLICTS_TABLE, DONE_TABLE, MARKER_TABLE, STATE_TABLE, mark_ddl
from cache_updater.applier.txn import SourceTxn, next_offsets
from cache_updater.apply_settings import ApplySettings, ConflictPolicy, DdlPolicy
from wmb import log
from wmb.errors import HaltedError
from wmb.event import ChangeEvent, Op

_log = log.get("wmb.apply.replica")

SESSION_SQL = (
    "SET SESSION time_zone='+00:00'",
    "SET SESSION sql_mode='STRICT_ALL_TABLES,NO_AUTO_VALUE_ON_ZERO,NO_ENGINE_SUBSTITUTION'",
    "SET SESSION foreign_key_checks=0",
    "SET SESSION unique_checks=1",
    "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
)

# Server codes that mean "the connection or the server went away / try the transaction again".
_TRANSIENT_CODES = frozenset({1040, 1053, 1152, 1158, 1159, 1160, 1161, 1205, 1213, 1317, 1927, 4031})
# DDL errors that mean "already done": a DDL re-applied after a crash before its position row.
TOLERATED_DDL_CODES = frozenset(
    {
        1007,  # database exists
        1008,  # can't drop database; doesn't exist
        1050,  # table already exists
        1051,  # unknown table (DROP TABLE)
        1060,  # duplicate column name
        1061,  # duplicate key name
        1068,  # multiple primary key defined
        1091,  # can't DROP column/key; check that it exists
        1359,  # trigger already exists
        1360,  # trigger does not exist
        4092,  # unknown sequence / view variants
    }
)
_DUP_KEY_RE = re.compile(r"for key '(?:[^'.]*\.)?([^']+)'")
_MAX_BATCH_ROWS = 1000


class ReplicaUnavailable(Exception):
    """The replica connection failed in a way a reconnect + re-seek can cure."""


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (pymysql.err.InterfaceError, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, pymysql.err.OperationalError | pymysql.err.InternalError):
        code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else 0
        return code >= 2000 or code in _TRANSIENT_CODES or code == 0
    return isinstance(exc, OSError)


def state_ddl(schema: str) -> list[str]:
    s = sql.qident(schema)
    return [
        f"CREATE DATABASE IF NOT EXISTS {s}",
        f"""CREATE TABLE IF NOT EXISTS {s}.{STATE_TABLE} (
            source VARCHAR(255) NOT NULL,
            topic VARCHAR(255) NOT NULL,
            kafka_partition INT NOT NULL,
            next_offset BIGINT NOT NULL,
            gtid VARCHAR(255) NULL,
            updated_at DATETIME(6) NOT NULL,
            PRIMARY KEY (source, topic, kafka_partition)
        ) ENGINE=InnoDB""",
        f"""CREATE TABLE IF NOT EXISTS {s}.{MARKER_TABLE} (
            applier VARCHAR(255) NOT NULL PRIMARY KEY,
            txn_count BIGINT UNSIGNED NOT NULL,
            last_gtid VARCHAR(255) NULL,
            updated_at DATETIME(6) NOT NULL
        ) ENGINE=InnoDB""",
        f"""CREATE TABLE IF NOT EXISTS {s}.{DONE_TABLE} (
            source VARCHAR(255) NOT NULL,
            topic VARCHAR(255) NOT NULL,
            kafka_partition INT NOT NULL,
            first_offset BIGINT NOT NULL,
            PRIMARY KEY (source, topic, kafka_partition, first_offset)
        ) ENGINE=InnoDB""",
        f"""CREATE TABLE IF NOT EXISTS {s}.{CONFLICTS_TABLE} (
            id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
            recorded_at DATETIME(6) NOT NULL,
            source VARCHAR(255) NOT NULL,
            gtid VARCHAR(255) NULL,
            txn_id VARCHAR(255) NOT NULL,
            db VARCHAR(255) NOT NULL,
            tbl VARCHAR(255) NOT NULL,
            op VARCHAR(16) NOT NULL,
            kind VARCHAR(32) NOT NULL,
            policy VARCHAR(16) NOT NULL,
            pk JSON NOT NULL,
            detail TEXT NULL,
            event JSON NULL
        ) ENGINE=InnoDB""",
    ]


@dataclass(frozen=True, slots=True)
class TableMeta:
    unique_keys: Mapping[str, tuple[str, ...]]  # secondary unique index name -> columns

    @property
    def has_unique_secondary(self) -> bool:
        return bool(self.unique_keys)


@dataclass(slots=True)
class GroupStats:
    txns: int = 0
    rows: int = 0
    conflicts: dict[str, int] = field(default_factory=dict)
    max_ts_ms: int = 0


def jsonable(value: Any) -> Any:
    """orjson ``default`` for reports and conflict records: bytes as 0x-hex, the rest as str."""
    if isinstance(value, bytes):
        return "0x" + value.hex()
    return str(value)


def _event_json(event: ChangeEvent) -> bytes:
    return orjson.dumps(
        {"pk": dict(event.pk), "before": event.before, "after": event.after}, default=jsonable
    )


class MariaDBReplica:
    """One connection to the replica; every method is one step of the applier's protocol."""

    def __init__(self, settings: ApplySettings) -> None:
        self.settings = settings
        self._conn: pymysql.connections.Connection[Any] | None = None
        self._meta: dict[tuple[str, str], TableMeta] = {}
        # Per-table answers of the settings' globs, cached: fnmatch per row is measurable.
        self._wants: dict[tuple[str, str], bool] = {}
        self._policy: dict[tuple[str, str], ConflictPolicy] = {}
        self._schema = sql.qident(settings.state_schema)

    # --- connection -------------------------------------------------------------------------
    def connect(self) -> None:
        r = self.settings.replica
        self.close()
        try:
            conn = pymysql.connect(
                host=r.host,
                port=r.port,
                user=r.user,
                password=r.password,
                charset="utf8mb4",
                autocommit=False,
                connect_timeout=int(self.settings.connect_timeout_s),
                client_flag=CLIENT.FOUND_ROWS,
            )
            with conn.cursor() as cur:
                for stmt in SESSION_SQL:
                    cur.execute(stmt)
            conn.commit()
        except Exception as exc:
            if is_transient(exc):
                raise ReplicaUnavailable(repr(exc)) from exc
            raise
        self._conn = conn
        self._meta.clear()

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # closing a dead socket may fail in many ways
                self._conn.close()
            self._conn = None

    @property
    def conn(self) -> pymysql.connections.Connection[Any]:
        if self._conn is None:
            raise ReplicaUnavailable("not connected")
        return self._conn

    def rollback_quietly(self) -> None:
        if self._conn is not None:
            try:
                self._conn.rollback()
            except Exception:
                self.close()

    def _exec(self, cur: Any, stmt: str) -> int:
        try:
            return int(cur.execute(stmt))
        except Exception as exc:
            if is_transient(exc):
                raise ReplicaUnavailable(repr(exc)) from exc
            raise

    # --- state ------------------------------------------------------------------------------
    def ensure_schema(self) -> None:
        with self.conn.cursor() as cur:
            for stmt in state_ddl(self.settings.state_schema):
                self._exec(cur, stmt)
        self.conn.commit()

    def read_positions(self, sources: Iterable[str]) -> dict[tuple[str, int], tuple[int, str | None]]:
        """``{(topic, partition): (next_offset, gtid)}`` of the given sources."""
        names = list(sources)
        if not names:
            return {}
        marks = ",".join(sql.lit(s) for s in names)
        with self.conn.cursor() as cur:
            self._exec(
                cur,
                f"SELECT topic, kafka_partition, next_offset, gtid FROM {self._schema}.{STATE_TABLE} "
                f"WHERE source IN ({marks})",
            )
            rows = cur.fetchall()
        self.conn.commit()
        return {(str(t), int(p)): (int(o), g) for t, p, o, g in rows}

    def write_positions(
        self, rows: Sequence[tuple[str, str, int, int, str | None]], commit: bool = True
    ) -> None:
        """Upsert position rows ``(source, topic, partition, next_offset, gtid)``."""
        if not rows:
            return
        values = ",".join(
            f"({sql.lit(s)},{sql.lit(t)},{p},{o},{sql.lit(g)},UTC_TIMESTAMP(6))" for s, t, p, o, g in rows
        )
        stmt = (
            f"INSERT INTO {self._schema}.{STATE_TABLE} "
            "(source, topic, kafka_partition, next_offset, gtid, updated_at) VALUES "
            f"{values} ON DUPLICATE KEY UPDATE next_offset=VALUES(next_offset), gtid=VALUES(gtid), "
            "updated_at=VALUES(updated_at)"
        )
        with self.conn.cursor() as cur:
            self._exec(cur, stmt)
        if commit:
            self._commit()

    def _commit(self) -> None:
        try:
            self.conn.commit()
        except Exception as exc:
            if is_transient(exc):
                raise ReplicaUnavailable(repr(exc)) from exc
            raise

    def read_done(self, sources: Iterable[str]) -> set[tuple[str, int, int]]:
        """``{(topic, partition, first_offset)}``: transactions committed beyond the position row."""
        names = list(sources)
        if not names:
            return set()
        marks = ",".join(sql.lit(s) for s in names)
        with self.conn.cursor() as cur:
            self._exec(
                cur,
                f"SELECT topic, kafka_partition, first_offset FROM {self._schema}.{DONE_TABLE} "
                f"WHERE source IN ({marks})",
            )
            rows = cur.fetchall()
        self.conn.commit()
        return {(str(t), int(p), int(o)) for t, p, o in rows}

    def write_watermarks(self, txns: Sequence[SourceTxn]) -> None:
        """Move the position rows to the low watermark ``txns`` (the last transaction of each
        partition's committed prefix) and forget the ``wmb_apply_done`` rows below it, atomically.

        Only the coordinator calls this, so the position row is never a hot row of the workers.
        """
        if not txns:
            return
        try:
            with self.conn.cursor() as cur:
                for t in txns:
                    self._exec(
                        cur,
                        f"DELETE FROM {self._schema}.{DONE_TABLE} WHERE source={sql.lit(t.source)} "
                        f"AND topic={sql.lit(t.topic)} AND kafka_partition={t.partition} "
                        f"AND first_offset < {t.next_offset}",
                    )
            self.write_positions(
                [(t.source, t.topic, t.partition, t.next_offset, t.gtid) for t in txns], commit=False
            )
            self._commit()
        except BaseException:
            self.rollback_quietly()
            raise

    def table_meta(self, database: str, table: str) -> TableMeta:
        key = (database, table)
        meta = self._meta.get(key)
        if meta is None:
            with self.conn.cursor() as cur:
                self._exec(
                    cur,
                    "SELECT INDEX_NAME, COLUMN_NAME FROM information_schema.STATISTICS "
                    f"WHERE TABLE_SCHEMA={sql.lit(database)} AND TABLE_NAME={sql.lit(table)} "
                    "AND NON_UNIQUE=0 AND INDEX_NAME<>'PRIMARY' ORDER BY INDEX_NAME, SEQ_IN_INDEX",
                )
                keys: dict[str, list[str]] = {}
                for index, column in cur.fetchall():
                    keys.setdefault(str(index), []).append(str(column))
            meta = TableMeta({k: tuple(v) for k, v in keys.items()})
            self._meta[key] = meta
        return meta

    def forget_meta(self) -> None:
        self._meta.clear()

    # --- applying ---------------------------------------------------------------------------
    def apply_group(
        self, txns: Sequence[SourceTxn], *, marker_key: str | None = None, done_rows: bool = False
    ) -> GroupStats:
        """Apply whole source transactions + their position rows in ONE replica transaction.

        Parallel apply (``done_rows``): a worker commits groups out of partition order, so instead of
        the position row it writes one ``wmb_apply_done`` row per source transaction; the
        coordinator moves the position row to the low watermark later (:meth:`write_watermarks`).
        ``marker_key`` names the marker row (one per worker: a shared row would be a lock every
        worker transaction holds from its first statement to its commit, i.e. no parallelism).

        Raises :class:`HaltedError` (after a rollback) on a conflict under the halt policy, and
        :class:`ReplicaUnavailable` when the connection breaks (the caller reconnects and
        re-seeks from the position rows: nothing of this group is committed).
        """
        stats = GroupStats()
        conn = self.conn
        try:
            with conn.cursor() as cur:
                last_gtid = next((t.gtid for t in reversed(txns) if t.gtid), None)
                # The loop marker comes first: a capturer sees it before any row of the transaction.
                self._exec(
                    cur,
                    f"INSERT INTO {self._schema}.{MARKER_TABLE} "
                    "(applier, txn_count, last_gtid, updated_at) "
                    f"VALUES ({sql.lit(marker_key or self.settings.dc)}, {len(txns)}, {sql.lit(last_gtid)}, "
                    "UTC_TIMESTAMP(6)) "
                    "ON DUPLICATE KEY UPDATE txn_count=txn_count+VALUES(txn_count), "
                    "last_gtid=VALUES(last_gtid), updated_at=VALUES(updated_at)",
                )
                batch = _Batch()
                for txn in txns:
                    stats.txns += 1
                    stats.max_ts_ms = max(stats.max_ts_ms, txn.ts_ms)
                    for event in txn.events:
                        if event.op not in (Op.INSERT, Op.UPDATE, Op.DELETE):
                            continue
                        key = (event.database, event.table)
                        wanted = self._wants.get(key)
                        if wanted is None:
                            wanted = self._wants[key] = self.settings.wants(*key)
                        if not wanted:
                            continue
                        stats.rows += 1
                        self._apply_row(cur, txn, event, batch, stats)
                self._flush(cur, batch)
                if done_rows:
                    values = ",".join(
                        f"({sql.lit(t.source)},{sql.lit(t.topic)},{t.partition},{t.first_offset})"
                        for t in txns
                    )
                    self._exec(
                        cur,
                        f"INSERT INTO {self._schema}.{DONE_TABLE} "
                        f"(source, topic, kafka_partition, first_offset) VALUES {values}",
                    )
                else:
                    positions = [
                        (t.source, topic, part, t.next_offset, t.gtid)
                        for (topic, part), t in sorted(next_offsets(list(txns)).items())
                    ]
                    self.write_positions(positions, commit=False)
            self._commit()
        except BaseException:
            self.rollback_quietly()
            raise
        return stats

    def _apply_row(self, cur: Any, txn: SourceTxn, ev: ChangeEvent, batch: _Batch, stats: GroupStats) -> None:
        meta = self.table_meta(ev.database, ev.table)
        key = (ev.database, ev.table)
        policy = self._policy.get(key)
        if policy is None:
            policy = self._policy[key] = self.settings.conflict_policy(*key)
        pk = dict(ev.pk)
        fast = bool(pk) and not meta.has_unique_secondary and ev.after is not None
        if ev.op == Op.INSERT and fast:
            batch.add(self, cur, ev)
            return
        if ev.op == Op.UPDATE and fast and policy == ConflictPolicy.OVERWRITE and self._pk_unchanged(ev):
            batch.add(self, cur, ev)  # overwrite: a missing row is simply re-created
            return
        self._flush(cur, batch)
        try:
            if ev.op == Op.INSERT:
                self._insert(cur, txn, ev, meta, policy, stats)
            elif ev.op == Op.UPDATE:
                self._update(cur, txn, ev, meta, policy, stats)
            else:
                self._delete(cur, txn, ev, policy, stats)
        except pymysql.err.MySQLError as exc:
            if is_transient(exc):
                raise ReplicaUnavailable(repr(exc)) from exc
            raise HaltedError(f"replica refused {_describe(txn, ev)}: {exc}") from exc

    def _flush(self, cur: Any, batch: _Batch) -> None:
        if not batch.rows:
            return
        first = batch.first
        assert first is not None
        stmt = sql.upsert_many(first.database, first.table, batch.columns, batch.rows, list(first.pk))
        try:
            self._exec(cur, stmt)
        except pymysql.err.MySQLError as exc:
            raise HaltedError(
                f"replica refused rows of {first.database}.{first.table} (batch): {exc}"
            ) from exc
        batch.clear()

    @staticmethod
    def _pk_unchanged(ev: ChangeEvent) -> bool:
        after = ev.after or {}
        return all(after.get(c) == v for c, v in ev.pk.items())

    def _insert(
        self,
        cur: Any,
        txn: SourceTxn,
        ev: ChangeEvent,
        meta: TableMeta,
        policy: ConflictPolicy,
        stats: GroupStats,
    ) -> None:
        after = dict(ev.after or {})
        pk = {c: after[c] for c in ev.pk} if ev.pk else {}
        if not pk:
            self._exec(cur, sql.insert_one(ev.database, ev.table, after))
            return
        # At most one retry per unique key: each overwrite removes one conflicting row.
        for _ in range(len(meta.unique_keys) + 2):
            try:
                self._exec(cur, sql.insert_one(ev.database, ev.table, after))
                return
            except pymysql.err.IntegrityError as exc:
                key = _dup_key(exc)
                if key is None:
                    raise
                if key == "PRIMARY":
                    # The row is there already (a replay, or an insert over a stale row): make it
                    # equal.  Its unique keys may still clash with other rows: loop via UPDATE.
                    self._update_existing(cur, txn, ev, meta, policy, stats, after, pk)
                    return
                if not self._unique_conflict(cur, txn, ev, meta, policy, stats, key, after, pk):
                    return
        raise HaltedError(f"could not resolve duplicate keys for {_describe(txn, ev)}")

    def _update_existing(
        self,
        cur: Any,
        txn: SourceTxn,
        ev: ChangeEvent,
        meta: TableMeta,
        policy: ConflictPolicy,
        stats: GroupStats,
        after: dict[str, Any],
        pk: dict[str, Any],
    ) -> int:
        """UPDATE by PK; returns matched rows (CLIENT_FOUND_ROWS), resolving unique clashes."""
        for _ in range(len(meta.unique_keys) + 2):
            try:
                return self._exec(cur, sql.update_by_pk(ev.database, ev.table, after, pk))
            except pymysql.err.IntegrityError as exc:
                key = _dup_key(exc)
                if key is None or key == "PRIMARY":
                    raise
                if not self._unique_conflict(cur, txn, ev, meta, policy, stats, key, after, pk):
                    return 1  # skipped: count as handled
        raise HaltedError(f"could not resolve duplicate keys for {_describe(txn, ev)}")

    def _unique_conflict(
        self,
        cur: Any,
        txn: SourceTxn,
        ev: ChangeEvent,
        meta: TableMeta,
        policy: ConflictPolicy,
        stats: GroupStats,
        key: str,
        after: dict[str, Any],
        pk: dict[str, Any],
    ) -> bool:
        """Handle a duplicate on secondary unique key ``key``; True = retry the statement."""
        self._conflict(cur, txn, ev, policy, stats, "duplicate_unique", f"unique key {key}")
        if policy != ConflictPolicy.OVERWRITE:
            return False
        cols = meta.unique_keys.get(key)
        if not cols:
            raise HaltedError(f"duplicate on unknown key {key!r} for {_describe(txn, ev)}")
        # The master's row wins: the replica's other row holding that key is stale (its own
        # delete/update is still to come, or it diverged).
        self._exec(cur, sql.delete_where(ev.database, ev.table, {c: after[c] for c in cols}, pk))
        return True

    def _update(
        self,
        cur: Any,
        txn: SourceTxn,
        ev: ChangeEvent,
        meta: TableMeta,
        policy: ConflictPolicy,
        stats: GroupStats,
    ) -> None:
        after = dict(ev.after or {})
        if not ev.pk:
            matched = self._exec(cur, sql.update_pkless(ev.database, ev.table, after, ev.before or {}))
            if matched == 0:
                self._missing(cur, txn, ev, policy, stats, "update_missing")
            return
        old_pk = dict(ev.pk)
        new_pk = {c: after[c] for c in ev.pk}
        if old_pk != new_pk:
            # PK change: delete the old key, then insert the new row (a replay finds it there).
            deleted = self._exec(cur, sql.delete_by_pk(ev.database, ev.table, old_pk))
            if deleted == 0 and not self._missing(cur, txn, ev, policy, stats, "update_missing"):
                return
            self._insert(cur, txn, ev, meta, policy, stats)
            return
        matched = self._update_existing(cur, txn, ev, meta, policy, stats, after, new_pk)
        if matched == 0 and self._missing(cur, txn, ev, policy, stats, "update_missing"):
            self._insert(cur, txn, ev, meta, policy, stats)

    def _delete(
        self, cur: Any, txn: SourceTxn, ev: ChangeEvent, policy: ConflictPolicy, stats: GroupStats
    ) -> None:
        if ev.pk:
            stmt = sql.delete_by_pk(ev.database, ev.table, ev.pk)
        else:
            stmt = sql.delete_by_pk(ev.database, ev.table, ev.before or {}, pkless=True)
        if self._exec(cur, stmt) == 0:
            self._missing(cur, txn, ev, policy, stats, "delete_missing")

    def _missing(
        self, cur: Any, txn: SourceTxn, ev: ChangeEvent, policy: ConflictPolicy, stats: GroupStats, kind: str
    ) -> bool:
        """The row to update/delete is not there.  True = go on as overwrite (re-create)."""
        self._conflict(cur, txn, ev, policy, stats, kind, "row not found on the replica")
        return policy == ConflictPolicy.OVERWRITE

    def _conflict(
        self,
        cur: Any,
        txn: SourceTxn,
        ev: ChangeEvent,
        policy: ConflictPolicy,
        stats: GroupStats,
        kind: str,
        detail: str,
    ) -> None:
        stats.conflicts[kind] = stats.conflicts.get(kind, 0) + 1
        if policy == ConflictPolicy.HALT:
            raise HaltedError(
                f"conflict {kind} ({detail}) on {_describe(txn, ev)}; policy halt "
                "(set conflicts.per_table to overwrite or skip to go on)"
            )
        _log.warning(
            "apply_conflict",
            kind=kind,
            policy=str(policy),
            source=ev.source,
            gtid=ev.position.gtid,
            table=f"{ev.database}.{ev.table}",
            pk=orjson.dumps(dict(ev.pk), default=jsonable).decode(),
        )
        if policy == ConflictPolicy.SKIP:
            self._exec(
                cur,
                f"INSERT INTO {self._schema}.{CONFLICTS_TABLE} "
                "(recorded_at, source, gtid, txn_id, db, tbl, op, kind, policy, pk, detail, event) VALUES ("
                f"UTC_TIMESTAMP(6), {sql.lit(ev.source)}, {sql.lit(ev.position.gtid)}, {sql.lit(ev.txn.id)}, "
                f"{sql.lit(ev.database)}, {sql.lit(ev.table)}, {sql.lit(str(ev.op))}, {sql.lit(kind)}, "
                f"{sql.lit(str(policy))}, {sql.lit(orjson.dumps(dict(ev.pk), default=jsonable).decode())}, "
                f"{sql.lit(detail)}, {sql.lit(_event_json(ev).decode())})",
            )

    def apply_ddl(self, txn: SourceTxn, policy: DdlPolicy) -> None:
        """Apply (or skip) a DDL transaction, then write its position row in its own transaction.

        MariaDB commits DDL implicitly, so the DDL and the position row cannot be atomic.  Window:
        a crash after the DDL and before the row re-applies the DDL on restart; errors that mean
        "already done" (:data:`TOLERATED_DDL_CODES`) are then logged and ignored, and
        ``IF [NOT] EXISTS`` statements are idempotent by themselves.
        """
        for ev in txn.events:
            if ev.op != Op.DDL or not ev.ddl:
                continue
            if policy == DdlPolicy.HALT:
                raise HaltedError(f"DDL on {_describe(txn, ev)} with ddl policy halt: {ev.ddl[:300]}")
            if policy == DdlPolicy.SKIP:
                _log.info("ddl_skipped", source=ev.source, gtid=ev.position.gtid, ddl=ev.ddl[:200])
                continue
            self.rollback_quietly()
            with self.conn.cursor() as cur:
                if ev.database:
                    try:
                        self._exec(cur, f"USE {sql.qident(ev.database)}")
                    except pymysql.err.MySQLError as exc:
                        if isinstance(exc, pymysql.err.OperationalError) and exc.args[0] == 1049:
                            pass  # the statement itself creates the database or names it in full
                        else:
                            raise
                try:
                    self._exec(cur, mark_ddl(ev.ddl))
                    _log.info("ddl_applied", source=ev.source, gtid=ev.position.gtid, ddl=ev.ddl[:200])
                except pymysql.err.MySQLError as exc:
                    code = exc.args[0] if exc.args else 0
                    if code not in TOLERATED_DDL_CODES:
                        raise HaltedError(f"replica refused DDL of {_describe(txn, ev)}: {exc}") from exc
                    _log.warning("ddl_already_applied", code=code, error=str(exc), ddl=ev.ddl[:200])
                finally:
                    self.forget_meta()
        self.write_positions([(txn.source, txn.topic, txn.partition, txn.next_offset, txn.gtid)])

    def apply_position_only(self, txns: Sequence[SourceTxn]) -> None:
        self.write_positions(
            [
                (t.source, topic, part, t.next_offset, t.gtid)
                for (topic, part), t in next_offsets(list(txns)).items()
            ]
        )


@dataclass(slots=True)
class _Batch:
    """A run of fast-path upserts into one table with one column list."""

    first: ChangeEvent | None = None
    columns: tuple[str, ...] = ()
    rows: list[list[Any]] = field(default_factory=list)

    def add(self, replica: MariaDBReplica, cur: Any, ev: ChangeEvent) -> None:
        after = ev.after or {}
        cols = tuple(after)
        if self.first is not None and (
            self.first.database != ev.database
            or self.first.table != ev.table
            or self.columns != cols
            or len(self.rows) >= _MAX_BATCH_ROWS
        ):
            replica._flush(cur, self)
        if self.first is None:
            self.first, self.columns = ev, cols
        self.rows.append([after[c] for c in cols])

    def clear(self) -> None:
        self.first, self.columns, self.rows = None, (), []


def _dup_key(exc: pymysql.err.IntegrityError) -> str | None:
    if not exc.args or exc.args[0] != 1062:
        return None
    m = _DUP_KEY_RE.search(str(exc.args[1]))
    return m.group(1) if m else None


def _describe(txn: SourceTxn, ev: ChangeEvent) -> str:
    pk = orjson.dumps(dict(ev.pk), default=jsonable).decode()
    return (
        f"event source={ev.source} gtid={ev.position.gtid} txn={ev.txn.id}#{ev.txn.seq} "
        f"table={ev.database}.{ev.table} op={ev.op} pk={pk} (kafka {txn.topic}[{txn.partition}] "
        f"offsets {txn.first_offset}..{txn.last_offset})"
    )
