"""The Kafka side: one transactional producer per source; events and checkpoint commit together.

``transactional.id`` is derived from the source name, so ``init_transactions`` of a second
capturer fences the first (its next transactional call raises ``ProducerFencedError`` /
``InvalidProducerEpochError``, which become :class:`wmb.errors.FencedError`) and aborts whatever
transaction the previous instance left open.  The checkpoint is read only *after*
``init_transactions``: until the old transaction is aborted the read_committed end offset (the last
stable offset) would not move past it.

The transactional producer is librdkafka's (``confluent-kafka``), not kafka-python's: kafka-python
spends ~40-200 us of Python (GIL) time per ``send()`` building record batches and waking its sender
thread, which alone capped the capture at ~0.2-0.3x of the bare binlog library; librdkafka's
``produce()`` is a ~1-2 us C call, and batching, compression, the network and the commit wait all
run outside the GIL.  It runs in a child process (:mod:`binlog_capture.producer_host`) by default:
in-process, its per-message delivery callbacks wait for the busy reader thread's GIL and stretch a
commit from ~10 ms to most of a second.  Admin and the checkpoint read stay on kafka-python (cold
paths).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from confluent_kafka import KafkaError as CKafkaError
from confluent_kafka import KafkaException as CKafkaException
from confluent_kafka import Producer
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka import errors as kerr
from kafka.admin import NewTopic
from kafka.partitioner.default import murmur2

from binlog_capture.producer_host import Message, RemoteProducer
from wmb import log
from wmb.errors import FencedError, WmbError

_log = log.get("binlog_capture.sink")

_FENCED = (kerr.ProducerFencedError, kerr.InvalidProducerEpochError)
_CK_FENCED_CODES = frozenset(
    {CKafkaError._FENCED, CKafkaError.PRODUCER_FENCED, CKafkaError.INVALID_PRODUCER_EPOCH}
)


@dataclass(frozen=True)
class Checkpoint:
    """Where the capture resumes: after the last complete source transaction committed to Kafka."""

    source: str
    gtid_state: str | None  # MariaDB slave_connect_state (or MySQL GTID set); None without GTIDs
    gtid: str | None  # the last transaction's GTID
    file: str
    pos: int
    epoch: int
    ts_ms: int  # commit time of that source transaction
    written_ms: int

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.__dict__)

    @classmethod
    def from_bytes(cls, data: bytes) -> Checkpoint:
        d = orjson.loads(data)
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__})


def is_fenced(exc: BaseException) -> bool:
    """True if ``exc`` (or what it wraps) says another producer took our transactional.id."""
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 5:
        ck_err = cur.args[0] if isinstance(cur, CKafkaException) and cur.args else None
        if isinstance(ck_err, CKafkaError) and ck_err.code() in _CK_FENCED_CODES:
            return True
        if isinstance(cur, _FENCED) or "ProducerFenced" in repr(cur) or "InvalidProducerEpoch" in repr(cur):
            return True
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return False


class KafkaTxnSink:
    """Transactional producer + checkpoint topic of one source."""

    def __init__(
        self,
        bootstrap: str,
        transactional_id: str,
        changes_topic: str,
        checkpoint_topic: str,
        *,
        partitions: int,
        source: str,
        compression: str = "zstd",
        call_timeout_s: float = 60.0,
        transaction_timeout_ms: int = 600_000,
        producer_process: bool = True,
    ) -> None:
        self.bootstrap = bootstrap
        self.call_timeout_s = call_timeout_s  # one transactional call (init/commit/abort) at most
        self.transaction_timeout_ms = transaction_timeout_ms
        self.transactional_id = transactional_id
        self.changes_topic = changes_topic
        self.checkpoint_topic = checkpoint_topic
        self.partitions = partitions
        self.source = source
        self.compression = compression
        self.producer_process = producer_process
        self._producer: Producer | RemoteProducer | None = None
        self._in_txn = False
        self._partition_cache: dict[bytes, int] = {}

    # -- setup --------------------------------------------------------------------------------------
    def ensure_topics(self) -> int:
        """Create missing topics; returns the changes topic's actual partition count."""
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, client_id=f"{self.transactional_id}-admin")
        try:
            existing = set(admin.list_topics())
            new: list[NewTopic] = []
            if self.changes_topic not in existing:
                new.append(NewTopic(self.changes_topic, self.partitions, 1))
            if self.checkpoint_topic not in existing:
                new.append(
                    NewTopic(
                        self.checkpoint_topic,
                        1,
                        1,
                        topic_configs={"cleanup.policy": "compact", "min.compaction.lag.ms": "60000"},
                    )
                )
            if new:
                try:
                    admin.create_topics(new)
                    _log.info("topics_created", topics=[t.name for t in new])
                except kerr.TopicAlreadyExistsError:
                    pass
            deadline = time.monotonic() + 30
            while True:
                meta = admin.describe_topics([self.changes_topic])
                parts = meta[0].get("partitions") if meta else None
                if parts:
                    count = len(parts)
                    break
                if time.monotonic() > deadline:
                    raise WmbError(f"topic {self.changes_topic} has no partitions after create")
                time.sleep(0.2)
        finally:
            admin.close()
        if count != self.partitions:
            _log.warning(
                "partition_count_differs", topic=self.changes_topic, configured=self.partitions, actual=count
            )
        self.partitions = count
        self._partition_cache.clear()
        return count

    def start(self) -> None:
        """Create the producer and claim the transactional.id (fencing any older instance)."""
        self.close()
        conf = {
            "bootstrap.servers": self.bootstrap,
            "client.id": self.transactional_id,
            "transactional.id": self.transactional_id,
            "enable.idempotence": True,
            "acks": "all",
            # The topic crosses the WAN later and the relay ships these stored batches as they
            # are, so this codec is the WAN's; librdkafka compresses off the GIL.
            "compression.type": self.compression,
            # Whole Kafka transactions are flushed at commit anyway; linger only shapes the
            # batches sent while a transaction is still filling.
            "linger.ms": 5,
            "batch.size": 1024 * 1024,
            "message.max.bytes": 16 * 1024 * 1024,
            "queue.buffering.max.messages": 1_000_000,
            "queue.buffering.max.kbytes": 1024 * 1024,
            # A delivery that fails fails the commit (and the daemon recovers); the broker's
            # transaction timeout stays far above it, see CaptureSettings.
            "transaction.timeout.ms": self.transaction_timeout_ms,
            "message.timeout.ms": max(1000, int(self.call_timeout_s * 1000)),
            "log_level": 4,  # warnings and worse on stderr
        }
        self._producer = RemoteProducer(conf) if self.producer_process else Producer(conf)
        self._call(self._producer.init_transactions, self.call_timeout_s)
        pid = self._producer.pid if isinstance(self._producer, RemoteProducer) else None
        _log.info("transactions_initialized", transactional_id=self.transactional_id, producer_pid=pid)

    def read_checkpoint(self, timeout_s: float = 30.0) -> Checkpoint | None:
        """The last committed checkpoint record (read_committed), or None if there is none."""
        consumer = KafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
            client_id=f"{self.transactional_id}-checkpoint-reader",
        )
        try:
            tp = TopicPartition(self.checkpoint_topic, 0)
            consumer.assign([tp])
            begin = consumer.beginning_offsets([tp])[tp]
            end = consumer.end_offsets([tp])[tp]  # the last stable offset under read_committed
            if end <= begin:
                return None
            # Each Kafka transaction adds one checkpoint record and one commit marker; look back a
            # little and widen the window until a committed record shows up.
            span = 64
            while True:
                start = max(begin, end - span)
                consumer.seek(tp, start)
                last: bytes | None = None
                deadline = time.monotonic() + timeout_s
                while consumer.position(tp) < end:
                    for rec in consumer.poll(timeout_ms=500).get(tp, []):
                        if rec.offset < end and rec.value is not None:
                            last = rec.value
                    if time.monotonic() > deadline:
                        raise WmbError(f"timed out reading checkpoint topic {self.checkpoint_topic}")
                if last is not None:
                    return Checkpoint.from_bytes(last)
                if start == begin:
                    return None
                span *= 8
        finally:
            consumer.close()

    # -- transactions ---------------------------------------------------------------------------------
    def begin(self) -> None:
        assert self._producer is not None
        self._call(self._producer.begin_transaction)
        self._in_txn = True

    @property
    def in_transaction(self) -> bool:
        return self._in_txn

    def partition_for(self, key: bytes) -> int:
        """Kafka's default (murmur2) partition of ``key``, memoized: keys repeat (a database, a
        table), and the library's pure-Python murmur2 per message is a measurable cost."""
        p = self._partition_cache.get(key)
        if p is None:
            p = (murmur2(key) & 0x7FFFFFFF) % self.partitions
            if len(self._partition_cache) < 100_000:
                self._partition_cache[key] = p
        return p

    def send(
        self,
        value: bytes,
        key: bytes | None,
        partition: int | None,
        headers: Sequence[tuple[str, bytes]] | None,
    ) -> None:
        """Queue one message of the open transaction (a C call; delivery is checked at commit)."""
        producer = self._producer
        assert producer is not None
        part = -1 if partition is None else partition  # -1: librdkafka's partitioner
        try:
            # (confluent-kafka's stub wants a list of (str, str | bytes | None): same at run time)
            producer.produce(self.changes_topic, value, key, part, headers=headers)  # type: ignore[arg-type]
        except BufferError:
            # The local queue is full: let librdkafka drain it (off the GIL) and try once more.
            producer.poll(0.5)
            self._call(producer.produce, self.changes_topic, value, key, part, headers=headers)
        except CKafkaException as exc:
            self._raise(exc)

    def send_many(self, messages: Sequence[Message]) -> None:
        """Queue the messages ``(value, key, partition, headers)`` of the open transaction.

        To the producer process the list goes as it is (one pickle per batch, no loop here)."""
        producer = self._producer
        if isinstance(producer, RemoteProducer):
            producer.produce_many(self.changes_topic, messages)
            return
        send = self.send
        for value, key, part, headers in messages:
            send(value, key, part, headers)

    def ship(self) -> None:
        """Start sending what :meth:`send_many` queued (the producer process batches until its
        frame is full or this is called; an in-process producer sends on its own)."""
        if isinstance(self._producer, RemoteProducer):
            self._producer.ship()

    def commit(self, checkpoint: Checkpoint) -> float:
        """Write ``checkpoint`` and commit the transaction; returns the commit latency in seconds.

        ``commit_transaction`` flushes every queued message of the transaction first and fails
        (abortable or fatal) if any of them was not delivered, so nothing is checkpointed past a
        lost message."""
        assert self._producer is not None
        self._call(
            self._producer.produce,
            self.checkpoint_topic,
            checkpoint.to_bytes(),
            self.source.encode(),
            0,
        )
        t0 = time.perf_counter()
        self._call(self._producer.commit_transaction, self.call_timeout_s)
        self._in_txn = False
        return time.perf_counter() - t0

    def abort(self) -> None:
        if self._producer is not None and self._in_txn:
            self._in_txn = False
            self._call(self._producer.abort_transaction, self.call_timeout_s)

    def close(self, timeout_s: float = 1.0) -> None:
        """Drop the producer.  An open transaction is not committed: the next instance's
        ``init_transactions`` (or the transaction timeout) aborts it."""
        producer, self._producer = self._producer, None
        self._in_txn = False
        if producer is not None:
            try:
                producer.purge()  # queued messages of an uncommitted transaction must not linger
                producer.flush(timeout_s)
                producer.close()
            except (CKafkaException, kerr.KafkaError, RuntimeError) as exc:
                _log.warning("producer_close_failed", error=repr(exc))

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (kerr.KafkaError, CKafkaException) as exc:
            self._raise(exc)

    def _raise(self, exc: BaseException) -> None:
        if is_fenced(exc):
            raise FencedError(
                f"another capturer took transactional.id {self.transactional_id!r} (this one is fenced): "
                f"{exc!r}"
            ) from exc
        if isinstance(exc, CKafkaException) and exc.args and isinstance(exc.args[0], CKafkaError):
            err = exc.args[0]
            if err.code() == CKafkaError._FATAL and self._producer is not None:
                # produce() only says "fatal"; a transactional call reports the stored cause
                # (e.g. _FENCED), which decides between FencedError and a crash.
                try:
                    self._producer.abort_transaction(5.0)
                except CKafkaException as cause:
                    if is_fenced(cause):
                        raise FencedError(
                            f"another capturer took transactional.id {self.transactional_id!r} "
                            f"(this one is fenced): {cause!r}"
                        ) from cause
            if err.retriable() and not err.fatal():
                # The daemon's retry seam knows kafka-python's RetriableError family.
                raise kerr.KafkaTimeoutError(f"{err.name()}: {err.str()}") from exc
        raise exc
