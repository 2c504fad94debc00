"""Column type tags and exact row values.

The capture daemon reads rows with python-mysql-replication 1.0.17, whose decoded values are *not*
what the server stores (see ``docs/event-format.md``, "Library quirks").  This module turns them into
the **canonical value** of each column: exactly what pymysql returns from ``SELECT`` on a session
with ``time_zone='+00:00'`` (wmb runs every session in UTC), and what pymysql must be given in an
``INSERT`` to store the master's bytes again.  The one deliberate exception is ``FLOAT``, where
``SELECT`` prints only 6 significant digits and so loses bits: wmb keeps the shortest decimal that
round-trips the stored float32 instead (see :func:`canonical_float32`).

Every column gets a **type tag** ``base[:param]`` (``"uint"``, ``"bit:64"``, ``"text:latin1"``,
``"binary:16"``, ``"datetime:6"`` ...), derived from the binlog table map.  The tag travels in the
envelope (``columns``) so that any consumer can rebuild the exact Python value from JSON with
:func:`from_json` without a schema lookup.

Public surface (used by ``binlog_capture`` and :mod:`wmb.codec`):

* :func:`column_type_tag` - tag of one ``pymysqlreplication.column.Column``
* :func:`normalize` - library value (+ its ``none_sources`` reason) -> canonical value
* :func:`row_values` / :func:`row_images` - a whole library row at once
* :func:`to_json` / :func:`from_json` - canonical value <-> JSON-able value, lossless
* :func:`install_library_fixes` - make the library decode MariaDB ``latin1`` like the server does
"""

from __future__ import annotations

import base64
import binascii
import codecs
import datetime as dt
import re
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any

from wmb.errors import PreflightError

# Field type numbers of pymysqlreplication.constants.FIELD_TYPE, copied so that consumers (relay,
# cache, applier) can use the JSON half of this module without importing the capture library.
_TINY, _SHORT, _LONG, _FLOAT, _DOUBLE, _TIMESTAMP, _LONGLONG, _INT24 = 1, 2, 3, 4, 5, 7, 8, 9
_DATE, _TIME, _DATETIME, _YEAR, _NEWDATE, _VARCHAR, _BIT = 10, 11, 12, 13, 14, 15, 16
_TIMESTAMP2, _DATETIME2, _TIME2 = 17, 18, 19
_JSON, _NEWDECIMAL, _ENUM, _SET = 245, 246, 247, 248
_TINY_BLOB, _MEDIUM_BLOB, _LONG_BLOB, _BLOB, _VAR_STRING, _STRING, _GEOMETRY = (
    249,
    250,
    251,
    252,
    253,
    254,
    255,
)

_INT_TYPES = frozenset({_TINY, _SHORT, _INT24, _LONG, _LONGLONG})
_STRING_TYPES = frozenset({_VARCHAR, _VAR_STRING, _STRING})
_BLOB_TYPES = frozenset({_TINY_BLOB, _MEDIUM_BLOB, _LONG_BLOB, _BLOB})

# Every base tag wmb knows; a tag outside this set is a malformed message.
BASE_TAGS = frozenset(
    {
        "int",
        "uint",
        "decimal",
        "float",
        "double",
        "bit",
        "text",
        "binary",
        "enum",
        "set",
        "date",
        "datetime",
        "timestamp",
        "time",
        "year",
        "geometry",
        "json",
    }
)
_TAG_RE = re.compile(r"^(?P<base>[a-z]+)(?::(?P<param>[A-Za-z0-9_,]+))?$")

# none_sources reasons of pymysqlreplication.constants.NONE_SOURCE that we act on.
NONE_NULL = "null"
NONE_EMPTY_SET = "empty set"
_NONE_ZERO_DATE = frozenset({"out of date range", "out of datetime range", "out of datetime2 range"})
_NONE_MISSING = frozenset({"cols bitmap", "same with before values"})

_ZERO_DATE = "0000-00-00"
_ZERO_DATETIME = "0000-00-00 00:00:00"
_EPOCH = dt.datetime(1970, 1, 1)
_US = dt.timedelta(microseconds=1)


# --------------------------------------------------------------------------------------------------
# Tags


def column_type_tag(column: Any) -> str:
    """The wmb type tag of one table-map column (``pymysqlreplication.column.Column``).

    Needs ``binlog_row_metadata=FULL``: without it the table map has no charsets, so text and
    binary strings cannot be told apart, and we refuse rather than guess.
    """
    ctype = column.type
    if ctype in _INT_TYPES:
        return "uint" if column.unsigned else "int"
    if ctype == _NEWDECIMAL:
        return f"decimal:{column.precision},{column.decimals}"
    if ctype == _FLOAT:
        return "float"
    if ctype == _DOUBLE:
        return "double"
    if ctype == _BIT:
        return f"bit:{column.bits}"
    if ctype in _STRING_TYPES or ctype in _BLOB_TYPES:
        collation = getattr(column, "collation_name", None)
        if collation is None:
            raise PreflightError(
                f"column {column.name!r} has no charset in the binlog table map: "
                "the source needs binlog_row_metadata=FULL"
            )
        if collation == "binary":
            # BINARY(n) is stored zero-padded but binlogged with the padding stripped.
            return f"binary:{column.max_length}" if ctype == _STRING else "binary"
        return f"text:{collation.split('_', 1)[0]}"
    if ctype == _ENUM:
        return "enum"
    if ctype == _SET:
        return "set"
    if ctype in (_DATE, _NEWDATE):
        return "date"
    if ctype in (_DATETIME, _DATETIME2):
        return f"datetime:{getattr(column, 'fsp', 0)}"
    if ctype in (_TIMESTAMP, _TIMESTAMP2):
        return f"timestamp:{getattr(column, 'fsp', 0)}"
    if ctype in (_TIME, _TIME2):
        return f"time:{getattr(column, 'fsp', 0)}"
    if ctype == _YEAR:
        return "year"
    if ctype == _GEOMETRY:
        return "geometry"
    if ctype == _JSON:
        return "json"
    raise PreflightError(f"column {column.name!r}: unsupported MySQL field type {ctype}")


@lru_cache(maxsize=4096)
def split_tag(tag: str) -> tuple[str, str]:
    """``"bit:64"`` -> ``("bit", "64")``; raises ``ValueError`` on an unknown tag."""
    m = _TAG_RE.match(tag)
    if m is None or m["base"] not in BASE_TAGS:
        raise ValueError(f"unknown column type tag {tag!r}")
    return m["base"], m["param"] or ""


def is_valid_tag(tag: object) -> bool:
    if not isinstance(tag, str):
        return False
    try:
        split_tag(tag)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------------------------------
# Library value -> canonical value

Normalizer = Callable[[Any, str | None], Any]


def canonical_float32(value: float) -> float:
    """The shortest decimal that round-trips the float32 ``value`` (what the master stores).

    The library hands the exact float32 widened to double (3.141590118408203); SELECT shows at most
    6 significant digits (16777217 is stored as 16777216 and shown as 16777200, which would store a
    different float32).  The shortest round-tripping decimal is both readable and lossless: pymysql
    sends it as a double literal, the server rounds it to the same float32.
    """
    packed = struct.pack("<f", value)
    for digits in range(6, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.pack("<f", candidate) == packed:
            return candidate
    return value  # 9 significant digits always round-trip a float32; kept for type safety


def _fix_negative_time(value: dt.timedelta) -> dt.timedelta:
    """Undo the library's TIME2 bug for negative values with a fraction.

    MariaDB stores a negative TIME2 as (floored integer part, borrowed fraction); 1.0.17 reads the
    integer part one second too large in magnitude and subtracts the fraction the wrong way, so
    -01:02:03.04 comes back as -01:02:03.96.  Mirror the fraction around the second.
    """
    micros = value // _US
    if micros >= 0:
        return value
    seconds, frac = divmod(-micros, 1_000_000)
    if not frac:
        return value
    return dt.timedelta(microseconds=-(seconds * 1_000_000 + (1_000_000 - frac)))


def _zero_fraction(fsp: int) -> str:
    return "." + "0" * fsp if fsp else ""


def passthrough(value: Any, none_source: str | None) -> Any:
    """The normalizer of the tags whose library value already is canonical (callers that build
    whole images at once test ``norm is passthrough`` and skip the call)."""
    return value


@lru_cache(maxsize=4096)
def normalizer(tag: str, members: tuple[str, ...] | None = None) -> Normalizer:
    """The function ``(library_value, none_source) -> canonical value`` for one tag (cached).

    ``members`` is a SET column's member list in definition order (``Column.set_values``).
    """
    base, param = split_tag(tag)

    if base in ("int", "uint", "decimal", "double", "enum", "geometry"):
        # Exact already.  (ENUM: the library maps the index, 0 -> '' like the server.)
        return passthrough

    if base == "float":

        def norm_float(value: Any, none_source: str | None) -> Any:
            return None if value is None else canonical_float32(value)

        return norm_float

    if base == "bit":
        nbytes = (int(param) + 7) // 8

        def norm_bit(value: Any, none_source: str | None) -> Any:
            # The library gives '0101'; pymysql returns big-endian bytes of ceil(n/8).
            return None if value is None else int(value, 2).to_bytes(nbytes, "big")

        return norm_bit

    if base == "text":

        def norm_text(value: Any, none_source: str | None) -> Any:
            # Undecodable bytes only reach us if the library could not find the codec.
            return value.decode("utf-8") if isinstance(value, bytes) else value

        return norm_text

    if base == "binary":
        width = int(param) if param else 0

        def norm_binary(value: Any, none_source: str | None) -> Any:
            if value is None:
                return None
            if isinstance(value, str):
                # b"".decode("binary") short-circuits to "" before the codec lookup fails, so an
                # empty binary string arrives as str.  Nothing else can (LookupError -> bytes).
                value = value.encode("latin-1")
            if width and len(value) < width:
                value = value.ljust(width, b"\x00")  # BINARY(n): binlog strips the zero padding
            return value

        return norm_binary

    if base == "set":

        def norm_set(value: Any, none_source: str | None) -> Any:
            if value is None:
                # An empty SET and NULL both decode to None; only none_sources tells them apart.
                return "" if none_source == NONE_EMPTY_SET else None
            if isinstance(value, str):
                return value
            # The library gives an unordered Python set; SELECT lists members in definition order.
            if members is None:
                raise ValueError("normalizing a SET value needs the column's member list")
            return ",".join(m for m in members if m in value)

        return norm_set

    if base == "year":

        def norm_year(value: Any, none_source: str | None) -> Any:
            # YEAR 0000 is stored as 0 and decoded as 0 + 1900; 1900 is not a valid YEAR.
            return 0 if value == 1900 else value

        return norm_year

    if base == "date":

        def norm_date(value: Any, none_source: str | None) -> Any:
            if value is None and none_source in _NONE_ZERO_DATE:
                return _ZERO_DATE  # pymysql returns an invalid date as its string
            return value

        return norm_date

    if base == "datetime":
        zero = _ZERO_DATETIME + _zero_fraction(int(param or 0))

        def norm_datetime(value: Any, none_source: str | None) -> Any:
            if value is None and none_source in _NONE_ZERO_DATE:
                return zero
            return value

        return norm_datetime

    if base == "timestamp":
        zero = _ZERO_DATETIME + _zero_fraction(int(param or 0))

        def norm_timestamp(value: Any, none_source: str | None) -> Any:
            # The library decodes with utcfromtimestamp (naive UTC), which equals SELECT in a UTC
            # session.  Epoch 0 is not a valid TIMESTAMP: it is how '0000-00-00 00:00:00' is stored.
            if value == _EPOCH:
                return zero
            return value

        return norm_timestamp

    if base == "time":

        def norm_time(value: Any, none_source: str | None) -> Any:
            return None if value is None else _fix_negative_time(value)

        return norm_time

    if base == "json":
        import orjson

        def norm_json(value: Any, none_source: str | None) -> Any:
            # MySQL binary JSON (MariaDB's JSON is text and tagged "text:utf8mb4"): keep it as text.
            if value is None or isinstance(value, str):
                return value
            return orjson.dumps(_json_bytes_to_str(value)).decode()

        return norm_json

    raise AssertionError(f"unhandled base tag {base}")  # pragma: no cover - split_tag guards


def _json_bytes_to_str(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, dict):
        return {_json_bytes_to_str(k): _json_bytes_to_str(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_bytes_to_str(v) for v in value]
    return value


def normalize(
    tag: str,
    library_value: Any,
    none_source: str | None = None,
    members: Sequence[str] | None = None,
) -> Any:
    """Turn one value decoded by python-mysql-replication into wmb's canonical value.

    ``none_source`` is the row's ``none_sources`` entry for the column (only set when the library
    value is None); it is what distinguishes an empty SET or a zero date from NULL.  ``members`` is
    the SET member list (``Column.set_values``), needed for SET columns only.
    """
    return normalizer(tag, tuple(members) if members is not None else None)(library_value, none_source)


def column_normalizer(column: Any) -> tuple[str, Normalizer]:
    """``(tag, normalizer)`` of one table-map column."""
    tag = column_type_tag(column)
    members = tuple(column.set_values) if tag == "set" and column.set_values else None
    return tag, normalizer(tag, members)


@dataclass(frozen=True, slots=True)
class RowImages:
    """A library row turned into canonical images (``before`` / ``after`` are None when absent)."""

    before: dict[str, Any] | None
    after: dict[str, Any] | None
    columns: dict[str, str]


def column_tags(table_columns: Sequence[Any]) -> dict[str, str]:
    """``{column name: tag}`` of a rows event's ``columns`` (in table order)."""
    tags: dict[str, str] = {}
    for column in table_columns:
        if not column.name:
            raise PreflightError(
                "binlog table map without column names: the source needs binlog_row_metadata=FULL"
            )
        tags[column.name] = column_type_tag(column)
    return tags


_Plan = list[tuple[str, Normalizer]]


def _plan(table_columns: Sequence[Any]) -> tuple[_Plan, dict[str, str]]:
    tags = column_tags(table_columns)
    plan = [(c.name, column_normalizer(c)[1]) for c in table_columns]
    return plan, tags


def _normalize_image(
    plan: _Plan, values: Mapping[str, Any], none_sources: Mapping[str, str]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, norm in plan:
        value = values[name]
        reason = none_sources.get(name) if value is None else None
        if reason in _NONE_MISSING:
            raise PreflightError(
                f"column {name!r} missing from the row image ({reason}): "
                "the source needs binlog_row_image=FULL"
            )
        out[name] = norm(value, reason)
    return out


def row_values(
    table_columns: Sequence[Any],
    values: Mapping[str, Any],
    none_sources: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Normalize one row image: ``(values, none_sources)`` of the library -> ``(row, tags)``.

    ``table_columns`` is the rows event's ``.columns``; ``values`` / ``none_sources`` are one image
    of one ``event.rows`` entry (``row["values"]`` and ``row["none_sources"]``, or the ``before_`` /
    ``after_`` pair of an update).
    """
    plan, tags = _plan(table_columns)
    return _normalize_image(plan, values, none_sources or {}), tags


def row_images(
    table_columns: Sequence[Any], library_row: Mapping[str, Any], *, deleted: bool = False
) -> RowImages:
    """Normalize one entry of ``WriteRowsEvent/UpdateRowsEvent/DeleteRowsEvent.rows``.

    Write rows become ``after``, update rows ``before`` and ``after``; pass ``deleted=True`` for a
    ``DeleteRowsEvent`` row, whose single image is the ``before``.
    """
    plan, tags = _plan(table_columns)
    if "values" in library_row:
        image = _normalize_image(plan, library_row["values"], library_row.get("none_sources") or {})
        if deleted:
            return RowImages(before=image, after=None, columns=tags)
        return RowImages(before=None, after=image, columns=tags)
    before = _normalize_image(
        plan, library_row["before_values"], library_row.get("before_none_sources") or {}
    )
    after = _normalize_image(plan, library_row["after_values"], library_row.get("after_none_sources") or {})
    return RowImages(before=before, after=after, columns=tags)


def primary_key(
    table_columns: Sequence[Any], image: Mapping[str, Any], pk_names: Iterable[str] | None = None
) -> dict[str, Any]:
    """The primary-key part of a canonical image, in table order.

    ``pk_names`` defaults to the columns the table map flags ``is_primary``; a table without a
    primary key uses the whole row as its key (as the replica applier must, too).
    """
    names = list(pk_names) if pk_names is not None else [c.name for c in table_columns if c.is_primary]
    if not names:
        names = [c.name for c in table_columns]
    return {name: image[name] for name in names}


# --------------------------------------------------------------------------------------------------
# Canonical value <-> JSON

ToJson = Callable[[Any], Any]
FromJson = Callable[[Any], Any]

_TIME_RE = re.compile(r"^(-?)(\d+):([0-5]\d):([0-5]\d)\.(\d{6})$")


def _time_to_json(value: dt.timedelta) -> str:
    micros = value // _US
    sign = "-" if micros < 0 else ""
    seconds, frac = divmod(abs(micros), 1_000_000)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{sign}{hours:02d}:{minutes:02d}:{secs:02d}.{frac:06d}"


def _time_from_json(text: str) -> dt.timedelta:
    m = _TIME_RE.match(text)
    if m is None:
        raise ValueError(f"not a [-]HH:MM:SS.ffffff time: {text!r}")
    sign, hours, minutes, secs, frac = m.groups()
    micros = ((int(hours) * 60 + int(minutes)) * 60 + int(secs)) * 1_000_000 + int(frac)
    return dt.timedelta(microseconds=-micros if sign else micros)


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError(f"not base64: {text[:40]!r}") from exc


def _require(kind: type | tuple[type, ...], value: Any) -> Any:
    # bool is an int subclass; JSON true must never pass for a number.
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"expected {kind}, got {type(value).__name__} {value!r:.60}")
    return value


def _datetime_to_json(value: dt.datetime | str) -> str:
    # Same text as orjson's native datetime output, which encode() relies on for speed.
    return value if isinstance(value, str) else value.isoformat()


def _datetime_from_json(value: Any, _parse: Callable[[str], dt.datetime] = dt.datetime.fromisoformat) -> Any:
    # On every consumer's hot path: exact-type test first (orjson never returns a str subclass).
    text: str = value if type(value) is str else _require(str, value)
    if text[:5] == "0000-":
        return text
    return _parse(text)


def _date_to_json(value: dt.date | str) -> str:
    return value if isinstance(value, str) else value.isoformat()


def _date_from_json(value: Any, _parse: Callable[[str], dt.date] = dt.date.fromisoformat) -> Any:
    text: str = value if type(value) is str else _require(str, value)
    if text[:5] == "0000-":
        return text
    return _parse(text)


def _set_to_json(value: str) -> list[str]:
    return value.split(",") if value else []


def _set_from_json(value: Any) -> str:
    items = _require(list, value)
    for item in items:
        _require(str, item)
    return ",".join(items)


def _decimal_from_json(value: Any) -> Decimal:
    try:
        result = Decimal(value if type(value) is str else _require(str, value))
    except InvalidOperation as exc:
        raise ValueError(f"not a decimal: {value!r:.60}") from exc
    if not result.is_finite():
        raise ValueError(f"not a finite decimal: {value!r:.60}")
    return result


def _int_from_json(value: Any) -> int:
    return int(_require(int, value))


def _float_from_json(value: Any) -> float:
    return float(_require((int, float), value))


def _str_from_json(value: Any) -> str:
    return str(_require(str, value))


@lru_cache(maxsize=1024)
def json_codec(tag: str) -> tuple[ToJson | None, FromJson]:
    """``(to_json or None if orjson takes the value as is, from_json)`` for one tag (cached)."""
    base, param = split_tag(tag)
    if base in ("int", "uint", "year"):
        return None, _int_from_json
    if base in ("float", "double"):
        # orjson writes the shortest repr that round-trips a double; canonical floats are doubles.
        return None, _float_from_json
    if base in ("text", "enum", "json"):
        return None, _str_from_json
    if base == "decimal":
        return str, _decimal_from_json
    if base == "bit":
        bits = int(param)
        nbytes = (bits + 7) // 8

        def bit_from_json(value: Any) -> bytes:
            number = _int_from_json(value)
            if number < 0 or number.bit_length() > bits:
                raise ValueError(f"bit value {number} out of range for {tag}")
            return number.to_bytes(nbytes, "big")

        return (lambda v: int.from_bytes(v, "big")), bit_from_json
    if base in ("binary", "geometry"):
        return _b64, lambda v: _unb64(_require(str, v))
    if base == "set":
        return _set_to_json, _set_from_json
    if base == "date":
        return _date_to_json, _date_from_json
    if base in ("datetime", "timestamp"):
        return _datetime_to_json, _datetime_from_json  # zero dates stay the string pymysql returns
    if base == "time":
        return _time_to_json, lambda v: _time_from_json(_require(str, v))
    raise AssertionError(f"unhandled base tag {base}")  # pragma: no cover


def to_json(tag: str, value: Any) -> Any:
    """Canonical value -> a value orjson writes without loss (None stays None)."""
    if value is None:
        return None
    encoder = json_codec(tag)[0]
    return value if encoder is None else encoder(value)


def from_json(tag: str, jsonable: Any) -> Any:
    """Inverse of :func:`to_json`; raises ``ValueError`` on a value that does not fit the tag."""
    if jsonable is None:
        return None
    return json_codec(tag)[1](jsonable)


# --------------------------------------------------------------------------------------------------
# Library fixes

_MARIADB_LATIN1 = "wmb_mariadb_latin1"


def _mariadb_latin1_codec(name: str) -> codecs.CodecInfo | None:
    if name != _MARIADB_LATIN1:
        return None
    # MariaDB's latin1 is cp1252 except that the five bytes cp1252 leaves undefined map to the C1
    # controls of the same number (strings/ctype-latin1.c); Python's cp1252 refuses them.
    table = "".join(
        bytes([i]).decode("cp1252") if i not in (0x81, 0x8D, 0x8F, 0x90, 0x9D) else chr(i) for i in range(256)
    )
    encoding_table = codecs.charmap_build(table)

    def encode(text: str, errors: str = "strict") -> tuple[bytes, int]:
        return codecs.charmap_encode(text, errors, encoding_table)

    def decode(data: bytes, errors: str = "strict") -> tuple[str, int]:
        return codecs.charmap_decode(data, errors, table)

    return codecs.CodecInfo(encode, decode, name=_MARIADB_LATIN1)  # type: ignore[arg-type]


_fixes_installed = False


def install_library_fixes() -> None:
    """Make python-mysql-replication decode ``latin1`` columns like the server (idempotent).

    1.0.17 decodes latin1 with Python's cp1252, which raises UnicodeDecodeError on 0x81, 0x8D,
    0x8F, 0x90 and 0x9D - one such byte in any latin1 column stops the whole stream.  We register a
    codec that is MariaDB's latin1 and route the library's charset lookup for latin1 to it.
    """
    global _fixes_installed
    if _fixes_installed:
        return
    from pymysqlreplication.row_event import RowsEvent

    codecs.register(_mariadb_latin1_codec)
    original = RowsEvent.charset_to_encoding

    def charset_to_encoding(name: str) -> str:
        encoding = str(original(name))
        return _MARIADB_LATIN1 if encoding == "cp1252" else encoding

    RowsEvent.charset_to_encoding = staticmethod(charset_to_encoding)
    _fixes_installed = True
