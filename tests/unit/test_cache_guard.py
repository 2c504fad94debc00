"""The Lua version guard on a real Redis: reorders, replays and resurrections are no-ops."""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest
import redis

from cache_updater.cache import RedisCache, plan, tombstone_key
from cache_updater.cache_settings import TableCache
from wmb.event import ChangeEvent, Op, Position, TxnInfo, Version
from wmb.servers import RedisServer

HASH = TableCache(table="app.t", key="t:{id}", primary_key=("id",))
JSON = TableCache(table="app.t", key="j:{id}", primary_key=("id",), format="json", ttl_s=100)
INVAL = TableCache(table="app.t", key="i:{id}", primary_key=("id",), mode="invalidate")


def ev(op: Op, seq: int, name: str | None = None, epoch: int = 1, row_id: int = 1) -> ChangeEvent:
    row = {"id": row_id, "name": name}
    return ChangeEvent(
        source="s",
        origin="bj",
        server_id=1,
        op=op,
        database="app",
        table="t",
        ts_ms=1,
        position=Position(f"0-1-{seq}", "b.1", seq),
        txn=TxnInfo(f"0-1-{seq}", 0, True),
        version=Version(epoch, seq, 0),
        pk={"id": row_id},
        before=row if op != Op.INSERT else None,
        after=row if op != Op.DELETE else None,
    )


@pytest.fixture
def client(redis_gz: RedisServer) -> Iterator[redis.Redis]:
    c = redis_gz.client()
    c.flushall()
    yield c
    c.close()


def apply(cache: RedisCache, table: TableCache, *events: ChangeEvent) -> tuple[int, int]:
    writes = [w for e in events for w in plan(e, table, 60)]
    r = cache.apply(writes)
    return r.applied, r.stale


def test_older_after_newer_is_a_noop(client: redis.Redis) -> None:
    cache = RedisCache(client)
    assert apply(cache, HASH, ev(Op.INSERT, 5, "new")) == (1, 0)
    assert apply(cache, HASH, ev(Op.UPDATE, 4, "old")) == (0, 1)
    assert apply(cache, HASH, ev(Op.UPDATE, 5, "same version")) == (0, 1)
    assert client.hgetall("t:1") == {
        b"id": b"1",
        b"name": b"new",
        b"_v": b"0000000001.00000000000000000005.0000000000",
    }


def test_delete_then_older_insert_does_not_resurrect(client: redis.Redis) -> None:
    cache = RedisCache(client)
    assert apply(cache, HASH, ev(Op.INSERT, 1, "a"), ev(Op.DELETE, 3)) == (2, 0)
    assert not client.exists("t:1")
    assert 0 < client.pttl(tombstone_key("t:1")) <= 60_000
    assert apply(cache, HASH, ev(Op.INSERT, 2, "zombie"), ev(Op.UPDATE, 3, "zombie")) == (0, 2)
    assert not client.exists("t:1")
    # A newer insert (re-created row) wins and clears the tombstone.
    assert apply(cache, HASH, ev(Op.INSERT, 4, "reborn")) == (1, 0)
    assert client.hget("t:1", "name") == b"reborn" and not client.exists(tombstone_key("t:1"))


def test_null_column_field_goes_away(client: redis.Redis) -> None:
    cache = RedisCache(client)
    apply(cache, HASH, ev(Op.INSERT, 1, "a"), ev(Op.UPDATE, 2, None))
    assert client.hgetall("t:1") == {b"id": b"1", b"_v": b"0000000001.00000000000000000002.0000000000"}


def test_json_mode_guard_and_ttl(client: redis.Redis) -> None:
    cache = RedisCache(client)
    assert apply(cache, JSON, ev(Op.INSERT, 7, "x"), ev(Op.UPDATE, 6, "older")) == (1, 1)
    doc = orjson.loads(client.get("j:1"))  # type: ignore[arg-type]
    assert doc == {"_v": "0000000001.00000000000000000007.0000000000", "id": "1", "name": "x"}
    assert 0 < client.pttl("j:1") <= 100_000


def test_epoch_beats_sequence(client: redis.Redis) -> None:
    cache = RedisCache(client)
    apply(cache, HASH, ev(Op.INSERT, 900, "old master"))
    assert apply(cache, HASH, ev(Op.UPDATE, 3, "new master", epoch=2)) == (1, 0)
    assert apply(cache, HASH, ev(Op.UPDATE, 901, "late from old master")) == (0, 1)
    assert client.hget("t:1", "name") == b"new master"


def test_invalidate_mode_tombstone_rejects_older_invalidations(client: redis.Redis) -> None:
    cache = RedisCache(client)
    client.set("i:1", "filled by the app")
    assert apply(cache, INVAL, ev(Op.UPDATE, 5, "x")) == (1, 0)
    assert not client.exists("i:1")
    client.set("i:1", "refilled by the app")
    assert apply(cache, INVAL, ev(Op.UPDATE, 4, "replayed")) == (0, 1)
    assert client.get("i:1") == b"refilled by the app"


def test_noscript_after_script_flush_reloads(client: redis.Redis) -> None:
    cache = RedisCache(client)
    apply(cache, HASH, ev(Op.INSERT, 1, "a"))
    client.script_flush()
    assert apply(cache, HASH, ev(Op.UPDATE, 2, "b"), ev(Op.UPDATE, 1, "old")) == (1, 1)
    assert client.hget("t:1", "name") == b"b"
