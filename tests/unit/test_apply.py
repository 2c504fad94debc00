"""Pure parts of the replica applier: transaction assembly, group commit, SQL, marker, settings."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pymysql
import pytest

from cache_updater.applier import sql
from cache_updater.applier.mariadb import _dup_key, is_transient
from cache_updater.applier.marker import mark_ddl
from cache_updater.applier.testing import synthetic_insert_txn, topology_yaml
from cache_updater.applier.txn import GroupBuffer, TxnAssembler, next_offsets
from cache_updater.apply import (
    ApplySettings,
    ConflictPolicy,
    DdlPolicy,
    ReplicaConn,
    is_applier_ddl,
    is_applier_transaction,
    settings_from_topology,
)
from wmb.topology import parse_topology

CONN = ReplicaConn("127.0.0.1", 3306, "root", "")


def test_assembler_closes_on_last_flag() -> None:
    a = TxnAssembler("t", 0)
    evs = synthetic_insert_txn("s", 5, "d", "x", 1, 3)
    assert a.feed(10, evs[0]) == []
    assert a.feed(11, evs[1]) == []
    [txn] = a.feed(12, evs[2])
    assert (txn.first_offset, txn.last_offset, txn.next_offset) == (10, 12, 13)
    assert txn.gtid == "0-1-5" and txn.row_count == 3 and not txn.is_ddl
    assert a.pending == 0


def test_assembler_closes_on_txn_change_without_last() -> None:
    a = TxnAssembler("t", 0)
    first = synthetic_insert_txn("s", 1, "d", "x", 1, 2)[:1]  # its last event never comes
    second = synthetic_insert_txn("s", 2, "d", "x", 9, 1)
    assert a.feed(0, first[0]) == []
    done = a.feed(1, second[0])
    assert [t.gtid for t in done] == ["0-1-1", "0-1-2"]


def test_assembler_poison_record_joins_open_txn() -> None:
    a = TxnAssembler("t", 0)
    evs = synthetic_insert_txn("s", 1, "d", "x", 1, 2)
    a.feed(0, evs[0])
    assert a.feed(1, None) == []
    [txn] = a.feed(2, evs[1])
    assert (txn.first_offset, txn.last_offset) == (0, 2)
    assert a.feed(3, None) == []  # nothing open: covered by the next transaction's position row


def test_group_buffer_bounds() -> None:
    g = GroupBuffer(max_txns=2, max_ms=50)
    a = TxnAssembler("t", 0)
    [t1] = a.feed(0, synthetic_insert_txn("s", 1, "d", "x", 1, 1)[0])
    [t2] = a.feed(1, synthetic_insert_txn("s", 2, "d", "x", 2, 1)[0])
    assert not g.ready()
    g.add(t1)
    assert not g.ready(now=g._opened_at + 0.01)
    assert g.ready(now=g._opened_at + 0.06)  # age bound
    g.add(t2)
    assert g.ready(now=g._opened_at)  # count bound
    assert next_offsets(g.txns)[("t", 0)] is t2
    assert g.take() == [t1, t2] and g.txns == []


def test_literals_are_exact() -> None:
    assert sql.lit(b"\x00'") == "_binary X'0027'"  # hex: NUL and quotes survive any sql_mode
    assert sql.lit(b"") == "_binary X''"
    assert sql.lit(Decimal("-1.000000000000000000000000000001")) == "-1.000000000000000000000000000001"
    assert sql.lit(-dt.timedelta(microseconds=1)) == "'-00:00:00.000001'"
    assert sql.lit(dt.datetime(2020, 1, 2, 3, 4, 5, 6)) == "'2020-01-02 03:04:05.000006'"
    assert sql.lit(frozenset({"b", "a"})) == "'a,b'"
    assert sql.lit(None) == "NULL"
    assert sql.lit(True) == "1"
    assert sql.qident("we`ird") == "`we``ird`"


def test_statements() -> None:
    stmt = sql.upsert_many("d", "t", ["id", "v"], [[1, "a"], [2, None]], ["id"])
    assert stmt == (
        "INSERT INTO `d`.`t` (`id`, `v`) VALUES (1,'a'),(2,NULL) ON DUPLICATE KEY UPDATE `v`=VALUES(`v`)"
    )
    assert sql.update_by_pk("d", "t", {"id": 1, "v": "x"}, {"id": 1}) == (
        "UPDATE `d`.`t` SET `v`='x' WHERE `id` <=> 1"
    )
    assert sql.update_by_pk("d", "t", {"id": 1}, {"id": 1}).startswith("UPDATE `d`.`t` SET `id`=`id`")
    assert (
        sql.delete_by_pk("d", "t", {"a": 1, "b": "x"})
        == "DELETE FROM `d`.`t` WHERE `a` <=> 1 AND `b` <=> 'x'"
    )
    assert sql.delete_where("d", "t", {"u": "k"}, {"id": 3}) == (
        "DELETE FROM `d`.`t` WHERE `u` <=> 'k' AND NOT (`id` <=> 3)"
    )


def test_marker() -> None:
    assert is_applier_transaction(["app.users", "wmb.wmb_apply_marker"])
    assert is_applier_transaction([("other_schema", "WMB_APPLY_MARKER")])
    assert is_applier_transaction(["wmb_apply_marker"])
    assert not is_applier_transaction(["app.users", "wmb.wmb_apply_state"])
    assert not is_applier_transaction([])
    ddl = mark_ddl("ALTER TABLE t ADD c INT")
    assert is_applier_ddl(ddl) and not is_applier_ddl("ALTER TABLE t ADD c INT")


def test_dup_key_and_transient() -> None:
    exc = pymysql.err.IntegrityError(1062, "Duplicate entry 'x' for key 'u_email'")
    assert _dup_key(exc) == "u_email"
    assert _dup_key(pymysql.err.IntegrityError(1062, "Duplicate entry '1' for key 'PRIMARY'")) == "PRIMARY"
    assert _dup_key(pymysql.err.IntegrityError(1452, "fk")) is None
    assert is_transient(pymysql.err.OperationalError(2013, "Lost connection"))
    assert is_transient(pymysql.err.OperationalError(1213, "Deadlock"))
    assert is_transient(pymysql.err.InterfaceError(0, ""))
    assert not is_transient(pymysql.err.OperationalError(1054, "Unknown column"))
    assert not is_transient(pymysql.err.ProgrammingError(1146, "no table"))


def test_settings_policies() -> None:
    s = ApplySettings(
        dc="gz",
        replica=CONN,
        kafka_bootstrap="k:9092",
        topics=(("src", "wmb.src.changes"),),
        tables=("app.*",),
        conflict_per_table={"app.logs": ConflictPolicy.SKIP, "app.tmp_*": ConflictPolicy.OVERWRITE},
    )
    assert s.wants("app", "users") and not s.wants("other", "users")
    assert s.conflict_policy("app", "logs") == ConflictPolicy.SKIP
    assert s.conflict_policy("app", "tmp_1") == ConflictPolicy.OVERWRITE
    assert s.conflict_policy("app", "users") == ConflictPolicy.HALT
    assert s.group_id == "wmb-apply-gz" and s.sources == ("src",)


def test_settings_from_topology() -> None:
    text = topology_yaml(
        kafka_bootstrap="127.0.0.1:9092",
        master=CONN,
        replica=ReplicaConn("127.0.0.1", 3307, "wmb", "pw"),
        source="main",
        tables=["app.*"],
        per_table={"app.logs": "skip"},
        ddl="skip",
        max_txns=7,
        max_ms=3,
    )
    s = settings_from_topology(parse_topology(text), "gz")
    assert s.replica == ReplicaConn("127.0.0.1", 3307, "wmb", "pw")
    assert s.master == CONN
    assert s.topics == (("main", "wmb.main.changes"),)
    assert s.ddl == DdlPolicy.SKIP and s.tables == ("app.*",)
    assert s.conflict_per_table == {"app.logs": ConflictPolicy.SKIP}
    assert (s.group_max_txns, s.group_max_ms, s.parallel_workers) == (7, 3, 0)
    with pytest.raises(Exception, match="no replica"):
        settings_from_topology(parse_topology(text), "bj")
