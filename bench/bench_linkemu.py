"""Benchmark of the WAN link emulator: throughput through a 20 ms link vs direct, and delay p50/p99.

    .venv/bin/python bench/bench_linkemu.py [--mb 200] [--delay-ms 20] [--pings 200]

Everything runs in this process on loopback: a sink server and an echo server in threads, the
emulator on its own loop thread.  The throughput is measured at the receiver from its first recv
(so connect time and the first one-way delay are excluded).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import threading
import time
from collections.abc import Callable

from wmb import log
from wmb.linkemu import LinkEmulator

MB = 1_000_000


def _serve(handler: Callable[[socket.socket], None]) -> tuple[socket.socket, int]:
    srv = socket.create_server(("127.0.0.1", 0))

    def accept_loop() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=handler, args=(conn,), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()
    return srv, srv.getsockname()[1]


def _echo(conn: socket.socket) -> None:
    with conn:
        try:
            while data := conn.recv(1 << 20):
                conn.sendall(data)
        except OSError:
            pass


class _Sink:
    def __init__(self) -> None:
        self.first: tuple[float, int] | None = None
        self.last: tuple[float, int] = (0.0, 0)
        self.done = threading.Event()

    def __call__(self, conn: socket.socket) -> None:
        buf = memoryview(bytearray(1 << 20))
        total = 0
        with conn:
            while n := conn.recv_into(buf):
                total += n
                now = time.perf_counter()
                if self.first is None:
                    self.first = (now, total)
                self.last = (now, total)
        self.done.set()

    def rate(self) -> float:
        assert self.first is not None
        return (self.last[1] - self.first[1]) / (self.last[0] - self.first[0])


def throughput(port_for: Callable[[int], int], total_bytes: int, label: str) -> float:
    sink = _Sink()
    srv, port = _serve(sink)
    block = os.urandom(1 << 20)
    with socket.create_connection(("127.0.0.1", port_for(port))) as s:
        sent = 0
        next_report = total_bytes // 4
        while sent < total_bytes:
            s.sendall(block)
            sent += len(block)
            if sent >= next_report:
                print(f"  {label}: sent {sent / MB:.0f}/{total_bytes / MB:.0f} MB", flush=True)
                next_report += total_bytes // 4
        s.shutdown(socket.SHUT_WR)
        sink.done.wait(120)
    srv.close()
    return sink.rate()


def rtts(port: int, n: int) -> list[float]:
    msg = b"p" * 32
    out = []
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(n + 10):
            t0 = time.perf_counter()
            s.sendall(msg)
            got = 0
            while got < len(msg):
                got += len(s.recv(len(msg) - got))
            if i >= 10:  # warm-up
                out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=200, help="MB streamed one way per throughput run")
    ap.add_argument("--delay-ms", type=float, default=20.0)
    ap.add_argument("--pings", type=int, default=200)
    args = ap.parse_args()
    log.configure("WARNING")
    total = args.mb * MB

    print(f"throughput: direct, {args.mb} MB", flush=True)
    direct = throughput(lambda p: p, total, "direct")
    print(f"throughput: through {args.delay_ms} ms link, {args.mb} MB", flush=True)
    links: list[LinkEmulator] = []

    def via_link(p: int) -> int:
        links.append(LinkEmulator("127.0.0.1", p, delay_ms=args.delay_ms).start())
        return links[-1].port

    linked = throughput(via_link, total, "link")
    for link in links:
        link.stop()

    print(f"delay: {args.pings} round trips direct and through the link", flush=True)
    echo_srv, echo_port = _serve(_echo)
    base = statistics.median(rtts(echo_port, args.pings))
    with LinkEmulator("127.0.0.1", echo_port, delay_ms=args.delay_ms) as link:
        added = sorted((r - base) / 2 * 1000 for r in rtts(link.port, args.pings))
    echo_srv.close()
    p50 = statistics.median(added)
    p99 = added[min(len(added) - 1, int(0.99 * len(added)))]

    print()
    print(f"direct throughput        {direct / MB:8.1f} MB/s")
    print(f"link throughput ({args.delay_ms:g} ms) {linked / MB:8.1f} MB/s   ratio {linked / direct:.2f}")
    print(f"direct RTT p50           {base * 1000:8.3f} ms")
    print(f"added one-way delay      p50 {p50:.2f} ms   p99 {p99:.2f} ms   (setting {args.delay_ms:g} ms)")


if __name__ == "__main__":
    main()
