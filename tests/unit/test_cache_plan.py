"""Pure logic of the cache updater: rendering, keys, planning (no servers)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import orjson
import pytest

from cache_updater.cache import (
    OP_DELETE,
    OP_HASH,
    OP_JSON,
    NoPrimaryKeyError,
    plan,
    render,
    tombstone_key,
)
from cache_updater.cache_settings import TableCache
from cache_updater.verify_cache import _pattern
from wmb.event import ChangeEvent, Op, Position, TxnInfo, Version


def ev(
    op: Op,
    pk: dict[str, Any],
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    seq: int = 5,
) -> ChangeEvent:
    return ChangeEvent(
        source="s1",
        origin="bj",
        server_id=1,
        op=op,
        database="app",
        table="users",
        ts_ms=1_700_000_000_000,
        position=Position("0-1-5", "bin.000001", 100),
        txn=TxnInfo("0-1-5", 0, True),
        version=Version(1, seq, 0),
        pk=pk,
        before=before,
        after=after,
    )


USERS = TableCache(table="app.users", key="user:{id}", primary_key=("id",))


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("héllo", "héllo"),
        (-42, "-42"),
        (Decimal("12.50"), "12.50"),
        (0.1, "0.1"),
        (3.14159, "3.14159"),
        (b"\x00\xff", "AP8="),
        (b"", ""),
        (dt.datetime(2024, 1, 2, 3, 4, 5), "2024-01-02 03:04:05"),
        (dt.datetime(2024, 1, 2, 3, 4, 5, 120), "2024-01-02 03:04:05.000120"),
        (dt.date(2024, 1, 2), "2024-01-02"),
        (dt.timedelta(hours=-1, minutes=-2, seconds=-3), "-01:02:03"),
        (dt.timedelta(hours=838, microseconds=5), "838:00:00.000005"),
        (frozenset({"b", "a"}), "a,b"),
    ],
)
def test_render_is_stable_text(value: object, text: str) -> None:
    assert render(value) == text


def test_tombstone_key_shares_the_slot() -> None:
    assert tombstone_key("user:1") == "{user:1}:tomb"
    assert tombstone_key("{t}user:1") == "{t}user:1:tomb"


def test_refresh_hash_omits_nulls_and_keeps_the_subset() -> None:
    table = TableCache(
        table="app.users", key="user:{id}", primary_key=("id",), columns=("id", "name", "nick")
    )
    [w] = plan(ev(Op.INSERT, {"id": 7}, after={"id": 7, "name": "a", "nick": None, "secret": "x"}), table, 60)
    assert (w.key, w.op, w.version) == ("user:7", OP_HASH, "0000000001.00000000000000000005.0000000000")
    assert w.args == ("2", "id", "7", "name", "a", "nick")


def test_refresh_json_puts_version_first() -> None:
    table = TableCache(table="app.users", key="u:{id}", primary_key=("id",), format="json", ttl_s=10)
    [w] = plan(ev(Op.INSERT, {"id": 1}, after={"id": 1, "n": None}), table, 60)
    assert w.op == OP_JSON and w.ttl_ms == 10_000
    doc = w.args[0]
    assert isinstance(doc, bytes) and doc.startswith(b'{"_v":"0000000001.')
    assert orjson.loads(doc) == {"_v": w.version, "id": "1", "n": None}


def test_delete_and_invalidate_leave_tombstones() -> None:
    [d] = plan(ev(Op.DELETE, {"id": 3}, before={"id": 3}), USERS, 60)
    assert (d.key, d.op, d.ttl_ms) == ("user:3", OP_DELETE, 60_000)
    inval = TableCache(table="app.users", key="user:{id}", primary_key=("id",), mode="invalidate")
    [i] = plan(ev(Op.UPDATE, {"id": 3}, before={"id": 3}, after={"id": 3}), inval, 60)
    assert i.op == OP_DELETE


def test_pk_change_deletes_the_old_key() -> None:
    writes = plan(ev(Op.UPDATE, {"id": 4}, before={"id": 3, "n": "a"}, after={"id": 4, "n": "a"}), USERS, 60)
    assert [(w.key, w.op) for w in writes] == [("user:3", OP_DELETE), ("user:4", OP_HASH)]


def test_row_without_pk_is_poison() -> None:
    with pytest.raises(NoPrimaryKeyError):
        plan(ev(Op.INSERT, {}, after={"id": 1}), USERS, 60)


def test_non_row_events_plan_nothing() -> None:
    heartbeat = ev(Op.HEARTBEAT, {})
    assert plan(heartbeat, USERS, 60) == []


def test_scan_pattern_escapes_globs() -> None:
    assert _pattern("user:{id}") == "user:*"
    assert _pattern("a*b:{x}:{y}") == "a\\*b:*:*"
