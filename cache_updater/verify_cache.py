"""``wmb verify --caches``: every cached key against the master's row, rendered the same way.

For each cached table (``refresh`` mode): the master's rows are read with ``SELECT`` (session in
UTC), rendered by :func:`cache_updater.cache.render` into the key and the value the cache would
hold, and compared with Redis:

* ``mismatched`` - the key holds a different value (stale or corrupted);
* ``orphans``    - a live key (not a tombstone) whose row the master does not have;
* ``missing``    - a master row with no key (never changed since the cache started, expired by TTL,
  or evicted): a miss is not wrong for a cache, so it fails the check only with ``strict``.

``invalidate`` tables hold what the application filled; only orphans are checked there.

Run it on a quiet pipeline (or twice): a key updated between the SELECT and the Redis read shows as
a transient difference.  It is also how the residual window after a Redis FLUSHALL is detected:
the versions are gone then, and an old event redelivered after a crash (the only one that can
arrive: offsets are committed after Redis acknowledged) could write an older value until the next
change of that row; verify reports such a key as ``mismatched``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from cache_updater.cache import VERSION_FIELD, make_key, rendered_row
from cache_updater.cache_settings import CacheSettings, TableCache, settings_from_topology
from wmb.values import canonical_float32


@dataclass(slots=True)
class KeyDiff:
    key: str
    table: str
    kind: str  # mismatched | orphan | missing
    expected: dict[str, str | None] | None = None
    actual: dict[str, str | None] | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "table": self.table,
            "kind": self.kind,
            "expected": self.expected,
            "actual": self.actual,
        }


@dataclass(slots=True)
class CacheReport:
    dc: str
    strict: bool = False
    checked_keys: int = 0
    master_rows: int = 0
    diffs: list[KeyDiff] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(1 for d in self.diffs if d.kind == kind)

    @property
    def ok(self) -> bool:
        bad = {"mismatched", "orphan"} | ({"missing"} if self.strict else set())
        return not any(d.kind in bad for d in self.diffs)

    def as_json(self) -> dict[str, Any]:
        return {
            "dc": self.dc,
            "ok": self.ok,
            "checked_keys": self.checked_keys,
            "master_rows": self.master_rows,
            "mismatched": self.count("mismatched"),
            "orphans": self.count("orphan"),
            "missing": self.count("missing"),
            "diffs": [d.as_json() for d in self.diffs],
        }


def format_report(report: CacheReport, limit: int = 50) -> str:
    """A few human lines: the verdict, the counts, then up to ``limit`` differing keys."""
    lines = [
        f"caches in {report.dc}: {'OK' if report.ok else 'MISMATCH'} "
        f"({report.checked_keys} keys, {report.master_rows} master rows; "
        f"mismatched={report.count('mismatched')} orphans={report.count('orphan')} "
        f"missing={report.count('missing')})"
    ]
    shown = [d for d in report.diffs if d.kind != "missing" or report.strict][:limit]
    for d in shown:
        lines.append(f"  {d.kind:10s} {d.key}  ({d.table})  expected={d.expected} actual={d.actual}")
    return "\n".join(lines)


def _pattern(template: str) -> str:
    """``user:{id}`` -> ``user:*`` (SCAN MATCH); glob metacharacters in the literal part escaped."""
    parts = re.split(r"(\{[A-Za-z0-9_$]+\})", template)
    return "".join(
        "*" if p.startswith("{") and p.endswith("}") else re.sub(r"([*?\[\]\\])", r"\\\1", p) for p in parts
    )


def _master_rows(conn: Any, table: str) -> Iterator[dict[str, Any]]:
    db, name = table.split(".", 1)
    with conn.cursor() as cur:
        cur.execute("SET time_zone = '+00:00'")
        cur.execute(
            "SELECT column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position",
            (db, name),
        )
        kinds = [(str(c), str(t).lower()) for c, t in cur.fetchall()]
        # SELECT prints a FLOAT with 6 digits and loses bits; CAST AS DOUBLE gives the exact float32,
        # which canonical_float32 turns into the value the event carried.
        select = ", ".join(f"CAST(`{c}` AS DOUBLE) AS `{c}`" if t == "float" else f"`{c}`" for c, t in kinds)
        floats = {c for c, t in kinds if t == "float"}
        cur.execute(f"SELECT {select} FROM `{db}`.`{name}`")
        cols = [d[0] for d in cur.description]
        for raw in cur.fetchall():
            row = dict(zip(cols, raw, strict=True))
            for c in floats:
                if row[c] is not None:
                    row[c] = canonical_float32(row[c])
            yield row


def _text(v: Any) -> str:
    return v.decode("utf-8", errors="backslashreplace") if isinstance(v, bytes) else str(v)


def _cached_value(client: Any, key: str, table: TableCache) -> dict[str, str | None] | None:
    if table.format == "json":
        raw = client.get(key)
        if raw is None:
            return None
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return {"<not json>": _text(raw)}
        if not isinstance(doc, dict):
            return {"<not an object>": _text(raw)}
        doc.pop(VERSION_FIELD, None)
        return {str(k): (None if v is None else str(v)) for k, v in doc.items()}
    try:
        fields = client.hgetall(key)
    except Exception:  # WRONGTYPE: something else wrote the key
        return {"<not a hash>": _text(client.type(key))}
    if not fields:
        return None
    out: dict[str, str | None] = {_text(k): _text(v) for k, v in fields.items()}
    out.pop(VERSION_FIELD, None)
    return out


def verify_tables(client: Any, master: Any, settings: CacheSettings, strict: bool = False) -> CacheReport:
    """The check itself, on an open Redis client and master connection (pymysql)."""
    report = CacheReport(dc=settings.dc, strict=strict)
    for table_name, caches in settings.tables.items():
        rows = list(_master_rows(master, table_name))
        report.master_rows += len(rows)
        for table in caches:
            _verify_one(client, rows, table, report)
    return report


def _verify_one(client: Any, rows: list[dict[str, Any]], table: TableCache, report: CacheReport) -> None:
    expected: dict[str, dict[str, str | None]] = {}
    for row in rows:
        r = rendered_row(row, table.columns)
        expected[make_key(table, row)] = (
            {k: v for k, v in r.items() if v is not None} if table.format == "hash" else r
        )
    live = set()
    for raw_key in client.scan_iter(match=_pattern(table.key), count=1000):
        key = _text(raw_key)
        if key.endswith(":tomb"):
            continue
        live.add(key)
        report.checked_keys += 1
        if key not in expected:
            report.diffs.append(KeyDiff(key, table.table, "orphan", None, _cached_value(client, key, table)))
            continue
        if table.mode == "invalidate":
            continue
        actual = _cached_value(client, key, table)
        if actual is not None and actual != expected[key]:
            report.diffs.append(KeyDiff(key, table.table, "mismatched", expected[key], actual))
    if table.mode == "refresh":
        for key in expected.keys() - live:
            report.diffs.append(KeyDiff(key, table.table, "missing", expected[key], None))


def verify_caches(topology: Any, dc: str, strict: bool = False) -> CacheReport:
    """Compare every cache of ``dc`` with the master of its source (``wmb verify --caches``)."""
    import pymysql

    from cache_updater.cache import connect

    settings = settings_from_topology(topology, dc)
    client = connect(settings.redis)
    report = CacheReport(dc=dc, strict=strict)
    by_source: dict[str | None, dict[str, tuple[TableCache, ...]]] = {}
    for name, caches in settings.tables.items():
        for t in caches:
            by_source.setdefault(t.source, {}).setdefault(name, ())
            by_source[t.source][name] += (t,)
    try:
        for source_name, tables in by_source.items():
            src = topology.source(source_name) if source_name else next(iter(topology.sources.values()))
            server = topology.server(src.dc, src.server)
            master = pymysql.connect(
                host=server.host,
                port=int(server.port),
                user=server.user,
                password=server.password.get_secret_value(),
                connect_timeout=10,
            )
            try:
                part = verify_tables(client, master, _with_tables(settings, tables), strict)
            finally:
                master.close()
            report.checked_keys += part.checked_keys
            report.master_rows += part.master_rows
            report.diffs += part.diffs
    finally:
        client.close()
    return report


def _with_tables(settings: CacheSettings, tables: Mapping[str, tuple[TableCache, ...]]) -> CacheSettings:
    from dataclasses import replace

    return replace(settings, tables=dict(tables))
