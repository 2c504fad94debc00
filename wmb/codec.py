"""The versioned JSON envelope of a :class:`~wmb.event.ChangeEvent` (``docs/event-format.md``).

``encode`` is on the capture hot path (one call per row), so it builds one dict and lets orjson write
it; per-column work is a cached lookup of the tag's converter, skipped for the values orjson already
writes exactly (ints, floats, strings, None).  ``decode`` is the trust boundary of every consumer: it
checks everything and raises :class:`~wmb.errors.DecodeError` with a reason a human can act on,
because that reason is what lands in the dead-letter topic.
"""

from __future__ import annotations

import datetime as dt
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


def envelope(event: ChangeEvent) -> dict[str, Any]:
    """The envelope as a JSON-able dict (what :func:`encode` serializes)."""
    columns = event.columns
    pos = event.position
    txn = event.txn
    ver = event.version
    return {
        "v": event.v,
        "id": event.id,
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
        "pk": _image_to_json(event.pk, columns, "pk"),
        "before": None if event.before is None else _image_to_json(event.before, columns, "before"),
        "after": None if event.after is None else _image_to_json(event.after, columns, "after"),
        "version": [ver.epoch, ver.seq, ver.row],
        "columns": dict(columns),
        "ddl": event.ddl,
    }


def encode(event: ChangeEvent) -> bytes:
    """Serialize one event to its envelope bytes (UTF-8 JSON, keys in a fixed order)."""
    return orjson.dumps(envelope(event))


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


@lru_cache(maxsize=4096)
def _decoder(tag: str) -> tuple[type | None, Callable[[Any], Any]]:
    """(JSON type that already is the canonical value for this tag, or None; from_json)."""
    base = split_tag(tag)[0]
    same: type | None = {"int": int, "uint": int, "year": int, "text": str, "enum": str, "json": str}.get(
        base
    )
    return same, json_codec(tag)[1]


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
        same, from_json = _decoder(tag)
        if type(value) is same:
            out[name] = value
            continue
        try:
            out[name] = from_json(value)
        except ValueError as exc:
            raise DecodeError(f"{what}.{name} ({tag}): {exc}") from None
    return out


def decode(data: bytes | bytearray | memoryview | str) -> ChangeEvent:
    """Rebuild a ChangeEvent from envelope bytes; :class:`DecodeError` says why it cannot."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"not JSON: {exc}") from None
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


def headers(event: ChangeEvent, route: Sequence[str] = ()) -> list[tuple[str, bytes]]:
    """Kafka headers for one event; ``route`` is the datacenters it has passed (origin first)."""
    out = [
        (HEADER_VERSION, str(event.v).encode()),
        (HEADER_ORIGIN, event.origin.encode()),
        (HEADER_SOURCE, event.source.encode()),
        (HEADER_OP, event.op.value.encode()),
        (HEADER_ID, event.id.encode()),
    ]
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
