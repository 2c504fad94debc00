"""Pure relay logic: loop headers, token bucket, control state, checkpoint codec, settings."""

from __future__ import annotations

import pytest
from kafka import TopicPartition

from broker import checkpoint
from broker.control import ControlCommand, RouteState
from broker.routing import ORIGIN_HEADER, ROUTE_HEADER, TS_HEADER, commit_ts_ms, relay_headers, visited
from broker.settings import RelaySettings, parse_route
from broker.throttle import TokenBucket
from wmb.errors import ConfigError


def test_headers_added_on_first_hop() -> None:
    out = relay_headers([("wmb-v", b"1")], "bj", "gz")
    assert out == [("wmb-v", b"1"), (ORIGIN_HEADER, b"bj"), (ROUTE_HEADER, b"bj,gz")]


def test_headers_keep_origin_and_extend_route() -> None:
    out = relay_headers([(ORIGIN_HEADER, b"sh"), (ROUTE_HEADER, b"sh,bj")], "bj", "gz")
    assert out == [(ORIGIN_HEADER, b"sh"), (ROUTE_HEADER, b"sh,bj,gz")]


def test_origin_without_route_counts_as_visited_source() -> None:
    assert visited([(ORIGIN_HEADER, b"sh")], "bj") == ["sh"]
    out = relay_headers([(ORIGIN_HEADER, b"sh")], "bj", "gz")
    assert out is not None and dict(out)[ROUTE_HEADER] == b"sh,bj,gz"


@pytest.mark.parametrize(
    "headers",
    [
        [(ORIGIN_HEADER, b"gz")],
        [(ORIGIN_HEADER, b"sh"), (ROUTE_HEADER, b"sh,gz,bj")],
        [(ROUTE_HEADER, b"gz,bj")],
    ],
)
def test_loop_is_never_shipped(headers: list[tuple[str, bytes]]) -> None:
    assert relay_headers(headers, "bj", "gz") is None
    assert relay_headers(headers, "bj", "gz", loop_protection=False) is not None


def test_commit_ts_header() -> None:
    assert commit_ts_ms([(TS_HEADER, b"1700000000123")]) == 1700000000123
    assert commit_ts_ms([(TS_HEADER, b"junk")]) is None
    assert commit_ts_ms([]) is None


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_token_bucket_long_run_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, burst_s=1.0, clock=clock)
    assert bucket.charge(1000) == 0.0  # the burst
    wait = bucket.charge(3000)  # a batch larger than the burst: pay the debt by waiting
    assert wait == pytest.approx(3.0)
    clock.t += 3.0
    assert bucket.wait_s() == 0.0
    assert bucket.charge(500) == pytest.approx(0.5)  # the bucket is empty, not in credit


def test_token_bucket_unlimited_and_rate_change() -> None:
    bucket = TokenBucket(None)
    assert bucket.charge(10**9) == 0.0
    bucket.set_rate(100)
    assert bucket.charge(300) > 0
    bucket.set_rate(0)
    assert bucket.rate is None and bucket.charge(10**9) == 0.0


def test_control_commands_and_state() -> None:
    state = RouteState()
    assert state.effective_rate(500) == 500
    state = state.apply(ControlCommand("bj:gz", "pause"))
    state = state.apply(ControlCommand("bj:gz", "throttle", 100))
    assert state.paused and state.effective_rate(500) == 100  # throttle does not erase the pause
    state = state.apply(ControlCommand("bj:gz", "resume"))
    assert not state.paused
    state = state.apply(ControlCommand("bj:gz", "throttle", 0))
    assert state.effective_rate(500) is None  # explicit 0 = unlimited, overriding the config
    cmd = ControlCommand.from_bytes(b'{"route": "bj:gz", "cmd": "throttle", "max_bytes_per_s": 7}')
    assert cmd == ControlCommand("bj:gz", "throttle", 7)
    assert cmd.key == b"bj:gz|throttle" and ControlCommand("bj:gz", "resume").key == b"bj:gz|pause"
    assert ControlCommand.from_bytes(cmd.to_bytes()) == cmd


@pytest.mark.parametrize("raw", [b"nope", b'{"route": "bj:gz"}', b'{"route": "bj:gz", "cmd": "explode"}'])
def test_bad_control_messages_are_refused(raw: bytes) -> None:
    with pytest.raises(ConfigError):
        ControlCommand.from_bytes(raw)


def test_checkpoint_codec_and_fold() -> None:
    tp0, tp1 = TopicPartition("wmb.a.changes", 0), TopicPartition("wmb.a.changes", 1)
    assert checkpoint.parse_key(checkpoint.key("bj:gz", tp0)) == ("bj:gz", tp0)
    records = [
        (checkpoint.key("bj:gz", tp0), checkpoint.value(5)),
        (checkpoint.key("sh:gz", tp0), checkpoint.value(99)),  # another route: ignored
        (checkpoint.key("bj:gz", tp1), checkpoint.value(3)),
        (checkpoint.key("bj:gz", tp0), checkpoint.value(8)),  # latest wins
        (None, b"x"),
    ]
    assert checkpoint.fold(records, "bj:gz") == {tp0: 8, tp1: 3}


def test_settings_validation_and_json_round_trip() -> None:
    s = RelaySettings(route="bj:gz", src_dc="bj", dst_dc="gz", src_bootstrap="a:1", dst_bootstrap="b:2")
    assert s.transactional_id == "wmb-relay-bj-gz" and s.group_id == "wmb-relay-bj-gz"
    assert s.wants_topic("wmb.main.changes") and not s.wants_topic("wmb.relay.checkpoint")
    assert not s.wants_topic("gz.wmb.main.changes")
    assert RelaySettings.from_json(s.to_json()) == s
    with pytest.raises(ConfigError):
        RelaySettings(route="bj:sh", src_dc="bj", dst_dc="gz", src_bootstrap="a:1", dst_bootstrap="b:2")
    with pytest.raises(ConfigError):
        RelaySettings.from_json(b'{"route": "bj:gz", "bogus": 1}')
    assert parse_route("bj->gz") == ("bj", "gz") == parse_route("bj:gz")
    with pytest.raises(ConfigError):
        parse_route("bjgz")


def test_settings_from_the_repo_topology() -> None:
    from pathlib import Path

    from broker.settings import settings_from_topology
    from wmb.topology import load_topology

    topo = load_topology(Path(__file__).resolve().parents[2] / "topology.yaml")
    s = settings_from_topology(topo, "bj:gz", metrics_port=9401)
    assert (s.src_dc, s.dst_dc, s.route) == ("bj", "gz", "bj:gz")
    assert s.src_bootstrap == topo.dc("bj").kafka.remote_bootstrap
    assert s.dst_bootstrap == topo.dc("gz").kafka.bootstrap
    assert s.topics == ("wmb.main.changes",)
    assert s.compression == "zstd" and s.metrics_port == 9401
    assert settings_from_topology(topo, "bj->gz", None).route == "bj:gz"
    with pytest.raises(ConfigError):
        settings_from_topology(topo, "gz:bj")
