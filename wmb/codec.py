"""The versioned JSON envelope of a :class:`~wmb.event.ChangeEvent` (``docs/event-format.md``).

``encode`` is on the capture hot path (one call per row), so it builds one dict and lets orjson write
it; per-column work is a cached lookup of the tag's converter, skipped for the values orjson already
writes exactly (ints, floats, strings, None).  ``decode`` is the trust boundary of every consumer: it
checks everything and raises :class:`~wmb.errors.DecodeError` with a reason a human can act on,
because that reason is what lands in the dead-letter topic.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import operator
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from functools import lru_cache
from typing import Any, Literal

import orjson

from wmb.errors import DecodeError
from wmb.event import ENVELOPE_VERSION, ChangeEvent, Op, Position, TxnInfo, Version
from wmb.values import is_valid_tag, json_codec, split_tag

Ordering = Literal["database", "table", "row"]
ORDERINGS: tuple[Ordering, ...] = ("database", "table", "row")

# Kafka header names.  Headers repeat a few envelope fields so that a router, the DLQ tool or a
# loop guard can act without parsing the value.
HEADER_VERSION = "wmb-v"
HEADER_ORIGIN = "wmb-origin"
HEADER_SOURCE = "wmb-source"
HEADER_OP = "wmb-op"
HEADER_ID = "wmb-id"
HEADER_ROUTE = "wmb-route"  # datacenters visited, comma separated, appended by each relay hop

_OPS = {op.value: op for op in Op}


# --------------------------------------------------------------------------------------------------
# Encode


# Value types orjson writes exactly as wmb's JSON form whatever the tag: ints (up to 64 bits), floats
# (shortest round-trip repr), naive datetimes/dates (ISO 8601, same text as ``isoformat()``).
_NATIVE = frozenset({int, float, type(None), dt.datetime, dt.date})


def _image_to_json(image: Mapping[str, Any], columns: Mapping[str, str], what: str) -> dict[str, Any]:
    if not columns.keys() >= image.keys():
        missing = sorted(set(image) - set(columns))
        raise ValueError(f"{what}.{missing[0]}: column has no type tag in event.columns")
    out: dict[str, Any] = {}
    # Dispatch on the value's type first: only strings (SET) and bytes (BIT vs binary) need the tag.
    for name, value in image.items():
        kind = type(value)
        if kind in _NATIVE:
            out[name] = value
        elif kind is str:
            out[name] = value if columns[name] != "set" else (value.split(",") if value else [])
        elif kind is Decimal:
            out[name] = str(value)
        else:
            encoder = json_codec(columns[name])[0]
            out[name] = value if encoder is None else encoder(value)
    return out


def _doc(event: ChangeEvent, pk: Any, before: Any, after: Any, columns: Any) -> dict[str, Any]:
    """The envelope's fields in their wire order, around images and columns already in JSON form."""
    pos = event.position
    txn = event.txn
    ver = event.version
    return {
        "v": event.v,
        "id": f"{event.source}:{txn.id}:{txn.seq}",
        "origin": event.origin,
        "source": event.source,
        "server_id": event.server_id,
        "gtid": pos.gtid,
        "file": pos.file,
        "pos": pos.pos,
        "db": event.database,
        "table": event.table,
        "op": event.op.value,
        "ts_ms": event.ts_ms,
        "txn": {"id": txn.id, "seq": txn.seq, "last": txn.last},
        "pk": pk,
        "before": before,
        "after": after,
        "version": [ver.epoch, ver.seq, ver.row],
        "columns": columns,
        "ddl": event.ddl,
    }


def envelope(event: ChangeEvent, *, copy_columns: bool = True) -> dict[str, Any]:
    """The envelope as a JSON-able dict (what :func:`encode` serializes)."""
    columns = event.columns
    return _doc(
        event,
        _image_to_json(event.pk, columns, "pk"),
        None if event.before is None else _image_to_json(event.before, columns, "before"),
        None if event.after is None else _image_to_json(event.after, columns, "after"),
        dict(columns) if copy_columns else None,
    )


def encode(event: ChangeEvent) -> bytes:
    """Serialize one event to its envelope bytes (UTF-8 JSON, keys in a fixed order)."""
    columns = event.columns
    if type(columns) is ColumnTags and columns._json is not None:
        return _encode_tagged(event, columns, columns._json)
    return orjson.dumps(envelope(event))


# Tags whose canonical values orjson writes as wmb's JSON form with no per-column help: the exact
# types of _NATIVE, str (never a SET here), and Decimal (str(value), in the ``default`` hook below).
_PLAIN_BASES = frozenset(
    {
        "int",
        "uint",
        "year",
        "float",
        "double",
        "text",
        "enum",
        "json",
        "decimal",
        "date",
        "datetime",
        "timestamp",
    }
)


class ColumnTags(dict[str, str]):
    """A ``columns`` map (``{column: tag}``, table order) that carries its own encoding.

    The capture builds one per table map and shares it across all events of that table, so
    :func:`encode` takes the ``columns`` JSON pre-serialized from here and, for tables of plain
    types only (no SET, BIT, binary, geometry or TIME column), lets orjson write the images
    directly instead of converting them value by value.  The output is byte-for-byte what
    :func:`envelope` gives; any mutation drops the cache (the next encode takes the generic path).
    """

    _json: orjson.Fragment | None = None
    _plain: bool = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._json = orjson.Fragment(orjson.dumps(dict(self)))
        try:
            self._plain = all(split_tag(tag)[0] in _PLAIN_BASES for tag in self.values())
        except (ValueError, TypeError):
            self._plain = False

    def _invalidate(self) -> None:
        self._json = None
        self._plain = False

    def __setitem__(self, key: str, value: str) -> None:
        self._invalidate()
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self._invalidate()
        super().__delitem__(key)

    def __ior__(self, other: Any) -> ColumnTags:  # type: ignore[override,misc]
        self._invalidate()
        super().__ior__(other)
        return self

    def clear(self) -> None:
        self._invalidate()
        super().clear()

    def pop(self, *args: Any) -> Any:
        self._invalidate()
        return super().pop(*args)

    def popitem(self) -> tuple[str, str]:
        self._invalidate()
        return super().popitem()

    def setdefault(self, key: str, default: str = "") -> str:
        self._invalidate()
        return super().setdefault(key, default)

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._invalidate()
        super().update(*args, **kwargs)


class _NotPlain(TypeError):
    pass


def _plain_default(value: Any) -> Any:
    if type(value) is Decimal:
        return str(value)
    raise _NotPlain  # anything else: the generic path decides (converts or refuses)


_PLAIN_OPTS = orjson.OPT_PASSTHROUGH_SUBCLASS  # str/int/dict subclasses go to the generic path too


def _encode_tagged(event: ChangeEvent, columns: ColumnTags, columns_json: orjson.Fragment) -> bytes:
    pk, before, after = event.pk, event.before, event.after
    if columns._plain:
        keys = columns.keys()
        if (
            type(pk) is dict
            and keys >= pk.keys()
            and (before is None or (type(before) is dict and keys >= before.keys()))
            and (after is None or (type(after) is dict and keys >= after.keys()))
        ):
            doc = _doc(event, pk, before, after, columns_json)
            try:
                return orjson.dumps(doc, default=_plain_default, option=_PLAIN_OPTS)
            except orjson.JSONEncodeError:
                pass
        return orjson.dumps(envelope(event))  # the same bytes, or the error that names the column
    doc = envelope_with_columns(event, columns_json)
    return orjson.dumps(doc)


def envelope_with_columns(event: ChangeEvent, columns_json: Any) -> dict[str, Any]:
    """:func:`envelope` with ``columns`` already in its JSON form (an ``orjson.Fragment``)."""
    doc = envelope(event, copy_columns=False)
    doc["columns"] = columns_json
    return doc


# --------------------------------------------------------------------------------------------------
# Decode


def _field(
    doc: Mapping[str, Any], name: str, kind: type | tuple[type, ...], *, nullable: bool = False
) -> Any:
    if name not in doc:
        raise DecodeError(f"missing field {name!r}")
    value = doc[name]
    if value is None and nullable:
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DecodeError(f"field {name!r} must be {want}{' or null' if nullable else ''}, got {value!r:.80}")
    return value


def _nonneg(doc: Mapping[str, Any], name: str) -> int:
    value: int = _field(doc, name, int)
    if value < 0:
        raise DecodeError(f"field {name!r} must be >= 0, got {value}")
    return value


# Per-column decoder: (JSON type whose values already are the canonical value, or None; from_json;
# tag).  A value of that exact type is kept as is (orjson never returns subclasses, and ``type(x) is
# int`` is False for JSON true); anything else goes through from_json, which converts or refuses.
# float/double: a JSON float is the canonical value, a JSON integer becomes float(v) in from_json.
_Decoder = tuple[type | None, Callable[[Any], Any], str]
_SAME: dict[str, type] = {
    "int": int,
    "uint": int,
    "year": int,
    "text": str,
    "enum": str,
    "json": str,
    "float": float,
    "double": float,
}


@lru_cache(maxsize=4096)
def _decoder(tag: str) -> _Decoder:
    return _SAME.get(split_tag(tag)[0]), json_codec(tag)[1], tag


class _ColumnsPlan:
    """The validated ``columns`` map of one table and each column's decoder, built once per map.

    Every event of a table repeats the same ``columns``: validating its tags and looking up the
    decoders per event was most of decode's time.  Plans are cached per (db, table) and reused while
    an event's ``columns`` equals the cached one (a dict compare, no allocation).
    """

    __slots__ = ("columns", "decoders")

    def __init__(self, columns: dict[str, Any]) -> None:
        for name, tag in columns.items():
            if not is_valid_tag(tag):
                raise DecodeError(f"columns.{name}: bad type tag {tag!r}")
        self.columns = dict(columns)
        self.decoders: dict[str, _Decoder] = {name: _decoder(tag) for name, tag in columns.items()}


_PLANS: dict[tuple[str, str], _ColumnsPlan] = {}
_PLANS_MAX = 4096


def _columns_plan(db: str, table: str, columns: dict[str, Any]) -> _ColumnsPlan:
    key = (db, table)
    found = _PLANS.get(key)
    if found is not None and found.columns == columns:
        return found
    built = _ColumnsPlan(columns)  # raises DecodeError on a bad tag: nothing cached then
    if len(_PLANS) >= _PLANS_MAX:
        _PLANS.clear()  # a cache, not a registry: thousands of tables just rebuild their plans
    _PLANS[key] = built
    return built


def _convert_image(raw: dict[str, Any], decoders: Mapping[str, _Decoder], what: str) -> dict[str, Any]:
    """Turn one image's JSON values into canonical values, in place (``raw`` is ours: orjson's).

    Only values are replaced, never keys, so changing the dict while iterating it is safe.
    """
    for name, value in raw.items():
        decoder = decoders.get(name)
        if decoder is None:
            raise DecodeError(f"{what}.{name}: column missing from 'columns'")
        if value is None or type(value) is decoder[0]:
            continue
        try:
            raw[name] = decoder[1](value)
        except ValueError as exc:
            raise DecodeError(f"{what}.{name} ({decoder[2]}): {exc}") from None
    return raw


def _image_from_json(raw: Any, columns: Mapping[str, str], what: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise DecodeError(f"field {what!r} must be an object, got {raw!r:.80}")
    out: dict[str, Any] = {}
    for name, value in raw.items():
        tag = columns.get(name)
        if tag is None:
            raise DecodeError(f"{what}.{name}: column missing from 'columns'")
        if value is None:
            out[name] = None
            continue
        same, from_json, _ = _decoder(tag)
        if type(value) is same:
            out[name] = value
            continue
        try:
            out[name] = from_json(value)
        except ValueError as exc:
            raise DecodeError(f"{what}.{name} ({tag}): {exc}") from None
    return out


# Frozen slotted dataclasses set each field in ``__init__`` through ``object.__setattr__`` plus
# default handling; setting the slots directly through their descriptors halves the cost of building
# an event.  Only valid while the classes have exactly these fields, in this order: checked at import,
# and on any drift (a new field in wmb.event) decode uses the real constructors instead.
_EVENT_FIELDS = (
    "source",
    "origin",
    "server_id",
    "op",
    "database",
    "table",
    "ts_ms",
    "position",
    "txn",
    "version",
    "pk",
    "before",
    "after",
    "columns",
    "ddl",
    "v",
)
_SLOT_LAYOUTS: tuple[tuple[type, tuple[str, ...]], ...] = (
    (ChangeEvent, _EVENT_FIELDS),
    (Position, ("gtid", "file", "pos")),
    (TxnInfo, ("id", "seq", "last")),
    (Version, ("epoch", "seq", "row")),
)
_FAST_BUILD = all(
    tuple(f.name for f in dataclasses.fields(cls)) == names
    and tuple(getattr(cls, "__slots__", ())) == names
    and not hasattr(cls, "__post_init__")
    for cls, names in _SLOT_LAYOUTS
)
_new = object.__new__
(
    _ev_source,
    _ev_origin,
    _ev_server_id,
    _ev_op,
    _ev_database,
    _ev_table,
    _ev_ts_ms,
    _ev_position,
    _ev_txn,
    _ev_version,
    _ev_pk,
    _ev_before,
    _ev_after,
    _ev_columns,
    _ev_ddl,
    _ev_v,
) = (getattr(ChangeEvent, name).__set__ for name in _EVENT_FIELDS)
_pos_gtid, _pos_file, _pos_pos = (getattr(Position, n).__set__ for n in ("gtid", "file", "pos"))
_txn_id, _txn_seq, _txn_last = (getattr(TxnInfo, n).__set__ for n in ("id", "seq", "last"))
_ver_epoch, _ver_seq, _ver_row = (getattr(Version, n).__set__ for n in ("epoch", "seq", "row"))


def _build_event(
    source: str,
    origin: str,
    server_id: int,
    op: Op,
    db: str,
    table: str,
    ts_ms: int,
    gtid: str | None,
    file: str,
    pos: int,
    txn_id: str,
    txn_seq: int,
    txn_last: bool,
    epoch: int,
    seq: int,
    row: int,
    pk: dict[str, Any],
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    columns: dict[str, str],
    ddl: str | None,
) -> ChangeEvent:
    if not _FAST_BUILD:
        return ChangeEvent(
            source=source,
            origin=origin,
            server_id=server_id,
            op=op,
            database=db,
            table=table,
            ts_ms=ts_ms,
            position=Position(gtid=gtid, file=file, pos=pos),
            txn=TxnInfo(id=txn_id, seq=txn_seq, last=txn_last),
            version=Version(epoch, seq, row),
            pk=pk,
            before=before,
            after=after,
            columns=columns,
            ddl=ddl,
            v=ENVELOPE_VERSION,
        )
    position = _new(Position)
    _pos_gtid(position, gtid)
    _pos_file(position, file)
    _pos_pos(position, pos)
    txn = _new(TxnInfo)
    _txn_id(txn, txn_id)
    _txn_seq(txn, txn_seq)
    _txn_last(txn, txn_last)
    version = _new(Version)
    _ver_epoch(version, epoch)
    _ver_seq(version, seq)
    _ver_row(version, row)
    event: ChangeEvent = _new(ChangeEvent)
    _ev_source(event, source)
    _ev_origin(event, origin)
    _ev_server_id(event, server_id)
    _ev_op(event, op)
    _ev_database(event, db)
    _ev_table(event, table)
    _ev_ts_ms(event, ts_ms)
    _ev_position(event, position)
    _ev_txn(event, txn)
    _ev_version(event, version)
    _ev_pk(event, pk)
    _ev_before(event, before)
    _ev_after(event, after)
    _ev_columns(event, columns)
    _ev_ddl(event, ddl)
    _ev_v(event, ENVELOPE_VERSION)
    return event


build_event = _build_event  # the capture builds its events with it too


# The envelope fields decode reads, fetched in one C call (KeyError when one is absent).
_ENVELOPE_FIELDS = operator.itemgetter(
    "id",
    "origin",
    "source",
    "server_id",
    "gtid",
    "file",
    "pos",
    "db",
    "table",
    "op",
    "ts_ms",
    "txn",
    "pk",
    "before",
    "after",
    "version",
    "columns",
    "ddl",
)
_TXN_FIELDS = operator.itemgetter("id", "seq", "last")

# The image shape each op requires: (before present, after present); None = either.
_SHAPES: dict[Op, tuple[bool, bool] | None] = {
    Op.INSERT: (False, True),
    Op.UPDATE: (True, True),
    Op.DELETE: (True, False),
    Op.DDL: None,
    Op.HEARTBEAT: None,
}


def _decode_fast(doc: dict[str, Any]) -> ChangeEvent | None:
    """Decode a well-formed envelope; None when any envelope field looks wrong.

    Every check here is a cheap exact-type test on orjson's output (never a subclass, so ``type(x)
    is int`` also refuses JSON true).  On None the caller re-runs the field-by-field checks of
    :func:`_decode_checked`, which name the problem; nothing is mutated before the last envelope
    check, so that re-run sees the document as it came.  Image values are the exception: their
    errors are raised here, with the same messages and in the same order as the checked path.
    """
    try:
        (
            event_id,
            origin,
            source,
            server_id,
            gtid,
            file,
            pos,
            db,
            table,
            op_text,
            ts_ms,
            txn,
            pk,
            before,
            after,
            ver,
            columns,
            ddl,
        ) = _ENVELOPE_FIELDS(doc)
    except KeyError:
        return None
    op = _OPS.get(op_text) if type(op_text) is str else None
    if not (
        type(columns) is dict
        and type(db) is str
        and type(table) is str
        and op is not None
        and type(txn) is dict
        and type(ver) is list
        and len(ver) == 3
        and type(pk) is dict
        and (before is None or type(before) is dict)
        and (after is None or type(after) is dict)
        and (ddl is None or type(ddl) is str)
        and (gtid is None or type(gtid) is str)
        and type(source) is str
        and type(origin) is str
        and type(file) is str
        and type(event_id) is str
        and type(server_id) is int
        and type(ts_ms) is int
        and type(pos) is int
        and server_id >= 0
        and ts_ms >= 0
        and pos >= 0
    ):
        return None
    try:
        txn_id, txn_seq, txn_last = _TXN_FIELDS(txn)
    except KeyError:
        return None
    epoch, seq, row = ver
    if not (
        type(txn_id) is str
        and type(txn_seq) is int
        and txn_seq >= 0
        and type(txn_last) is bool
        and type(epoch) is int
        and type(seq) is int
        and type(row) is int
        and epoch >= 0
        and seq >= 0
        and row >= 0
    ):
        return None
    shape = _SHAPES[op]
    if shape is not None and shape != (before is not None, after is not None):
        return None
    if op is Op.DDL and ddl is None:
        return None
    if event_id != f"{source}:{txn_id}:{txn_seq}":
        return None
    try:
        plan = _columns_plan(db, table, columns)
    except DecodeError:
        return None  # the checked path names the bad tag
    decoders = plan.decoders
    if before is not None:
        _convert_image(before, decoders, "before")
    if after is not None:
        _convert_image(after, decoders, "after")
    if pk:
        _convert_image(pk, decoders, "pk")
    return _build_event(
        source,
        origin,
        server_id,
        op,
        db,
        table,
        ts_ms,
        gtid,
        file,
        pos,
        txn_id,
        txn_seq,
        txn_last,
        epoch,
        seq,
        row,
        pk,
        before,
        after,
        columns,
        ddl,
    )


def decode(data: bytes | bytearray | memoryview | str) -> ChangeEvent:
    """Rebuild a ChangeEvent from envelope bytes; :class:`DecodeError` says why it cannot."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"not JSON: {exc}") from None
    if type(doc) is dict and doc.get("v") == ENVELOPE_VERSION and type(doc.get("v")) is int:
        event = _decode_fast(doc)
        if event is not None:
            return event
    return _decode_checked(doc)


def _decode_checked(doc: Any) -> ChangeEvent:
    """The field-by-field decode: slower, and its :class:`DecodeError` names the first problem."""
    if not isinstance(doc, dict):
        raise DecodeError(f"envelope must be a JSON object, got {type(doc).__name__}")
    version = doc.get("v")
    if version != ENVELOPE_VERSION or isinstance(version, bool):
        raise DecodeError(
            f"unsupported envelope version v={version!r} (this build reads v={ENVELOPE_VERSION})"
        )

    columns_raw = _field(doc, "columns", dict)
    for name, tag in columns_raw.items():
        if not is_valid_tag(tag):
            raise DecodeError(f"columns.{name}: bad type tag {tag!r}")
    columns: dict[str, str] = columns_raw

    op_text = _field(doc, "op", str)
    op = _OPS.get(op_text)
    if op is None:
        raise DecodeError(f"field 'op' must be one of {sorted(_OPS)}, got {op_text!r}")

    txn_raw = _field(doc, "txn", dict)
    txn = TxnInfo(
        id=_field(txn_raw, "id", str), seq=_nonneg(txn_raw, "seq"), last=_field(txn_raw, "last", bool)
    )

    ver_raw = _field(doc, "version", list)
    if len(ver_raw) != 3 or not all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in ver_raw
    ):
        raise DecodeError(f"field 'version' must be [epoch, seq, row] of ints >= 0, got {ver_raw!r:.80}")

    before_raw = _field(doc, "before", dict, nullable=True)
    after_raw = _field(doc, "after", dict, nullable=True)
    before = None if before_raw is None else _image_from_json(before_raw, columns, "before")
    after = None if after_raw is None else _image_from_json(after_raw, columns, "after")
    ddl = _field(doc, "ddl", str, nullable=True)
    if op == Op.INSERT and (after is None or before is not None):
        raise DecodeError("an insert needs 'after' and no 'before'")
    if op == Op.UPDATE and (after is None or before is None):
        raise DecodeError("an update needs 'before' and 'after'")
    if op == Op.DELETE and (before is None or after is not None):
        raise DecodeError("a delete needs 'before' and no 'after'")
    if op == Op.DDL and ddl is None:
        raise DecodeError("a ddl event needs 'ddl'")

    event = ChangeEvent(
        source=_field(doc, "source", str),
        origin=_field(doc, "origin", str),
        server_id=_nonneg(doc, "server_id"),
        op=op,
        database=_field(doc, "db", str),
        table=_field(doc, "table", str),
        ts_ms=_nonneg(doc, "ts_ms"),
        position=Position(
            gtid=_field(doc, "gtid", str, nullable=True),
            file=_field(doc, "file", str),
            pos=_nonneg(doc, "pos"),
        ),
        txn=txn,
        version=Version(*ver_raw),
        pk=_image_from_json(_field(doc, "pk", dict), columns, "pk"),
        before=before,
        after=after,
        columns=columns,
        ddl=ddl,
        v=ENVELOPE_VERSION,
    )
    event_id = _field(doc, "id", str)
    if event_id != event.id:
        raise DecodeError(f"field 'id' {event_id!r} does not match source:txn.id:txn.seq {event.id!r}")
    return event


# --------------------------------------------------------------------------------------------------
# Kafka key and headers


def pk_key(event: ChangeEvent) -> bytes:
    """Canonical bytes of the primary key: the JSON list of its values in key-column order.

    The same row gives the same bytes at every stage, because the values are the canonical ones
    (``wmb.values``) and the order is the table's key order that the capture put into ``pk``.
    """
    columns = event.columns
    values = []
    for name, value in event.pk.items():
        encoder = json_codec(columns[name])[0] if value is not None else None
        values.append(value if encoder is None else encoder(value))
    return orjson.dumps(values)


def message_key(event: ChangeEvent, ordering: Ordering | str) -> bytes:
    """The Kafka message key for an ordering scope (the partitioner hashes it).

    * ``database``: ``db`` - one partition per source database, total order of its transactions;
    * ``table``: ``db.table`` - order per table only;
    * ``row``: ``db.table`` + NUL + :func:`pk_key` - order per row only.  Events without a key
      (DDL, heartbeats) fall back to the table key so they stay ordered with that table.
    """
    if ordering == "database":
        return event.database.encode()
    table_key = f"{event.database}.{event.table}".encode()
    if ordering == "table":
        return table_key
    if ordering == "row":
        if not event.pk:
            return table_key
        return table_key + b"\x00" + pk_key(event)
    raise ValueError(f"unknown ordering {ordering!r}; expected one of {ORDERINGS}")


_HeaderHead = tuple[tuple[str, bytes], ...]
_HEADER_HEADS: dict[tuple[int, str, str, str], _HeaderHead] = {}


def _header_head(v: int, origin: str, source: str, op: str) -> _HeaderHead:
    head = (
        (HEADER_VERSION, str(v).encode()),
        (HEADER_ORIGIN, origin.encode()),
        (HEADER_SOURCE, source.encode()),
        (HEADER_OP, op.encode()),
    )
    if len(_HEADER_HEADS) >= 1024:
        _HEADER_HEADS.clear()
    _HEADER_HEADS[(v, origin, source, op)] = head
    return head


def headers(event: ChangeEvent, route: Sequence[str] = ()) -> list[tuple[str, bytes]]:
    """Kafka headers for one event; ``route`` is the datacenters it has passed (origin first)."""
    op = event.op.value
    # The first four repeat for every event of a source: built once per (v, origin, source, op).
    head = _HEADER_HEADS.get((event.v, event.origin, event.source, op))
    if head is None:
        head = _header_head(event.v, event.origin, event.source, op)
    out = [*head, (HEADER_ID, event.id.encode())]
    if route:
        out.append((HEADER_ROUTE, ",".join(route).encode()))
    return out


def header_value(record_headers: Sequence[tuple[str, bytes]] | None, name: str) -> str | None:
    """The last value of header ``name`` as text (None when absent)."""
    found: str | None = None
    for key, value in record_headers or ():
        if key == name:
            found = value.decode()
    return found
