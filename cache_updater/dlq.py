"""The dead-letter topic of one datacenter: poison messages parked with why and where they came from.

Any consumer of the change topics (the cache updater, the replica applier) that meets a message it
can never apply (undecodable bytes, an unknown envelope version ``v``, a row event without a primary
key ...) sends the *original* key and value to ``wmb.topics.dead_letter_topic(dc)`` and goes on.
Headers say why and where from, so the record can be inspected (``wmb dlq list``) and re-injected
into its original topic and partition once the cause is fixed (``wmb dlq replay``).

Headers (all UTF-8 text):

============================  =====================================================
``wmb-dlq-reason``            short machine reason: ``decode``, ``version``, ``no-pk`` ...
``wmb-dlq-detail``            human detail (the exception text), may be empty
``wmb-dlq-stage``             which consumer parked it: ``cache``, ``apply`` ...
``wmb-dlq-topic``             source topic of the original record
``wmb-dlq-partition``         its partition
``wmb-dlq-offset``            its offset
============================  =====================================================

The original record's own headers are kept after these.

Durability: the producer uses ``acks=all`` and idempotence; a consumer must ``flush()`` it before
it commits the offset past the poison record, so a crash never loses a dead letter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError

from wmb import log, topics

_log = log.get("cache_updater.dlq")

H_REASON = "wmb-dlq-reason"
H_DETAIL = "wmb-dlq-detail"
H_STAGE = "wmb-dlq-stage"
H_TOPIC = "wmb-dlq-topic"
H_PARTITION = "wmb-dlq-partition"
H_OFFSET = "wmb-dlq-offset"
_OWN = (H_REASON, H_DETAIL, H_STAGE, H_TOPIC, H_PARTITION, H_OFFSET)

_ensured: set[tuple[int, str]] = set()

# Header put on a record that ``wmb dlq replay`` re-injected: "<dlq topic>:<dlq offset>".
H_REPLAYED_FROM = "wmb-replayed-from"


class RawRecord(Protocol):
    """What we need of a consumed record (kafka-python's ``ConsumerRecord`` fits)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]] | None


def make_producer(bootstrap: str | Sequence[str], **overrides: Any) -> KafkaProducer:
    """A producer fit for dead letters: acks=all + idempotent, so a parked record is never lost."""
    conf: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 5,
    }
    conf.update(overrides)
    return KafkaProducer(**conf)


def ensure_topic(bootstrap: str | Sequence[str], dc: str, partitions: int = 1, replication: int = 1) -> None:
    """Create the dead-letter topic of ``dc`` if it does not exist (brokers may not auto-create)."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        if topics.dead_letter_topic(dc) in admin.list_topics():
            return
        admin.create_topics([NewTopic(topics.dead_letter_topic(dc), partitions, replication)])
    except TopicAlreadyExistsError:
        pass
    finally:
        admin.close()


def dlq_headers(
    record: RawRecord, reason: str, detail: str = "", stage: str = "cache"
) -> list[tuple[str, bytes]]:
    """The headers of the dead letter of ``record`` (ours first, then the original ones)."""
    own = [
        (H_REASON, reason.encode()),
        (H_DETAIL, detail[:2000].encode()),
        (H_STAGE, stage.encode()),
        (H_TOPIC, record.topic.encode()),
        (H_PARTITION, str(record.partition).encode()),
        (H_OFFSET, str(record.offset).encode()),
    ]
    original = [(k, v) for k, v in (record.headers or []) if k not in _OWN]
    return own + original


def send_to_dlq(
    producer: KafkaProducer,
    dc: str,
    record: RawRecord,
    reason: str,
    detail: str = "",
    stage: str = "cache",
) -> Any:
    """Park ``record`` (its original key and value) in the dead-letter topic of ``dc``.

    Creates the dead-letter topic on first use.  Returns the producer future.  The caller must
    ``producer.flush()`` before committing the consumer offset past ``record``.
    """
    ensured = (id(producer), dc)
    if ensured not in _ensured:
        # Brokers may run with auto.create.topics.enable=false: create the topic on first use.
        ensure_topic(producer.config["bootstrap_servers"], dc)
        _ensured.add(ensured)
    _log.warning(
        "dead_letter",
        reason=reason,
        detail=detail[:200],
        stage=stage,
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
    )
    return producer.send(
        topics.dead_letter_topic(dc),
        key=record.key,
        value=record.value,
        headers=dlq_headers(record, reason, detail, stage),
    )


class DeadLetterSink:
    """Dead letters of one consumer, made durable with retries across a lost local Kafka.

    :meth:`park` only queues (no I/O: the consumer's decode loop never blocks on, or fails because
    of, a Kafka that is down); :meth:`flush` returns once Kafka acknowledged every queued record
    (acks=all), and must run before the consumer commits past them.  A lost Kafka is retried with
    backoff (``io_retry``, up to ``max_elapsed_s``; None = forever): a record the producer gave up
    (its delivery timeout) is sent again on a new producer, where a bare ``producer.flush()`` would
    return and let the commit skip the poison record for good.  Past the bound, or on a stop while
    Kafka is unreachable: :class:`wmb.errors.GaveUpError`, nothing committed past the records.  A
    record may so be parked twice (at-least-once), never lost.
    """

    def __init__(
        self,
        bootstrap: str | Sequence[str],
        dc: str,
        stage: str,
        *,
        stop: Any = None,
        max_elapsed_s: float | None = None,
        flush_timeout_s: float = 30.0,
        producer_factory: Any = None,
    ) -> None:
        self.bootstrap, self.dc, self.stage = bootstrap, dc, stage
        self.stop = stop  # a wmb.runtime.StopToken
        self.max_elapsed_s = max_elapsed_s
        self.flush_timeout_s = flush_timeout_s
        self._make = producer_factory or make_producer
        self._producer: Any = None
        self._pending: list[list[Any]] = []  # [record, reason, detail, future | None]

    @property
    def pending(self) -> int:
        return len(self._pending)

    def park(self, record: RawRecord, reason: str, detail: str = "") -> None:
        self._pending.append([record, reason, detail, None])

    def flush(self) -> None:
        if not self._pending:
            return
        from wmb.errors import GaveUpError
        from wmb.runtime import io_retry

        def on_retry(_state: Any) -> None:
            self.close()  # its failed batches are gone; the next attempt opens a new producer
            if self.stop is not None and self.stop.stopped:
                raise GaveUpError("stopped while the local Kafka was unreachable; dead letters not written")

        try:
            for attempt in io_retry(
                "dlq_produce",
                retry_on=(KafkaError, OSError),
                max_elapsed_s=self.max_elapsed_s,
                initial_s=0.2,
                max_backoff_s=5.0,
                stop=self.stop,
                on_retry=on_retry,
            ):
                with attempt:
                    if self._producer is None:
                        self._producer = self._make(self.bootstrap)
                    for item in self._pending:
                        future = item[3]
                        # Not acknowledged: never sent, or sent on a producer closed since.
                        if future is None or not (future.is_done and future.succeeded()):
                            item[3] = send_to_dlq(
                                self._producer, self.dc, item[0], item[1], item[2], stage=self.stage
                            )
                    self._producer.flush(timeout=self.flush_timeout_s)
                    for item in self._pending:
                        item[3].get(timeout=0)  # raises the send's error (e.g. its delivery timeout)
        except (KafkaError, OSError) as exc:
            raise GaveUpError(
                f"local Kafka unreachable, {len(self._pending)} dead letter(s) not written: {exc!r}"
            ) from exc
        self._pending.clear()

    def close(self) -> None:
        if self._producer is not None:
            with contextlib.suppress(Exception):
                self._producer.close(timeout=1)
            self._producer = None


@dataclass(frozen=True, slots=True)
class DlqEntry:
    """One dead letter as ``wmb dlq list`` shows it."""

    dlq_offset: int
    dlq_partition: int
    reason: str
    detail: str
    stage: str
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)  # the original record's headers

    def as_json(self) -> dict[str, Any]:
        return {
            "dlq_partition": self.dlq_partition,
            "dlq_offset": self.dlq_offset,
            "reason": self.reason,
            "detail": self.detail,
            "stage": self.stage,
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "key": _show(self.key),
            "value": _show(self.value),
        }


def _show(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    text = raw.decode("utf-8", errors="backslashreplace")
    return text if len(text) <= 500 else text[:500] + "..."


def entry_from_record(record: RawRecord) -> DlqEntry:
    heads = dict(record.headers or [])

    def text(name: str) -> str:
        return heads.get(name, b"").decode("utf-8", errors="replace")

    def number(name: str) -> int:
        try:
            return int(text(name))
        except ValueError:
            return -1

    return DlqEntry(
        dlq_offset=record.offset,
        dlq_partition=record.partition,
        reason=text(H_REASON),
        detail=text(H_DETAIL),
        stage=text(H_STAGE),
        topic=text(H_TOPIC),
        partition=number(H_PARTITION),
        offset=number(H_OFFSET),
        key=record.key,
        value=record.value,
        headers=[(k, v) for k, v in (record.headers or []) if k not in _OWN],
    )


def read_dlq(bootstrap: str | Sequence[str], dc: str, timeout_s: float = 10.0) -> list[DlqEntry]:
    """Every dead letter of ``dc`` from the start of the topic up to its current end (no group)."""
    topic = topics.dead_letter_topic(dc)
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        isolation_level="read_committed",
        consumer_timeout_ms=int(timeout_s * 1000),
    )
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            return []
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        out: list[DlqEntry] = []
        pending = {tp for tp in tps if ends[tp] > 0}
        while pending:
            batch = consumer.poll(timeout_ms=int(timeout_s * 1000))
            if not batch:
                break  # nothing more within the timeout: return what we have
            for tp, records in batch.items():
                for rec in records:
                    if rec.offset < ends[tp]:
                        out.append(entry_from_record(rec))
                if consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
        return sorted(out, key=lambda e: (e.dlq_partition, e.dlq_offset))
    finally:
        consumer.close()


def replay(producer: KafkaProducer, entries: Sequence[DlqEntry], dlq_topic: str) -> int:
    """Re-inject each entry's original key/value into its original topic and partition.

    Why re-inject rather than apply directly: every consumer of the change topic (the cache and the
    replica applier) then sees the record again through its normal path, with its own guards (the
    cache's version guard makes a replay of an already-newer row a no-op).  A record that is still
    poison comes back to the dead-letter topic with a fresh reason.  Entries for the same original
    (topic, partition, offset) parked by two consumers are re-injected once.
    """
    seen: set[tuple[str, int, int]] = set()
    sent = 0
    for e in entries:
        origin = (e.topic, e.partition, e.offset)
        if origin in seen or not e.topic or e.partition < 0:
            continue
        seen.add(origin)
        headers = [*e.headers, (H_REPLAYED_FROM, f"{dlq_topic}:{e.dlq_partition}:{e.dlq_offset}".encode())]
        producer.send(e.topic, key=e.key, value=e.value, partition=e.partition, headers=headers)
        sent += 1
    producer.flush()
    _log.info("dlq_replayed", records=sent)
    return sent
