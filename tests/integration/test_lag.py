"""`wmb lag` agrees with Kafka's own `kafka-consumer-groups.sh --describe`, and judges hops like Burrow."""

from __future__ import annotations

import subprocess
import time

import orjson
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from wmb.lag import HopLag, PartitionLag, Status, _judge, group_lag
from wmb.servers import KafkaServer

GROUP = "wmb-lagtest"
TOPIC = "wmb.lagtest.changes"


def _describe(kafka: KafkaServer, group: str) -> dict[int, tuple[int, int, int]]:
    """partition -> (CURRENT-OFFSET, LOG-END-OFFSET, LAG) as Kafka's ConsumerGroupCommand prints them."""
    out = subprocess.run(
        [
            "java",
            "-cp",
            f"{kafka.libs_dir}/*",
            "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
            "--bootstrap-server",
            kafka.bootstrap,
            "--describe",
            "--group",
            group,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    rows = {}
    for line in out.splitlines():
        cols = line.split()
        if len(cols) >= 6 and cols[0] == group and cols[1] == TOPIC:
            rows[int(cols[2])] = (int(cols[3]), int(cols[4]), int(cols[5]))
    return rows


@pytest.mark.integration
def test_group_lag_matches_kafka_consumer_groups_tool(kafka_gz: KafkaServer) -> None:
    kafka_gz.create_topic(TOPIC, partitions=3, exist_ok=True)
    producer = KafkaProducer(bootstrap_servers=kafka_gz.bootstrap, transactional_id="wmb-lagtest-tx")
    producer.init_transactions()
    old_ms = int(time.time() * 1000) - 42_000
    for batch in range(4):
        producer.begin_transaction()
        for p in range(3):
            for i in range(5 + p):
                value = orjson.dumps({"v": 1, "ts_ms": old_ms + batch * 1000 + i})
                producer.send(TOPIC, value=value, partition=p)
        producer.commit_transaction()
    producer.close()

    # The group stands at offsets 3, 0 and "everything" on the three partitions.
    committer = KafkaConsumer(bootstrap_servers=kafka_gz.bootstrap, group_id=GROUP, enable_auto_commit=False)
    ends = committer.end_offsets([TopicPartition(TOPIC, p) for p in range(3)])
    positions = {0: 3, 1: 0, 2: ends[TopicPartition(TOPIC, 2)]}
    committer.commit({TopicPartition(TOPIC, p): OffsetAndMetadata(o, "", -1) for p, o in positions.items()})
    committer.close()

    ours = group_lag(kafka_gz.bootstrap, GROUP, TOPIC, int(time.time() * 1000))
    assert ours is not None
    theirs = _describe(kafka_gz, GROUP)
    assert set(theirs) == {0, 1, 2}
    for part in ours:
        assert (part.position, part.end, part.behind) == theirs[part.partition], (part, theirs)
    by_partition = {p.partition: p for p in ours}
    # Pending records are ~42 s old (their envelope commit time); the caught-up partition has none.
    assert 40.0 < by_partition[0].seconds < 120.0
    assert 40.0 < by_partition[1].seconds < 120.0
    assert by_partition[2].behind == 0 and by_partition[2].seconds == 0.0


@pytest.mark.integration
def test_unknown_group_reports_no_position(kafka_gz: KafkaServer) -> None:
    kafka_gz.create_topic(TOPIC, partitions=3, exist_ok=True)
    assert group_lag(kafka_gz.bootstrap, "wmb-lagtest-nobody", TOPIC, int(time.time() * 1000)) is None


def _hop(behind: int, seconds: float, position: int) -> HopLag:
    return HopLag(
        "gz",
        "cache:gz",
        "g",
        "t",
        behind,
        seconds,
        partitions=[PartitionLag(0, position, 100, behind, seconds)],
    )


@pytest.mark.parametrize(
    ("behind", "seconds", "before", "expected"),
    [
        (0, 0.0, None, Status.OK),
        (3, 6.0, None, Status.WARN),
        (3, 31.0, None, Status.ERR),
        (3, 0.5, _hop(5, 0.4, 10), Status.STALL),  # work pending, position sat still
        (3, 0.5, _hop(5, 0.4, 7), Status.OK),  # position moved
        (0, 0.0, _hop(0, 0.0, 10), Status.OK),  # idle is not a stall
    ],
)
def test_burrow_rules(behind: int, seconds: float, before: HopLag | None, expected: Status) -> None:
    hop = _hop(behind, seconds, 10)
    _judge(hop, warn_s=5.0, crit_s=30.0, before=before)
    assert hop.status == expected
    assert hop.status.exit_code == {Status.OK: 0, Status.WARN: 1, Status.STALL: 2, Status.ERR: 2}[expected]
