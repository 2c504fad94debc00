"""The cache daemon: change topics (read_committed) -> guarded Redis writes -> group offsets.

Order of durability, per batch:
  1. poll records; decode; plan guarded writes; park poison records in the dead-letter topic;
  2. send every *complete* source transaction's writes in one pipeline (one EVALSHA per write);
  3. ``flush()`` the dead-letter producer;
  4. commit the group offsets just past the last flushed transaction.
A crash anywhere redelivers from the last commit; the guard rejects what was already applied, so
at-least-once delivery + the guard = exactly-once *effect* in Redis.

Transactions: writes of one source transaction are only sent once its last event (``txn.last``)
arrived, and in one pipeline.  (A pipeline with ``transaction=False`` is not atomic for concurrent
readers - MULTI cannot span cluster slots - but no committed offset ever sits inside a transaction.)
A transaction whose last event never comes (it was undecodable, or with ``ordering: table|row`` the
transaction spans partitions and its last event is in another one) is closed by the next
transaction of the partition, or when a poll finds nothing more to read in that partition.

``consistency: after-replica``: a transaction with such a write waits until the dc's replica
applier has applied past its offset (``wmb_apply_state.next_offset > offset``), polled with
backoff.  Waiting holds back only the later transactions of *the same partition* (order per key),
never other partitions, and only up to ``ReplicaSettings.max_wait_s``: then the write goes ahead
(counted in ``wmb_cache_replica_wait_timeouts_total``): the cache is then ahead of the replica but
never older than the master.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata
from prometheus_client import CollectorRegistry, Counter, Gauge

from cache_updater import dlq
from cache_updater.cache import ApplyResult, GuardedWrite, NoPrimaryKeyError, RedisCache, connect, plan
from cache_updater.cache_settings import CacheSettings, TableCache
from wmb import codec, log
from wmb.errors import DecodeError, GaveUpError
from wmb.event import ChangeEvent, Op
from wmb.runtime import StopToken, io_retry

_log = log.get("cache_updater.daemon")

_ROW_OPS = frozenset({Op.INSERT, Op.UPDATE, Op.DELETE})
OFFSET_COMMIT_TIMEOUT_MS = 5_000

REDIS_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.BusyLoadingError,
    ConnectionError,
    OSError,
)


class CacheMetrics:
    """The daemon's Prometheus series, in their own registry (several daemons may share a process)."""

    def __init__(self, dc: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r, lbl = self.registry, ["dc"]
        self.events = Counter("wmb_cache_events", "Change records consumed", lbl, registry=r).labels(dc)
        self.consumer_replaced = Counter(
            "wmb_cache_consumer_replaced", "Consumers replaced: no partition owned too long", lbl, registry=r
        ).labels(dc)
        self.redis_ops = Counter("wmb_cache_redis_ops", "Guarded Redis writes sent", lbl, registry=r).labels(
            dc
        )
        self.applied = Counter(
            "wmb_cache_writes_applied", "Writes the guard applied", lbl, registry=r
        ).labels(dc)
        self.stale = Counter(
            "wmb_cache_stale_rejected", "Writes the guard rejected as stale", lbl, registry=r
        ).labels(dc)
        self.dlq = Counter("wmb_cache_dlq", "Records sent to the dead-letter topic", lbl, registry=r).labels(
            dc
        )
        self.replica_timeouts = Counter(
            "wmb_cache_replica_wait_timeouts", "after-replica writes sent past max_wait_s", lbl, registry=r
        ).labels(dc)
        self.lag_s = Gauge(
            "wmb_cache_lag_seconds", "now - commit time of the last applied event", lbl, registry=r
        ).labels(dc)
        self.last_ts_ms = 0
        self.started = time.monotonic()

    def snapshot(self) -> dict[str, Any]:
        up_s = max(time.monotonic() - self.started, 1e-9)
        events = self.events._value.get()
        ops = self.redis_ops._value.get()
        return {
            "events": events,
            "events_per_s": round(events / up_s, 1),
            "redis_ops": ops,
            "redis_ops_per_s": round(ops / up_s, 1),
            "applied": self.applied._value.get(),
            "stale_rejected": self.stale._value.get(),
            "dlq": self.dlq._value.get(),
            "lag_s": round(time.time() - self.last_ts_ms / 1000, 3) if self.last_ts_ms else None,
        }


@dataclass(slots=True)
class _Txn:
    writes: list[GuardedWrite] = field(default_factory=list)
    next_offset: int = 0
    max_ts_ms: int = 0
    replica_offset: int | None = None  # highest offset of an after-replica write in it
    ready_since: float = 0.0


@dataclass(slots=True)
class _PartState:
    ready: deque[_Txn] = field(default_factory=deque)
    open: _Txn | None = None
    open_id: str | None = None

    def close_open(self) -> None:
        if self.open is not None:
            self.open.ready_since = time.monotonic()
            self.ready.append(self.open)
        self.open, self.open_id = None, None

    def pending_writes(self) -> int:
        return sum(len(t.writes) for t in self.ready) + (len(self.open.writes) if self.open else 0)


ReplicaPositions = Callable[[], Mapping[tuple[str, int], int]]


class ReplicaWatch:
    """Reads ``wmb_apply_state``: (topic, partition) -> next offset the replica will apply."""

    def __init__(self, connect_fn: Callable[[], Any], schema: str = "wmb") -> None:
        self._connect = connect_fn
        self._schema = schema
        self._conn: Any = None

    def positions(self) -> dict[tuple[str, int], int]:
        try:
            if self._conn is None:
                self._conn = self._connect()
            with self._conn.cursor() as cur:
                cur.execute(
                    f"SELECT topic, kafka_partition, next_offset FROM `{self._schema}`.wmb_apply_state"
                )
                rows = cur.fetchall()
            self._conn.commit()  # end the snapshot so the next read sees new positions
        except Exception as exc:  # the replica being down must not stop the cache: we wait, bounded
            _log.warning("replica_position_unreadable", error=repr(exc))
            self._close()
            return {}
        return {(str(t), int(p)): int(o) for t, p, o in rows}

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = None


class CacheDaemon:
    """One datacenter's cache updater.  ``run()`` returns after a stop, having flushed and committed."""

    def __init__(
        self,
        settings: CacheSettings,
        *,
        stop: StopToken | None = None,
        metrics: CacheMetrics | None = None,
        consumer_overrides: Mapping[str, Any] | None = None,
        replica_watch: ReplicaWatch | None = None,
        redis_retry_max_elapsed_s: float | None = None,
        kafka_retry_max_elapsed_s: float | None = None,
    ) -> None:
        self.settings = settings
        self.stop = stop or StopToken()
        self.metrics = metrics or CacheMetrics(settings.dc)
        self.cache = RedisCache(connect(settings.redis))
        self._consumer_overrides = dict(consumer_overrides or {})
        self._parts: dict[TopicPartition, _PartState] = {}
        self._consumer: KafkaConsumer | None = None
        self._replica = replica_watch or self._default_replica_watch()
        self._replica_pos: dict[tuple[str, int], int] = {}
        self._replica_polled = 0.0
        self._replica_backoff_s = 0.05
        self._redis_retry_max_elapsed_s = redis_retry_max_elapsed_s
        self._dlq = dlq.DeadLetterSink(
            settings.bootstrap, settings.dc, "cache", stop=self.stop, max_elapsed_s=kafka_retry_max_elapsed_s
        )
        self._tables_memo: dict[tuple[str, str, str], tuple[TableCache, ...]] = {}

    # ---------------------------------------------------------------- wiring

    def _default_replica_watch(self) -> ReplicaWatch | None:
        rep = self.settings.replica
        if rep is None:
            return None
        needed = any(t.consistency == "after-replica" for ts in self.settings.tables.values() for t in ts)
        if not needed:
            return None

        def connect_fn() -> Any:
            import pymysql

            return pymysql.connect(
                host=rep.host, port=rep.port, user=rep.user, password=rep.password or "", connect_timeout=5
            )

        return ReplicaWatch(connect_fn)

    def consumer_config(self) -> dict[str, Any]:
        """The KafkaConsumer options (the bench polls with exactly these to measure the poll ceiling)."""
        conf: dict[str, Any] = {
            "bootstrap_servers": self.settings.bootstrap,
            "group_id": self.settings.consumer_group,
            "enable_auto_commit": False,
            "isolation_level": "read_committed",
            "auto_offset_reset": "earliest",
            "max_poll_records": self.settings.batch_max_events,
            "fetch_max_bytes": 64 * 1024 * 1024,
            "max_partition_fetch_bytes": 8 * 1024 * 1024,
            # The broker parks a fetch up to this long when a partition in it has nothing new; at
            # the default 500 ms a busy consumer stalled ~0.4 s after every few batches (measured:
            # 25k -> 83k records/s polled).  Idle, this is one fetch request per 20 ms.
            "fetch_max_wait_ms": 20,
        }
        conf.update(self._consumer_overrides)
        return conf

    def _make_consumer(self) -> KafkaConsumer:
        consumer = KafkaConsumer(**self.consumer_config())
        daemon = self

        class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
            def on_partitions_revoked(self, revoked: Any) -> None:
                # Runs on kafka-python's IO thread, where a blocking commit is refused.  Drop the
                # unflushed work of these partitions: the next owner gets it again from the last
                # commit, and the guard turns what we already wrote into no-ops.
                for tp in revoked:
                    daemon._parts.pop(tp, None)

            def on_partitions_assigned(self, assigned: Any) -> None:
                _log.info(
                    "partitions_assigned", partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in assigned)
                )

        consumer.subscribe(topics=list(self.settings.topics), listener=Listener())
        return consumer

    def health(self) -> tuple[bool, dict[str, Any]]:
        return True, self.metrics.snapshot()

    # ---------------------------------------------------------------- the loop

    def run(self, max_idle_polls: int | None = None) -> ApplyResult:
        """Consume until stopped (or ``max_idle_polls`` empty polls in a row, for tests and replays)."""
        total = ApplyResult()
        self.cache.load()
        self._consumer = self._make_consumer()
        idle = 0
        last_flush = unassigned_since = time.monotonic()
        try:
            while not self.stop.stopped:
                batch = self._consumer.poll(timeout_ms=100, max_records=self.settings.batch_max_events)
                take, parts = self._take, self._parts
                for tp, records in batch.items():
                    # Counted per batch: a Prometheus inc() per record is a lock round trip each.
                    self.metrics.events.inc(len(records))
                    st = parts.get(tp)
                    if st is None:
                        st = parts[tp] = _PartState()
                    for rec in records:  # decode + plan of a whole poll batch, in one tight loop
                        take(st, rec)
                # Idle polls count only once we own partitions (a group join also polls empty).
                assigned = bool(self._consumer.assignment())
                idle = 0 if batch or not assigned else idle + 1
                if assigned:
                    unassigned_since = time.monotonic()
                elif time.monotonic() - unassigned_since > self.settings.assignment_timeout_s:
                    self._replace_consumer(time.monotonic() - unassigned_since)
                    unassigned_since = time.monotonic()
                for tp, st in self._parts.items():
                    if st.open is not None and tp not in batch:
                        # Nothing more of this partition is readable now.  read_committed shows a
                        # Kafka transaction whole, so the rest of a source transaction is not in
                        # this partition (it spanned partitions: ordering table/row).  Close it.
                        st.close_open()
                now = time.monotonic()
                pending = sum(p.pending_writes() for p in self._parts.values())
                if (
                    not batch
                    or pending >= self.settings.batch_max_events
                    or now - last_flush >= self.settings.flush_interval_s
                ):
                    total.add(self._flush())
                    last_flush = now
                if max_idle_polls is not None and idle >= max_idle_polls and not self._has_waiting():
                    break
            _log.info("cache_draining", reason=self.stop.reason or "idle")
            total.add(self._flush(force=True))
        finally:
            self._consumer.close(autocommit=False)
            self._dlq.close()
        return total

    def _replace_consumer(self, waited_s: float) -> None:
        """The consumer owns no partition after ``assignment_timeout_s``: start over with a new one
        (it joins afresh; nothing of the old one is pending, since it owned nothing)."""
        group, waited = self.settings.consumer_group, round(waited_s, 1)
        _log.warning("no_partitions_assigned_new_consumer", group=group, waited_s=waited)
        self.metrics.consumer_replaced.inc()
        assert self._consumer is not None
        with contextlib.suppress(Exception):
            self._consumer.close(autocommit=False)
        self._parts.clear()
        self._consumer = self._make_consumer()

    def _has_waiting(self) -> bool:
        return any(p.ready for p in self._parts.values())

    def _take(self, st: _PartState, rec: Any) -> None:
        """One record: plan its writes into the open transaction of its partition (counted by the caller)."""
        writes: list[GuardedWrite] = []
        try:
            event: ChangeEvent | None = codec.decode(rec.value)
            if event is not None and event.op in _ROW_OPS:
                tombstone_ttl_s = self.settings.tombstone_ttl_s
                for table in self._tables_for(event):
                    writes += plan(event, table, tombstone_ttl_s)
        except DecodeError as exc:
            reason = "version" if "envelope version" in str(exc) else "decode"
            self._dead_letter(rec, reason, str(exc))
            event, writes = None, []
        except NoPrimaryKeyError as exc:
            self._dead_letter(rec, "no-pk", str(exc))
            event, writes = None, []

        if event is None:
            txn_id: str | None = None
            last = False
        else:
            txn_id, last = event.txn.id, event.txn.last
        if st.open is not None and txn_id != st.open_id:
            st.close_open()  # previous transaction's last event never came (poison): close it here
        if st.open is None:
            if txn_id is None or (last and not writes):
                # Nothing to keep together: just an offset to move past.
                self._append_skip(st, rec.offset + 1, event.ts_ms if event else 0)
                return
            assert event is not None
            waits = self._replica is not None and self._waits_for_replica(event)
            if last and not waits:
                # A whole transaction in one record (the common case): it joins the ready one
                # before it.  Both are sent in the same pipeline anyway, and neither waits for
                # the replica, so nothing tells them apart; this saves a _Txn per record.
                tail = st.ready[-1] if st.ready else None
                if tail is None or tail.replica_offset is not None:
                    tail = _Txn(ready_since=time.monotonic())
                    st.ready.append(tail)
                tail.writes += writes
                tail.next_offset = rec.offset + 1
                if event.ts_ms > tail.max_ts_ms:
                    tail.max_ts_ms = event.ts_ms
                return
            st.open, st.open_id = _Txn(), txn_id
        txn = st.open
        txn.writes += writes
        txn.next_offset = rec.offset + 1
        if event is not None:
            txn.max_ts_ms = max(txn.max_ts_ms, event.ts_ms)
            if writes and self._replica is not None and self._waits_for_replica(event):
                txn.replica_offset = rec.offset
            if last:
                st.close_open()

    @staticmethod
    def _append_skip(st: _PartState, next_offset: int, ts_ms: int) -> None:
        last = st.ready[-1] if st.ready else None
        if last is not None and not last.writes and last.replica_offset is None:
            last.next_offset = next_offset
            last.max_ts_ms = max(last.max_ts_ms, ts_ms)
        else:
            st.ready.append(_Txn(next_offset=next_offset, max_ts_ms=ts_ms, ready_since=time.monotonic()))

    def _tables_for(self, event: ChangeEvent) -> tuple[TableCache, ...]:
        # Per event on the hot path, twice: memoized per (db, table, source); settings never change.
        key = (event.database, event.table, event.source)
        tables = self._tables_memo.get(key)
        if tables is None:
            found = self.settings.tables.get(f"{event.database}.{event.table}", ())
            tables = tuple(t for t in found if t.source is None or t.source == event.source)
            if len(self._tables_memo) >= 65_536:
                self._tables_memo.clear()
            self._tables_memo[key] = tables
        return tables

    def _waits_for_replica(self, event: ChangeEvent) -> bool:
        return any(t.consistency == "after-replica" for t in self._tables_for(event))

    def _dead_letter(self, rec: Any, reason: str, detail: str) -> None:
        # Only queued: the local Kafka may be down now; _flush makes it durable before the commit.
        self._dlq.park(rec, reason, detail)
        self.metrics.dlq.inc()

    # ---------------------------------------------------------------- flush + commit

    def _replica_ready(self, tp: TopicPartition, txn: _Txn, now: float) -> bool:
        if txn.replica_offset is None or self._replica is None:
            return True
        if self._replica_pos.get((tp.topic, tp.partition), -1) > txn.replica_offset:
            return True
        if now - self._replica_polled >= self._replica_backoff_s:
            self._replica_pos = self._replica.positions()
            self._replica_polled = now
            if self._replica_pos.get((tp.topic, tp.partition), -1) > txn.replica_offset:
                self._replica_backoff_s = 0.05
                return True
            self._replica_backoff_s = min(self._replica_backoff_s * 2, 1.0)
        assert self.settings.replica is not None
        if now - txn.ready_since >= self.settings.replica.max_wait_s:
            _log.warning(
                "replica_wait_timeout", topic=tp.topic, partition=tp.partition, offset=txn.replica_offset
            )
            self.metrics.replica_timeouts.inc()
            return True
        return False

    def _flush(self, force: bool = False) -> ApplyResult:
        """Send every complete transaction (in partition order), then commit past them."""
        writes: list[GuardedWrite] = []
        commits: dict[TopicPartition, int] = {}
        max_ts = 0
        now = time.monotonic()
        for tp, st in self._parts.items():
            while st.ready:
                txn = st.ready[0]
                if not self._replica_ready(tp, txn, now):
                    break
                writes.extend(txn.writes)
                commits[tp] = txn.next_offset
                max_ts = max(max_ts, txn.max_ts_ms)
                st.ready.popleft()
            if not st.ready and st.open is None and self._consumer is not None:
                # Drained: commit the fetch position, which also steps over the transaction
                # markers after the last record (so an idle group shows zero offset lag).
                with contextlib.suppress(Exception):
                    position = self._consumer.position(tp)
                    if position is not None and position > commits.get(tp, -1):
                        commits[tp] = position
        result = self._apply(writes) if writes else ApplyResult()
        self._dlq.flush()  # every dead letter durable before we commit past its record
        if commits:
            self._commit(commits)
        if max_ts:
            self.metrics.last_ts_ms = max(self.metrics.last_ts_ms, max_ts)
            self.metrics.lag_s.set(max(0.0, time.time() - self.metrics.last_ts_ms / 1000))
        return result

    def _apply(self, writes: list[GuardedWrite]) -> ApplyResult:
        def stop_or_retry(_state: Any) -> None:
            if self.stop.stopped:
                raise GaveUpError("stopped while Redis was unreachable; offsets not committed past the batch")

        for attempt in io_retry(
            "redis_pipeline",
            retry_on=REDIS_ERRORS,
            max_elapsed_s=self._redis_retry_max_elapsed_s,
            initial_s=0.1,
            max_backoff_s=5.0,
            stop=self.stop,
            on_retry=stop_or_retry,
        ):
            with attempt:
                result = ApplyResult()
                for i in range(0, len(writes), 10_000):
                    result.add(self.cache.apply(writes[i : i + 10_000]))
        self.metrics.redis_ops.inc(len(writes))
        self.metrics.applied.inc(result.applied)
        self.metrics.stale.inc(result.stale)
        return result

    def _commit(self, commits: dict[TopicPartition, int]) -> None:
        assert self._consumer is not None
        offsets = {tp: OffsetAndMetadata(off, "", -1) for tp, off in commits.items()}
        try:
            # Bounded: with the default (request_timeout_ms, 30 s) one commit begun while the local
            # Kafka was down held the loop ~20 s after it came back.  A missed commit costs nothing:
            # the next one covers it, and a redelivery meanwhile is a no-op for the guard.
            self._consumer.commit(offsets, timeout_ms=OFFSET_COMMIT_TIMEOUT_MS)
        except (CommitFailedError, KafkaError) as exc:
            # A rebalance took the partitions: the next owner redelivers, the guard makes it a no-op.
            _log.warning("offset_commit_failed", error=repr(exc))
