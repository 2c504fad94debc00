"""A stand-in for the capture daemon, for tests and benchmarks of the applier.

:class:`SqlChangeSource` runs transactions on a real master and builds the :class:`ChangeEvent`
objects the capture would emit for them, with exact values read back by ``SELECT`` in a UTC session
(FLOAT through ``CAST(.. AS DOUBLE)`` + :func:`wmb.values.canonical_float32`, as the codec wants).
:func:`produce` writes them to a change topic with :func:`wmb.codec.encode`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pymysql

from cache_updater.applier.sql import lit, qident, qtable, where_pk
from cache_updater.apply_settings import ReplicaConn
from wmb import codec
from wmb.event import ChangeEvent, Op, Position, TxnInfo, Version
from wmb.values import canonical_float32

_INTS = {"tinyint", "smallint", "mediumint", "int", "bigint"}
_TEXT = {"char", "varchar", "tinytext", "text", "mediumtext", "longtext"}
_BLOB = {"varbinary", "tinyblob", "blob", "mediumblob", "longblob"}
_GEO = {"geometry", "point", "linestring", "polygon", "multipoint", "multilinestring", "multipolygon"}


@dataclass(frozen=True, slots=True)
class Raw:
    """An SQL expression as an update value (``Raw("n+1")``)."""

    sql: str


@dataclass(frozen=True, slots=True)
class TableInfo:
    columns: tuple[str, ...]
    tags: Mapping[str, str]
    pk: tuple[str, ...]
    select: str  # the SELECT list that returns canonical values


def type_tag(
    data_type: str, column_type: str, charset: str | None, precision: Any, scale: Any, dt_prec: Any
) -> str:
    """wmb type tag of an information_schema.COLUMNS row (mirrors wmb.values.column_type_tag)."""
    t = data_type.lower()
    if t in _INTS:
        return "uint" if "unsigned" in column_type.lower() else "int"
    if t == "decimal":
        return f"decimal:{precision},{scale}"
    if t in ("float", "double"):
        return t
    if t == "bit":
        return f"bit:{precision}"
    if t in _TEXT:
        return f"text:{charset}"
    if t == "binary":
        return f"binary:{column_type[column_type.index('(') + 1 : -1]}"
    if t in _BLOB:
        return "binary"
    if t in ("enum", "set", "date", "year", "json"):
        return t
    if t in ("datetime", "timestamp", "time"):
        return f"{t}:{dt_prec or 0}"
    if t in _GEO:
        return "geometry"
    raise ValueError(f"no wmb tag for {column_type}")


class SqlChangeSource:
    """Runs transactions on the master and returns the change events they produce."""

    def __init__(self, master: ReplicaConn, source: str = "bj1", origin: str = "bj", epoch: int = 1) -> None:
        self.source, self.origin, self.epoch = source, origin, epoch
        self.conn = pymysql.connect(
            host=master.host,
            port=master.port,
            user=master.user,
            password=master.password,
            charset="utf8mb4",
            autocommit=False,
        )
        with self.conn.cursor() as cur:
            cur.execute("SET SESSION time_zone='+00:00'")
            cur.execute("SELECT @@server_id")
            self.server_id = int(cur.fetchone()[0])  # type: ignore[index]
        self._info: dict[tuple[str, str], TableInfo] = {}
        self._seq = 0

    def close(self) -> None:
        self.conn.close()

    def info(self, db: str, table: str) -> TableInfo:
        key = (db, table)
        if key not in self._info:
            with self.conn.cursor() as cur:
                cur.execute(
                    "SELECT COLUMN_NAME, DATA_TYPE, COLUMN_TYPE, CHARACTER_SET_NAME, NUMERIC_PRECISION, "
                    "NUMERIC_SCALE, DATETIME_PRECISION, COLUMN_KEY FROM information_schema.COLUMNS "
                    "WHERE TABLE_SCHEMA=%s AND TABLE_NAME=%s ORDER BY ORDINAL_POSITION",
                    (db, table),
                )
                rows = cur.fetchall()
                cur.execute(
                    "SELECT COLUMN_NAME FROM information_schema.STATISTICS WHERE TABLE_SCHEMA=%s "
                    "AND TABLE_NAME=%s AND INDEX_NAME='PRIMARY' ORDER BY SEQ_IN_INDEX",
                    (db, table),
                )
                pk = tuple(str(r[0]) for r in cur.fetchall())
            self.conn.commit()
            cols = tuple(str(r[0]) for r in rows)
            tags = {str(r[0]): type_tag(r[1], r[2], r[3], r[4], r[5], r[6]) for r in rows}
            select = ",".join(
                f"CAST({qident(c)} AS DOUBLE)" if tags[c] == "float" else qident(c) for c in cols
            )
            self._info[key] = TableInfo(cols, tags, pk, select)
        return self._info[key]

    def forget(self) -> None:
        self._info.clear()

    def _read(
        self, cur: Any, db: str, table: str, pk: Mapping[str, Any], lock: bool = False
    ) -> dict[str, Any] | None:
        info = self.info(db, table)
        cur.execute(
            f"SELECT {info.select} FROM {qtable(db, table)} WHERE {where_pk(pk)}"
            + (" FOR UPDATE" if lock else "")
        )
        row = cur.fetchone()
        if row is None:
            return None
        out = dict(zip(info.columns, row, strict=True))
        for c in info.columns:
            if info.tags[c] == "float" and out[c] is not None:
                out[c] = canonical_float32(out[c])
        return out

    def txn(self, ops: Sequence[tuple[Any, ...]]) -> list[ChangeEvent]:
        """Run ``ops`` in one master transaction; returns its events (last one has txn.last).

        ops: ``("insert", db, table, row)``, ``("update", db, table, pk, changes)`` (a change value
        may be :class:`Raw`), ``("delete", db, table, pk)``.
        """
        pending: list[tuple[Op, str, str, dict[str, Any], dict[str, Any] | None, dict[str, Any] | None]] = []
        with self.conn.cursor() as cur:
            for op in ops:
                kind, db, table = op[0], op[1], op[2]
                info = self.info(db, table)
                if kind == "insert":
                    row = dict(op[3])
                    cur.execute(
                        f"INSERT INTO {qtable(db, table)} ({','.join(qident(c) for c in row)}) "
                        f"VALUES ({','.join(v.sql if isinstance(v, Raw) else lit(v) for v in row.values())})"
                    )
                    pk = {c: row.get(c, cur.lastrowid) for c in info.pk}
                    after = self._read(cur, db, table, pk)
                    assert after is not None
                    pending.append((Op.INSERT, db, table, {c: after[c] for c in info.pk}, None, after))
                elif kind == "update":
                    pk, changes = dict(op[3]), dict(op[4])
                    before = self._read(cur, db, table, pk, lock=True)
                    if before is None:
                        continue
                    sets = ",".join(
                        f"{qident(c)}={v.sql if isinstance(v, Raw) else lit(v)}" for c, v in changes.items()
                    )
                    cur.execute(f"UPDATE {qtable(db, table)} SET {sets} WHERE {where_pk(pk)}")
                    new_pk = {
                        c: (changes[c] if c in changes and not isinstance(changes[c], Raw) else pk[c])
                        for c in pk
                    }
                    after = self._read(cur, db, table, new_pk)
                    assert after is not None
                    if after == before:
                        continue  # no row change, no binlog row
                    pending.append((Op.UPDATE, db, table, {c: before[c] for c in info.pk}, before, after))
                elif kind == "delete":
                    pk = dict(op[3])
                    before = self._read(cur, db, table, pk, lock=True)
                    if before is None:
                        continue
                    cur.execute(f"DELETE FROM {qtable(db, table)} WHERE {where_pk(pk)}")
                    pending.append((Op.DELETE, db, table, {c: before[c] for c in info.pk}, before, None))
                else:
                    raise ValueError(f"unknown op {kind!r}")
            self.conn.commit()
            cur.execute("SELECT @@last_gtid")
            gtid = str(cur.fetchone()[0])  # type: ignore[index]
        self.conn.commit()
        ts_ms = int(time.time() * 1000)
        seq = int(gtid.rsplit("-", 1)[-1]) if gtid else 0
        events = []
        for i, (op_, db, table, pk, before, after) in enumerate(pending):
            events.append(
                ChangeEvent(
                    source=self.source,
                    origin=self.origin,
                    server_id=self.server_id,
                    op=op_,
                    database=db,
                    table=table,
                    ts_ms=ts_ms,
                    position=Position(gtid, "sim-binlog.000001", 4 + seq),
                    txn=TxnInfo(gtid, i, i == len(pending) - 1),
                    version=Version(self.epoch, seq, i),
                    pk=pk,
                    before=before,
                    after=after,
                    columns=dict(self.info(db, table).tags),
                )
            )
        return events

    def ddl(self, database: str, statement: str) -> list[ChangeEvent]:
        with self.conn.cursor() as cur:
            if database:
                cur.execute(f"USE {qident(database)}")
            cur.execute(statement)
            cur.execute("SELECT @@last_gtid")
            gtid = str(cur.fetchone()[0])  # type: ignore[index]
        self.conn.commit()
        self.forget()
        seq = int(gtid.rsplit("-", 1)[-1])
        return [
            ChangeEvent(
                source=self.source,
                origin=self.origin,
                server_id=self.server_id,
                op=Op.DDL,
                database=database,
                table="",
                ts_ms=int(time.time() * 1000),
                position=Position(gtid, "sim-binlog.000001", 4 + seq),
                txn=TxnInfo(gtid, 0, True),
                version=Version(self.epoch, seq, 0),
                ddl=statement,
            )
        ]


def produce(producer: Any, topic: str, events: Iterable[ChangeEvent], partition: int = 0) -> None:
    """Send events to ``topic[partition]`` (no flush)."""
    for ev in events:
        producer.send(topic, value=codec.encode(ev), key=f"{ev.database}".encode(), partition=partition)


def synthetic_insert_txn(
    source: str, seq: int, db: str, table: str, first_id: int, rows: int, payload: str = "x" * 40
) -> list[ChangeEvent]:
    """One source transaction of ``rows`` inserts into ``(id BIGINT PK, k INT, v VARCHAR, n BIGINT)``."""
    gtid = f"0-1-{seq}"
    tags = {"id": "int", "k": "int", "v": "text:utf8mb4", "n": "int"}
    out = []
    for i in range(rows):
        rid = first_id + i
        out.append(
            ChangeEvent(
                source=source,
                origin="bj",
                server_id=1,
                op=Op.INSERT,
                database=db,
                table=table,
                ts_ms=int(time.time() * 1000),
                position=Position(gtid, "sim-binlog.000001", 4 + seq),
                txn=TxnInfo(gtid, i, i == rows - 1),
                version=Version(1, seq, i),
                pk={"id": rid},
                after={"id": rid, "k": rid % 1000, "v": payload, "n": seq},
                columns=tags,
            )
        )
    return out


def wait_until(
    predicate: Any, timeout_s: float = 120.0, interval_s: float = 0.2, what: str = "condition"
) -> None:
    """Poll ``predicate`` until truthy; AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def topology_yaml(
    *,
    kafka_bootstrap: str,
    master: ReplicaConn,
    replica: ReplicaConn,
    source: str,
    tables: Sequence[str] = ("*.*",),
    conflicts_default: str = "halt",
    per_table: Mapping[str, str] | None = None,
    ddl: str = "apply",
    max_txns: int = 100,
    max_ms: int = 20,
    parallel_workers: int = 0,
) -> str:
    """A two-datacenter topology (bj master -> gz replica) for applier tests."""
    per = "".join(f'\n        "{k}": {v}' for k, v in (per_table or {}).items())
    return f"""
version: 1
datacenters:
  bj:
    kafka: {{bootstrap: "{kafka_bootstrap}"}}
    mysql:
      master:
        {{host: {master.host}, port: {master.port}, user: {master.user}, password: "{master.password}",
          server_id: 1}}
  gz:
    kafka: {{bootstrap: "{kafka_bootstrap}"}}
    mysql:
      replicas:
        gzrep:
          {{host: {replica.host}, port: {replica.port}, user: {replica.user}, password: "{replica.password}",
            server_id: 2}}
sources:
  {source}:
    dc: bj
    server: master
    replication_server_id: 1001
routes:
  - {{from: bj, to: gz}}
replicas:
  - dc: gz
    server: gzrep
    tables: [{", ".join(f'"{t}"' for t in tables)}]
    ddl: {ddl}
    conflicts:
      default: {conflicts_default}
      per_table: {{{per}}}
    group_commit: {{max_txns: {max_txns}, max_ms: {max_ms}}}
    parallel: {{enabled: {"true" if parallel_workers > 1 else "false"}, workers: {max(1, parallel_workers)}}}
"""
