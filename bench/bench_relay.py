"""Relay WAN benchmark: throughput against the link's cap, added latency, catch-up after a cut.

Starts two private Kafka nodes (bj with a WAN listener, gz) and the link emulator (20 ms one way,
20 MB/s cap by default), then in one process:

1. **direct**: the relay copies a single-partition topic of incompressible payloads bj -> gz
   without the link (the ceiling of this machine);
2. **link**: the same data through the emulated link; prints relay MB/s vs the cap and vs direct,
   and the wire bytes the link carried;
3. **latency**: single-record transactions at a low rate; (visible-in-gz time - bj commit time)
   minus the link's one-way delay, p50/p99;
4. **catch-up**: a cut of ``--cut-s`` seconds under a steady load, then the rate at which the relay
   drains its backlog after the heal.

Run: ``.venv/bin/python bench/bench_relay.py [--mb 200] [--cap-mb 20] [--delay-ms 20]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from broker.settings import RelaySettings
from broker.testing import RelayThread, read_topic
from wmb import log
from wmb.linkemu import LinkEmulator
from wmb.servers import KafkaServer, free_port

MB = 1_000_000


def produce(bootstrap: str, topic: str, total_bytes: int, value_bytes: int) -> int:
    """Incompressible values (random bytes) in committed transactions; returns the record count."""
    p = KafkaProducer(
        bootstrap_servers=bootstrap,
        transactional_id=f"bench-{topic}",
        linger_ms=10,
        batch_size=1024 * 1024,
        max_request_size=16 * 1024 * 1024,
    )
    p.init_transactions()
    block = os.urandom(value_bytes * 64)
    n = 0
    sent = 0
    while sent < total_bytes:
        p.begin_transaction()
        for _ in range(64):
            off = (n * 7919) % (len(block) - value_bytes)
            p.send(topic, value=n.to_bytes(8, "big") + block[off : off + value_bytes - 8], partition=0)
            n += 1
            sent += value_bytes
        p.commit_transaction()
    p.close()
    return n


def relay_until(settings: RelaySettings, dst: str, dst_topic: str, records: int) -> tuple[float, int]:
    """Run a relay until ``records`` are shipped; (seconds from first to last shipped, bytes)."""
    with RelayThread(settings) as relay:
        r = relay.relay
        while r.shipped == 0:
            time.sleep(0.005)
        t0 = time.monotonic()
        first = r.shipped
        first_bytes = r.metrics.bytes._value.get()
        while r.shipped < records:
            time.sleep(0.01)
            if relay.error:
                raise relay.error
        elapsed = time.monotonic() - t0
        shipped_bytes = int(r.metrics.bytes._value.get() - first_bytes)
        del first
    return elapsed, shipped_bytes


def settings(name: str, src: str, dst: str, topic: str, **kw: object) -> RelaySettings:
    return RelaySettings(
        route=f"bj:{name}",
        src_dc="bj",
        dst_dc=name,
        src_bootstrap=src,
        dst_bootstrap=dst,
        topics=(topic,),
        topic_prefix=f"{name}.",
        probe_interval_s=0.5,
        retry_max_backoff_s=1.0,
        **kw,  # type: ignore[arg-type]
    )


def latency(bj: KafkaServer, gz: KafkaServer, link: LinkEmulator, samples: int) -> list[float]:
    topic = "wmb.benchlat.changes"
    bj.create_topic(topic, 1)
    s = settings("gzlat", bj.wan_bootstrap or "", gz.bootstrap, topic, fetch_max_wait_ms=500)
    seen: dict[int, float] = {}
    done = threading.Event()

    def watch() -> None:
        c = KafkaConsumer(
            bootstrap_servers=gz.bootstrap,
            isolation_level="read_committed",
            fetch_max_wait_ms=20,
            group_id=None,
            enable_auto_commit=False,
        )
        tp = TopicPartition("gzlat." + topic, 0)
        while not done.is_set():
            if c.partitions_for_topic(tp.topic):
                break
            time.sleep(0.05)
        c.assign([tp])
        c.seek_to_beginning(tp)
        while not done.is_set():
            for recs in c.poll(timeout_ms=50).values():
                now = time.monotonic()
                for rec in recs:
                    seen[int(rec.value)] = now
        c.close()

    p = KafkaProducer(bootstrap_servers=bj.bootstrap, transactional_id="bench-lat")
    p.init_transactions()
    committed: dict[int, float] = {}
    with RelayThread(s):
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        # warm up: topic creation, first fetch
        for i in range(samples + 20):
            p.begin_transaction()
            p.send(topic, value=str(i).encode(), partition=0)
            p.commit_transaction()
            committed[i] = time.monotonic()
            time.sleep(0.05)
        deadline = time.monotonic() + 30
        while len(seen) < len(committed) and time.monotonic() < deadline:
            time.sleep(0.1)
        done.set()
        watcher.join(timeout=10)
    p.close()
    delay_s = link.delay_ms / 1000
    return sorted((seen[i] - committed[i] - delay_s) * 1000 for i in range(20, samples + 20) if i in seen)


def catch_up(bj: KafkaServer, gz: KafkaServer, link: LinkEmulator, cut_s: float, value_bytes: int) -> None:
    topic = "wmb.benchcut.changes"
    bj.create_topic(topic, 1)
    s = settings("gzcut", bj.wan_bootstrap or "", gz.bootstrap, topic)
    stop = threading.Event()
    rate_mb = 5.0

    def load() -> None:
        p = KafkaProducer(bootstrap_servers=bj.bootstrap, transactional_id="bench-cut", linger_ms=10)
        p.init_transactions()
        block = os.urandom(value_bytes)
        per_txn = max(1, int(rate_mb * MB / value_bytes / 10))
        n = 0
        while not stop.is_set():
            t = time.monotonic()
            p.begin_transaction()
            for _ in range(per_txn):
                p.send(topic, value=n.to_bytes(8, "big") + block[8:], partition=0)
                n += 1
            p.commit_transaction()
            stop.wait(max(0.0, 0.1 - (time.monotonic() - t)))
        p.close()

    loader = threading.Thread(target=load, daemon=True)
    with RelayThread(s) as relay:
        loader.start()
        time.sleep(3)
        link.cut("blackhole")
        time.sleep(cut_s)
        shipped_at_heal = relay.relay.shipped
        stop.set()
        loader.join()
        backlog = sum(len(v) for v in read_topic(bj.bootstrap, topic).values()) - shipped_at_heal
        link.heal()
        t0 = time.monotonic()
        while relay.relay.shipped < shipped_at_heal + backlog:
            time.sleep(0.02)
        took = time.monotonic() - t0
    mb = backlog * value_bytes / MB
    print(
        f"catch-up after a {cut_s:.0f}s blackhole at {rate_mb:.0f} MB/s load: backlog {backlog} records "
        f"({mb:.0f} MB) drained in {took:.1f}s from heal = {mb / took:.1f} MB/s "
        f"(includes link-down detection and reconnect backoff)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=160.0, help="payload to copy per throughput run")
    ap.add_argument("--value-bytes", type=int, default=32 * 1024)
    ap.add_argument("--cap-mb", type=float, default=20.0, help="link bandwidth cap, MB/s (10^6)")
    ap.add_argument("--delay-ms", type=float, default=20.0)
    ap.add_argument("--latency-samples", type=int, default=200)
    ap.add_argument("--cut-s", type=float, default=10.0)
    ap.add_argument("--compression", default="zstd", help="the relay's local produce compression")
    ap.add_argument("--partition-fetch-mb", type=float, default=16.0, help="max_partition_fetch_bytes, MiB")
    ap.add_argument("--only-throughput", action="store_true")
    args = ap.parse_args()
    log.configure("WARNING", json=False)

    root = Path(tempfile.mkdtemp(prefix="bench_relay_"))
    adv = free_port()
    bj = KafkaServer(root / "bj", wan_advertised_port=adv).start()
    gz = KafkaServer(root / "gz").start()
    assert bj.wan_port is not None
    link = LinkEmulator(
        "127.0.0.1",
        bj.wan_port,
        listen_port=adv,
        delay_ms=args.delay_ms,
        bandwidth_bytes_per_s=args.cap_mb * MB,
    ).start()
    try:
        topic = "wmb.bench.changes"
        bj.create_topic(topic, 1)
        records = produce(bj.bootstrap, topic, int(args.mb * MB), args.value_bytes)
        print(f"source: {records} records x {args.value_bytes} B (random, incompressible) in 1 partition")

        t_direct, b_direct = relay_until(
            settings("gzdirect", bj.bootstrap, gz.bootstrap, topic),
            gz.bootstrap,
            "gzdirect." + topic,
            records,
        )
        direct = b_direct / t_direct / MB
        print(f"direct (no link):            {direct:7.1f} MB/s")

        wire0 = link.counters.bytes_down
        t_link, b_link = relay_until(
            settings("gzlink", bj.wan_bootstrap or "", gz.bootstrap, topic),
            gz.bootstrap,
            "gzlink." + topic,
            records,
        )
        via = b_link / t_link / MB
        wire = (link.counters.bytes_down - wire0) / t_link / MB
        print(
            f"through link ({args.delay_ms:.0f} ms one way, cap {args.cap_mb:.0f} MB/s, "
            f"{args.compression}, {args.partition_fetch_mb:.0f} MiB fetches): {via:7.1f} MB/s payload, "
            f"{wire:.1f} MB/s on the wire = {100 * via / args.cap_mb:.0f}% of the cap, "
            f"{100 * via / direct:.0f}% of direct"
        )

        if args.only_throughput:
            return
        link.set(bandwidth_bytes_per_s=None)
        lat = latency(bj, gz, link, args.latency_samples)
        if lat:
            p50 = statistics.median(lat)
            p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
            print(
                f"latency added on top of the {args.delay_ms:.0f} ms one-way delay "
                f"(bj commit -> visible read_committed in gz, n={len(lat)}): "
                f"p50 {p50:.1f} ms, p99 {p99:.1f} ms"
            )
        link.set(bandwidth_bytes_per_s=args.cap_mb * MB)
        catch_up(bj, gz, link, args.cut_s, args.value_bytes)
    finally:
        link.stop()
        bj.stop()
        gz.stop()


if __name__ == "__main__":
    main()
