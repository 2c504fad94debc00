"""The foundation's acceptance: a client in gz talks to bj's Kafka only through the emulated link."""

from __future__ import annotations

import time

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from wmb.linkemu import LinkEmulator
from wmb.servers import KafkaServer


def test_transactional_batch_through_the_link_read_committed(
    kafka_bj: KafkaServer, link_bj_gz: LinkEmulator
) -> None:
    topic = "wmb.linktest.changes"
    kafka_bj.create_topic(topic, partitions=2, exist_ok=True)
    assert kafka_bj.wan_bootstrap == f"127.0.0.1:{link_bj_gz.port}"
    before = link_bj_gz.stats()

    # gz side: a transactional producer that bootstraps through the link (and, because bj
    # advertises its WAN listener as the link's address, stays on it for every connection).
    producer = KafkaProducer(bootstrap_servers=kafka_bj.wan_bootstrap, transactional_id="wmb-linktest")
    producer.init_transactions()
    producer.begin_transaction()
    for i in range(100):
        producer.send(topic, key=b"k%d" % (i % 2), value=b"committed-%d" % i, partition=i % 2)
    producer.commit_transaction()
    producer.begin_transaction()
    producer.send(topic, value=b"aborted", partition=0)
    producer.flush()
    producer.abort_transaction()
    producer.close()

    consumer = KafkaConsumer(
        bootstrap_servers=kafka_bj.wan_bootstrap, isolation_level="read_committed", group_id=None
    )
    tps = [TopicPartition(topic, p) for p in (0, 1)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    values: list[bytes] = []
    deadline = time.monotonic() + 60
    while len(values) < 100 and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            values.extend(r.value for r in records)
    consumer.close()

    assert sorted(values) == sorted(b"committed-%d" % i for i in range(100))
    assert b"aborted" not in values
    after = link_bj_gz.stats()
    # The records went out and came back through the emulator, not around it.
    payload = sum(len(b"committed-%d" % i) for i in range(100))
    assert after["bytes_up"] - before["bytes_up"] > payload
    assert after["bytes_down"] - before["bytes_down"] > payload
    assert after["connections_total"] > before["connections_total"]
