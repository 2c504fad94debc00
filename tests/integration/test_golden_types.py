"""Golden type test: every column type, SQL in -> binlog -> ChangeEvent -> JSON -> ChangeEvent.

Against the real MariaDB master of the session (``mariadb_master``).  For each row change the decoded
``before`` / ``after`` images must equal what ``SELECT`` returns through pymysql (same types, same
values), the encoded envelopes must equal ``tests/golden/every_type.json`` (set WMB_UPDATE_GOLDEN=1
to regenerate it), and the decoded images written back through pymysql must give a byte-identical
table (CHECKSUM TABLE), which is what the replica applier relies on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pymysql
import pytest
from pymysqlreplication import BinLogStreamReader
from pymysqlreplication.row_event import DeleteRowsEvent, UpdateRowsEvent, WriteRowsEvent

from wmb import codec, values
from wmb.event import ChangeEvent, Op, Position, TxnInfo, Version
from wmb.servers import MariaDBServer

pytestmark = pytest.mark.integration

DB = "wmb_golden"
GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "every_type.json"

DDL = """
CREATE TABLE {name} (
  id INT NOT NULL PRIMARY KEY,
  ti TINYINT, tiu TINYINT UNSIGNED, si SMALLINT, siu SMALLINT UNSIGNED,
  mi MEDIUMINT, miu MEDIUMINT UNSIGNED, i INT, iu INT UNSIGNED, bi BIGINT, biu BIGINT UNSIGNED,
  dec65 DECIMAL(65,30), dec0 DECIMAL(10,0), fl FLOAT, db DOUBLE,
  bit1 BIT(1), bit5 BIT(5), bit64 BIT(64),
  ch CHAR(10) CHARACTER SET utf8mb4, vc VARCHAR(100) CHARACTER SET utf8mb4, tx TEXT CHARACTER SET utf8mb4,
  chl CHAR(10) CHARACTER SET latin1, vcl VARCHAR(100) CHARACTER SET latin1, txl TEXT CHARACTER SET latin1,
  bn BINARY(4), vb VARBINARY(16), bl BLOB, lbl LONGBLOB,
  js JSON,
  d DATE, dt DATETIME(6), dt0 DATETIME, ts TIMESTAMP(6) NULL DEFAULT NULL, ts0 TIMESTAMP NULL DEFAULT NULL,
  tm TIME(6), tm2 TIME(2), tm0 TIME, y YEAR,
  en ENUM('small','medium','large'), st SET('read','write','admin'),
  geo GEOMETRY
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4
"""

COLUMNS = [
    "id", "ti", "tiu", "si", "siu", "mi", "miu", "i", "iu", "bi", "biu", "dec65", "dec0", "fl", "db",
    "bit1", "bit5", "bit64", "ch", "vc", "tx", "chl", "vcl", "txl", "bn", "vb", "bl", "lbl", "js",
    "d", "dt", "dt0", "ts", "ts0", "tm", "tm2", "tm0", "y", "en", "st", "geo",
]  # fmt: skip
FLOATS = {"fl"}

NINES = "9" * 35 + "." + "9" * 30
ROWS: list[dict[str, Any]] = [
    {  # every maximum
        "id": 1, "ti": 127, "tiu": 255, "si": 32767, "siu": 65535, "mi": 8388607, "miu": 16777215,
        "i": 2147483647, "iu": 4294967295, "bi": 9223372036854775807, "biu": 18446744073709551615,
        "dec65": NINES, "dec0": 9999999999, "fl": 3.14159, "db": 1.7976931348623157e308,
        "bit1": 1, "bit5": 21, "bit64": 0xFFFFFFFFFFFFFFFF,
        "ch": "emoji\U0001f600", "vc": "\U0001f600\U0001f389 \u00fcn\u00efc\u00f6d\u00e9 \u4e2d\u6587",
        "tx": "long \U0001f680 " * 50, "chl": "caf\u00e9",
        "vcl": "\u20ac\u201a\u0192\u201e \u0081\u008d\u00ff", "txl": "\u00c0 la carte \u00bd",
        "bn": b"\x00\x01", "vb": b"\x00\x00\xff\x00", "bl": bytes(range(256)),
        "lbl": b"\x00", "js": '{"k": [1, "\U0001f600", null, 2.5e-3]}',
        "d": "9999-12-31", "dt": "9999-12-31 23:59:59.999999", "dt0": "9999-12-31 23:59:59",
        "ts": "2038-01-19 03:14:07.999999", "ts0": "2038-01-19 03:14:07",
        "tm": "838:59:59.000000", "tm2": "-00:00:00.01", "tm0": "-838:59:59", "y": 2155,
        "en": "large", "st": "read,write,admin", "geo": "POINT(1 2)",
    },
    {  # every minimum, empty strings, empty SET
        "id": 2, "ti": -128, "tiu": 0, "si": -32768, "siu": 0, "mi": -8388608, "miu": 0,
        "i": -2147483648, "iu": 0, "bi": -9223372036854775808, "biu": 0,
        "dec65": "-" + NINES, "dec0": -9999999999, "fl": -1.17549435e-38, "db": -2.2250738585072014e-308,
        "bit1": 0, "bit5": 0, "bit64": 0,
        "ch": "", "vc": "", "tx": "", "chl": "", "vcl": "", "txl": "",
        "bn": b"", "vb": b"", "bl": b"", "lbl": b"", "js": "[]",
        "d": "1000-01-01", "dt": "1000-01-01 00:00:00.000000", "dt0": "1000-01-01 00:00:00",
        "ts": "1970-01-01 00:00:01.000000", "ts0": "1970-01-01 00:00:01",
        "tm": "-838:59:59.000000", "tm2": "-01:02:03.04", "tm0": "00:00:00", "y": 1901,
        "en": "small", "st": "", "geo": "POLYGON((0 0, 10 0, 10 10, 0 10, 0 0))",
    },
    {"id": 3},  # NULL in every nullable column
    {  # rounding FLOAT, tiny DECIMAL, zero dates, YEAR 0000, trailing zeros and spaces
        "id": 4, "ti": 0, "tiu": 1, "si": -1, "siu": 1, "mi": 0, "miu": 1, "i": -1, "iu": 1,
        "bi": -1, "biu": 1,
        "dec65": "0.000000000000000000000000000001", "dec0": 0, "fl": 16777217.0, "db": 0.1,
        "bit1": 1, "bit5": 31, "bit64": 0x8000000000000001,
        "ch": "trail  ", "vc": "trail  ", "tx": " ", "chl": "x ", "vcl": "\u00ff", "txl": "\u00e9",
        "bn": b"abcd", "vb": b"ab\x00\x00", "bl": b"\x00\x00", "lbl": b"\xff" * 1000, "js": '"str"',
        "d": "0000-00-00", "dt": "0000-00-00 00:00:00.000000", "dt0": "0000-00-00 00:00:00",
        "ts": "0000-00-00 00:00:00.000000", "ts0": "0000-00-00 00:00:00",
        "tm": "-00:00:00.000001", "tm2": "00:00:00.99", "tm0": "12:34:56", "y": 0,
        "en": "medium", "st": "write", "geo": "LINESTRING(0 0, 1 1, 2 5)",
    },
    {  # a plain row
        "id": 5, "ti": 5, "tiu": 5, "si": 5, "siu": 5, "mi": 5, "miu": 5, "i": 5, "iu": 5, "bi": 5, "biu": 5,
        "dec65": "12345.678", "dec0": 42, "fl": 0.1, "db": 3.141592653589793,
        "bit1": 0, "bit5": 1, "bit64": 1, "ch": "abc", "vc": "hello", "tx": "world", "chl": "abc",
        "vcl": "hello", "txl": "world", "bn": b"ab", "vb": b"x", "bl": b"blob", "lbl": b"longblob",
        "js": '{"a": 1}', "d": "2024-02-29", "dt": "2024-02-29 12:00:00.5", "dt0": "2024-02-29 12:00:00",
        "ts": "2024-02-29 12:00:00.123456", "ts0": "2024-02-29 12:00:00", "tm": "-00:00:59.999999",
        "tm2": "-838:59:58.99", "tm0": "-00:00:01", "y": 2024, "en": "small", "st": "admin,read",
        "geo": "POINT(-1.5 2.25)",
    },
]  # fmt: skip

UPDATES = [
    "UPDATE every_type SET vc='changed \U0001f501', bit64=b'1', st='', fl=-0.0, tm='-00:00:00.5' WHERE id=1",
    "UPDATE every_type SET ti=1, chl='\u00fc', bl=x'00ff00', tm2='-00:00:59.99', y=0, st='read', "
    "geo=ST_GeomFromText('POINT(0 0)') WHERE id=3",
    "UPDATE every_type SET ts=NULL, js=NULL, en=NULL, dec65=-0.5 WHERE id IN (2, 5)",
]
DELETES = ["DELETE FROM every_type WHERE id IN (4, 5)"]


def _insert_sql(table: str, columns: list[str], geo_as_text: bool) -> str:
    marks = ["ST_GeomFromText(%s)" if c == "geo" and geo_as_text else "%s" for c in columns]
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(marks)})"


def _select_sql(table: str) -> str:
    # FLOAT: SELECT prints 6 significant digits (lossy); CAST to DOUBLE shows the stored float32 exactly.
    cols = [f"CAST({c} AS DOUBLE) AS {c}" if c in FLOATS else c for c in COLUMNS]
    return f"SELECT {', '.join(cols)} FROM {table} ORDER BY id"


def _snapshot(conn: pymysql.Connection[Any], table: str = "every_type") -> dict[int, dict[str, Any]]:
    with conn.cursor() as cur:
        cur.execute(_select_sql(table))
        rows = {row[0]: dict(zip(COLUMNS, row, strict=True)) for row in cur.fetchall()}
    for row in rows.values():
        for c in FLOATS:
            if row[c] is not None:
                row[c] = values.canonical_float32(row[c])
    return rows


def _connect(server: MariaDBServer) -> pymysql.Connection[Any]:
    # wmb's sessions run in UTC: TIMESTAMP values are then the library's naive-UTC datetimes.
    return server.connect(database=DB, init_command="SET time_zone='+00:00'")


def _assert_same_row(got: Mapping[str, Any] | None, want: Mapping[str, Any], what: str) -> None:
    assert got is not None, what
    diffs = []
    for column in COLUMNS:
        g, w = got[column], want[column]
        if g != w or type(g) is not type(w) or (isinstance(w, Decimal) and str(g) != str(w)):
            diffs.append(f"  {column}: got {g!r} want {w!r}")
    assert not diffs, f"{what} differs from SELECT:\n" + "\n".join(diffs)


@pytest.fixture(scope="module")
def golden_run(mariadb_master: MariaDBServer) -> Iterator[dict[str, Any]]:
    """Run the SQL once, read it back from the binlog, and hand the pieces to the tests."""
    values.install_library_fixes()  # latin1 0x81 etc.: the capture daemon does the same at start
    mariadb_master.execute(f"DROP DATABASE IF EXISTS {DB}")
    mariadb_master.execute(f"CREATE DATABASE {DB}")
    conn = _connect(mariadb_master)
    with conn.cursor() as cur:
        for table in ("every_type", "every_type_snap", "every_type_copy"):
            cur.execute(DDL.format(name=table))
        cur.execute("SELECT @@gtid_binlog_pos")
        start_gtid = cur.fetchone()[0]

        conn.begin()
        for row in ROWS:
            cur.execute(_insert_sql("every_type", list(row), geo_as_text=True), list(row.values()))
        conn.commit()
        after_insert = _snapshot(conn)
        for sql in UPDATES:
            cur.execute(sql)
        after_update = _snapshot(conn)
        cur.execute("INSERT INTO every_type_snap SELECT * FROM every_type")
        for sql in DELETES:
            cur.execute(sql)

    stream = BinLogStreamReader(
        connection_settings={
            "host": mariadb_master.host,
            "port": mariadb_master.port,
            "user": mariadb_master.user,
            "passwd": mariadb_master.password,
        },
        server_id=4242,
        is_mariadb=True,
        auto_position=start_gtid,
        blocking=False,
        only_events=[WriteRowsEvent, UpdateRowsEvent, DeleteRowsEvent],
        only_schemas=[DB],
        only_tables=["every_type"],
    )
    events: list[ChangeEvent] = []
    try:
        for binlog_event in stream:
            op = {WriteRowsEvent: Op.INSERT, UpdateRowsEvent: Op.UPDATE, DeleteRowsEvent: Op.DELETE}[
                type(binlog_event)
            ]
            rows = binlog_event.rows
            for index, library_row in enumerate(rows):
                images = values.row_images(binlog_event.columns, library_row, deleted=op == Op.DELETE)
                key_image = images.before if op == Op.DELETE else images.after
                assert key_image is not None
                txn_id = f"{stream.log_file}:{binlog_event.packet.log_pos}"
                events.append(
                    ChangeEvent(
                        source="bj-main",
                        origin="bj",
                        server_id=binlog_event.packet.server_id,
                        op=op,
                        database=binlog_event.schema,
                        table=binlog_event.table,
                        ts_ms=binlog_event.timestamp * 1000,
                        position=Position(gtid=None, file=stream.log_file, pos=binlog_event.packet.log_pos),
                        txn=TxnInfo(id=txn_id, seq=index, last=index == len(rows) - 1),
                        version=Version(0, binlog_event.packet.log_pos, index),
                        pk=values.primary_key(binlog_event.columns, key_image),
                        before=images.before,
                        after=images.after,
                        columns=images.columns,
                    )
                )
    finally:
        stream.close()
    yield {
        "conn": conn,
        "events": events,
        "encoded": [codec.encode(e) for e in events],
        "after_insert": after_insert,
        "after_update": after_update,
    }
    conn.close()
    mariadb_master.execute(f"DROP DATABASE IF EXISTS {DB}")


def test_binlog_images_equal_select(golden_run: dict[str, Any]) -> None:
    decoded = [codec.decode(data) for data in golden_run["encoded"]]
    assert decoded == golden_run["events"]  # the codec loses nothing
    ops = [e.op for e in decoded]
    assert ops.count(Op.INSERT) == len(ROWS)
    assert ops.count(Op.UPDATE) == 4 and ops.count(Op.DELETE) == 2
    for event in decoded:
        key = event.pk["id"]
        if event.op == Op.INSERT:
            _assert_same_row(event.after, golden_run["after_insert"][key], f"insert id={key} after")
        elif event.op == Op.UPDATE:
            _assert_same_row(event.before, golden_run["after_insert"][key], f"update id={key} before")
            _assert_same_row(event.after, golden_run["after_update"][key], f"update id={key} after")
        else:
            _assert_same_row(event.before, golden_run["after_update"][key], f"delete id={key} before")


def _stable(envelope: dict[str, Any]) -> dict[str, Any]:
    """Replace what changes from run to run (time, binlog coordinates, server id) by placeholders."""
    out = dict(envelope)
    out.update(ts_ms=0, gtid=None, file="binlog.X", pos=0, server_id=1)
    out["txn"] = {**envelope["txn"], "id": "TXN"}
    out["id"] = f"{envelope['source']}:TXN:{envelope['txn']['seq']}"
    out["version"] = [envelope["version"][0], 0, envelope["version"][2]]
    return out


def test_encoded_events_match_golden_file(golden_run: dict[str, Any]) -> None:
    got = [_stable(orjson.loads(data)) for data in golden_run["encoded"]]
    if os.environ.get("WMB_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_bytes(orjson.dumps(got, option=orjson.OPT_INDENT_2) + b"\n")
    assert GOLDEN.exists(), f"{GOLDEN} missing: run with WMB_UPDATE_GOLDEN=1 to create it"
    want = orjson.loads(GOLDEN.read_bytes())
    assert len(got) == len(want)
    for index, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == w, f"event {index} ({g['op']} id={g['pk']}) differs from {GOLDEN.name}"


def test_written_back_images_are_byte_identical(golden_run: dict[str, Any]) -> None:
    """The replica's view: INSERT the decoded images through pymysql, then compare the tables."""
    latest: dict[int, dict[str, Any]] = {}
    for data in golden_run["encoded"]:
        event = codec.decode(data)
        if event.op in (Op.INSERT, Op.UPDATE):
            assert event.after is not None
            latest[event.pk["id"]] = dict(event.after)
    conn = golden_run["conn"]
    with conn.cursor() as cur:
        for row in latest.values():
            # GEOMETRY goes back as its raw bytes: MariaDB stores WKB with the SRID prefix as is.
            cur.execute(_insert_sql("every_type_copy", list(row), geo_as_text=False), list(row.values()))
        cur.execute("CHECKSUM TABLE every_type_snap, every_type_copy")
        sums = {name.split(".")[-1]: value for name, value in cur.fetchall()}
    assert sums["every_type_snap"] == sums["every_type_copy"]
    snap, copy = _snapshot(conn, "every_type_snap"), _snapshot(conn, "every_type_copy")
    assert snap.keys() == copy.keys() == golden_run["after_update"].keys()
    for key in snap:
        _assert_same_row(copy[key], snap[key], f"copy id={key}")
    with conn.cursor() as cur:  # and byte for byte, column by column, as the server sees it
        hexed = ", ".join(f"HEX({c})" for c in COLUMNS)
        cur.execute(f"SELECT {hexed} FROM every_type_snap ORDER BY id")
        snap_hex = cur.fetchall()
        cur.execute(f"SELECT {hexed} FROM every_type_copy ORDER BY id")
        assert cur.fetchall() == snap_hex
