"""Helpers for capture tests and benchmarks: build settings, run the daemon, read the topic back."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from binlog_capture.daemon import CaptureDaemon, StartMode
from binlog_capture.settings import CaptureSettings
from wmb import codec, topics
from wmb.event import ChangeEvent


def settings_for(mariadb: Any, kafka: Any, source: str, **overrides: Any) -> CaptureSettings:
    """CaptureSettings for a ``wmb.servers`` MariaDB + Kafka pair."""
    base: dict[str, Any] = dict(
        source=source,
        origin_dc="bj",
        mysql_host=mariadb.host,
        mysql_port=mariadb.port,
        mysql_user=mariadb.user,
        mysql_password=mariadb.password,
        kafka_bootstrap=kafka.bootstrap,
        server_id=9000 + (abs(hash(source)) % 1000),
        partitions=3,
        heartbeat_interval_s=0.5,
        reconnect_max_elapsed_s=60.0,
    )
    base.update(overrides)
    return CaptureSettings.from_mapping(base)


@contextmanager
def running(
    settings: CaptureSettings, *, start: StartMode = "checkpoint", from_gtid: str | None = None
) -> Iterator[CaptureDaemon]:
    """Run a daemon in a thread; stop it (SIGTERM path) on exit and re-raise what it raised."""
    daemon = CaptureDaemon(settings, start=start, from_gtid=from_gtid)
    errors: list[BaseException] = []

    def target() -> None:
        try:
            daemon.run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name=f"capture-{settings.source}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 90
    while not daemon.started.wait(0.2):
        if errors:
            raise errors[0]
        if time.monotonic() > deadline:
            raise TimeoutError("capture daemon did not start")
    try:
        yield daemon
    finally:
        daemon.stop.stop("test")
        thread.join(60)
        if errors:
            raise errors[0]


def read_events(
    bootstrap: str,
    source: str,
    *,
    until: Callable[[list[tuple[int, ChangeEvent]]], bool] | None = None,
    timeout_s: float = 90.0,
    isolation: str = "read_committed",
) -> list[tuple[int, ChangeEvent]]:
    """All (partition, event) of the changes topic, in partition order; polls until ``until`` holds
    (or, without ``until``, until the end offsets seen at the start are reached)."""
    topic = topics.changes_topic(source)
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        isolation_level=isolation,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        out: list[tuple[int, ChangeEvent]] = []
        deadline = time.monotonic() + timeout_s
        ends = consumer.end_offsets(tps)
        while True:
            for tp, recs in consumer.poll(timeout_ms=300).items():
                out.extend((tp.partition, codec.decode(r.value)) for r in recs)
            if until is not None:
                if until(out):
                    break
            elif all(consumer.position(tp) >= ends[tp] for tp in tps):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"read_events: condition not met after {timeout_s}s ({len(out)} events)")
        out.sort(key=lambda pe: pe[0])  # stable: keeps the order within each partition
        return out
    finally:
        consumer.close()


def spawn(
    settings: CaptureSettings, tmp: Path, *args: str, log_name: str = "capture"
) -> subprocess.Popen[bytes]:
    """``python -m binlog_capture --settings-json FILE ARGS`` with its log in ``tmp/<log_name>.log``."""
    path = tmp / f"{settings.source}.json"
    path.write_text(settings.to_json())
    log = open(tmp / f"{log_name}.log", "ab")  # noqa: SIM115 - owned by the child
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "binlog_capture", "--settings-json", str(path), *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )


def wait_log(
    path: Path, needle: str, timeout_s: float = 90.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and needle in path.read_text(errors="replace"):
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(
                f"process exited {proc.returncode} before {needle!r}:\n{path.read_text()[-3000:]}"
            )
        time.sleep(0.1)
    raise TimeoutError(f"{needle!r} not in {path} after {timeout_s}s")


def producer_processes(parent_pid: int) -> list[int]:
    """PIDs of the producer processes (:mod:`binlog_capture.producer_host`) started by ``parent_pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if len(argv) >= 4 and argv[1].endswith(b"producer_host.py") and argv[3] == str(parent_pid).encode():
            found.append(int(entry.name))
    return found
