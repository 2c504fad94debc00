"""Integration fixtures shared by the relay tests: the emulated bj -> gz WAN link."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from wmb.linkemu import LinkEmulator
from wmb.servers import KafkaServer


@pytest.fixture
def link_bj_gz(kafka_bj: KafkaServer) -> Iterator[LinkEmulator]:
    """The bj -> gz link (20 ms each way) in front of kafka_bj's WAN listener.

    It listens on ``kafka_bj.wan_advertised_port``, so a client that bootstraps from
    ``kafka_bj.wan_bootstrap`` stays on the link for every broker connection.  One per test: a test
    may cut, heal or reshape it freely.
    """
    assert kafka_bj.wan_port is not None and kafka_bj.wan_advertised_port is not None
    link = LinkEmulator(
        "127.0.0.1", kafka_bj.wan_port, listen_port=kafka_bj.wan_advertised_port, delay_ms=20, name="bj-gz"
    ).start()
    try:
        yield link
    finally:
        link.stop()
