"""``wmb verify``: compare a replica with its master by chunked checksums, then show differing rows.

Each table is cut into chunks of ``chunk_size`` primary keys in PK order, bounds taken from the
master; the first chunk is open below and the last open above, so rows that exist only on the
replica land in some chunk too.  Each chunk's ``COUNT(*)`` and
``BIT_XOR`` of a 64-bit slice of ``MD5(CONCAT_WS('#', every column, NULL markers))`` are computed
independently on both servers (in a ``time_zone='+00:00'`` session, so TIMESTAMPs compare as
stored); only mismatching chunks are fetched whole and compared row by row in Python.
Tables without a primary key are one chunk (and a multiset diff on drill-down).
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
import pymysql

from cache_updater.applier.mariadb import jsonable
from cache_updater.applier.sql import lit, qident, qtable
from cache_updater.apply_settings import ReplicaConn

SYSTEM_SCHEMAS = frozenset({"mysql", "information_schema", "performance_schema", "sys"})


@dataclass(frozen=True, slots=True)
class RowDiff:
    kind: str  # missing_on_replica | extra_on_replica | different
    pk: dict[str, Any]
    columns: tuple[str, ...] = ()  # the differing columns (kind "different")
    master: dict[str, Any] | None = None
    replica: dict[str, Any] | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "pk": self.pk,
            "columns": list(self.columns),
            "master": self.master,
            "replica": self.replica,
        }


@dataclass(slots=True)
class TableReport:
    table: str
    chunks: int = 0
    rows_master: int = 0
    rows_replica: int = 0
    mismatched_chunks: int = 0
    diffs: list[RowDiff] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.mismatched_chunks == 0

    def as_json(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "ok": self.ok,
            "chunks": self.chunks,
            "rows_master": self.rows_master,
            "rows_replica": self.rows_replica,
            "mismatched_chunks": self.mismatched_chunks,
            "error": self.error,
            "diffs": [d.as_json() for d in self.diffs],
        }


@dataclass(slots=True)
class VerifyReport:
    tables: list[TableReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.tables)

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "tables": [t.as_json() for t in self.tables]}


def format_report(report: VerifyReport, as_json: bool = False) -> str:
    """Human text (or JSON) of a report."""
    if as_json:
        return orjson.dumps(report.as_json(), default=jsonable).decode()
    lines: list[str] = []
    for t in report.tables:
        status = "OK" if t.ok else "MISMATCH"
        lines.append(
            f"{status:8} {t.table}: {t.rows_master} rows on master, {t.rows_replica} on replica, "
            f"{t.chunks} chunks, {t.mismatched_chunks} differ" + (f" ({t.error})" if t.error else "")
        )
        for d in t.diffs:
            pk = orjson.dumps(d.pk, default=jsonable).decode()
            if d.kind == "different":
                cols = ", ".join(
                    f"{c}: master={_show(d.master, c)} replica={_show(d.replica, c)}" for c in d.columns
                )
                lines.append(f"    different  pk={pk}  {cols}")
            else:
                lines.append(f"    {d.kind:18} pk={pk}")
    n_bad = sum(not t.ok for t in report.tables)
    lines.append(
        "identical: replica equals master" if report.ok else f"{n_bad} of {len(report.tables)} tables differ"
    )
    return "\n".join(lines)


def _show(row: dict[str, Any] | None, col: str) -> str:
    if row is None:
        return "-"
    text = repr(row.get(col))
    return text if len(text) <= 80 else text[:77] + "..."


@contextmanager
def _connect(c: ReplicaConn) -> Iterator[pymysql.connections.Connection[Any]]:
    conn = pymysql.connect(
        host=c.host, port=c.port, user=c.user, password=c.password, charset="utf8mb4", autocommit=True
    )
    try:
        with conn.cursor() as cur:
            cur.execute("SET SESSION time_zone='+00:00'")
            cur.execute("SET SESSION group_concat_max_len=1048576")
        yield conn
    finally:
        conn.close()


def _query(conn: Any, stmt: str) -> list[tuple[Any, ...]]:
    with conn.cursor() as cur:
        cur.execute(stmt)
        return list(cur.fetchall())


def list_tables(conn: Any, globs: Sequence[str], exclude_schemas: Sequence[str] = ("wmb",)) -> list[str]:
    rows = _query(
        conn,
        "SELECT TABLE_SCHEMA, TABLE_NAME FROM information_schema.TABLES WHERE TABLE_TYPE='BASE TABLE' "
        "ORDER BY TABLE_SCHEMA, TABLE_NAME",
    )
    out = []
    for schema, name in rows:
        if schema in SYSTEM_SCHEMAS or schema in exclude_schemas:
            continue
        full = f"{schema}.{name}"
        if any(fnmatch.fnmatchcase(full, g) for g in globs):
            out.append(full)
    return out


def _columns(conn: Any, db: str, table: str) -> tuple[list[str], list[str]]:
    rows = _query(
        conn,
        "SELECT COLUMN_NAME, COLUMN_KEY FROM information_schema.COLUMNS "
        f"WHERE TABLE_SCHEMA={lit(db)} AND TABLE_NAME={lit(table)} ORDER BY ORDINAL_POSITION",
    )
    cols = [str(r[0]) for r in rows]
    pk_rows = _query(
        conn,
        "SELECT COLUMN_NAME FROM information_schema.STATISTICS "
        f"WHERE TABLE_SCHEMA={lit(db)} AND TABLE_NAME={lit(table)} AND INDEX_NAME='PRIMARY' "
        "ORDER BY SEQ_IN_INDEX",
    )
    return cols, [str(r[0]) for r in pk_rows]


def _row_expr(cols: Sequence[str]) -> str:
    nulls = "CONCAT(" + ",".join(f"ISNULL({qident(c)})" for c in cols) + ")"
    return "CONCAT_WS('#'," + ",".join(qident(c) for c in cols) + "," + nulls + ")"


def _tuple(cols: Sequence[str]) -> str:
    return "(" + ",".join(qident(c) for c in cols) + ")"


def _vals(values: Sequence[Any]) -> str:
    return "(" + ",".join(lit(v) for v in values) + ")"


def _range(pk: Sequence[str], lo: Sequence[Any] | None, hi: Sequence[Any] | None) -> str:
    conds = []
    if lo is not None:
        conds.append(f"{_tuple(pk)} > {_vals(lo)}")
    if hi is not None:
        conds.append(f"{_tuple(pk)} <= {_vals(hi)}")
    return " WHERE " + " AND ".join(conds) if conds else ""


def _checksum(conn: Any, table: str, cols: Sequence[str], where: str) -> tuple[int, int, int]:
    row = _query(
        conn,
        "SELECT COUNT(*), "
        f"COALESCE(BIT_XOR(CAST(CONV(SUBSTRING(MD5({_row_expr(cols)}),1,16),16,10) AS UNSIGNED)),0), "
        f"COALESCE(SUM(CRC32({_row_expr(cols)})),0) FROM {table}{where}",
    )[0]
    return int(row[0]), int(row[1]), int(row[2])


def _fetch(conn: Any, table: str, cols: Sequence[str], where: str, order: str) -> list[dict[str, Any]]:
    sel = ",".join(qident(c) for c in cols)
    return [dict(zip(cols, r, strict=True)) for r in _query(conn, f"SELECT {sel} FROM {table}{where}{order}")]


def _diff_rows(
    pk: Sequence[str], master: list[dict[str, Any]], replica: list[dict[str, Any]], cols: Sequence[str]
) -> list[RowDiff]:
    if not pk:

        def key(r: dict[str, Any]) -> bytes:
            return orjson.dumps([r[c] for c in cols], default=jsonable)

        cm, cr = Counter(key(r) for r in master), Counter(key(r) for r in replica)
        by_key = {key(r): r for r in master + replica}
        diffs = [RowDiff("missing_on_replica", {}, master=by_key[k]) for k in (cm - cr).elements()]
        diffs += [RowDiff("extra_on_replica", {}, replica=by_key[k]) for k in (cr - cm).elements()]
        return diffs
    m = {tuple(r[c] for c in pk): r for r in master}
    r_ = {tuple(r[c] for c in pk): r for r in replica}
    out: list[RowDiff] = []
    for k in sorted(m.keys() | r_.keys(), key=lambda t: orjson.dumps(list(t), default=jsonable)):
        pkd = dict(zip(pk, k, strict=True))
        a, b = m.get(k), r_.get(k)
        if b is None:
            out.append(RowDiff("missing_on_replica", pkd, master=a))
        elif a is None:
            out.append(RowDiff("extra_on_replica", pkd, replica=b))
        else:
            differing = tuple(c for c in cols if a[c] != b.get(c) or type(a[c]) is not type(b.get(c)))
            if differing:
                out.append(RowDiff("different", pkd, differing, master=a, replica=b))
    return out


def verify_table(
    master: Any, replica: Any, full_name: str, chunk_size: int = 1000, max_diffs: int = 100
) -> TableReport:
    """Checksum one ``db.table`` chunk by chunk on both connections; drill into mismatches."""
    db, name = full_name.split(".", 1)
    report = TableReport(full_name)
    table = qtable(db, name)
    cols, pk = _columns(master, db, name)
    rcols, _ = _columns(replica, db, name)
    if not rcols:
        report.error = "table missing on the replica"
        report.mismatched_chunks = 1
        return report
    if rcols != cols:
        report.error = f"columns differ: master {cols} replica {rcols}"
        report.mismatched_chunks = 1
        return report
    order = " ORDER BY " + ",".join(qident(c) for c in pk) if pk else ""
    lo: list[Any] | None = None
    while True:
        hi: list[Any] | None = None
        if pk:
            bound = _query(
                master,
                f"SELECT {','.join(qident(c) for c in pk)} FROM {table}{_range(pk, lo, None)}{order} "
                f"LIMIT 1 OFFSET {chunk_size - 1}",
            )
            hi = list(bound[0]) if bound else None
        where = _range(pk, lo, hi) if pk else ""
        cm, cr = _checksum(master, table, cols, where), _checksum(replica, table, cols, where)
        report.chunks += 1
        report.rows_master += cm[0]
        report.rows_replica += cr[0]
        if cm != cr:
            report.mismatched_chunks += 1
            if len(report.diffs) < max_diffs:
                rows_m = _fetch(master, table, cols, where, order)
                rows_r = _fetch(replica, table, cols, where, order)
                report.diffs.extend(_diff_rows(pk, rows_m, rows_r, cols)[: max_diffs - len(report.diffs)])
        if hi is None:
            break
        lo = hi
    return report


def verify_replica(
    master: ReplicaConn,
    replica: ReplicaConn,
    tables: Sequence[str] = ("*.*",),
    *,
    chunk_size: int = 1000,
    max_diffs: int = 100,
    exclude_schemas: Sequence[str] = ("wmb",),
) -> VerifyReport:
    """Compare every master table matching the ``db.table`` globs with the replica."""
    report = VerifyReport()
    with _connect(master) as m, _connect(replica) as r:
        for full in list_tables(m, tables, exclude_schemas):
            report.tables.append(verify_table(m, r, full, chunk_size, max_diffs))
    return report
