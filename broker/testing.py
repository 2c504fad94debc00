"""Test helpers for the relay: workloads, a relay in a thread or a subprocess, and comparisons.

Used by ``tests/*/test_relay*.py`` and ``bench/bench_relay.py``; nothing here runs in production.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from broker.relay import Relay
from broker.routing import ORIGIN_HEADER, TS_HEADER
from broker.settings import RelaySettings
from wmb.runtime import StopToken

REPO = Path(__file__).resolve().parent.parent


class TxnWorkload:
    """Writes transactions of ``batch`` records into ``topic`` (round-robin partitions), like capture.

    Values are ``<origin>:<partition>:<seq>``; every ``abort_every``-th transaction is aborted (its
    values say ``ABORTED``) and must never reach the destination.  Runs in a thread until stopped or
    until ``max_txns`` transactions.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        partitions: int,
        origin: str = "bj",
        batch: int = 50,
        abort_every: int = 5,
        max_txns: int | None = None,
        pause_s: float = 0.0,
        value_bytes: int = 0,
    ) -> None:
        self.bootstrap, self.topic, self.partitions, self.origin = bootstrap, topic, partitions, origin
        self.batch, self.abort_every, self.max_txns, self.pause_s = batch, abort_every, max_txns, pause_s
        self.padding = os.urandom(value_bytes) if value_bytes else b""
        self.committed = 0
        self.txns = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="workload", daemon=True)
        self.error: BaseException | None = None
        self._seq = [0] * partitions

    def start(self) -> TxnWorkload:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        if self.error:
            raise self.error

    def join(self, timeout_s: float = 120) -> None:
        self._thread.join(timeout=timeout_s)
        if self.error:
            raise self.error

    def _run(self) -> None:
        producer = KafkaProducer(
            bootstrap_servers=self.bootstrap,
            transactional_id=f"workload-{self.topic}-{self.origin}",
            linger_ms=5,
        )
        try:
            producer.init_transactions()
            while not self._stop.is_set() and (self.max_txns is None or self.txns < self.max_txns):
                self.txns += 1
                abort = self.abort_every > 0 and self.txns % self.abort_every == 0
                producer.begin_transaction()
                for i in range(self.batch):
                    part = i % self.partitions
                    if abort:
                        value = f"{self.origin}:{part}:ABORTED".encode()
                    else:
                        value = f"{self.origin}:{part}:{self._seq[part]}".encode()
                        self._seq[part] += 1
                    producer.send(
                        self.topic,
                        key=f"k{i}".encode(),
                        value=value + self.padding,
                        partition=part,
                        headers=[(ORIGIN_HEADER, self.origin.encode()), (TS_HEADER, str(now_ms()).encode())],
                    )
                if abort:
                    producer.abort_transaction()
                else:
                    producer.commit_transaction()
                    self.committed += self.batch
                if self.pause_s:
                    self._stop.wait(self.pause_s)
        except BaseException as exc:
            self.error = exc
        finally:
            producer.close(timeout=10)


def now_ms() -> int:
    return int(time.time() * 1000)


def read_topic(bootstrap: str, topic: str, timeout_s: float = 60.0) -> dict[int, list[Any]]:
    """Every committed record of ``topic`` per partition, in offset order, up to its end now."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level="read_committed", enable_auto_commit=False, group_id=None
    )
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        out: dict[int, list[Any]] = {tp.partition: [] for tp in tps}
        if not tps:
            return out
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} did not reach its end")
            for tp, recs in consumer.poll(timeout_ms=500).items():
                out[tp.partition].extend(recs)
        return out
    finally:
        consumer.close()


def values(records: dict[int, list[Any]]) -> dict[int, list[bytes]]:
    return {p: [r.value for r in recs] for p, recs in records.items()}


def count(records: dict[int, list[Any]]) -> int:
    return sum(len(v) for v in records.values())


def wait_until(cond: Any, timeout_s: float, what: str, interval_s: float = 0.5) -> None:
    """Poll ``cond()`` until true; fail with ``what`` after a generous ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def end_offsets(bootstrap: str, topic: str, isolation_level: str = "read_committed") -> dict[int, int]:
    """Per partition: the last stable offset (read_committed) or the high watermark (read_uncommitted)."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level=isolation_level, enable_auto_commit=False, group_id=None
    )
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        return {tp.partition: off for tp, off in consumer.end_offsets(tps).items()} if tps else {}
    finally:
        consumer.close()


def mirror_report(src: str, dst: str, topic: str, dst_topic: str | None = None) -> str:
    """Per partition: committed records in src and dst, and dst's last stable offset vs high watermark.

    An LSO stuck below the high watermark means an open (or hanging) transaction in dst: the records
    are there but read_committed readers cannot pass them.
    """
    lines = []
    try:
        src_recs = read_topic(src, topic, timeout_s=20)
        dst_recs = read_topic(dst, dst_topic or topic, timeout_s=20)
        lso = end_offsets(dst, dst_topic or topic)
        hw = end_offsets(dst, dst_topic or topic, "read_uncommitted")
        for p in sorted(src_recs):
            src_vals = [r.value for r in src_recs[p]]
            dst_part = dst_recs.get(p, [])
            lines.append(
                f"  partition {p}: src={len(src_vals)} dst={len(dst_part)} "
                f"dst_lso={lso.get(p)} dst_high_watermark={hw.get(p)}"
            )
            # Where the copies differ: repeated values (duplicates) and values the source lacks.
            seen: dict[bytes, int] = {}
            known = set(src_vals)
            odd = []
            for r in dst_part:
                if r.value in seen:
                    odd.append(f"dup {r.value!r} at dst offsets {seen[r.value]} and {r.offset}")
                elif r.value not in known:
                    odd.append(f"foreign {r.value!r} at dst offset {r.offset}")
                seen.setdefault(r.value, r.offset)
            if odd:  # a second reader (librdkafka) tells a consumer bug from a real duplicate
                other = _librdkafka_count(dst, dst_topic or topic, p)
                lines.append(f"    librdkafka read_committed count: {other}")
            lines.extend(f"    {line}" for line in odd[:3])
            if len(odd) > 3:
                lines.append(f"    ... and {len(odd) - 3} more ({odd[-1]})")
    except Exception as exc:  # a report must not hide the timeout it explains
        lines.append(f"  (report failed: {exc!r})")
    return "\n".join(lines)


def _librdkafka_count(bootstrap: str, topic: str, partition: int) -> int | str:
    from confluent_kafka import Consumer
    from confluent_kafka import TopicPartition as CTopicPartition

    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "wmb-mirror-report",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    try:
        c.assign([CTopicPartition(topic, partition, 0)])
        n = 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msg = c.poll(1.0)
            if msg is None:
                continue
            error = msg.error()
            if error is not None:
                return n if error.code() == -191 else f"error {error}"  # -191: _PARTITION_EOF
            n += 1
        return f"timeout after {n}"
    finally:
        c.close()


def wait_mirrored(
    src: str, dst: str, topic: str, dst_topic: str | None = None, timeout_s: float = 180
) -> None:
    """Until the destination holds as many committed records as the source (then compare exactly).

    Fails with per-partition counts (src vs dst, dst LSO vs high watermark) on timeout, and fails
    fast when the destination holds *more* than the source (duplicates never go away by waiting).
    """
    want = count(read_topic(src, topic))
    have = 0

    def caught_up() -> bool:
        nonlocal have
        have = count(read_topic(dst, dst_topic or topic))
        if have > want:
            raise AssertionError(
                f"{dst} holds {have} records of {dst_topic or topic}, more than the {want} in {src}:\n"
                + mirror_report(src, dst, topic, dst_topic)
            )
        return have >= want

    try:
        wait_until(caught_up, timeout_s, f"{want} records in {dst}")
    except AssertionError as exc:
        if "timed out" not in str(exc):
            raise
        raise AssertionError(
            f"timed out after {timeout_s}s waiting for {want} records in {dst} (last saw {have}):\n"
            + mirror_report(src, dst, topic, dst_topic)
        ) from None


class RelayThread:
    """A :class:`Relay` in a thread of this process (for tests that need its metrics or health)."""

    def __init__(self, settings: RelaySettings) -> None:
        self.relay = Relay(settings, StopToken())
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"relay-{settings.route}", daemon=True)

    def _run(self) -> None:
        try:
            self.relay.run()
        except BaseException as exc:
            self.error = exc

    def start(self) -> RelayThread:
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 60) -> None:
        self.relay.stop.stop("test")
        self._thread.join(timeout=timeout_s)

    def __enter__(self) -> RelayThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RelayProcess:
    """``python -m broker --settings-json FILE`` as a child process (for kill -9 and fencing)."""

    def __init__(self, settings: RelaySettings, workdir: Path, name: str = "relay") -> None:
        self.settings_path = workdir / f"{name}.settings.json"
        self.settings_path.write_bytes(settings.to_json())
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RelayProcess:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with self.log_path.open("ab") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "broker", "--settings-json", str(self.settings_path), "--log-json"],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=env,
            )
        return self

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def terminate(self, timeout_s: float = 60) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        return self.proc.returncode

    def wait(self, timeout_s: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextlib.contextmanager
def relay_process(settings: RelaySettings, workdir: Path, name: str = "relay") -> Iterator[RelayProcess]:
    proc = RelayProcess(settings, workdir, name).start()
    try:
        yield proc
    finally:
        proc.terminate()


def new_changes_topic(kafka: Any, partitions: int = 3) -> str:
    """A fresh ``wmb.<random>.changes`` topic in ``kafka`` (a wmb.servers.KafkaServer)."""
    topic = f"wmb.t{uuid.uuid4().hex[:10]}.changes"
    kafka.create_topic(topic, partitions=partitions)
    return topic


def relay_settings_for(kafka_bj: Any, kafka_gz: Any, topic: str, **kw: Any) -> RelaySettings:
    """bj:gz settings for one topic, through bj's WAN listener, with quick probes for tests."""
    base: dict[str, Any] = {
        "route": "bj:gz",
        "src_dc": "bj",
        "dst_dc": "gz",
        "src_bootstrap": kafka_bj.wan_bootstrap,
        "dst_bootstrap": kafka_gz.bootstrap,
        "topics": (topic,),
        "probe_interval_s": 0.5,
        "retry_max_backoff_s": 2.0,
    }
    base.update(kw)
    return RelaySettings(**base)
