"""A userspace WAN link emulator: a TCP proxy with one-way delay, jitter, a bandwidth cap and cuts.

Kernel ``netem`` is not available where wmb's tests run, so the inter-region link
(Beijing <-> Guangzhou, ~20 ms one way, ~40 ms RTT) is emulated by this proxy.  Clients connect to
``listen``; every accepted connection opens one upstream connection to ``target``; bytes are carried
in both directions through a delay line.  The proxy runs on its own asyncio loop in a background
thread so synchronous tests and daemons can drive it (:class:`LinkEmulator`), or as a standalone
process with a tiny HTTP control port (``python -m wmb.linkemu``, :class:`LinkControlServer`).

The model, per direction of each proxied connection:

* **delay** (``delay_ms``, one way): every chunk read from a socket is stamped
  ``deliver_at = arrival + delay + jitter_sample`` and queued; one writer task per direction sleeps
  until the head chunk's ``deliver_at`` and writes it.  The link is therefore a *pipe with latency*:
  many chunks are in flight at once and 20 ms of delay does not cap throughput at one chunk per
  20 ms.  A request/response pays the delay twice (RTT = 2 x delay).
* **jitter** (``jitter_ms``): a sample uniform in ``[-jitter, +jitter]`` is added to each chunk's
  delay, but ``deliver_at`` never goes below the previous chunk's in that direction, so jitter
  never reorders bytes (TCP does not either; it shows as bunching instead).
* **bandwidth cap** (``bandwidth_bytes_per_s``): a token bucket per direction of the link, shared
  by all its connections (it is one pipe), applied by the writers after the delay line (bucket
  depth ~10 ms of the rate, at least 16 KiB), so sustained throughput is ~the cap and a burst is
  at most one bucket.  ``None`` = uncapped.
* **backpressure**: each direction holds at most ``max_queue_bytes`` in its delay line; past that
  the proxy stops reading the source socket, so a slow receiver slows the sender (as a TCP window
  would) instead of growing memory.  Throughput is bounded by ``max_queue_bytes / delay``
  (8 MiB / 20 ms = 400 MiB/s by default), the bandwidth-delay product of the emulated link.
* **cut("blackhole")**: packets stop in both directions.  Implemented as "nothing is read and
  nothing is delivered": existing connections stay open, data already in the delay line stays
  there, and senders see their socket buffers fill and their writes stall - which is what a TCP
  peer sees on a real blackhole (its segments are never acknowledged).  New connections are
  accepted by the listen socket (the kernel completes the handshake) but no upstream connection is
  made and nothing is forwarded, so to a Kafka client the connect or first request just hangs until
  its own timeout fires.
* **cut("reset")**: every current connection is aborted with RST (``SO_LINGER`` 0) on both sides,
  and new connections are accepted and reset at once (the client sees ``ECONNRESET``/EOF on its
  first read, not a connect timeout).
* **heal()**: new connections work normally again, connections accepted during a blackhole are
  connected upstream, and blackholed connections *resume* with the data they held - a cut shorter
  than TCP's retransmission timeout is survivable.  ``heal(reset_existing=True)`` instead resets
  every connection that lived through the cut, modelling a long cut after which real TCP sessions
  are dead.  (A Kafka client usually closes such a connection itself after ``request_timeout_ms``.)

Not emulated: packet loss and retransmission (TCP over loopback never loses, and each endpoint's
kernel still acknowledges locally, so send-side timing differs from a real WAN where the sender
waits one RTT for ACKs), MTU/segmentation, congestion control and slow start, and the delay of
an RST (a peer's reset is forwarded at once, dropping what was in flight; a FIN does travel
the delay line behind the data).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import socket
import struct
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal

import orjson
import structlog

from wmb import log

# Not ``log.get(...)``: that binds at import time, which freezes structlog's default config (stdout,
# no level filter) before ``log.configure`` runs; the lazy proxy resolves the config on first use.
_log = structlog.get_logger("wmb.linkemu")

CutMode = Literal["blackhole", "reset"]
State = Literal["up", "cut-blackhole", "cut-reset"]

# One recv of the selector transport is at most 256 KiB; the kernel buffers are set larger so a
# delay line of several MB can drain into the receiver without the proxy waiting on it.
DEFAULT_SOCKET_BUFFER_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_QUEUE_BYTES = 8 * 1024 * 1024
# The write buffer of each transport above which it reports pause_writing (default is 64 KiB,
# too small to keep a fast pipe busy).
_WRITE_HIGH_WATER = 1024 * 1024
_MIN_BUCKET_BYTES = 16 * 1024
_BUCKET_SECONDS = 0.010


@dataclass
class LinkCounters:
    """Totals since start.  ``bytes_up`` is listen->target (client to server), ``bytes_down`` back."""

    bytes_up: int = 0
    bytes_down: int = 0
    connections_total: int = 0
    connections_active: int = 0
    connections_reset: int = 0


def _set_rst_on_close(transport: asyncio.BaseTransport) -> None:
    """Make the next close of this transport's socket send RST instead of FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _tune_socket(transport: asyncio.BaseTransport, buffer_bytes: int | None) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError):
        # Kafka sets TCP_NODELAY on its own sockets; the proxy must not add Nagle delay on top.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if buffer_bytes:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)
    if isinstance(transport, asyncio.WriteTransport):
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)


class _Side(asyncio.Protocol):
    """One socket of a proxied connection (the accepted client, or the upstream connection)."""

    def __init__(self, conn: _Connection, name: str) -> None:
        self.conn = conn
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.backpressured = False  # our outgoing delay line is full: stop reading this socket
        self.reading = True

    # asyncio.Protocol callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        _tune_socket(transport, self.conn.link._socket_buffer_bytes)
        if self is self.conn.client and self.conn.link._state == "cut-reset":
            self.conn.abort()  # a reset link resets new connections at once
            return
        self.update_reading()

    def data_received(self, data: bytes) -> None:
        self.conn.on_data(self, data)

    def eof_received(self) -> bool:
        self.conn.on_eof(self)
        return True  # keep the transport half-open: the other direction may still carry data

    def connection_lost(self, exc: Exception | None) -> None:
        self.can_write.set()  # wake a writer waiting on us so it sees the close
        self.conn.on_lost(self, exc)

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    # helpers
    def update_reading(self) -> None:
        """Read iff the link is not blackholed and our outgoing delay line has room."""
        t = self.transport
        if t is None or t.is_closing():
            return
        want = self.conn.link._state == "up" and not self.backpressured
        if want and not self.reading:
            t.resume_reading()
            self.reading = True
        elif not want and self.reading:
            t.pause_reading()
            self.reading = False

    def abort_rst(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            _set_rst_on_close(t)
            t.abort()


class _Direction:
    """The delay line and writer task carrying bytes from ``src`` to ``dst``."""

    def __init__(self, conn: _Connection, src: _Side, dst: _Side, up: bool) -> None:
        self.conn = conn
        self.src = src
        self.dst = dst
        self.up = up
        self.chunks: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued_bytes = 0
        self.last_deliver_at = 0.0
        self.eof_pending = False
        self.eof_at = 0.0  # a FIN travels the delay line like data
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.done = False

    def push(self, data: bytes) -> None:
        link = self.conn.link
        now = link._loop_time()
        deliver_at = now + link._delay_s
        if link._jitter_s > 0:
            deliver_at += link._rng.uniform(-link._jitter_s, link._jitter_s)
        # Jitter must never reorder: a chunk is delivered no earlier than the one before it.
        deliver_at = max(deliver_at, now, self.last_deliver_at)
        self.last_deliver_at = deliver_at
        self.chunks.append((deliver_at, data))
        self.queued_bytes += len(data)
        if self.queued_bytes >= link._max_queue_bytes and not self.src.backpressured:
            self.src.backpressured = True
            self.src.update_reading()
        self.wakeup.set()

    def _release(self, n: int) -> None:
        self.queued_bytes -= n
        # Resume reading at half the bound (hysteresis: avoid a pause/resume per chunk).
        if self.src.backpressured and self.queued_bytes <= self.conn.link._max_queue_bytes // 2:
            self.src.backpressured = False
            self.src.update_reading()

    async def run(self) -> None:
        link = self.conn.link
        try:
            while True:
                if not self.chunks and not self.eof_pending:
                    self.wakeup.clear()
                    await self.wakeup.wait()
                    continue
                await link._up_event.wait()  # blackhole: hold everything in the delay line
                if not self.chunks:
                    wait_s = self.eof_at - link._loop_time()
                    if wait_s > 0:
                        await asyncio.sleep(wait_s)
                        continue
                    self._send_eof()
                    return
                wait_s = self.chunks[0][0] - link._loop_time()
                if wait_s > 0:
                    await asyncio.sleep(wait_s)
                    continue  # re-check the gate: a cut may have started while we slept
                await self.dst.can_write.wait()
                t = self.dst.transport
                if t is None or t.is_closing():
                    return
                _, data = self.chunks.popleft()
                bucket = link._bucket_up if self.up else link._bucket_down
                if bucket is None:
                    t.write(data)
                else:
                    await self._write_shaped(t, bucket, data)
                    if t.is_closing():
                        return
                self._count(len(data))
                self._release(len(data))
        finally:
            self.done = True
            self.conn.maybe_close()

    async def _write_shaped(self, t: asyncio.Transport, bucket: _TokenBucket, data: bytes) -> None:
        view = memoryview(data)
        while view:
            await self.conn.link._up_event.wait()  # a blackhole can start mid-chunk
            # A quarter bucket at a time, so oversleeping the refill is credited, not clipped.
            piece = view[: bucket.piece_bytes]
            await bucket.take(len(piece))
            if t.is_closing():
                return
            t.write(piece)
            view = view[len(piece) :]
            if not self.dst.can_write.is_set():
                await self.dst.can_write.wait()

    def _count(self, n: int) -> None:
        c = self.conn.link.counters
        if self.up:
            c.bytes_up += n
        else:
            c.bytes_down += n

    def _send_eof(self) -> None:
        t = self.dst.transport
        if t is not None and not t.is_closing() and t.can_write_eof():
            try:
                t.write_eof()
            except OSError:
                # The peer is already gone (ENOTCONN): nothing to half-close; the connection
                # closes through maybe_close() like any other end.
                t.abort()


class _TokenBucket:
    """Bytes per second with a small burst; shared by every connection of one direction."""

    def __init__(self, link: LinkEmulator, rate_bytes_per_s: float) -> None:
        self.link = link
        self.rate = float(rate_bytes_per_s)
        self.depth_bytes = max(_MIN_BUCKET_BYTES, int(self.rate * _BUCKET_SECONDS))
        self.piece_bytes = self.depth_bytes // 4
        self.tokens = float(self.depth_bytes)
        self.updated = link._loop_time()

    async def take(self, n: int) -> None:
        while True:
            now = self.link._loop_time()
            self.tokens = min(float(self.depth_bytes), self.tokens + (now - self.updated) * self.rate)
            self.updated = now
            if self.tokens >= n:
                self.tokens -= n
                return
            # Sleep for exactly the missing tokens; oversleeping is credited on the next refill.
            await asyncio.sleep((n - self.tokens) / self.rate)


class _Connection:
    """One client connection and its upstream connection."""

    def __init__(self, link: LinkEmulator, conn_id: int) -> None:
        self.link = link
        self.id = conn_id
        self.client = _Side(self, "client")
        self.server = _Side(self, "server")
        self.up = _Direction(self, self.client, self.server, up=True)
        self.down = _Direction(self, self.server, self.client, up=False)
        self.upstream_task: asyncio.Task[None] | None = None
        self.closed = False

    def on_data(self, side: _Side, data: bytes) -> None:
        (self.up if side is self.client else self.down).push(data)

    def on_eof(self, side: _Side) -> None:
        d = self.up if side is self.client else self.down
        d.eof_at = max(self.link._loop_time() + self.link._delay_s, d.last_deliver_at)
        d.eof_pending = True
        d.wakeup.set()

    def on_lost(self, side: _Side, exc: Exception | None) -> None:
        if self.closed:
            return
        if exc is not None:
            # The peer reset (or the socket failed): the far end sees a reset too.
            self.abort()
        else:
            self.maybe_close()

    def start_upstream(self) -> None:
        if self.upstream_task is None and not self.closed:
            self.upstream_task = self.link._loop.create_task(self._connect_upstream())

    async def _connect_upstream(self) -> None:
        link = self.link
        try:
            await link._loop.create_connection(lambda: self.server, link.target_host, link.target_port)
        except OSError as exc:
            _log.debug("link_upstream_failed", link=link.name, conn=self.id, error=repr(exc))
            self.abort()
            return
        if self.closed:
            self.server.abort_rst()
            return
        self.up.task = link._loop.create_task(self.up.run())
        self.down.task = link._loop.create_task(self.down.run())

    def maybe_close(self) -> None:
        """Close both sockets once each direction has delivered its EOF.

        A peer that resets or fails instead goes through :meth:`abort` (``connection_lost`` with
        an error); with ``eof_received`` returning True, a clean ``connection_lost`` only follows
        our own close.
        """
        if not self.closed and self.up.done and self.down.done:
            self._finish(graceful=True)

    def abort(self) -> None:
        """RST both sides (a cut, a peer reset, or an upstream connect failure)."""
        if self.closed:
            return
        self.link.counters.connections_reset += 1
        self.client.abort_rst()
        self.server.abort_rst()
        self._finish(graceful=False)

    def _finish(self, graceful: bool) -> None:
        self.closed = True
        for side in (self.client, self.server):
            t = side.transport
            if graceful and t is not None and not t.is_closing():
                t.close()  # flushes what is already written, then FIN
        for d in (self.up, self.down):
            if d.task is not None and not d.done:
                d.task.cancel()
        if self.upstream_task is not None and not self.upstream_task.done():
            self.upstream_task.cancel()
        if self.link._conns.pop(self.id, None) is not None:
            self.link.counters.connections_active -= 1


class LinkEmulator:
    """A TCP proxy that behaves like a WAN link; see the module docstring for the model.

    Runs its own event loop in a daemon thread; every public method is thread-safe and returns
    after the change has taken effect on the loop.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        delay_ms: float = 20.0,
        jitter_ms: float = 0.0,
        bandwidth_bytes_per_s: float | None = None,
        name: str = "link",
        *,
        max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES,
        socket_buffer_bytes: int | None = DEFAULT_SOCKET_BUFFER_BYTES,
        seed: int | None = None,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self.port = listen_port
        self.name = name
        self.counters = LinkCounters()
        self._max_queue_bytes = max_queue_bytes
        self._socket_buffer_bytes = socket_buffer_bytes
        self._rng = random.Random(seed)
        self._delay_s = 0.0
        self._jitter_s = 0.0
        self._bandwidth: float | None = None
        self._bucket_up: _TokenBucket | None = None
        self._bucket_down: _TokenBucket | None = None
        self._state: State = "up"
        self._conns: dict[int, _Connection] = {}
        self._next_id = 0
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._up_event: asyncio.Event
        self._pending_delay_ms = delay_ms
        self._pending_jitter_ms = jitter_ms
        self._pending_bandwidth = bandwidth_bytes_per_s

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> LinkEmulator:
        """Start the loop thread and listen; returns once ``.port`` is bound and accepting."""
        if self._thread is not None:
            raise RuntimeError(f"link {self.name} already started")
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"linkemu-{self.name}", daemon=True
        )
        self._thread.start()
        self._call(self._astart())
        _log.info(
            "link_started",
            link=self.name,
            listen=f"{self.listen_host}:{self.port}",
            target=f"{self.target_host}:{self.target_port}",
            delay_ms=self.delay_ms,
            jitter_ms=self.jitter_ms,
            bandwidth_bytes_per_s=self.bandwidth_bytes_per_s,
        )
        return self

    def stop(self) -> None:
        """Close the listen socket, reset every connection, and end the loop thread."""
        if self._thread is None:
            return
        with contextlib.suppress(Exception):
            self._call(self._astop(), timeout_s=10.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10.0)
        self._thread = None
        self._loop.close()
        _log.info("link_stopped", link=self.name, **asdict(self.counters))

    def __enter__(self) -> LinkEmulator:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---- runtime control -------------------------------------------------------------------
    @property
    def state(self) -> State:
        return self._state

    @property
    def delay_ms(self) -> float:
        return self._delay_s * 1000.0

    @property
    def jitter_ms(self) -> float:
        return self._jitter_s * 1000.0

    @property
    def bandwidth_bytes_per_s(self) -> float | None:
        return self._bandwidth

    _UNSET: Any = object()

    def set(
        self,
        delay_ms: float | None = None,
        jitter_ms: float | None = None,
        bandwidth_bytes_per_s: float | None = _UNSET,
    ) -> None:
        """Change the link at runtime; applies to chunks read from now on.

        ``None`` leaves delay/jitter unchanged; for the cap, omit it to leave it, pass ``None`` to
        uncap.  Lowering the delay never reorders: new chunks wait behind those already in flight.
        """

        async def apply() -> None:
            if delay_ms is not None:
                self._apply_delay(delay_ms)
            if jitter_ms is not None:
                self._apply_jitter(jitter_ms)
            if bandwidth_bytes_per_s is not LinkEmulator._UNSET:
                self._apply_bandwidth(bandwidth_bytes_per_s)

        self._call(apply())
        _log.info(
            "link_set",
            link=self.name,
            delay_ms=self.delay_ms,
            jitter_ms=self.jitter_ms,
            bandwidth_bytes_per_s=self.bandwidth_bytes_per_s,
        )

    def cut(self, mode: CutMode = "blackhole") -> None:
        """Cut the link: ``blackhole`` (everything hangs) or ``reset`` (everything is RST)."""
        if mode not in ("blackhole", "reset"):
            raise ValueError(f"cut mode must be 'blackhole' or 'reset', not {mode!r}")
        self._call(self._acut(mode))
        _log.warning("link_cut", link=self.name, mode=mode)

    def heal(self, reset_existing: bool = False) -> None:
        """Restore the link.  ``reset_existing`` RSTs connections that lived through a blackhole."""
        self._call(self._aheal(reset_existing))
        _log.info("link_healed", link=self.name, reset_existing=reset_existing)

    def stats(self) -> dict[str, Any]:
        """State, settings and counters as a JSON-ready dict (what ``GET /state`` returns)."""
        return {
            "name": self.name,
            "state": self._state,
            "listen": f"{self.listen_host}:{self.port}",
            "target": f"{self.target_host}:{self.target_port}",
            "delay_ms": self.delay_ms,
            "jitter_ms": self.jitter_ms,
            "bandwidth_bytes_per_s": self._bandwidth,
            **asdict(self.counters),
        }

    # ---- loop side -------------------------------------------------------------------------
    def _call(self, coro: Any, timeout_s: float = 30.0) -> Any:
        if self._thread is None:
            coro.close()
            raise RuntimeError(f"link {self.name} is not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def _loop_time(self) -> float:
        return self._loop.time()

    def _apply_delay(self, delay_ms: float) -> None:
        if delay_ms < 0:
            raise ValueError("delay_ms must be >= 0")
        self._delay_s = delay_ms / 1000.0

    def _apply_jitter(self, jitter_ms: float) -> None:
        if jitter_ms < 0:
            raise ValueError("jitter_ms must be >= 0")
        self._jitter_s = jitter_ms / 1000.0

    def _apply_bandwidth(self, rate: float | None) -> None:
        if rate is not None and rate <= 0:
            raise ValueError("bandwidth_bytes_per_s must be > 0 (or None for uncapped)")
        self._bandwidth = rate
        self._bucket_up = _TokenBucket(self, rate) if rate else None
        self._bucket_down = _TokenBucket(self, rate) if rate else None

    async def _astart(self) -> None:
        self._up_event = asyncio.Event()
        self._up_event.set()
        self._apply_delay(self._pending_delay_ms)
        self._apply_jitter(self._pending_jitter_ms)
        self._apply_bandwidth(self._pending_bandwidth)
        self._server = await self._loop.create_server(
            self._accept, self.listen_host, self.port, reuse_address=True, backlog=256
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def _accept(self) -> _Side:
        self._next_id += 1
        conn = _Connection(self, self._next_id)
        self._conns[conn.id] = conn
        self.counters.connections_total += 1
        self.counters.connections_active += 1
        if self._state == "up":
            conn.start_upstream()
        # cut-blackhole: held, connected upstream at heal; cut-reset: reset in connection_made.
        return conn.client

    async def _astop(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns.values()):
            conn.abort()
        await asyncio.sleep(0)  # let the aborts' connection_lost callbacks run
        if self._server is not None:
            await self._server.wait_closed()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    async def _acut(self, mode: CutMode) -> None:
        if mode == "reset":
            self._state = "cut-reset"
            self._up_event.set()  # nothing is held in a reset; writers just find closed sockets
            for conn in list(self._conns.values()):
                conn.abort()
        else:
            self._state = "cut-blackhole"
            self._up_event.clear()
            for conn in self._conns.values():
                conn.client.update_reading()
                conn.server.update_reading()
        await asyncio.sleep(0)

    async def _aheal(self, reset_existing: bool) -> None:
        was_blackhole = self._state == "cut-blackhole"
        if reset_existing and was_blackhole:
            for conn in list(self._conns.values()):
                conn.abort()
        self._state = "up"
        self._up_event.set()
        for conn in list(self._conns.values()):
            conn.client.update_reading()
            conn.server.update_reading()
            conn.start_upstream()
        await asyncio.sleep(0)


# ---- standalone process: HTTP control ---------------------------------------------------------


class LinkControlServer:
    """HTTP control of a running link.

    ``GET /state``; ``POST /cut?mode=blackhole|reset``; ``POST /heal[?reset=1]``;
    ``POST /set?delay_ms=..&jitter_ms=..&bandwidth_bytes_per_s=..`` (``none`` uncaps).
    Every answer is the link's state as JSON; a bad request is 400 with ``{"error": ...}``.
    """

    def __init__(self, link: LinkEmulator, port: int = 0, host: str = "127.0.0.1") -> None:
        outer_link = link

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = orjson.dumps(body)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                if url.path in ("/state", "/"):
                    self._answer(200, outer_link.stats())
                else:
                    self._answer(404, {"error": f"unknown path {url.path}"})

            def do_POST(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                q = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
                try:
                    if url.path == "/cut":
                        mode = q.get("mode", "blackhole")
                        if mode not in ("blackhole", "reset"):
                            raise ValueError(f"mode must be blackhole or reset, not {mode!r}")
                        outer_link.cut(mode)  # type: ignore[arg-type]
                    elif url.path == "/heal":
                        outer_link.heal(reset_existing=q.get("reset", "0") in ("1", "true", "yes"))
                    elif url.path == "/set":
                        kwargs: dict[str, Any] = {}
                        for key in ("delay_ms", "jitter_ms"):
                            if key in q:
                                kwargs[key] = float(q[key])
                        if "bandwidth_bytes_per_s" in q:
                            raw = q["bandwidth_bytes_per_s"].lower()
                            kwargs["bandwidth_bytes_per_s"] = None if raw in ("", "none", "0") else float(raw)
                        outer_link.set(**kwargs)
                    else:
                        self._answer(404, {"error": f"unknown path {url.path}"})
                        return
                except ValueError as exc:
                    self._answer(400, {"error": str(exc)})
                    return
                self._answer(200, outer_link.stats())

            # The length of the body is ignored: every parameter travels in the query string.

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self.host = host
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"linkemu-control-{link.name}", daemon=True
        )

    def start(self) -> LinkControlServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def control_request(control_url: str, action: str, timeout_s: float = 10.0, **params: Any) -> dict[str, Any]:
    """Drive a standalone link: ``control_request("http://127.0.0.1:P", "cut", mode="reset")``.

    ``action`` is ``state`` (GET) or ``cut`` / ``heal`` / ``set`` (POST).  Returns the state dict.
    """
    query = urllib.parse.urlencode({k: ("none" if v is None else v) for k, v in params.items()})
    url = f"{control_url.rstrip('/')}/{action}" + (f"?{query}" if query else "")
    req = urllib.request.Request(url, method="GET" if action == "state" else "POST", data=None)
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        result: dict[str, Any] = orjson.loads(resp.read())
    return result


def _hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return (host or "127.0.0.1"), int(port)


def _command() -> Any:
    import click

    from wmb.runtime import StopToken

    @click.command("linkemu")
    @click.option("--listen", required=True, help="HOST:PORT to accept on (port 0 = any free port).")
    @click.option("--target", required=True, help="HOST:PORT to forward to.")
    @click.option("--delay-ms", type=float, default=20.0, show_default=True, help="One-way delay.")
    @click.option("--jitter-ms", type=float, default=0.0, show_default=True)
    @click.option("--bandwidth-bytes-per-s", type=float, default=None, help="Cap per direction.")
    @click.option("--control-port", type=int, default=None, help="HTTP control port (0 = any free).")
    @click.option("--name", default="link", show_default=True)
    @click.option("--log-level", default="INFO", show_default=True, envvar="WMB_LOG_LEVEL")
    def linkemu(
        listen: str,
        target: str,
        delay_ms: float,
        jitter_ms: float,
        bandwidth_bytes_per_s: float | None,
        control_port: int | None,
        name: str,
        log_level: str,
    ) -> None:
        """Run the WAN link emulator as a process; prints one JSON line with the bound ports."""
        log.configure(log_level)
        stop = StopToken().install()
        lhost, lport = _hostport(listen)
        thost, tport = _hostport(target)
        link = LinkEmulator(
            thost,
            tport,
            listen_host=lhost,
            listen_port=lport,
            delay_ms=delay_ms,
            jitter_ms=jitter_ms,
            bandwidth_bytes_per_s=bandwidth_bytes_per_s,
            name=name,
        ).start()
        control = LinkControlServer(link, port=control_port).start() if control_port is not None else None
        ready = {"listen_port": link.port, "control_port": control.port if control else None}
        click.echo(orjson.dumps(ready).decode(), nl=True)
        try:
            while not stop.wait(3600.0):
                pass
        finally:
            if control is not None:
                control.stop()
            link.stop()

    return linkemu


def main(argv: list[str] | None = None) -> None:
    """``python -m wmb.linkemu``; :func:`command` gives the same as a click command for ``wmb``."""
    _command()(args=argv, prog_name="python -m wmb.linkemu")


def command() -> Any:
    """The ``linkemu`` click command, for ``cli.add_command(linkemu.command())``."""
    return _command()


@contextlib.contextmanager
def running(target_host: str, target_port: int, **kwargs: Any) -> Iterator[LinkEmulator]:
    """``with running(host, port, delay_ms=20) as link:`` - started, and stopped on exit."""
    link = LinkEmulator(target_host, target_port, **kwargs).start()
    try:
        yield link
    finally:
        link.stop()


if __name__ == "__main__":
    main()
