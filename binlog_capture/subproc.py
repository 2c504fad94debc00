"""Binlog read + event build + encode in a child process (``decode_in_subprocess``).

Why: the capture's CPU work (the library's row decoding, :class:`EventBuilder`, ``codec.encode``)
ran on a reader thread that shares one GIL with the producing/committing main thread, and on big
transactions that thread was the bottleneck.  The machine has more than one core, so the child runs
the daemon's own reader loop (the same ``_read_loop`` / ``_prepare`` code, retries included) and
streams *complete, encoded* source transactions to the parent, which keeps producing and
committing them with their checkpoint exactly as the thread mode does.

The protocol over one duplex pipe: the parent sends one start message (start point, master
server_id, partition count, blocking); the child answers with pickled *batches* (lists) of
transactions, several per message to amortise the IPC, each a plain tuple (no row data, only the
encoded messages and the checkpoint fields).  A failure in the child travels as
``("failed", exception type, message)`` and is re-raised in the parent (so PositionLostError and
PreflightError keep their exit codes); the end of a non-blocking stream travels as ``("ended",)``.

Lifecycle: the "spawn" context (never fork: the parent has threads by then); the child ignores
SIGINT/SIGTERM (the parent decides when to stop: it commits what is complete and then kills the
child, which holds no state worth saving); PR_SET_PDEATHSIG plus a ``getppid()`` poll kill the child
when the parent dies (kill -9 leaves no orphan); a child that dies unexpectedly ends the parent with
:class:`DecoderCrashed` (exit 1, the supervisor restarts from the checkpoint).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import multiprocessing
import os
import pickle
import queue
import signal
import time
from multiprocessing.connection import Connection
from typing import Any

from binlog_capture.reader import SourceTxn, StartPoint
from binlog_capture.settings import CaptureSettings
from wmb import log

_log = log.get("binlog_capture.subproc")

_PR_SET_PDEATHSIG = 1
# A batch goes out when it holds this many messages, or this long after its first transaction:
# big enough to amortise pickling and the pipe round trip, far below commit_interval_ms.
_BATCH_MAX_MSGS = 2000
_BATCH_MAX_WAIT_S = 0.001

# (gtid, start_file, start_pos, file, pos, ts_s, gtid_state, msgs, nbytes)
_WireTxn = tuple[Any, ...]


class DecoderCrashed(RuntimeError):
    """The decoder child died without reporting an error (crash, OOM kill, ...)."""


class DecoderProcess:
    """The parent's handle on the child; ``get``/``get_nowait`` mimic ``queue.Queue``."""

    def __init__(self, settings: CaptureSettings) -> None:
        self.s = settings
        self._ctx = multiprocessing.get_context("spawn")
        self._conn: Connection | None = None
        self._proc: Any = None
        self._buf: collections.deque[Any] = collections.deque()
        self._ready = False

    def spawn(self) -> DecoderProcess:
        """Start the child now (its imports take a while; it then waits for :meth:`begin`)."""
        parent_end, child_end = self._ctx.Pipe(duplex=True)
        self._proc = self._ctx.Process(
            target=_child_main,
            args=(self.s, child_end, os.getpid()),
            name=f"wmb-capture-decoder-{self.s.source}",
            daemon=True,
        )
        self._proc.start()
        child_end.close()
        self._conn = parent_end
        _log.info("decoder_child_started", pid=self._proc.pid)
        return self

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Block until the child has done its imports (it says so with one ``ready`` message)."""
        assert self._conn is not None
        if self._ready:
            return
        if not self._conn.poll(timeout_s):
            raise DecoderCrashed(f"decoder child not ready after {timeout_s:.0f} s")
        try:
            msg = self._conn.recv()
        except (EOFError, OSError) as exc:
            raise DecoderCrashed(f"decoder child died while starting: {exc!r}") from exc
        if msg != "ready":
            raise DecoderCrashed(f"decoder child: unexpected first message {msg!r}")
        self._ready = True

    def begin(
        self, start: StartPoint, *, master_server_id: int, partitions: int, blocking: bool = True
    ) -> None:
        """Hand the child its start point; it starts streaming at once."""
        assert self._conn is not None
        self.wait_ready()
        self._conn.send((start, master_server_id, partitions, blocking))

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def get(self, timeout: float | None = None) -> Any:
        if not self._buf:
            assert self._conn is not None
            if not self._conn.poll(timeout):
                raise queue.Empty
            self._receive()
        return self._buf.popleft()

    def get_nowait(self) -> Any:
        return self.get(0)

    def _receive(self) -> None:
        from binlog_capture.daemon import _ENDED, _Prepared, _ReaderFailed

        assert self._conn is not None
        try:
            batch = pickle.loads(self._conn.recv_bytes())
        except (EOFError, OSError):
            code = self._proc.exitcode if self._proc is not None else None
            if code is None and self._proc is not None:
                self._proc.join(1.0)
                code = self._proc.exitcode
            self._buf.append(_ReaderFailed(DecoderCrashed(f"decoder child died (exit code {code})")))
            return
        append = self._buf.append
        for t in batch:
            if len(t) == 9:
                txn = SourceTxn(t[0], t[1], t[2], t[3], t[4], t[5], t[6])
                append(_Prepared(txn, t[7], t[8]))
            elif t[0] == "ended":
                append(_ENDED)
            else:
                append(_ReaderFailed(_rebuild(t[1], t[2])))

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the child (it has no state: whatever it had not handed over is re-read on restart)."""
        proc, self._proc = self._proc, None
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
            self._conn = None
        if proc is None:
            return
        if proc.is_alive():
            proc.kill()
        proc.join(timeout_s)
        _log.info("decoder_child_stopped", pid=proc.pid, exit_code=proc.exitcode)


def _rebuild(exc_type: Any, message: str) -> BaseException:
    try:
        exc = exc_type(message)
        if isinstance(exc, BaseException):
            return exc
    except Exception:  # a type that wants other arguments
        pass
    return RuntimeError(f"{getattr(exc_type, '__name__', exc_type)}: {message}")


# -- the child ---------------------------------------------------------------------------------------
def _die_with_parent(parent_pid: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _child_main(settings: CaptureSettings, conn: Connection, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    # The parent owns stopping: a group-wide SIGTERM/Ctrl-C must not end the child first (the
    # parent would read that as a crash); the parent kills the child after its last commit.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from binlog_capture.daemon import CaptureDaemon, _Prepared, _ReaderFailed
    from binlog_capture.reader import TxnReader
    from wmb import values

    values.install_library_fixes()
    try:
        conn.send("ready")
        start, master_server_id, partitions, blocking = conn.recv()
    except (EOFError, OSError):
        return
    daemon = CaptureDaemon(settings)
    daemon._master_server_id = master_server_id
    daemon.sink.partitions = partitions
    daemon.builder.partitions = partitions
    daemon._reader = TxnReader(
        daemon._mysql_settings(),
        settings.server_id,
        start,
        mariadb=settings.is_mariadb,
        only_schemas=daemon.builder.filter.only_schemas(),
        table_filter=daemon.builder.filter,
        blocking=blocking,
    )
    import threading

    threading.Thread(target=daemon._read_loop, name="binlog-reader", daemon=True).start()

    q = daemon._queue
    dumps, send = pickle.dumps, conn.send_bytes
    while True:
        try:
            item = q.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent_pid:
                os._exit(1)
            continue
        batch: list[_WireTxn] = []
        n = 0
        deadline = time.monotonic() + _BATCH_MAX_WAIT_S
        final = False
        while True:
            if isinstance(item, _Prepared):
                t = item.txn
                batch.append(
                    (
                        t.gtid,
                        t.start_file,
                        t.start_pos,
                        t.file,
                        t.pos,
                        t.ts_s,
                        t.gtid_state,
                        item.msgs,
                        item.nbytes,
                    )
                )
                n += len(item.msgs) + 1
            elif isinstance(item, _ReaderFailed):
                batch.append(_wire_failure(item.exc))
                final = True
            else:  # _StreamEnded
                batch.append(("ended",))
                final = True
            if final or n >= _BATCH_MAX_MSGS:
                break
            wait = deadline - time.monotonic()
            try:
                item = q.get(timeout=wait) if wait > 0 else q.get_nowait()
            except queue.Empty:
                break
        try:
            send(dumps(batch, protocol=pickle.HIGHEST_PROTOCOL))
        except (OSError, EOFError):
            os._exit(1)  # the parent is gone
        if final:
            with contextlib.suppress(OSError):
                conn.close()
            return


def _wire_failure(exc: BaseException) -> tuple[str, Any, str]:
    exc_type: Any = type(exc)
    try:
        pickle.dumps(exc_type)
    except Exception:  # a local or unimportable class
        exc_type = RuntimeError
    return ("failed", exc_type, str(exc) or repr(exc))
