"""The Kafka consume loop of the applier: read committed, assemble, group-commit, recover.

Protocol (why it is exactly-once): the only durable position is the replica's ``wmb_apply_state``
row per (source, topic, partition), written in the same replica transaction as the rows it covers.
On start and after every replica failure we roll back, re-read those rows and ``seek`` each
partition there; Kafka group offsets are committed *after* the replica commit, for monitoring only,
and never read back.  A crash at any point therefore replays exactly the uncommitted suffix.

With ``parallel_workers`` > 1 the rows are applied by :class:`~cache_updater.applier.parallel.WorkerPool`
and the position row is the low watermark plus ``wmb_apply_done`` rows (see that module): on seek,
transactions with a done row are skipped, in both modes.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata
from prometheus_client import Counter, Gauge

from cache_updater.applier.mariadb import GroupStats, MariaDBReplica, ReplicaUnavailable, is_transient
from cache_updater.applier.parallel import WorkerFailed, WorkerPool, table_unique_keys, txn_id, write_set
from cache_updater.applier.txn import GroupBuffer, SourceTxn, TxnAssembler
from cache_updater.apply_settings import ApplySettings
from wmb import codec, log
from wmb.errors import DecodeError, GaveUpError
from wmb.event import ChangeEvent
from wmb.runtime import StopToken, io_retry

_log = log.get("wmb.apply")

OFFSET_COMMIT_TIMEOUT_MS = 5_000  # group offsets are for monitoring only
CRASH_ENV = "WMB_TEST_CRASH_AFTER_COMMIT"  # test hook: os._exit(137) right after the N-th commit

TXNS = Counter("wmb_apply_transactions_total", "Source transactions applied to the replica", ["dc"])
ROWS = Counter("wmb_apply_rows_total", "Row changes applied to the replica", ["dc"])
COMMITS = Counter("wmb_apply_commits_total", "Replica transactions committed (group commits)", ["dc"])
CONFLICTS = Counter("wmb_apply_conflicts_total", "Row conflicts met", ["dc", "kind"])
LAG = Gauge("wmb_apply_lag_seconds", "now - source commit time of the last applied transaction", ["dc"])
RECOVERIES = Counter("wmb_apply_recoveries_total", "Replica reconnects + re-seeks", ["dc"])
DEAD_LETTERS = Counter("wmb_apply_dead_letters_total", "Poison messages sent to the DLQ", ["dc"])


@dataclass(slots=True)
class ApplyStatus:
    """What /health reports."""

    connected: bool = False
    commits: int = 0
    txns: int = 0
    rows: int = 0
    lag_s: float | None = None
    last_commit_at: float = 0.0
    recoveries: int = 0
    conflicts: dict[str, int] = field(default_factory=dict)

    def health(self) -> tuple[bool, dict[str, Any]]:
        return self.connected, {
            "connected": self.connected,
            "commits": self.commits,
            "txns": self.txns,
            "rows": self.rows,
            "lag_s": self.lag_s,
            "recoveries": self.recoveries,
            "conflicts": self.conflicts,
        }


DlqSink = Callable[[Any, str, str], None]  # (record, reason, detail)


class ApplyRunner:
    """Consume the change topics of ``settings`` and apply them to the replica until stopped."""

    def __init__(
        self,
        settings: ApplySettings,
        stop: StopToken,
        *,
        dlq: DlqSink | None = None,
        crash_after_commit: int | None = None,
        poll_timeout_ms: int = 100,
    ) -> None:
        self.settings = settings
        self.stop = stop
        self.status = ApplyStatus()
        self.replica = MariaDBReplica(settings)
        self._dlq = dlq
        env = os.environ.get(CRASH_ENV)
        self._crash_after = (
            crash_after_commit if crash_after_commit is not None else (int(env) if env else None)
        )
        self._poll_timeout_ms = poll_timeout_ms
        self._consumer: KafkaConsumer | None = None
        self._tps: list[TopicPartition] = []
        self._assemblers: dict[TopicPartition, TxnAssembler] = {}
        self._group = GroupBuffer(max(1, settings.group_max_txns), settings.group_max_ms)
        self._source_of_topic = {t: s for s, t in settings.topics}
        self._last_offset_commit = 0.0
        self._committed: dict[TopicPartition, int] = {}
        self._done: set[tuple[str, int, int]] = set()  # committed beyond the position rows
        self._status_lock = threading.Lock()  # workers report commits from their threads
        self._pool: WorkerPool | None = None
        if settings.parallel_workers > 1:
            self._pool = WorkerPool(settings, settings.parallel_workers, self._after_commit)
        self._unique_keys_of = table_unique_keys(self.replica)
        self._last_watermark_at = 0.0

    # --- lifecycle --------------------------------------------------------------------------
    def run(self) -> None:
        """Run until the stop token is set; then commit what is whole and return."""
        self._connect_replica()
        self._consumer = self._make_consumer()
        try:
            self._assign()
            self._seek_from_replica()
            if self._pool is not None:
                self._pool.start()
            while not self.stop.stopped:
                try:
                    self._step()
                except ReplicaUnavailable as exc:
                    self._recover(exc)
            # SIGTERM: intake is stopped; commit the whole transactions already read.
            try:
                self._flush_group()
                if self._pool is not None:
                    self._worker_errors(self._pool.drain)
                    self._write_watermarks(force=True)
            except ReplicaUnavailable as exc:
                _log.warning("final_flush_failed", error=str(exc))
            self._commit_offsets(force=True)
        finally:
            if self._pool is not None:
                self._pool.stop()
                self._pool.close()
            self._consumer.close(autocommit=False)
            self.replica.close()
            self.status.connected = False
            _log.info("apply_stopped", commits=self.status.commits, txns=self.status.txns)

    def _retrying(self, what: str) -> Any:
        return io_retry(
            what,
            retry_on=(ReplicaUnavailable,),
            max_elapsed_s=self.settings.max_retry_elapsed_s,
            initial_s=0.2,
            max_backoff_s=5.0,
            stop=self.stop,
        )

    def _connect_replica(self) -> None:
        try:
            for attempt in self._retrying("replica_connect"):
                with attempt:
                    if self.stop.stopped:
                        raise GaveUpError("stopped while connecting to the replica")
                    self.replica.connect()
                    self.replica.ensure_schema()
                    if self._pool is not None:
                        self._pool.connect()
        except ReplicaUnavailable as exc:
            raise GaveUpError(f"replica unreachable: {exc}") from exc
        self.status.connected = True

    def _make_consumer(self) -> KafkaConsumer:
        return KafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            group_id=self.settings.group_id,
            client_id=f"wmb-apply-{self.settings.dc}",
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            max_poll_records=5000,
            fetch_max_bytes=32 * 1024 * 1024,
            max_partition_fetch_bytes=8 * 1024 * 1024,
        )

    def _assign(self) -> None:
        assert self._consumer is not None
        tps: list[TopicPartition] = []
        for _source, topic in self.settings.topics:
            parts = None
            while not self.stop.stopped:
                parts = self._consumer.partitions_for_topic(topic)
                if parts:
                    break
                _log.info("waiting_for_topic", topic=topic)
                self.stop.wait(1.0)
            tps.extend(TopicPartition(topic, p) for p in sorted(parts or ()))
        self._tps = tps
        self._consumer.assign(tps)
        self._assemblers = {tp: TxnAssembler(tp.topic, tp.partition) for tp in tps}
        _log.info("partitions_assigned", partitions=[f"{tp.topic}[{tp.partition}]" for tp in tps])

    def _seek_from_replica(self) -> None:
        """Seek every partition to its position row (the only truth), or to the beginning."""
        assert self._consumer is not None
        positions = self.replica.read_positions(self.settings.sources)
        for tp in self._tps:
            saved = positions.get((tp.topic, tp.partition))
            if saved is None:
                self._consumer.seek_to_beginning(tp)
            else:
                self._consumer.seek(tp, saved[0])
            self._assemblers[tp].reset()
        self._group.clear()
        self._done = {
            d
            for d in self.replica.read_done(self.settings.sources)
            if d[2] >= positions.get(d[:2], (0, None))[0]
        }
        _log.info("seeked_from_replica", positions={f"{t}[{p}]": o for (t, p), (o, _g) in positions.items()})

    def _recover(self, exc: BaseException) -> None:
        """Replica lost mid-flight: roll back, reconnect with backoff, re-read positions, re-seek."""
        _log.warning("replica_lost", error=str(exc))
        RECOVERIES.labels(self.settings.dc).inc()
        self.status.recoveries += 1
        self.status.connected = False
        if self._pool is not None:
            self._pool.stop()  # a group in progress commits or fails; queued work is dropped
            self._pool.close()
        self.replica.rollback_quietly()
        self.replica.close()
        self._connect_replica()
        try:
            self._seek_from_replica()
        except ReplicaUnavailable as again:
            self._recover(again)
            return
        if self._pool is not None:
            self._pool.start()

    # --- the loop ---------------------------------------------------------------------------
    def _step(self) -> None:
        assert self._consumer is not None
        batches = self._consumer.poll(timeout_ms=self._poll_timeout_ms)
        for tp, records in batches.items():
            assembler = self._assemblers.get(tp)
            if assembler is None:
                continue
            for rec in records:
                event = self._decode(rec)
                for txn in assembler.feed(rec.offset, event):
                    if txn_id(txn) in self._done:
                        self._skip_done(txn)
                    elif self._pool is not None:
                        self._worker_errors(lambda t=txn: self._dispatch(t))  # type: ignore[misc]
                        if self.stop.stopped:
                            # Nothing after an undispatched transaction may be dispatched: the
                            # watermark would pass over it.
                            return
                    elif txn.is_ddl:
                        self._flush_group()
                        self._apply_ddl(txn)
                    else:
                        self._group.add(txn)
                        if len(self._group.txns) >= self._group.max_txns:
                            self._flush_group()
        if self._group.ready():
            self._flush_group()
        if self._pool is not None:
            self._worker_errors(self._write_watermarks)
        self._commit_offsets()

    # --- parallel apply ---------------------------------------------------------------------
    def _worker_errors(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn``; a worker's failure surfaces here as the error the serial path would raise."""
        try:
            return fn()
        except WorkerFailed as exc:
            cause = exc.__cause__
            if isinstance(cause, ReplicaUnavailable):
                raise cause from None
            if isinstance(cause, BaseException):
                raise cause from None
            raise

    def _dispatch(self, txn: SourceTxn) -> None:
        assert self._pool is not None
        if txn.is_ddl:
            # A barrier: every earlier transaction commits (and the watermark reaches it) first.
            if not self._pool.drain(lambda: False):
                return
            self._write_watermarks(force=True)
            self._apply_ddl(txn)
            self._pool.forget_meta()
            return
        keys = write_set(txn, self._unique_keys_of)
        if not self._pool.submit(txn, keys, lambda: self.stop.stopped):
            # Stopped while waiting: the transaction is not queued; the position row does not cover
            # it, so it is read again on the next start.
            return

    def _skip_done(self, txn: SourceTxn) -> None:
        """``txn`` committed beyond the position row before a crash (parallel apply): skip it."""
        self._done.discard(txn_id(txn))
        _log.info("skip_committed", topic=txn.topic, partition=txn.partition, offset=txn.first_offset)
        if self._pool is not None:
            self._pool.skip(txn)
        else:
            self._flush_group()
            self.replica.apply_position_only([txn])

    def _write_watermarks(self, force: bool = False) -> None:
        assert self._pool is not None
        now = time.monotonic()
        if not force and now - self._last_watermark_at < 0.1 and not self._pool.idle():
            return
        self._last_watermark_at = now
        marks = self._pool.take_watermarks()
        if marks:
            self.replica.write_watermarks(marks)
            for t in marks:
                self._committed[TopicPartition(t.topic, t.partition)] = t.next_offset

    def _decode(self, rec: Any) -> ChangeEvent | None:
        try:
            if rec.value is None:
                raise DecodeError("empty record value")
            return codec.decode(rec.value)
        except DecodeError as exc:
            DEAD_LETTERS.labels(self.settings.dc).inc()
            if self._dlq is None:
                raise
            self._dlq(rec, "decode", str(exc))
            return None

    def _flush_group(self) -> None:
        txns = self._group.take()
        if not txns:
            return
        stats = self.replica.apply_group(txns)
        self._after_commit(txns, stats)

    def _apply_ddl(self, txn: SourceTxn) -> None:
        self.replica.apply_ddl(txn, self.settings.ddl)
        self._after_commit([txn], GroupStats(txns=1, max_ts_ms=txn.ts_ms))

    def _after_commit(self, txns: list[SourceTxn], stats: GroupStats) -> None:
        with self._status_lock:
            self._count_commit(txns, stats)

    def _count_commit(self, txns: list[SourceTxn], stats: GroupStats) -> None:
        st = self.status
        st.commits += 1
        st.txns += stats.txns
        st.rows += stats.rows
        st.last_commit_at = time.time()
        dc = self.settings.dc
        COMMITS.labels(dc).inc()
        TXNS.labels(dc).inc(stats.txns)
        ROWS.labels(dc).inc(stats.rows)
        for kind, n in stats.conflicts.items():
            CONFLICTS.labels(dc, kind).inc(n)
            st.conflicts[kind] = st.conflicts.get(kind, 0) + n
        if stats.max_ts_ms:
            st.lag_s = max(0.0, time.time() - stats.max_ts_ms / 1000.0)
            LAG.labels(dc).set(st.lag_s)
        if self._pool is None or any(t.is_ddl for t in txns):
            for t in txns:  # (parallel: the coordinator records the watermark instead)
                self._committed[TopicPartition(t.topic, t.partition)] = t.next_offset
        if self._crash_after is not None and st.commits >= self._crash_after:
            # Test hook: die after the replica commit and before the Kafka offset commit.
            _log.warning("test_crash_after_commit", commits=st.commits)
            os._exit(137)

    def _commit_offsets(self, force: bool = False) -> None:
        """Group offsets for monitoring (lag tools) only; never read back by the applier."""
        assert self._consumer is not None
        now = time.monotonic()
        if not self._committed or (not force and now - self._last_offset_commit < 1.0):
            return
        self._last_offset_commit = now
        offsets = {tp: OffsetAndMetadata(o, "", -1) for tp, o in self._committed.items()}
        try:
            # Bounded (default 30 s): a commit begun while the local Kafka is down must not hold
            # the apply loop long after it is back; the next commit carries the same offsets.
            self._consumer.commit(offsets, timeout_ms=OFFSET_COMMIT_TIMEOUT_MS)
            self._committed.clear()
        except KafkaError as exc:
            _log.warning("offset_commit_failed", error=str(exc))


__all__ = ["CRASH_ENV", "ApplyRunner", "ApplyStatus", "is_transient"]
