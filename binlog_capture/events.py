"""Complete source transactions -> ChangeEvents, with filtering and masking applied first.

Pure logic (no I/O): :class:`EventBuilder` turns one :class:`binlog_capture.reader.SourceTxn` into
the ordered list of :class:`OutMessage` to produce.  Excluded tables never get here (the reader
skips their table maps), excluded columns are dropped and masked columns rewritten before an event
exists, so nothing filtered can leave the daemon.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from binlog_capture.reader import DdlItem, RowsItem, SourceTxn
from binlog_capture.settings import CaptureSettings
from wmb import values
from wmb.codec import ColumnTags, build_event
from wmb.event import ChangeEvent, Op, Position, TxnInfo, Version
from wmb.topics import is_applier_ddl, is_applier_marker_table

SYSTEM_SCHEMAS = frozenset({"mysql", "information_schema", "performance_schema", "sys"})
MASKED_HASH_TAG = "text:utf8mb4"  # an HMAC-SHA256 hex digest, whatever the column's own type


@dataclass(frozen=True, slots=True)
class OutMessage:
    """One event and, for heartbeats only, the explicit partition it goes to."""

    event: ChangeEvent
    partition: int | None = None


class TableFilter:
    """include/exclude ``db.table`` globs; the heartbeat table of this source always passes."""

    def __init__(self, settings: CaptureSettings) -> None:
        self._include = tuple(settings.include)
        self._exclude = tuple(settings.exclude)
        self._hb = (settings.heartbeat_database, settings.heartbeat_table)
        self._cache: dict[tuple[str, str], bool] = {}

    def __call__(self, db: str, table: str) -> bool:
        key = (db, table)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._decide(db, table)
            if len(self._cache) < 100_000:
                self._cache[key] = hit
        return hit

    def _decide(self, db: str, table: str) -> bool:
        if (db, table) == self._hb or is_applier_marker_table(table):
            return True  # read, never shipped: a heartbeat, or the mark of a wmb applier's write
        if db == self._hb[0] or db in SYSTEM_SCHEMAS:
            return False  # wmb's own bookkeeping schema and the system schemas never replicate
        name = f"{db}.{table}"
        if self._include and not any(fnmatch.fnmatchcase(name, g) for g in self._include):
            return False
        return not any(fnmatch.fnmatchcase(name, g) for g in self._exclude)

    def database_included(self, db: str) -> bool:
        """For DDL: the statement's schema could hold an included table."""
        if db == self._hb[0] or db in SYSTEM_SCHEMAS:
            return False
        if self._include and not any(fnmatch.fnmatchcase(db, g.split(".", 1)[0]) for g in self._include):
            return False
        # Excluded only when a whole-database exclude (``db.*``) covers it.
        return not any(g.endswith(".*") and fnmatch.fnmatchcase(db, g[:-2]) for g in self._exclude)

    def only_schemas(self) -> list[str] | None:
        """Literal databases of the include globs (lets the library skip other schemas), or None."""
        if not self._include:
            return None
        dbs = {g.split(".", 1)[0] for g in self._include}
        if any(any(ch in d for ch in "*?[") for d in dbs):
            return None
        return sorted(dbs | {self._hb[0]})


_IDENT = r"(?:`((?:[^`]|``)+)`|([A-Za-z0-9_$]+))"
_DDL_TABLE_RE = re.compile(
    r"\b(?:TABLE|TABLES|ON|INTO|VIEW)\s+(?:IF\s+(?:NOT\s+)?EXISTS\s+)?"
    + _IDENT
    + r"(?:\s*\.\s*"
    + _IDENT
    + r")?",
    re.IGNORECASE,
)
_DDL_DB_RE = re.compile(
    r"^\s*(?:CREATE|ALTER|DROP)\s+(?:DATABASE|SCHEMA)\s+(?:IF\s+(?:NOT\s+)?EXISTS\s+)?" + _IDENT,
    re.IGNORECASE,
)


def ddl_target(query: str, session_schema: str) -> tuple[str, str]:
    """``(database, table)`` a DDL statement acts on (first table named); the session's default
    schema when the statement does not qualify the name.  Best effort: it only picks the partition
    and the ``table`` field; the statement text travels unchanged."""
    body = _strip_comments(query)
    m = _DDL_DB_RE.match(body)
    if m:
        return _unquote(m.group(1), m.group(2)), ""
    m = _DDL_TABLE_RE.search(body)
    if not m:
        return session_schema, ""
    first = _unquote(m.group(1), m.group(2))
    if m.group(3) or m.group(4):
        return first, _unquote(m.group(3), m.group(4))
    return session_schema, first


def _unquote(quoted: str | None, bare: str | None) -> str:
    return quoted.replace("``", "`") if quoted is not None else (bare or "")


def _strip_comments(query: str) -> str:
    return re.sub(r"/\*.*?\*/", " ", query, flags=re.DOTALL)


def canonical_bytes(tag: str, value: Any) -> bytes:
    """What a mask hashes: raw bytes for binary values, UTF-8 for text, else the JSON form."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return orjson.dumps(values.to_json(tag, value))


Norm = Callable[[Any, str | None], Any]
_Draft = tuple[
    Op, str, str, dict[str, Any], dict[str, Any] | None, dict[str, Any] | None, dict[str, str], str | None
]


@dataclass(slots=True)
class _TablePlan:
    """Per table map (cached on the Column list): tags, normalizers, dropped and masked columns."""

    tags: ColumnTags
    norms: list[tuple[str, Norm]]
    masks: dict[str, str]
    pk_names: list[str]
    #: no column dropped: an image starts as a copy of the library's row dict (same keys, same
    #: table order), and only ``special`` (the normalizers that are not the identity) run per row
    whole: bool = False
    ncols: int = 0
    special: list[tuple[str, Norm]] | None = None


class EventBuilder:
    def __init__(self, settings: CaptureSettings) -> None:
        self.s = settings
        self.filter = TableFilter(settings)
        self._plans: dict[int, tuple[Sequence[Any], _TablePlan]] = {}
        self._mask_key = settings.mask_key.encode()

    # -- per table ---------------------------------------------------------------------------------
    def _plan(self, item: RowsItem) -> _TablePlan:
        # The table map cache shares one Column list per distinct table map, so its identity is a
        # cheap key; the stored reference keeps the id from being reused.
        key = id(item.columns)
        hit = self._plans.get(key)
        if hit is not None and hit[0] is item.columns:
            return hit[1]
        tags_all = values.column_tags(item.columns)
        prefix = f"{item.schema}.{item.table}."
        drop = {
            name
            for name in tags_all
            if any(fnmatch.fnmatchcase(prefix + name, g) for g in self.s.exclude_columns)
        }
        masks: dict[str, str] = {}
        kind: str
        for pattern, kind in self.s.mask_columns.items():
            for name in tags_all:
                if name not in drop and fnmatch.fnmatchcase(prefix + name, pattern):
                    masks[name] = kind
        tags = {n: t for n, t in tags_all.items() if n not in drop}
        for name, kind in masks.items():
            if kind == "hash":
                tags[name] = MASKED_HASH_TAG
        # column_normalizer, not normalizer(tag): a SET column's needs the member list.
        by_name = {c.name: values.column_normalizer(c)[1] for c in item.columns}
        norms = [(n, by_name[n]) for n in tags]
        pk = [c.name for c in item.columns if c.is_primary and c.name in tags] or list(tags)
        plan = _TablePlan(
            ColumnTags(tags),
            norms,
            masks,
            pk,
            whole=not drop and len(tags_all) == len(item.columns),
            ncols=len(item.columns),
            special=[(n, f) for n, f in norms if f is not values.passthrough],
        )
        if len(self._plans) > 10_000:
            self._plans.clear()
        self._plans[key] = (item.columns, plan)
        return plan

    def _image(
        self, plan: _TablePlan, vals: Mapping[str, Any], nones: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        out: dict[str, Any]
        nones = nones or {}
        if plan.whole and len(vals) == plan.ncols:
            # The library fills a row dict from the same Column list, in order: copying it is the
            # image (order included); the identity normalizers need no call.
            out = dict(vals)
            for name, norm in plan.special or ():
                v = out[name]
                out[name] = norm(v, nones.get(name) if v is None else None)
        else:
            out = {}
            for name, norm in plan.norms:
                v = vals[name]
                out[name] = norm(v, nones.get(name) if v is None else None)
        if plan.masks:
            for name, kind in plan.masks.items():
                v = out[name]
                if kind == "null" or v is None:
                    out[name] = None
                else:
                    msg = canonical_bytes(plan.tags.get(name, ""), v)
                    out[name] = hmac.new(self._mask_key, msg, hashlib.sha256).hexdigest()
        return out

    # -- per transaction ---------------------------------------------------------------------------
    def build(self, txn: SourceTxn, server_id: int) -> list[OutMessage]:
        s = self.s
        pos = Position(gtid=txn.gtid, file=txn.file, pos=txn.pos)
        seq = _gtid_seq(txn)
        ts_ms = txn.ts_s * 1000
        # (op, database, table, pk, before, after, columns, ddl)
        drafts: list[_Draft] = []
        heartbeat_ts: int | None = None
        if any(not isinstance(i, DdlItem) and is_applier_marker_table(i.table) for i in txn.items):
            # Written by a wmb applier (a replica fed by wmb, now captured after a failover or in a
            # two-way setup): shipping it would send the change back where it came from.
            return []
        for item in txn.items:
            if isinstance(item, DdlItem):
                if is_applier_ddl(item.query):
                    continue
                db, table = ddl_target(item.query, item.schema)
                if self.filter.database_included(db) and (not table or self.filter(db, table)):
                    drafts.append((Op.DDL, db, table, {}, None, None, {}, item.query))
                continue
            if (item.schema, item.table) == (s.heartbeat_database, s.heartbeat_table):
                for row in item.rows:
                    img = row.get("after_values") or row.get("values") or {}
                    if img.get("source") == s.source and img.get("ts_ms") is not None:
                        heartbeat_ts = int(img["ts_ms"])
                continue
            if not self.filter(item.schema, item.table):
                continue
            plan = self._plan(item)
            image = self._image
            op, db, table, tags, pk_names = item.op, item.schema, item.table, plan.tags, plan.pk_names
            for row in item.rows:
                if op is Op.INSERT:
                    before, after = None, image(plan, row["values"], row.get("none_sources"))
                    key_img = after
                elif op is Op.UPDATE:
                    before = image(plan, row["before_values"], row.get("before_none_sources"))
                    after = image(plan, row["after_values"], row.get("after_none_sources"))
                    key_img = before
                else:
                    before, after = image(plan, row["values"], row.get("none_sources")), None
                    key_img = before
                pk = {n: key_img[n] for n in pk_names}
                drafts.append((op, db, table, pk, before, after, tags, None))
        out: list[OutMessage] = []
        last = len(drafts) - 1
        source, origin, epoch, txn_id = s.source, s.origin_dc, s.epoch, txn.txn_id
        gtid, file, offset = txn.gtid, txn.file, txn.pos
        for i, (op, db, table, pk, before, after, columns, ddl) in enumerate(drafts):
            ev = build_event(
                source,
                origin,
                server_id,
                op,
                db,
                table,
                ts_ms,
                gtid,
                file,
                offset,
                txn_id,
                i,
                i == last,
                epoch,
                seq,
                i,
                pk,
                before,
                after,
                columns,
                ddl,
            )
            out.append(OutMessage(ev))
        if heartbeat_ts is not None and not out:
            # One heartbeat per partition so that every partition shows progress.  Each is the
            # whole transaction as far as its partition is concerned (last=True); seq = partition
            # keeps the event ids unique.
            for p in range(self.partitions):
                out.append(
                    OutMessage(
                        ChangeEvent(
                            source=s.source,
                            origin=s.origin_dc,
                            server_id=server_id,
                            op=Op.HEARTBEAT,
                            database=s.heartbeat_database,
                            table=s.heartbeat_table,
                            ts_ms=heartbeat_ts,
                            position=pos,
                            txn=TxnInfo(id=txn.txn_id, seq=p, last=True),
                            version=Version(s.epoch, seq, p),
                        ),
                        partition=p,
                    )
                )
        return out

    partitions: int = 1


def _gtid_seq(txn: SourceTxn) -> int:
    if txn.gtid:
        tail = txn.gtid.rsplit("-", 1)[-1] if "-" in txn.gtid else txn.gtid.rsplit(":", 1)[-1]
        try:
            return int(tail)
        except ValueError:
            pass
    return txn.pos  # without GTIDs the binlog offset still grows within one file
