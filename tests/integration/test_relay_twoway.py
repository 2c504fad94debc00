"""Two-way bj <-> gz: both sides write into the same topic name, two relays mirror it each way.

Each relay writes into its local cluster under the very topic the other relay mirrors back, so
without loop protection every event would ping-pong forever.  With it, each event exists exactly
once per datacenter.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter

import pytest

from broker.testing import RelayThread, TxnWorkload, count, read_topic, relay_settings_for, wait_until
from wmb.linkemu import LinkEmulator
from wmb.servers import KafkaServer

pytestmark = pytest.mark.integration


def test_two_way_topology_has_no_loops(
    kafka_bj: KafkaServer, kafka_gz: KafkaServer, link_bj_gz: LinkEmulator
) -> None:
    topic = f"wmb.tw{uuid.uuid4().hex[:8]}.changes"
    kafka_bj.create_topic(topic, partitions=2)
    kafka_gz.create_topic(topic, partitions=2)
    bj_to_gz = relay_settings_for(kafka_bj, kafka_gz, topic)
    gz_to_bj = relay_settings_for(
        kafka_gz,
        kafka_bj,
        topic,
        route="gz:bj",
        src_dc="gz",
        dst_dc="bj",
        src_bootstrap=kafka_gz.bootstrap,  # the link emulator fronts bj only; gz -> bj goes direct
        dst_bootstrap=kafka_bj.bootstrap,
    )
    with RelayThread(bj_to_gz) as r1, RelayThread(gz_to_bj) as r2:
        w_bj = TxnWorkload(kafka_bj.bootstrap, topic, 2, origin="bj", batch=20, abort_every=3, max_txns=15)
        w_gz = TxnWorkload(kafka_gz.bootstrap, topic, 2, origin="gz", batch=20, abort_every=3, max_txns=15)
        w_bj.start()
        w_gz.start()
        w_bj.join()
        w_gz.join()
        total = w_bj.committed + w_gz.committed
        for kafka in (kafka_bj, kafka_gz):
            wait_until(
                lambda k=kafka: count(read_topic(k.bootstrap, topic)) >= total, 120, f"{total} in {kafka}"
            )
        # let both relays see the echoes (they must skip them) and settle
        wait_until(
            lambda: (
                r1.relay.metrics.skipped_loop._value.get() >= w_gz.committed
                and r2.relay.metrics.skipped_loop._value.get() >= w_bj.committed
            ),
            120,
            "both relays skipped the other side's echoes",
        )
        time.sleep(2)  # not a timing assertion: any late loop would only add records
        for kafka in (kafka_bj, kafka_gz):
            recs = [r for rs in read_topic(kafka.bootstrap, topic).values() for r in rs]
            seen = Counter(r.value for r in recs)
            assert len(recs) == total, f"{kafka}: {len(recs)} records, expected {total}"
            assert all(n == 1 for n in seen.values()), "an event exists more than once"
            assert not any(b"ABORTED" in v for v in seen)
        # per-partition order of each origin is kept on both sides
        for kafka in (kafka_bj, kafka_gz):
            for part, recs in read_topic(kafka.bootstrap, topic).items():
                for origin in (b"bj", b"gz"):
                    seqs = [int(r.value.split(b":")[2]) for r in recs if r.value.startswith(origin + b":")]
                    assert seqs == list(range(len(seqs))), f"{kafka} p{part} {origin!r} out of order"
        assert r1.error is None and r2.error is None
