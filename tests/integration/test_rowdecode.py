"""binlog_capture.rowdecode gives exactly the library's rows: same values, types, none_sources, order.

Every rows event of a workload over all the types the fast decoder covers (limits, NULLs, zero and
invalid dates, latin1 bytes cp1252 lacks, wide VARCHARs, an ALTER mid-stream) is decoded twice, by
the plan and by python-mysql-replication, from the same packet; the every-type table (BIT, SET,
TIME, GEOMETRY ...) must fall back to the library.
"""

from __future__ import annotations

import random
from decimal import Decimal
from typing import Any

import pytest

from binlog_capture import rowdecode
from binlog_capture.reader import StartPoint, TxnReader
from wmb import values
from wmb.servers import MariaDBServer

from . import test_golden_types as golden

DB = "wmb_rowdecode"
DDL = """CREATE TABLE fast (id INT NOT NULL PRIMARY KEY,
  ti TINYINT, tiu TINYINT UNSIGNED, si SMALLINT, siu SMALLINT UNSIGNED, mi MEDIUMINT,
  miu MEDIUMINT UNSIGNED, i INT, iu INT UNSIGNED, bi BIGINT, biu BIGINT UNSIGNED,
  dec65 DECIMAL(65,30), dec0 DECIMAL(10,0), d10 DECIMAL(10,10), d92 DECIMAL(9,2), d183 DECIMAL(18,3),
  d4 DECIMAL(4,1), fl FLOAT, db DOUBLE,
  ch CHAR(10) CHARACTER SET utf8mb4, vc VARCHAR(100) CHARACTER SET utf8mb4,
  vcw VARCHAR(300) CHARACTER SET utf8mb4, tx TEXT CHARACTER SET utf8mb4,
  chl CHAR(10) CHARACTER SET latin1, vcl VARCHAR(100) CHARACTER SET latin1, txl TEXT CHARACTER SET latin1,
  mt MEDIUMTEXT, tt TINYTEXT, lt LONGTEXT, a VARCHAR(20) CHARACTER SET ascii,
  bn BINARY(4), vb VARBINARY(16), bl BLOB, lbl LONGBLOB, tb TINYBLOB,
  d DATE, dt DATETIME(6), dt0 DATETIME, dt3 DATETIME(3), dt1 DATETIME(1), dt5 DATETIME(5),
  ts TIMESTAMP(6) NULL DEFAULT NULL, ts0 TIMESTAMP NULL DEFAULT NULL, ts2 TIMESTAMP(2) NULL DEFAULT NULL,
  y YEAR, en ENUM('small','medium','large'), en2 ENUM('x','y'), js JSON
) DEFAULT CHARSET=utf8mb4"""


def _row(rnd: random.Random, k: int, cols: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(cols)
    row["id"] = k
    if k % 7 == 3:
        return row  # NULL everywhere
    c = rnd.choice
    row.update(
        ti=rnd.randint(-128, 127), tiu=rnd.randint(0, 255), si=rnd.randint(-32768, 32767),
        siu=rnd.randint(0, 65535), mi=rnd.randint(-8388608, 8388607), miu=rnd.randint(0, 16777215),
        i=rnd.randint(-(2**31), 2**31 - 1), iu=rnd.randint(0, 2**32 - 1),
        bi=rnd.randint(-(2**63), 2**63 - 1), biu=rnd.randint(0, 2**64 - 1),
        dec65=c(["-", ""]) + str(rnd.randint(0, 10**35 - 1)) + "."
        + str(rnd.randint(0, 10**30 - 1)).zfill(30),
        dec0=rnd.randint(-9999999999, 9999999999),
        d10="0." + str(rnd.randint(0, 10**10 - 1)).zfill(10) if k % 2 else "-0.0000000001",
        d92=f"{rnd.uniform(-9999999, 9999999):.2f}", d183=f"{rnd.uniform(-1e14, 1e14):.3f}",
        d4=c(["-999.9", "0.0", "999.9", "-0.1", "12.3"]),
        fl=c([3.14159, -1e-30, 16777217.0, 0.0, -0.0]), db=c([0.1, -1.7976931348623157e308, 5e-324]),
        ch=c(["", "emoji\U0001f600", "abc  "]), vc=c(["", "h\u00e9llo \u4e2d"]),
        vcw="w" * rnd.randint(0, 300),
        tx="t\U0001f680" * rnd.randint(0, 10), chl=c(["caf\u00e9", ""]), vcl="\u20ac\u201a\u0081\u008d\u00ff",
        txl="\u00c0 la carte", mt="m" * rnd.randint(0, 700), tt="tiny", lt="long" * rnd.randint(0, 10),
        a="ascii!", bn=rnd.randbytes(rnd.randint(0, 4)), vb=rnd.randbytes(rnd.randint(0, 16)),
        bl=bytes(range(256)) if k % 2 else b"", lbl=b"\xff" * rnd.randint(0, 30), tb=b"\x00",
        d=c(["1000-01-01", "9999-12-31", "0000-00-00", "2024-02-29", "2024-00-10", "2024-05-00"]),
        dt=c(["9999-12-31 23:59:59.999999", "1000-01-01 00:00:00.000000", "0000-00-00 00:00:00",
              "2024-02-29 12:00:00.5", "2024-00-00 00:00:00"]),
        dt0=c(["2024-01-02 03:04:05", "0000-00-00 00:00:00"]), dt3="2024-01-02 03:04:05.678",
        dt1="2024-01-02 03:04:05.9", dt5="2024-01-02 03:04:05.12345",
        ts=c(["2038-01-19 03:14:07.999999", "1970-01-01 00:00:01.000000", "0000-00-00 00:00:00"]),
        ts0="2024-01-02 03:04:05", ts2="2024-01-02 03:04:05.07",
        y=c([1901, 2155, 0, 2024]), en=c(["small", "large", ""]), en2="y", js='{"a": [1, 2.5]}',
    )  # fmt: skip
    return row


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Decimal):
        return str(a) == str(b)
    return bool(a == b)


def test_plan_decode_equals_the_library(
    mariadb_master: MariaDBServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    values.install_library_fixes()
    db = mariadb_master
    db.execute(f"DROP DATABASE IF EXISTS {DB}")
    db.execute(f"CREATE DATABASE {DB}")
    start = db.gtid_binlog_pos()
    conn = db.connect(database=DB, init_command="SET time_zone='+00:00'")
    rnd = random.Random(7)
    with conn.cursor() as cur:
        cur.execute("SET SESSION sql_mode=''")  # zero and invalid dates are what the binlog can hold
        cur.execute(golden.DDL.format(name="every_type"))
        for row in golden.ROWS:
            cur.execute(golden._insert_sql("every_type", list(row), geo_as_text=True), list(row.values()))
        conn.commit()
        cur.execute(DDL)
        cols = list(_row(random.Random(0), 1, ["id"]))
        marks = ",".join(["%s"] * len(cols))
        for k in range(1, 200):
            row = _row(rnd, k, cols)
            cur.execute(f"INSERT INTO fast ({','.join(cols)}) VALUES ({marks})", [row[c] for c in cols])
            if k % 10 == 0:
                conn.commit()
        conn.commit()
        cur.execute("UPDATE fast SET vc=CONCAT(vc,'x'), dec65=-dec65, d=NULL, y=0 WHERE id % 3 = 0")
        cur.execute("DELETE FROM fast WHERE id % 5 = 0")
        cur.execute("ALTER TABLE fast ADD z INT FIRST, DROP COLUMN d4")
        cur.execute("UPDATE fast SET z = id WHERE id < 50")
        conn.commit()
    conn.close()
    end = db.gtid_binlog_pos()

    seen = {"fast": 0, "library": 0, "rows": 0}
    problems: list[str] = []

    def both(ev: Any) -> list[dict[str, Any]]:
        wrapper = ev.packet
        raw = wrapper.packet
        before = raw._position, wrapper.read_bytes
        fast = rowdecode._decode(ev)
        after_fast = raw._position, wrapper.read_bytes
        raw._position, wrapper.read_bytes = before
        ev._RowsEvent__rows = None
        library: list[dict[str, Any]] = ev.rows
        if fast is None:
            seen["library"] += 1
            assert ev.table == "every_type", f"{ev.table}: the plan refused a table it covers"
        else:
            seen["fast"] += 1
            seen["rows"] += len(library)
            if not _same(fast, library) or after_fast != (raw._position, wrapper.read_bytes):
                problems.append(f"{ev.table}: {fast[:1]!r} != {library[:1]!r}")
        return library

    monkeypatch.setattr(rowdecode, "rows", both)
    reader = TxnReader(
        {"host": db.host, "port": db.port, "user": db.user, "password": db.password},
        4343,
        StartPoint(start),
        only_schemas=[DB],
    )
    try:
        for txn in reader.transactions():
            if txn.gtid == end:
                break
    finally:
        reader.close()
    assert not problems, problems[:3]
    assert seen["fast"] >= 20 and seen["rows"] >= 300 and seen["library"] >= 1, seen
