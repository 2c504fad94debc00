"""librdkafka's transactional producer in a child process, so that it never waits for the GIL.

Why a process: confluent-kafka calls back into Python for every delivered message (its delivery
callback takes the GIL even when no callback is set), and ``commit_transaction`` serves those
callbacks while it flushes.  With the capture's reader thread busy decoding the binlog, every one
of them waits for that thread to let go of the GIL: a commit of 5,000 messages took 0.2-0.8 s
instead of ~10 ms, and the capture ran at half the bare library's speed (in a test with a thread
doing nothing but Python, a commit of 100 messages took 0.8 s and one of 5,000 timed out after
30 s).  In a child process the producer has a Python interpreter of its own; the parent only
pickles batches of ready-made messages and waits on a socket (GIL released) for the replies.

:class:`RemoteProducer` offers the subset of ``confluent_kafka.Producer`` that
:class:`binlog_capture.sink.KafkaTxnSink` uses.  ``produce`` is buffered and shipped in batches
(one pickle per batch, no reply); the transactional calls are synchronous and re-raise the
child's ``KafkaException`` as an equal one (same code, fatal / retriable / abortable flags), so
fencing and the retry decisions work as with an in-process producer.  A failed ``produce`` in the
child is kept and raised by the next ``commit_transaction`` or ``flush``, so no transaction
commits past a message that was not queued.

The child dies with its parent (``PR_SET_PDEATHSIG``; and on end-of-file on its socket), ignores
SIGINT and SIGTERM (the parent decides when to commit and close) and has no state of its own
worth keeping: a lost child is a lost producer, which the daemon recovers from like a lost
local Kafka.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

from confluent_kafka import KafkaError as CKafkaError
from confluent_kafka import KafkaException as CKafkaException
from kafka import errors as kerr

# One pickled frame carries up to this many messages (a few hundred KB): large enough that the
# per-frame cost vanishes, small enough that the child starts producing while the parent reads on.
BATCH_MESSAGES = 2000
# What a transactional call may take beyond its own timeout before the child is declared hung.
_RPC_MARGIN_S = 15.0
_START_TIMEOUT_S = 30.0
_PR_SET_PDEATHSIG = 1

# (value, key, partition, headers): one message; the frames carry (topic, [message, ...]) groups.
Message = tuple[bytes, bytes | None, int, Any]
_Group = tuple[str, Sequence[Message]]


def _error_state(exc: CKafkaException) -> tuple[Any, ...]:
    err = exc.args[0] if exc.args else None
    if isinstance(err, CKafkaError):
        return ("kafka", err.code(), err.str(), err.fatal(), err.retriable(), err.txn_requires_abort())
    return ("kafka", CKafkaError._FAIL, repr(exc), False, False, False)


def _rebuild(state: tuple[Any, ...]) -> BaseException:
    kind = state[0]
    if kind == "kafka":
        _, code, reason, fatal, retriable, abortable = state
        exc: BaseException = CKafkaException(
            CKafkaError(code, reason, fatal=fatal, retriable=retriable, txn_requires_abort=abortable)
        )
    else:
        exc = kerr.KafkaTimeoutError(f"producer process: {state[1]}")
    return exc


class RemoteProducer:
    """A ``confluent_kafka.Producer`` living in a child process (see the module docstring)."""

    def __init__(self, conf: dict[str, Any], *, batch_messages: int = BATCH_MESSAGES) -> None:
        self._batch_messages = batch_messages
        self._buffer: list[_Group] = []
        self._buffered = 0
        self._closed = False
        parent_sock, child_sock = socket.socketpair()
        try:
            self._proc = subprocess.Popen(
                # Run as a script, not with -m: the package's __init__ would import the whole
                # capture (binlog library, daemon) into a process that needs none of it.
                [sys.executable, os.path.abspath(__file__), str(child_sock.fileno()), str(os.getpid())],
                pass_fds=(child_sock.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            parent_sock.close()
            raise kerr.KafkaTimeoutError(f"cannot start the producer process: {exc!r}") from exc
        finally:
            child_sock.close()
        self._conn = Connection(parent_sock.detach())
        try:
            self._rpc("start", (conf,), timeout_s=_START_TIMEOUT_S)
        except BaseException:
            self._kill()
            raise

    # -- the Producer subset ------------------------------------------------------------------------
    def produce(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        partition: int = -1,
        headers: Any = None,
    ) -> None:
        self.produce_many(topic, [(value, key, partition, headers)])

    def produce_many(self, topic: str, messages: Sequence[Message]) -> None:
        """Queue ``messages`` (kept by reference: the caller must not change the list)."""
        self._buffer.append((topic, messages))
        self._buffered += len(messages)
        if self._buffered >= self._batch_messages:
            self._ship()

    def ship(self) -> None:
        """Hand what is buffered to the child now, so it produces while the caller goes on."""
        if self._buffer:
            self._ship()

    def init_transactions(self, timeout: float) -> None:
        self._rpc("init_transactions", (timeout,), timeout_s=timeout)

    def begin_transaction(self) -> None:
        self._rpc("begin_transaction", ())

    def commit_transaction(self, timeout: float) -> None:
        self._rpc("commit_transaction", (timeout,), timeout_s=timeout)

    def abort_transaction(self, timeout: float) -> None:
        self._drop_buffer()
        self._rpc("abort_transaction", (timeout,), timeout_s=timeout)

    def poll(self, timeout: float = 0.0) -> int:
        return int(self._rpc("poll", (timeout,), timeout_s=timeout))

    def flush(self, timeout: float = -1.0) -> int:
        return int(self._rpc("flush", (timeout,), timeout_s=max(timeout, 0.0)))

    def purge(self) -> None:
        self._drop_buffer()
        self._rpc("purge", ())

    def close(self, timeout_s: float = 5.0) -> None:
        """Close the child's producer and let it exit (killed past ``timeout_s``)."""
        if self._closed:
            return
        self._drop_buffer()
        with contextlib.suppress(BaseException):
            self._rpc("close", (), timeout_s=timeout_s)
        self._closed = True
        self._conn.close()
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._kill()

    @property
    def pid(self) -> int:
        return self._proc.pid

    # -- plumbing ----------------------------------------------------------------------------------
    def _drop_buffer(self) -> None:
        self._buffer, self._buffered = [], 0

    def _ship(self) -> None:
        batch, self._buffer, self._buffered = self._buffer, [], 0
        self._send(("produce", (batch,)))

    def _send(self, frame: tuple[str, tuple[Any, ...]]) -> None:
        if self._closed:
            raise kerr.KafkaTimeoutError("producer process: already closed")
        try:
            self._conn.send_bytes(pickle.dumps(frame, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError as exc:
            raise self._died(exc) from exc

    def _rpc(self, op: str, args: tuple[Any, ...], *, timeout_s: float = 0.0) -> Any:
        if self._buffer:
            self._ship()
        self._send((op, args))
        try:
            if not self._conn.poll(timeout_s + _RPC_MARGIN_S):
                self._kill()
                raise kerr.KafkaTimeoutError(
                    f"producer process: no answer to {op} within {timeout_s + _RPC_MARGIN_S:.0f} s (killed)"
                )
            reply = pickle.loads(self._conn.recv_bytes())
        except (OSError, EOFError) as exc:
            raise self._died(exc) from exc
        if reply[0] == "ok":
            return reply[1]
        raise _rebuild(reply[1])

    def _died(self, exc: BaseException) -> kerr.KafkaTimeoutError:
        self._closed = True
        code = self._proc.poll()
        if code is None:
            self._kill()
            code = self._proc.returncode
        return kerr.KafkaTimeoutError(f"producer process lost (exit code {code}): {exc!r}")

    def _kill(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._conn.close()
        if self._proc.poll() is None:
            self._proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(5)


# -- the child ------------------------------------------------------------------------------------
class _Host:
    """The child's side: one producer; the first failed produce is kept for the next commit."""

    def __init__(self) -> None:
        self.producer: Any = None
        self.failed: tuple[Any, ...] | None = None
        self.message_timeout_s = 60.0

    def start(self, conf: dict[str, Any]) -> None:
        from confluent_kafka import Producer

        self.message_timeout_s = float(conf.get("message.timeout.ms", 60_000)) / 1000.0
        self.producer = Producer(conf)

    def produce(self, batch: list[_Group]) -> None:
        if self.failed is not None:
            return  # this transaction cannot commit any more; its end reports why
        produce = self.producer.produce
        for topic, messages in batch:
            for value, key, partition, headers in messages:
                try:
                    produce(topic, value, key, partition, headers=headers)
                except BufferError:
                    if not self._produce_when_room(topic, value, key, partition, headers):
                        return
                except CKafkaException as exc:
                    self.failed = _error_state(exc)
                    return

    def _produce_when_room(self, topic: str, value: Any, key: Any, partition: int, headers: Any) -> bool:
        # The local queue is full: librdkafka drains it (or times the messages out) meanwhile.
        deadline = time.monotonic() + self.message_timeout_s
        while True:
            self.producer.poll(0.1)
            try:
                self.producer.produce(topic, value, key, partition, headers=headers)
                return True
            except BufferError as exc:
                if time.monotonic() > deadline:
                    self.failed = (
                        "buffer",
                        f"local producer queue full for {self.message_timeout_s:.0f} s: {exc}",
                    )
                    return False
            except CKafkaException as exc:
                self.failed = _error_state(exc)
                return False

    def _check_failed(self) -> None:
        if self.failed is not None:
            failed, self.failed = self.failed, None
            raise _Failed(failed)

    def call(self, op: str, args: tuple[Any, ...]) -> Any:
        p = self.producer
        if op == "init_transactions":
            return p.init_transactions(*args)
        if op == "begin_transaction":
            self.failed = None
            return p.begin_transaction()
        if op == "commit_transaction":
            self._check_failed()
            return p.commit_transaction(*args)
        if op == "abort_transaction":
            self.failed = None
            return p.abort_transaction(*args)
        if op == "flush":
            self._check_failed()
            return p.flush(*args)
        if op == "poll":
            return p.poll(*args)
        if op == "purge":
            return p.purge()
        if op == "close":
            self.producer = None
            with contextlib.suppress(AttributeError):  # close() is new in confluent-kafka 2.x
                p.close()
            return None
        raise ValueError(f"unknown producer call {op!r}")


class _Failed(Exception):
    def __init__(self, state: tuple[Any, ...]) -> None:
        super().__init__(state)
        self.state = state


def _die_with_parent(parent: int) -> None:
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(0)


def _serve(fd: int, parent: int) -> None:
    _die_with_parent(parent)
    # The parent owns the shutdown: it commits what it holds, then closes this producer.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn = Connection(fd)
    host = _Host()
    loads, dumps = pickle.loads, pickle.dumps
    while True:
        try:
            op, args = loads(conn.recv_bytes())
        except (EOFError, OSError):
            return  # the parent is gone or closed us
        if op == "produce":
            host.produce(*args)
            continue
        try:
            if op == "start":
                host.start(*args)
                result: Any = None
            else:
                result = host.call(op, args)
            reply: tuple[Any, ...] = ("ok", result)
        except _Failed as exc:
            reply = ("err", exc.state)
        except CKafkaException as exc:
            reply = ("err", _error_state(exc))
        except Exception as exc:
            reply = ("err", ("other", repr(exc)))
        try:
            conn.send_bytes(dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError:
            return
        if op == "close":
            return


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]))
