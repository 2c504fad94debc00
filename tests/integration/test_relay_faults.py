"""Faults under load, then gz must hold exactly the bj sequence: kill -9 of the relay, link cuts
(blackhole and reset), a restart of the destination Kafka."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest

from broker.testing import (
    RelayProcess,
    RelayThread,
    TxnWorkload,
    count,
    new_changes_topic,
    read_topic,
    relay_settings_for,
    values,
    wait_mirrored,
    wait_until,
)
from wmb.linkemu import LinkEmulator
from wmb.servers import KafkaServer, ServerPool

pytestmark = pytest.mark.integration


def assert_exact_mirror(src: str, dst: str, topic: str) -> None:
    wait_mirrored(src, dst, topic)
    src_values, dst_values = values(read_topic(src, topic)), values(read_topic(dst, topic))
    for part in src_values:
        assert len(dst_values[part]) == len(src_values[part]), f"partition {part}: count differs"
        assert dst_values[part] == src_values[part], f"partition {part}: order or content differs"
    assert not any(b"ABORTED" in v for vs in dst_values.values() for v in vs)


def test_kill9_relay_five_times_under_load(
    kafka_bj: KafkaServer, kafka_gz: KafkaServer, link_bj_gz: LinkEmulator, tmp_path: Path
) -> None:
    topic = new_changes_topic(kafka_bj, partitions=3)
    s = relay_settings_for(kafka_bj, kafka_gz, topic)
    work = TxnWorkload(kafka_bj.bootstrap, topic, 3, batch=30, abort_every=4, pause_s=0.02).start()
    rng = random.Random(5)
    try:
        for i in range(5):
            relay = RelayProcess(s, tmp_path, f"relay{i}").start()
            before = count(read_topic(kafka_gz.bootstrap, topic)) if i else 0
            wait_until(
                lambda b=before: count(read_topic(kafka_gz.bootstrap, topic)) > b,
                120,
                f"progress of relay {i}",
            )
            time.sleep(rng.uniform(0.2, 2.0))  # kill at a random point, often mid-transaction
            relay.kill9()
        work.stop()
        with_final = RelayProcess(s, tmp_path, "final").start()
        try:
            assert_exact_mirror(kafka_bj.bootstrap, kafka_gz.bootstrap, topic)
        finally:
            assert with_final.terminate() == 0, with_final.log()[-3000:]
    finally:
        work._stop.set()


def _cut_under_load(
    kafka_bj: KafkaServer, kafka_gz: KafkaServer, link: LinkEmulator, mode: str, cut_s: float
) -> None:
    topic = new_changes_topic(kafka_bj, partitions=2)
    s = relay_settings_for(kafka_bj, kafka_gz, topic)
    work = TxnWorkload(kafka_bj.bootstrap, topic, 2, batch=40, abort_every=5, pause_s=0.05).start()
    try:
        with RelayThread(s) as relay:
            wait_until(lambda: relay.relay.shipped > 200, 120, "relay flowing")
            link.cut(mode)  # type: ignore[arg-type]
            cut_at = time.monotonic()
            wait_until(lambda: not relay.relay.health()[1]["link_up"], 120, "link_down detected")
            assert relay.relay.metrics.link_up._value.get() == 0
            time.sleep(max(0.0, cut_s - (time.monotonic() - cut_at)))
            shipped_at_heal = relay.relay.shipped
            link.heal()
            healed_at = time.monotonic()
            wait_until(lambda: relay.relay.health()[1]["link_up"], 120, "link_up after heal")
            work.stop()
            assert_exact_mirror(kafka_bj.bootstrap, kafka_gz.bootstrap, topic)
            caught_up_s = time.monotonic() - healed_at
            print(
                f"\n{mode} cut of {cut_s:.0f} s: {relay.relay.shipped - shipped_at_heal} records "
                f"shipped after the heal, caught up {caught_up_s:.1f} s after it"
            )
            assert relay.alive and relay.error is None
    finally:
        work._stop.set()
        link.heal()


@pytest.mark.parametrize("mode", ["blackhole", "reset"])
def test_link_cut_under_load(
    kafka_bj: KafkaServer, kafka_gz: KafkaServer, link_bj_gz: LinkEmulator, mode: str
) -> None:
    """A bounded cut for CI (12 s: longer than the probe timeout, so the cut is noticed)."""
    _cut_under_load(kafka_bj, kafka_gz, link_bj_gz, mode, 12.0)


@pytest.mark.slow
@pytest.mark.parametrize("cut_s", [60.0, 300.0])
@pytest.mark.parametrize("mode", ["blackhole", "reset"])
def test_long_link_cut_under_load(
    kafka_bj: KafkaServer, kafka_gz: KafkaServer, link_bj_gz: LinkEmulator, mode: str, cut_s: float
) -> None:
    _cut_under_load(kafka_bj, kafka_gz, link_bj_gz, mode, cut_s)


def _restart_destination_under_load(
    kafka_bj: KafkaServer,
    server_factory: ServerPool,
    down_s: float,
    restarts: int,
    until_reset: bool = False,
    **kw: Any,
) -> float:
    """Kill -9 and restart gz ``restarts`` times under load; returns the relay's local resets.

    With ``until_reset`` the outages go on (up to ``restarts``) only until one of them has failed
    a local transaction: whether an outage catches sends in flight depends on timing."""
    gz = server_factory.kafka(name="gz_private")
    topic = new_changes_topic(kafka_bj, partitions=2)
    s = relay_settings_for(kafka_bj, gz, topic, **kw)
    work = TxnWorkload(kafka_bj.bootstrap, topic, 2, batch=40, abort_every=5, pause_s=0.05).start()
    try:
        with RelayThread(s) as relay:
            wait_until(lambda: relay.relay.shipped > 200, 120, "relay flowing")
            for i in range(restarts):
                shipped = relay.relay.shipped
                gz.kill()  # kill -9: open transactions die with it
                time.sleep(down_s)
                gz.restart()
                # kafka-python's transactional producer may ride through a short restart; when it
                # does not, the relay aborts, re-reads the checkpoint and re-seeks (local_resets)
                wait_until(
                    lambda b=shipped: relay.relay.shipped > b + 200,
                    180,
                    f"relay flowing after restart {i + 1}",
                )
                if until_reset and relay.relay.metrics.local_resets._value.get() >= 1:
                    break
            work.stop()
            assert_exact_mirror(kafka_bj.bootstrap, gz.bootstrap, topic)
            assert relay.alive and relay.error is None
            resets: float = relay.relay.metrics.local_resets._value.get()
            print(f"\nlocal_resets={resets}")
            return resets
    finally:
        work._stop.set()


def test_destination_kafka_restart_under_load(
    kafka_bj: KafkaServer, link_bj_gz: LinkEmulator, server_factory: ServerPool
) -> None:
    _restart_destination_under_load(kafka_bj, server_factory, down_s=3.0, restarts=1)


def test_destination_kafka_restarted_twice(
    kafka_bj: KafkaServer, link_bj_gz: LinkEmulator, server_factory: ServerPool
) -> None:
    _restart_destination_under_load(kafka_bj, server_factory, down_s=3.0, restarts=2)


def test_destination_down_past_the_delivery_timeout(
    kafka_bj: KafkaServer, link_bj_gz: LinkEmulator, server_factory: ServerPool
) -> None:
    """Forces the local-failure path: gz stays down longer than the relay's delivery timeout (and
    than its local flush bound), so the sends of the open transaction expire or the flush gives up
    (kafka-python, left alone, bumps the epoch, skips the EndTxn and reports the commit as done).
    The relay must drop the producer, re-read its checkpoint read_committed and re-seek, skipping
    nothing and duplicating nothing.  (The transaction timeout stays above
    the outage: past it the coordinator bumps the epoch and the relay sees itself fenced.)"""
    resets = _restart_destination_under_load(
        kafka_bj,
        server_factory,
        down_s=15.0,
        restarts=4,
        until_reset=True,
        delivery_timeout_ms=6_000,
    )
    assert resets >= 1, "the outage did not fail a local transaction: the test forced nothing"
