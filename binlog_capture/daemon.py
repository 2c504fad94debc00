"""The capture daemon: binlog (complete transactions) -> Kafka transactions with their checkpoint.

Threads: a *reader* thread owns the binlog stream, builds and encodes the events of each complete
source transaction and hands them through a queue bounded in events; the main thread only ships
them to the transactional producer and commits a Kafka transaction every ``commit_interval_ms`` or
``commit_max_events`` (whichever first) *between* source transactions, with the checkpoint of the
last one in the same Kafka transaction; a heartbeat thread upserts the heartbeat row.  A source
transaction is never split: a 10k-row one rides in one Kafka transaction.  The producer itself
runs in a child process (:mod:`binlog_capture.producer_host`): in this one, its per-message
delivery reports would wait for the reader's GIL.

Why the work sits on the reader side: a commit blocks the main thread for a broker round trip or
two (~10-50 ms) with the GIL released, so every CPU step (decode, build, encode) belongs to the
thread that keeps running meanwhile.  ``commit_interval_ms`` is a latency bound, not a rate: when
the interval is up, whatever is already waiting in the queue rides along in the same commit.
"""

from __future__ import annotations

import collections
import gc
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import pymysql
from confluent_kafka import KafkaException as CKafkaException
from kafka import errors as kerr

from binlog_capture import heartbeat, preflight
from binlog_capture.events import EventBuilder
from binlog_capture.metrics import CaptureMetrics
from binlog_capture.reader import (
    GtidState,
    SourceTxn,
    StartPoint,
    TxnReader,
    check_gtid_servable,
    current_file_pos,
    current_gtid_state,
)
from binlog_capture.settings import CaptureSettings
from binlog_capture.sink import Checkpoint, KafkaTxnSink
from wmb import codec, log, topics, values
from wmb.errors import ConfigError, ExitCode, FencedError, GaveUpError, PreflightError, WmbError
from wmb.event import Gtid
from wmb.runtime import MetricsServer, StopToken, io_retry

_log = log.get("binlog_capture.daemon")

StartMode = Literal["checkpoint", "now", "gtid"]

# Connection-level failures of the binlog stream that a reconnect can cure.
_MYSQL_RETRYABLE: tuple[type[BaseException], ...] = (
    pymysql.err.OperationalError,
    pymysql.err.InterfaceError,
    ConnectionError,
    OSError,
)
_MYSQL_AUTH_ERRORS = frozenset({1044, 1045, 1698, 1227})
# kafka-python marks transient errors RetriableError (timeouts, no broker, connection lost).
_KAFKA_RETRYABLE: tuple[type[BaseException], ...] = (kerr.RetriableError,)
# What the sink raises when the local Kafka fails a send or a commit (fencing is a FencedError).
_LOCAL_KAFKA_ERRORS: tuple[type[BaseException], ...] = (kerr.KafkaError, CKafkaException)


class _StreamBroke(Exception):
    """The stream failed after making progress: reconnect at once with a fresh retry budget."""


@dataclass
class _ReaderFailed:
    exc: BaseException


class _StreamEnded:
    """A non-blocking stream reached the end of the binlog (benchmarks, tools): commit and return."""


_ENDED = _StreamEnded()


@dataclass(slots=True)
class _Prepared:
    """A complete source transaction with its messages encoded: (value, key, partition, headers)."""

    txn: SourceTxn
    msgs: list[tuple[bytes, bytes, int, list[tuple[str, bytes]]]]
    nbytes: int


_QueueItem = _Prepared | _ReaderFailed | _StreamEnded

# What the reader may have decoded ahead of the producer, in events.  A commit holds the main
# thread for ~10-60 ms; the reader must be able to run on meanwhile.  (A bound of 512 transactions
# stalled the reader on one-row transactions, and allowed 256k events on 500-row ones.)
_QUEUE_MAX_EVENTS = 50_000


class _EventQueue:
    """The FIFO from the reader thread to the main thread, bounded by the events it holds.

    One transaction larger than the bound still passes when the queue is empty (a 10k-row
    transaction must never wait for room that cannot come)."""

    def __init__(self, max_events: int) -> None:
        self._items: collections.deque[tuple[_QueueItem, int]] = collections.deque()
        self._events = 0
        self._max_events = max_events
        self._cond = threading.Condition()

    def put(self, item: _QueueItem, timeout_s: float) -> bool:
        """Append ``item``; False if there was no room within ``timeout_s``."""
        weight = max(1, len(item.msgs)) if isinstance(item, _Prepared) else 1
        with self._cond:
            if not self._cond.wait_for(self._has_room, timeout_s):
                return False
            self._items.append((item, weight))
            self._events += weight
            self._cond.notify_all()
            return True

    def get_all(self, timeout_s: float) -> list[_QueueItem]:
        """Everything queued, oldest first; waits up to ``timeout_s`` for the first item (an empty
        list if none came).  One wake-up per batch, not per transaction: on one-row transactions
        a wake-up per item cost the reader a GIL hand-over each."""
        with self._cond:
            if not self._items and (timeout_s <= 0 or not self._cond.wait_for(self._not_empty, timeout_s)):
                return []
            items = [item for item, _ in self._items]
            self._items.clear()
            self._events = 0
            self._cond.notify_all()
            return items

    def clear(self) -> None:
        with self._cond:
            self._items.clear()
            self._events = 0
            self._cond.notify_all()

    def _has_room(self) -> bool:
        return self._events < self._max_events or not self._items

    def _not_empty(self) -> bool:
        return bool(self._items)


def tune_gc() -> None:
    """Make the cyclic garbage collector rarer: the capture allocates millions of short-lived,
    acyclic objects (rows, events, encoded messages), and with CPython's default thresholds the
    reader thread spent ~15% of its time in collections that find nothing (measured with
    bench/bench_capture.py).  Reference counting frees them all the same.  ``gc.freeze()`` moves
    what start-up built (modules, settings, table maps) out of the collector's sight for good."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*_GC_THRESHOLDS)


# gen0 every 10k container allocations instead of 700; the older generations as often as before
# relative to it.
_GC_THRESHOLDS = (10_000, 10, 10)


class CaptureDaemon:
    """One source's capture.  ``run()`` returns on stop; raises a WmbError subclass on refusal.

    ``start``: ``"checkpoint"`` (default: resume after the saved checkpoint; with none, start at the
    topology's ``start`` position or, without one, at the master's current position), ``"now"``
    (ignore any checkpoint, start at the current position) or ``"gtid"`` (start after ``from_gtid``).
    """

    def __init__(
        self,
        settings: CaptureSettings,
        *,
        start: StartMode = "checkpoint",
        from_gtid: str | None = None,
        stop: StopToken | None = None,
        metrics: CaptureMetrics | None = None,
    ) -> None:
        if start == "gtid" and not from_gtid:
            raise ConfigError("--from-gtid needs a GTID")
        self.s = settings
        self.start_mode = start
        self.from_gtid = from_gtid
        self.stop = stop or StopToken()
        self.metrics = metrics or CaptureMetrics(settings.source)
        self.builder = EventBuilder(settings)
        self.sink = KafkaTxnSink(
            settings.kafka_bootstrap,
            settings.transactional_id,
            topics.changes_topic(settings.source),
            topics.capture_checkpoint_topic(settings.source),
            partitions=settings.partitions,
            source=settings.source,
            compression=settings.compression,
            call_timeout_s=settings.kafka_call_timeout_s,
            transaction_timeout_ms=settings.kafka_transaction_timeout_ms,
        )
        self._queue = _EventQueue(_QUEUE_MAX_EVENTS)
        self._reader: TxnReader | None = None
        self._reader_thread: threading.Thread | None = None
        self._halt = threading.Event()  # set to retire the current reader thread
        self._master_server_id = 0
        self.last_checkpoint: Checkpoint | None = None
        self.metrics_port: int | None = None  # the bound port once serving (settings may say 0)
        self.started = threading.Event()  # set once streaming (tests wait on it)
        self._log = _log.bind(source=settings.source)

    # -- connections -----------------------------------------------------------------------------
    def _mysql_settings(self) -> dict[str, Any]:
        s = self.s
        return dict(host=s.mysql_host, port=s.mysql_port, user=s.mysql_user, password=s.mysql_password)

    def connect(self) -> pymysql.connections.Connection:
        s = self.s
        try:
            return pymysql.connect(
                host=s.mysql_host,
                port=s.mysql_port,
                user=s.mysql_user,
                password=s.mysql_password,
                autocommit=True,
                connect_timeout=10,
                read_timeout=60,
                write_timeout=60,
            )
        except pymysql.err.OperationalError as exc:
            if exc.args and exc.args[0] in _MYSQL_AUTH_ERRORS:
                # Not an outage: retrying a wrong password only delays the operator's fix.
                raise PreflightError(
                    f"cannot log in to {s.mysql_host}:{s.mysql_port} as {s.mysql_user!r}: {exc.args[1]}"
                ) from exc
            raise

    def _retrying(self, what: str, retry_on: tuple[type[BaseException], ...]) -> Any:
        return io_retry(
            what,
            retry_on=retry_on,
            max_attempts=self.s.reconnect_max_attempts,
            max_elapsed_s=self.s.reconnect_max_elapsed_s,
            stop=self.stop,
        )

    # -- main ------------------------------------------------------------------------------------
    def run(self) -> None:
        values.install_library_fixes()
        metrics_server = None
        if self.s.metrics_port is not None:
            metrics_server = MetricsServer(
                self.s.metrics_port, self.health, registry=self.metrics.registry
            ).start()
            self.metrics_port = metrics_server.port
        hb: heartbeat.HeartbeatWriter | None = None
        try:
            conn = self._with_retry("mysql connect", self.connect, _MYSQL_RETRYABLE)
            try:
                binlog = preflight.run(conn, self.s.mysql_user)
                with conn.cursor() as cur:
                    cur.execute("SELECT @@GLOBAL.server_id")
                    row = cur.fetchone()
                self._master_server_id = int(row[0]) if row else 0
                if self._master_server_id == self.s.server_id:
                    raise PreflightError(
                        f"replication client server_id {self.s.server_id} equals the source's server_id; "
                        "set a different replication_server_id"
                    )
                heartbeat.ensure_table(conn, self.s.heartbeat_database, self.s.heartbeat_table)
                self._log.info("preflight_ok", **binlog, master_server_id=self._master_server_id)

                self._with_retry("kafka topics", self.sink.ensure_topics, _KAFKA_RETRYABLE)
                self.builder.partitions = self.sink.partitions
                self._with_retry("kafka init_transactions", self.sink.start, _KAFKA_RETRYABLE)
                start = self._start_point(conn)
            finally:
                conn.close()

            hb = heartbeat.HeartbeatWriter(
                self.connect,
                self.s.heartbeat_database,
                self.s.heartbeat_table,
                self.s.source,
                self.s.origin_dc,
                self.s.heartbeat_interval_s,
                self.stop,
            ).start()
            initial = self.last_checkpoint
            tune_gc()
            while True:
                self._start_reader(start)
                self.started.set()
                try:
                    self._loop()
                    break
                except _LOCAL_KAFKA_ERRORS as exc:
                    if self.stop.stopped:
                        raise
                    start = self._recover_local_kafka(exc, start, initial)
        finally:
            if hb is not None:
                hb.stop()
            if self._reader is not None:
                self._reader.close()
            self.sink.close()
            if metrics_server is not None:
                metrics_server.stop()

    def _with_retry(self, what: str, fn: Callable[[], Any], retry_on: tuple[type[BaseException], ...]) -> Any:
        try:
            for attempt in self._retrying(what, retry_on):
                with attempt:
                    return fn()
        except retry_on as exc:
            raise GaveUpError(f"{what}: gave up after the configured retry bound: {exc!r}") from exc
        return None

    # -- where to start ------------------------------------------------------------------------
    def _start_point(self, conn: pymysql.connections.Connection) -> StartPoint:
        mariadb = self.s.is_mariadb
        if self.start_mode == "gtid":
            assert self.from_gtid is not None
            state = GtidState(self.from_gtid, mariadb=mariadb)
            if mariadb:
                check_gtid_servable(conn, state)
            self._log.warning("start_from_gtid", gtid=str(state), overriding_checkpoint=True)
            return StartPoint(str(state))
        if self.start_mode == "checkpoint":
            cp = self._with_retry("read checkpoint", self.sink.read_checkpoint, _KAFKA_RETRYABLE)
            if cp is not None:
                self.last_checkpoint = cp
                if cp.gtid_state and mariadb:
                    check_gtid_servable(conn, GtidState(cp.gtid_state))
                return self._checkpoint_start(cp)
            s = self.s
            if s.start_gtid:
                state = GtidState(s.start_gtid, mariadb=mariadb)
                if mariadb:
                    check_gtid_servable(conn, state)
                self._log.info("first_start_from_configured_gtid", gtid=str(state))
                return StartPoint(str(state))
            if s.start_file and s.start_pos:
                self._log.info("first_start_from_configured_file_pos", file=s.start_file, pos=s.start_pos)
                return StartPoint(None, s.start_file, s.start_pos)
            # Documented: no checkpoint record at all = a brand-new source, start at "now".
            self._log.warning("first_start_no_checkpoint_from_now")
        gtid_pos = current_gtid_state(conn) if mariadb else ""
        file, pos = current_file_pos(conn)
        if gtid_pos:
            self._log.info("start_from_now", gtid_state=gtid_pos, file=file, pos=pos)
            return StartPoint(gtid_pos, file, pos)
        self._log.info("start_from_now", file=file, pos=pos)
        return StartPoint(None, file, pos)

    # -- local Kafka lost ------------------------------------------------------------------------
    def _recover_local_kafka(
        self, exc: BaseException, start: StartPoint, initial: Checkpoint | None
    ) -> StartPoint:
        """The local Kafka failed a send or a commit (down longer than ``kafka_call_timeout_s``).

        The open Kafka transaction is lost; nothing past the last committed checkpoint counts.  So:
        retire the reader, open a new producer (its ``init_transactions`` aborts the old
        transaction, or waits for a commit that did reach the coordinator to complete), re-read
        the checkpoint read_committed and stream again after it.  Retried with backoff up to
        ``reconnect_max_elapsed_s``, then GaveUpError (exit 6).
        """
        self.metrics.kafka_recoveries.labels(self.s.source).inc()
        self._log.warning("local_kafka_lost_recovering", error=repr(exc), checkpoint=self._cp_text())
        self._stop_reader()
        self.sink.close()
        self._with_retry("kafka init_transactions", self.sink.start, _KAFKA_RETRYABLE)
        cp = self._with_retry("read checkpoint", self.sink.read_checkpoint, _KAFKA_RETRYABLE)
        if cp is None or cp == initial:
            # Nothing committed since this process started: begin again where it began (a
            # ``--from-now`` start must not fall back to an older checkpoint).
            self._log.info("local_kafka_recovered", resume="start_point")
            return start
        self.last_checkpoint = cp
        self._log.info("local_kafka_recovered", resume="checkpoint", checkpoint=self._cp_text())
        return self._checkpoint_start(cp)

    def _stop_reader(self) -> None:
        self._halt.set()
        if self._reader is not None:
            self._reader.close()
        thread = self._reader_thread
        if thread is not None:
            thread.join(timeout=30)
            if thread.is_alive():
                raise WmbError("the binlog reader thread did not stop within 30 s")
        self._queue.clear()  # what the retired reader had queued belongs to the lost transaction

    def _checkpoint_start(self, cp: Checkpoint) -> StartPoint:
        if cp.gtid_state:
            self._log.info("resume_from_checkpoint", gtid_state=cp.gtid_state, file=cp.file, pos=cp.pos)
            return StartPoint(cp.gtid_state)
        self._log.info("resume_from_checkpoint", file=cp.file, pos=cp.pos)
        return StartPoint(None, cp.file, cp.pos)

    # -- reader thread ---------------------------------------------------------------------------
    def _start_reader(self, start: StartPoint) -> None:
        self._reader = TxnReader(
            self._mysql_settings(),
            self.s.server_id,
            start,
            mariadb=self.s.is_mariadb,
            only_schemas=self.builder.filter.only_schemas(),
            table_filter=self.builder.filter,
        )
        self._spawn_reader_thread()

    def _spawn_reader_thread(self) -> None:
        self._halt = threading.Event()  # this reader's own: a replaced reader keeps its (set) one
        self._reader_thread = threading.Thread(
            target=self._read_loop, args=(self._halt,), name="binlog-reader", daemon=True
        )
        self._reader_thread.start()

    def _halted(self, halt: threading.Event) -> bool:
        """The reader thread's exit condition: the daemon stops, or this reader is replaced."""
        return self.stop.stopped or halt.is_set()

    def _read_loop(self, halt: threading.Event) -> None:
        try:
            while not self._halted(halt):
                try:
                    for attempt in self._retrying("binlog stream", _MYSQL_RETRYABLE):
                        with attempt:
                            self._stream_once(halt)
                    if not self._halted(halt):
                        self._put(_ENDED, halt)  # only a non-blocking stream ends by itself
                    return
                except _StreamBroke as exc:
                    self._log.warning("binlog_stream_broke_reconnecting", error=repr(exc.__cause__))
                    continue
                except _MYSQL_RETRYABLE as exc:
                    if self._halted(halt):
                        return
                    raise GaveUpError(f"binlog stream: gave up reconnecting: {exc!r}") from exc
        except BaseException as exc:
            self._put(_ReaderFailed(exc), halt)

    def _stream_once(self, halt: threading.Event) -> None:
        reader = self._reader
        assert reader is not None
        if self._halted(halt):
            return
        progressed = False
        try:
            for txn in reader.transactions():
                progressed = True
                if not self._put(self._prepare(txn), halt):
                    return
        except _MYSQL_RETRYABLE as exc:
            if self._halted(halt):
                return
            if progressed:
                raise _StreamBroke() from exc
            raise

    def _prepare(self, txn: SourceTxn) -> _Prepared:
        """Build and encode the events of ``txn`` (runs on the reader thread)."""
        server_id = self._master_server_id
        if txn.gtid and "-" in txn.gtid:
            server_id = Gtid.parse(txn.gtid).server_id
        encode, key_of, headers_of = codec.encode, codec.message_key, codec.headers
        ordering = self.s.ordering
        partition_for = self.sink.partition_for
        msgs: list[tuple[bytes, bytes, int, list[tuple[str, bytes]]]] = []
        nbytes = 0
        for m in self.builder.build(txn, server_id):
            ev = m.event
            value = encode(ev)
            nbytes += len(value)
            key = key_of(ev, ordering)
            part = m.partition if m.partition is not None else partition_for(key)
            msgs.append((value, key, part, headers_of(ev)))
        return _Prepared(txn, msgs, nbytes)

    def _put(self, item: _QueueItem, halt: threading.Event) -> bool:
        while True:
            if halt.is_set():
                return False  # this reader was replaced: its items must not reach the new sink
            if self._queue.put(item, 0.2):
                return True
            if self._halted(halt):
                return False

    # -- producer loop ---------------------------------------------------------------------------
    def pipe(self, reader: TxnReader) -> None:
        """Stream ``reader``'s transactions into Kafka until it ends (non-blocking) or stop.

        The sink must be started (``ensure_topics`` + ``start``); ``run()`` uses the same path.
        Public for the benchmark, which measures exactly the daemon's threads and batching.
        """
        self.builder.partitions = self.sink.partitions
        self._reader = reader
        tune_gc()
        self._spawn_reader_thread()
        try:
            self._loop()
        finally:
            reader.close()

    def _loop(self) -> None:
        s = self.s
        interval_s = s.commit_interval_ms / 1000.0
        max_events = s.commit_max_events
        sink = self.sink
        send_many = sink.send_many
        get_all = self._queue.get_all
        batch_started = 0.0
        pending_events = pending_txns = pending_bytes = 0
        last_txn: SourceTxn | None = None
        uncommitted: SourceTxn | None = None  # complete txns in the open Kafka txn or skipped
        ended = False
        try:
            while not ended:
                if self.stop.stopped:
                    break
                wait = batch_started + interval_s - time.monotonic() if sink.in_transaction else 0.2
                # Whatever is waiting rides in the open transaction: under a backlog one ~10-50 ms
                # commit per 10 ms of events would otherwise cap the throughput.
                for item in get_all(wait):
                    if isinstance(item, _ReaderFailed):
                        raise item.exc
                    if isinstance(item, _StreamEnded):
                        ended = True
                        break
                    txn = item.txn
                    if item.msgs:
                        if not sink.in_transaction:
                            sink.begin()
                            batch_started = time.monotonic()
                        send_many(item.msgs)
                        pending_events += len(item.msgs)
                        pending_bytes += item.nbytes
                        pending_txns += 1
                    last_txn = uncommitted = txn
                    if sink.in_transaction and pending_events >= max_events:
                        self._commit(txn, pending_events, pending_txns, pending_bytes)
                        pending_events = pending_txns = pending_bytes = 0
                        uncommitted = None
                if not sink.in_transaction:
                    continue
                if time.monotonic() - batch_started < interval_s:
                    sink.ship()  # the child produces while the interval runs out
                else:
                    assert last_txn is not None
                    self._commit(last_txn, pending_events, pending_txns, pending_bytes)
                    pending_events = pending_txns = pending_bytes = 0
                    uncommitted = None
        except FencedError:
            self._log.error("fenced_exiting", transactional_id=s.transactional_id)
            raise
        # Stop requested (or the stream ended): commit what is open (complete source transactions
        # only) with its checkpoint.
        if sink.in_transaction and last_txn is not None:
            self._commit(last_txn, pending_events, pending_txns, pending_bytes)
        elif uncommitted is not None:
            self._log.info("stop_with_filtered_tail", note="skipped transactions are re-read on restart")
        self._log.info(
            "capture_stopped",
            reason=self.stop.reason or ("stream_ended" if ended else None),
            checkpoint=self._cp_text(),
        )

    def _commit(self, txn: SourceTxn, events: int, txns: int, nbytes: int) -> None:
        assert self._reader is not None
        cp = Checkpoint(
            source=self.s.source,
            gtid_state=txn.gtid_state,
            gtid=txn.gtid,
            file=txn.file,
            pos=txn.pos,
            epoch=self.s.epoch,
            ts_ms=txn.ts_s * 1000,
            written_ms=int(time.time() * 1000),
        )
        latency = self.sink.commit(cp)
        self.last_checkpoint = cp
        seq = Gtid.parse(txn.gtid).seq if txn.gtid and "-" in txn.gtid else txn.pos
        self.metrics.committed(
            events=events, txns=txns, nbytes=nbytes, latency_s=latency, gtid=txn.gtid, seq=seq, ts_ms=cp.ts_ms
        )

    def _cp_text(self) -> str:
        cp = self.last_checkpoint
        return f"{cp.gtid} {cp.file}:{cp.pos}" if cp else "none"

    # -- health ----------------------------------------------------------------------------------
    def health(self) -> tuple[bool, dict[str, Any]]:
        alive = self._reader_thread is not None and self._reader_thread.is_alive()
        behind = self.metrics.seconds_behind()
        ok = alive and not self.stop.stopped and (behind != behind or behind < 60)  # NaN = no commit yet
        return ok, {
            "source": self.s.source,
            "reader_alive": alive,
            "seconds_behind_source": None if behind != behind else round(behind, 3),
            "checkpoint": self._cp_text(),
        }


def run_daemon(
    settings: CaptureSettings, *, start: StartMode = "checkpoint", from_gtid: str | None = None
) -> int:
    """Process entry point: installs the signal handlers; returns the exit code."""
    stop = StopToken().install()
    daemon = CaptureDaemon(settings, start=start, from_gtid=from_gtid, stop=stop)
    try:
        daemon.run()
    except WmbError as exc:
        _log.error("capture_failed", source=settings.source, error=str(exc), exit_code=int(exc.exit_code))
        return int(exc.exit_code)
    except Exception:
        # Unexpected (e.g. a Kafka error past the client's own retries): the open Kafka transaction
        # is aborted by the next instance's init_transactions, which resumes from the checkpoint.
        _log.exception("capture_crashed", source=settings.source, exit_code=int(ExitCode.ERROR))
        return int(ExitCode.ERROR)
    return 0
