"""Envelope codec and value encoding: pure unit tests (no servers)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import struct
import time
import types
from decimal import Decimal
from importlib import resources
from types import SimpleNamespace
from typing import Any

import jsonschema
import orjson
import pytest

from wmb import codec, values
from wmb.errors import DecodeError, PreflightError
from wmb.event import ChangeEvent, Op, Position, TxnInfo, Version

# One exact canonical value per tag, including the limits that break naive encoders.
SAMPLES: dict[str, tuple[str, Any]] = {
    "id": ("uint", 18446744073709551615),
    "i_min": ("int", -9223372036854775808),
    "dec": ("decimal:65,30", Decimal("-12345678901234567890123456789012345.123456789012345678901234567890")),
    "dec0": ("decimal:10,2", Decimal("0.00")),
    "f": ("float", 3.14159),
    "d": ("double", 1.7976931348623157e308),
    "b1": ("bit:1", b"\x01"),
    "b64": ("bit:64", b"\xff" * 8),
    "txt": ("text:utf8mb4", "caf\u00e9 \U0001f600"),
    "lat": ("text:latin1", "\u20ac\u0081"),
    "bin": ("binary:4", b"a\x00\x00\x00"),
    "blob": ("binary", b""),
    "geo": ("geometry", b"\x00\x00\x00\x00\x01\x01\x00\x00\x00" + b"\x00" * 16),
    "e": ("enum", "y"),
    "s": ("set", "a,c"),
    "s0": ("set", ""),
    "dt": ("date", dt.date(1000, 1, 1)),
    "dz": ("date", "0000-00-00"),
    "dtm": ("datetime:6", dt.datetime(9999, 12, 31, 23, 59, 59, 999999)),
    "ts": ("timestamp:6", dt.datetime(2038, 1, 19, 3, 14, 7, 999999)),
    "tsz": ("timestamp:0", "0000-00-00 00:00:00"),
    "tm": ("time:6", -dt.timedelta(hours=838, minutes=59, seconds=59)),
    "tmf": ("time:2", -dt.timedelta(hours=1, minutes=2, seconds=3, microseconds=40000)),
    "y": ("year", 0),
    "j": ("text:utf8mb4", '{"a": [1, 2.5]}'),
    "n": ("int", None),
}


def make_event(op: Op = Op.UPDATE, **overrides: Any) -> ChangeEvent:
    columns = {name: tag for name, (tag, _) in SAMPLES.items()}
    row = {name: value for name, (_, value) in SAMPLES.items()}
    fields: dict[str, Any] = {
        "source": "bj-main",
        "origin": "bj",
        "server_id": 1,
        "op": op,
        "database": "shop",
        "table": "orders",
        "ts_ms": 1_700_000_000_123,
        "position": Position(gtid="0-1-42", file="mb.000003", pos=1234),
        "txn": TxnInfo(id="0-1-42", seq=3, last=True),
        "version": Version(0, 42, 3),
        "pk": {"id": row["id"]},
        "before": row if op in (Op.UPDATE, Op.DELETE) else None,
        "after": row if op in (Op.UPDATE, Op.INSERT) else None,
        "columns": columns,
    }
    fields.update(overrides)
    return ChangeEvent(**fields)


def schema() -> dict[str, Any]:
    text = resources.files("wmb").joinpath("schemas/event-v1.json").read_text()
    result: dict[str, Any] = json.loads(text)
    return result


@pytest.mark.parametrize("name", list(SAMPLES))
def test_value_round_trips_through_json_exactly(name: str) -> None:
    tag, value = SAMPLES[name]
    wire = orjson.loads(orjson.dumps(values.to_json(tag, value)))
    back = values.from_json(tag, wire)
    assert back == value
    assert type(back) is type(value)
    if isinstance(value, Decimal):
        assert str(back) == str(value)  # the scale is part of the value


@pytest.mark.parametrize("op", [Op.INSERT, Op.UPDATE, Op.DELETE])
def test_event_round_trip(op: Op) -> None:
    event = make_event(op)
    assert codec.decode(codec.encode(event)) == event


def test_ddl_and_heartbeat_round_trip() -> None:
    ddl = make_event(Op.DDL, pk={}, before=None, after=None, columns={}, ddl="ALTER TABLE t ADD c INT")
    assert codec.decode(codec.encode(ddl)) == ddl
    hb = make_event(Op.HEARTBEAT, pk={}, before=None, after=None, columns={})
    assert codec.decode(codec.encode(hb)) == hb


@pytest.mark.parametrize("op", list(Op))
def test_encoded_events_match_json_schema(op: Op) -> None:
    if op in (Op.DDL, Op.HEARTBEAT):
        event = make_event(op, pk={}, before=None, after=None, columns={}, ddl="DROP TABLE x")
    else:
        event = make_event(op)
    jsonschema.Draft202012Validator(schema()).validate(orjson.loads(codec.encode(event)))


def test_schema_rejects_what_decode_rejects() -> None:
    doc = orjson.loads(codec.encode(make_event()))
    validator = jsonschema.Draft202012Validator(schema())
    for broken in ({**doc, "v": 2}, {**doc, "op": "upsert"}, {**doc, "columns": {"id": "uuid"}}):
        assert not validator.is_valid(broken)
        with pytest.raises(DecodeError):
            codec.decode(orjson.dumps(broken))


def test_envelope_field_order_and_values() -> None:
    doc = orjson.loads(codec.encode(make_event(Op.INSERT)))
    assert list(doc) == [
        "v", "id", "origin", "source", "server_id", "gtid", "file", "pos", "db", "table", "op",
        "ts_ms", "txn", "pk", "before", "after", "version", "columns", "ddl",
    ]  # fmt: skip
    assert doc["id"] == "bj-main:0-1-42:3"
    assert doc["pk"] == {"id": 18446744073709551615}
    after = doc["after"]
    assert after["b64"] == 18446744073709551615
    assert after["dec"] == "-12345678901234567890123456789012345.123456789012345678901234567890"
    assert after["bin"] == "YQAAAA=="
    assert after["s"] == ["a", "c"] and after["s0"] == []
    assert after["tm"] == "-838:59:59.000000"
    assert after["tmf"] == "-01:02:03.040000"
    assert after["ts"] == "2038-01-19T03:14:07.999999"
    assert after["f"] == 3.14159


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xfe", "not JSON"),
        (b"[1]", "JSON object"),
        (b'{"v": 2}', "version"),
        (b'{"v": true}', "version"),
    ],
)
def test_decode_rejects_garbage(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        codec.decode(data)


def _mutated(**changes: Any) -> bytes:
    doc = orjson.loads(codec.encode(make_event()))
    for key, value in changes.items():
        if value is KeyError:
            del doc[key]
        else:
            doc[key] = value
    return orjson.dumps(doc)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"source": KeyError}, "missing field 'source'"),
        ({"ts_ms": "soon"}, "'ts_ms' must be int"),
        ({"server_id": True}, "'server_id' must be int"),
        ({"op": "upsert"}, "'op' must be one of"),
        ({"columns": {"id": "uuid"}}, "bad type tag"),
        ({"version": [1, 2]}, "version"),
        ({"txn": {"id": "x", "seq": 0}}, "missing field 'last'"),
        ({"after": None}, "update needs"),
        ({"id": "other:1:2"}, "does not match"),
        ({"pk": {"nope": 1}}, "column missing"),
        ({"pk": {"id": "12"}}, r"pk\.id \(uint\)"),
    ],
)
def test_decode_names_the_problem(changes: dict[str, Any], reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        codec.decode(_mutated(**changes))


@pytest.mark.parametrize(
    ("column", "value", "reason"),
    [
        ("bin", "not base64!", "base64"),
        ("dec", "12abc", "decimal"),
        ("dec", "NaN", "finite"),
        ("b1", 2, "out of range"),
        ("tm", "1 day", "time"),
        ("s", "a,b", "expected"),
        ("dtm", "yesterday", "Invalid isoformat"),
    ],
)
def test_decode_rejects_values_that_do_not_fit_their_tag(column: str, value: Any, reason: str) -> None:
    doc = orjson.loads(codec.encode(make_event()))
    doc["after"][column] = value
    with pytest.raises(DecodeError, match=f"after.{column}.*{reason}"):
        codec.decode(orjson.dumps(doc))


# decode() has a fast path for well-formed envelopes and falls back to the field-by-field checks
# for anything odd; both must accept the same documents, build the same events, and name the same
# problem.
_ODD_DOCS: list[dict[str, Any]] = [
    {"before": KeyError},  # absent is not null
    {"ddl": KeyError},
    {"gtid": KeyError},
    {"gtid": None},
    {"v": 1.0},  # == 1: accepted by the checked path
    {"txn": {"id": "0-1-42", "seq": 3, "last": 1}},
    {"version": [0, 42, True]},
    {"version": [0, -1, 3]},
    {"pos": -1},
    {"op": ["update"]},
    {"columns": {**{n: t for n, (t, _) in SAMPLES.items()}, "id": 7}},
    {"extra_field": "ignored"},
]


@pytest.mark.parametrize("changes", _ODD_DOCS, ids=lambda c: ",".join(c))
def test_fast_and_checked_decode_agree(changes: dict[str, Any]) -> None:
    data = _mutated(**changes)
    try:
        expected: Any = codec._decode_checked(orjson.loads(data))
    except DecodeError as exc:
        expected = f"error: {exc}"
    try:
        got: Any = codec.decode(data)
    except DecodeError as exc:
        got = f"error: {exc}"
    assert got == expected


def test_decode_accepts_any_key_order() -> None:
    event = make_event()
    doc = orjson.loads(codec.encode(event))
    shuffled = dict(reversed(list(doc.items())))
    assert codec.decode(orjson.dumps(shuffled)) == event


@pytest.mark.parametrize(
    ("tag", "wire", "value"),
    [("double", 2, 2.0), ("float", -3, -3.0), ("int", True, DecodeError), ("text:utf8mb4", 1, DecodeError)],
)
def test_decode_exact_types_per_tag(tag: str, wire: Any, value: Any) -> None:
    # The identity fast path keeps a value only when its JSON type already is the canonical type.
    doc = orjson.loads(codec.encode(make_event(Op.INSERT, pk={}, after={"c": None}, columns={"c": tag})))
    doc["after"]["c"] = wire
    if value is DecodeError:
        with pytest.raises(DecodeError, match=r"after\.c"):
            codec.decode(orjson.dumps(doc))
        return
    got = codec.decode(orjson.dumps(doc)).after
    assert got is not None and got["c"] == value and type(got["c"]) is type(value)


def test_decode_follows_a_changed_columns_map() -> None:
    # The columns plan is cached per table; an ALTER changes the map and must change the decoding.
    first = make_event(Op.INSERT, pk={"c": 1}, after={"c": 1}, columns={"c": "int"})
    altered = make_event(Op.INSERT, pk={}, after={"c": Decimal("1.50")}, columns={"c": "decimal:5,2"})
    assert codec.decode(codec.encode(first)) == first
    assert codec.decode(codec.encode(altered)) == altered
    assert codec.decode(codec.encode(first)) == first
    broken = orjson.loads(codec.encode(first))
    broken["columns"] = {"c": "uuid"}
    with pytest.raises(DecodeError, match="bad type tag"):
        codec.decode(orjson.dumps(broken))


def test_decoded_events_do_not_share_state() -> None:
    data = codec.encode(make_event())
    one, two = codec.decode(data), codec.decode(data)
    assert one == two
    assert one.after is not two.after and one.columns is not two.columns and one.pk is not two.pk


def test_encode_refuses_untagged_column() -> None:
    with pytest.raises(ValueError, match="no type tag"):
        codec.encode(make_event(Op.INSERT, after={"ghost": 1}))


_PLAIN = {"id": "uint", "n": "int", "dec": "decimal:10,2", "f": "double", "txt": "text:utf8mb4", "d": "date"}
_PLAIN_ROW = {
    "id": 7,
    "n": None,
    "dec": Decimal("-1.50"),
    "f": 0.1,
    "txt": 'q"\u00e9',
    "d": dt.date(2024, 2, 29),
}


class _Str(str):
    pass


@pytest.mark.parametrize("op", [Op.INSERT, Op.UPDATE, Op.DELETE])
@pytest.mark.parametrize("plain", [True, False])
def test_encode_with_column_tags_is_the_generic_encoding(op: Op, plain: bool) -> None:
    """The capture's ColumnTags take a faster path through encode: the bytes must not change."""
    if plain:
        columns, row = dict(_PLAIN), dict(_PLAIN_ROW)
        row["dt"], columns["dt"] = dt.datetime(2024, 1, 2, 3, 4, 5, 6), "datetime:6"
        row["dz"], columns["dz"] = "0000-00-00 00:00:00", "datetime:0"
    else:
        columns = {name: tag for name, (tag, _) in SAMPLES.items()}
        row = {name: value for name, (_, value) in SAMPLES.items()}
    event = make_event(
        op,
        pk={"id": row["id"]},
        before=row if op is not Op.INSERT else None,
        after=row if op is not Op.DELETE else None,
        columns=columns,
    )
    tagged = dataclasses.replace(event, columns=codec.ColumnTags(columns))
    assert codec.ColumnTags(columns)._plain is plain
    assert codec.encode(tagged) == orjson.dumps(codec.envelope(event)) == codec.encode(event)
    assert codec.decode(codec.encode(tagged)) == event


def test_column_tags_fall_back_on_anything_unusual() -> None:
    tags = codec.ColumnTags(_PLAIN)
    base = make_event(Op.INSERT, pk={"id": 7}, before=None, after=_PLAIN_ROW, columns=tags)
    generic = dataclasses.replace(base, columns=dict(_PLAIN))
    assert codec.encode(base) == codec.encode(generic)
    # a str subclass (orjson would write it natively; the generic path decides), a mapping image
    for after in ({**_PLAIN_ROW, "txt": _Str("x")}, types.MappingProxyType(_PLAIN_ROW)):
        odd = dataclasses.replace(base, after=after)
        assert codec.encode(odd) == codec.encode(dataclasses.replace(odd, columns=dict(_PLAIN)))
    # a value no tag allows, and an untagged column: the generic path's errors
    with pytest.raises(TypeError):
        codec.encode(dataclasses.replace(base, after={**_PLAIN_ROW, "n": object()}))
    with pytest.raises(ValueError, match="no type tag"):
        codec.encode(dataclasses.replace(base, after={"ghost": 1}))
    # mutating the map drops its cached JSON: the new tag is written
    tags["n"] = "uint"
    assert tags._json is None
    assert b'"n":"uint"' in codec.encode(base)


def test_message_keys_per_ordering() -> None:
    event = make_event(pk={"id": 7, "bin": b"\x00"})
    assert codec.message_key(event, "database") == b"shop"
    assert codec.message_key(event, "table") == b"shop.orders"
    assert codec.message_key(event, "row") == b'shop.orders\x00[7,"AA=="]'
    # the key is a function of the canonical pk only: a decoded copy gives the same bytes
    assert codec.message_key(codec.decode(codec.encode(event)), "row") == codec.message_key(event, "row")
    ddl = make_event(Op.DDL, pk={}, before=None, after=None, columns={}, ddl="x")
    assert codec.message_key(ddl, "row") == b"shop.orders"
    with pytest.raises(ValueError, match="unknown ordering"):
        codec.message_key(event, "global")


def test_headers() -> None:
    hdrs = codec.headers(make_event(), route=["bj", "gz"])
    assert dict(hdrs) == {
        "wmb-v": b"1",
        "wmb-origin": b"bj",
        "wmb-source": b"bj-main",
        "wmb-op": b"update",
        "wmb-id": b"bj-main:0-1-42:3",
        "wmb-route": b"bj,gz",
    }
    assert codec.header_value(hdrs, "wmb-route") == "bj,gz"
    assert codec.header_value(None, "wmb-route") is None


# -- normalize: the library quirks, with the values 1.0.17 really produced on MariaDB 10.11 --------


@pytest.mark.parametrize(
    ("tag", "library", "none_source", "expected"),
    [
        ("bit:1", "1", None, b"\x01"),
        ("bit:5", "00101", None, b"\x05"),
        ("bit:64", "1" * 64, None, b"\xff" * 8),
        ("binary", "", None, b""),  # empty binary decodes to str
        ("binary:4", "", None, b"\x00" * 4),  # BINARY(n) padding stripped in the binlog
        ("binary:4", b"a", None, b"a\x00\x00\x00"),
        ("binary", b"\x00\x01\x00", None, b"\x00\x01\x00"),
        ("set", None, "empty set", ""),
        ("set", None, "null", None),
        ("year", 1900, None, 0),
        ("year", 2155, None, 2155),
        ("float", 3.141590118408203, None, 3.14159),
        ("float", 16777216.0, None, 16777216.0),
        ("float", 9.999999680285692e37, None, 1e38),
        ("float", 0.10000000149011612, None, 0.1),
        ("timestamp:0", dt.datetime(1970, 1, 1), None, "0000-00-00 00:00:00"),
        ("timestamp:6", dt.datetime(1970, 1, 1), None, "0000-00-00 00:00:00.000000"),
        ("timestamp:6", dt.datetime(1970, 1, 1, 0, 0, 1), None, dt.datetime(1970, 1, 1, 0, 0, 1)),
        ("date", None, "out of date range", "0000-00-00"),
        ("date", None, "null", None),
        ("datetime:2", None, "out of datetime2 range", "0000-00-00 00:00:00.00"),
        # TIME2 negative with a fraction: the library mirrors the fraction around the second
        ("time:2", dt.timedelta(seconds=-3723.96), None, dt.timedelta(seconds=-3723.04)),
        ("time:1", dt.timedelta(seconds=-0.9), None, dt.timedelta(seconds=-0.1)),
        (
            "time:6",
            dt.timedelta(seconds=-60, microseconds=-999999),
            None,
            dt.timedelta(microseconds=-60000001),
        ),
        ("time:6", dt.timedelta(seconds=-0.5), None, dt.timedelta(seconds=-0.5)),
        ("time:0", dt.timedelta(seconds=-1), None, dt.timedelta(seconds=-1)),
        ("time:6", dt.timedelta(hours=838), None, dt.timedelta(hours=838)),
        ("decimal:4,2", Decimal("-0.50"), None, Decimal("-0.50")),
        ("uint", 18446744073709551615, None, 18446744073709551615),
    ],
)
def test_normalize(tag: str, library: Any, none_source: str | None, expected: Any) -> None:
    got = values.normalize(tag, library, none_source)
    assert got == expected
    assert type(got) is type(expected)


def test_normalize_set_orders_members_like_select() -> None:
    assert values.normalize("set", {"c", "a"}, members=["c", "b", "a"]) == "c,a"
    with pytest.raises(ValueError, match="member list"):
        values.normalize("set", {"a"})


def test_canonical_float32_is_shortest_and_exact() -> None:
    for x in (3.14159, 0.1, 1e38, 1.17549435e-38, -1.5e-38, 16777217.0, 123456.789, 1.401298464324817e-45):
        f32 = struct.unpack("<f", struct.pack("<f", x))[0]
        canon = values.canonical_float32(f32)
        assert struct.pack("<f", canon) == struct.pack("<f", f32)
        assert len(repr(canon)) <= len(repr(f32))


def _col(**kw: Any) -> SimpleNamespace:
    base = {"name": "c", "unsigned": False, "is_primary": False, "set_values": None}
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize(
    ("column", "tag"),
    [
        (_col(type=8, unsigned=True), "uint"),
        (_col(type=1), "int"),
        (_col(type=246, precision=65, decimals=30), "decimal:65,30"),
        (_col(type=16, bits=64, bytes=8), "bit:64"),
        (_col(type=254, collation_name="binary", max_length=16), "binary:16"),
        (_col(type=15, collation_name="binary", max_length=10), "binary"),
        (_col(type=252, collation_name="binary"), "binary"),
        (_col(type=252, collation_name="utf8mb4_bin"), "text:utf8mb4"),
        (_col(type=15, collation_name="latin1_swedish_ci"), "text:latin1"),
        (_col(type=18, fsp=6), "datetime:6"),
        (_col(type=17, fsp=0), "timestamp:0"),
        (_col(type=19, fsp=3), "time:3"),
        (_col(type=13), "year"),
        (_col(type=248), "set"),
        (_col(type=247), "enum"),
        (_col(type=255, collation_name="binary"), "geometry"),
    ],
)
def test_column_type_tag(column: SimpleNamespace, tag: str) -> None:
    assert values.column_type_tag(column) == tag
    assert values.is_valid_tag(tag)


def test_missing_metadata_is_refused() -> None:
    with pytest.raises(PreflightError, match="binlog_row_metadata=FULL"):
        values.column_type_tag(_col(type=15, collation_name=None))
    with pytest.raises(PreflightError, match="binlog_row_metadata=FULL"):
        values.row_values([_col(type=3, name=None)], {"UNKNOWN_COL0": 1})
    with pytest.raises(PreflightError, match="binlog_row_image=FULL"):
        values.row_values([_col(type=3)], {"c": None}, {"c": "cols bitmap"})


def test_row_images_shapes() -> None:
    cols = [_col(name="id", type=3, is_primary=True), _col(name="s", type=248, set_values=["x", "y"])]
    write = values.row_images(cols, {"values": {"id": 1, "s": None}, "none_sources": {"s": "empty set"}})
    assert write.after == {"id": 1, "s": ""} and write.before is None
    assert write.columns == {"id": "int", "s": "set"}
    delete = values.row_images(cols, {"values": {"id": 1, "s": {"y"}}, "none_sources": {}}, deleted=True)
    assert delete.before == {"id": 1, "s": "y"} and delete.after is None
    upd = values.row_images(
        cols,
        {
            "before_values": {"id": 1, "s": None},
            "before_none_sources": {"s": "null"},
            "after_values": {"id": 1, "s": {"x", "y"}},
            "after_none_sources": {},
        },
    )
    assert upd.before == {"id": 1, "s": None} and upd.after == {"id": 1, "s": "x,y"}
    assert values.primary_key(cols, upd.after) == {"id": 1}


def test_latin1_fix_decodes_like_mariadb() -> None:
    values.install_library_fixes()
    values.install_library_fixes()  # idempotent
    from pymysqlreplication.row_event import RowsEvent

    encoding = RowsEvent.charset_to_encoding("cp1252")
    assert bytes(range(0x80, 0xA0)).decode(encoding) == "".join(
        chr(i) if i in (0x81, 0x8D, 0x8F, 0x90, 0x9D) else bytes([i]).decode("cp1252")
        for i in range(0x80, 0xA0)
    )
    assert RowsEvent.charset_to_encoding("utf8mb4") == "utf8"


def test_encode_decode_rate_report(capsys: pytest.CaptureFixture[str]) -> None:
    """Not a timed assertion: prints the rate for a typical 10-column row (run with -s to see)."""
    cols = {
        "id": "uint", "user_id": "int", "sku": "text:utf8mb4", "qty": "int", "price": "decimal:10,2",
        "status": "enum", "note": "text:utf8mb4", "created": "datetime:6", "updated": "timestamp:6",
        "flags": "set",
    }  # fmt: skip
    row = {
        "id": 123456789, "user_id": 42, "sku": "SKU-000123", "qty": 3, "price": Decimal("19.99"),
        "status": "paid", "note": "gift wrap, please", "created": dt.datetime(2024, 5, 1, 12, 0, 0, 123456),
        "updated": dt.datetime(2024, 5, 1, 12, 0, 1, 654321), "flags": "a,b",
    }  # fmt: skip
    event = make_event(Op.UPDATE, columns=cols, pk={"id": row["id"]}, before=row, after=row)
    n = 20_000
    start = time.perf_counter()
    for _ in range(n):
        data = codec.encode(event)
    enc_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(n):
        codec.decode(data)
    dec_s = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n[codec] update with 10-column before+after ({len(data)} B): "
              f"encode {n / enc_s:,.0f}/s, decode {n / dec_s:,.0f}/s")  # fmt: skip
