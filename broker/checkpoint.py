"""The relay checkpoint: source topic-partition -> next source offset, in the local cluster.

Records go to the compacted ``wmb.topics.relay_checkpoint_topic()`` keyed ``route|topic|partition``
and are written in the *same* Kafka transaction as the relayed messages, so after any crash the
committed checkpoint says exactly which source offsets are in the destination.
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson
from kafka import TopicPartition

from wmb import topics
from wmb.errors import WmbError

Checkpoints = dict[TopicPartition, int]


def key(route: str, tp: TopicPartition) -> bytes:
    src_dc, dst_dc = route.split(":", 1)
    return topics.relay_checkpoint_key(src_dc, dst_dc, tp.topic, tp.partition)


def parse_key(raw: bytes) -> tuple[str, TopicPartition]:
    route, topic, partition = raw.decode().rsplit("|", 2)
    return route, TopicPartition(topic, int(partition))


def value(next_offset: int) -> bytes:
    return orjson.dumps({"next_offset": next_offset})


def parse_value(raw: bytes) -> int:
    data = orjson.loads(raw)
    offset = data["next_offset"]
    if not isinstance(offset, int) or offset < 0:
        raise WmbError(f"bad relay checkpoint value {raw!r}")
    return offset


def fold(records: Sequence[tuple[bytes | None, bytes | None]], route: str) -> Checkpoints:
    """The latest checkpoint per partition of ``route`` from (key, value) records in offset order."""
    out: Checkpoints = {}
    for raw_key, raw_value in records:
        if raw_key is None:
            continue
        their_route, tp = parse_key(raw_key)
        if their_route != route:
            continue
        if raw_value is None:
            out.pop(tp, None)
        else:
            out[tp] = parse_value(raw_value)
    return out
