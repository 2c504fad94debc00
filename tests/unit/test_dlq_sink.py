"""DeadLetterSink across a lost local Kafka (fake producers: no servers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from kafka.errors import KafkaTimeoutError

from cache_updater import dlq
from wmb.errors import GaveUpError
from wmb.runtime import StopToken


@dataclass
class Rec:
    topic: str = "wmb.s1.changes"
    partition: int = 0
    offset: int = 0
    key: bytes | None = b"k"
    value: bytes | None = b"\x00garbage"
    headers: Any = None


class FakeFuture:
    def __init__(self, error: BaseException | None) -> None:
        self.error = error
        self.is_done = True

    def succeeded(self) -> bool:
        return self.error is None

    def get(self, timeout: float | None = None) -> Any:
        if self.error is not None:
            raise self.error
        return "metadata"


class FakeProducer:
    """Every send fails (the producer gave the batch up after its delivery timeout) while ``down``."""

    def __init__(self, world: dict[str, Any]) -> None:
        self.world = world
        self.closed = False
        self.config = {"bootstrap_servers": "fake:9092"}
        world["producers"].append(self)

    def send(self, topic: str, key: Any = None, value: Any = None, headers: Any = None) -> FakeFuture:
        self.world["sent"].append((topic, value, dict(headers or ())["wmb-dlq-offset"]))
        down = self.world["down"] > 0
        return FakeFuture(KafkaTimeoutError("Expiring 1 record(s): delivery timeout") if down else None)

    def flush(self, timeout: float | None = None) -> None:
        if self.world["down"] > 0:
            self.world["down"] -= 1

    def close(self, timeout: float | None = None) -> None:
        self.closed = True


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setattr(dlq, "ensure_topic", lambda *a, **kw: None)
    return {"down": 0, "sent": [], "producers": []}


def sink(world: dict[str, Any], **kw: Any) -> dlq.DeadLetterSink:
    return dlq.DeadLetterSink(
        "fake:9092", "gz", "cache", producer_factory=lambda _b: FakeProducer(world), **kw
    )


def test_park_does_no_io_and_flush_sends_once(world: dict[str, Any]) -> None:
    s = sink(world)
    s.park(Rec(offset=3), "decode", "bad bytes")
    s.park(Rec(offset=4), "no-pk")
    assert world["producers"] == [] and s.pending == 2  # nothing touched Kafka yet
    s.flush()
    assert [o for _t, _v, o in world["sent"]] == [b"3", b"4"] and s.pending == 0
    s.flush()  # nothing pending: no I/O
    assert len(world["sent"]) == 2


def test_a_dead_letter_given_up_by_the_producer_is_sent_again(world: dict[str, Any]) -> None:
    """A bare flush() returns after a delivery timeout; the sink must not: it re-sends, on a new producer."""
    world["down"] = 2  # the first two attempts fail
    s = sink(world)
    s.park(Rec(offset=7), "decode")
    s.flush()
    assert s.pending == 0
    assert [o for _t, _v, o in world["sent"]] == [b"7", b"7", b"7"]
    assert len(world["producers"]) == 3
    assert all(p.closed for p in world["producers"][:2]) and not world["producers"][2].closed


def test_gives_up_past_the_bound_and_keeps_the_records(world: dict[str, Any]) -> None:
    world["down"] = 10**6
    s = sink(world, max_elapsed_s=0.5)
    s.park(Rec(offset=9), "decode")
    with pytest.raises(GaveUpError, match="1 dead letter"):
        s.flush()
    assert s.pending == 1  # not dropped: the caller commits nothing past it


def test_a_stop_while_kafka_is_down_gives_up_instead_of_hanging(world: dict[str, Any]) -> None:
    world["down"] = 10**6
    stop = StopToken()
    stop.stop("test")
    s = sink(world, stop=stop)
    s.park(Rec(offset=1), "decode")
    with pytest.raises(GaveUpError, match="stopped"):
        s.flush()
    assert s.pending == 1
