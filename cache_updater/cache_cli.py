"""``wmb cache`` (the daemon), ``wmb dlq list|replay`` and the ``--caches`` half of ``wmb verify``."""

from __future__ import annotations

import sys
from typing import Any

import click
import orjson

from cache_updater import dlq
from cache_updater.cache_settings import settings_from_topology
from wmb import log, topics
from wmb.runtime import MetricsServer, StopToken

_log = log.get("cache_updater.cli")


def _load(topology_path: str) -> Any:
    from wmb.topology import load_topology

    return load_topology(topology_path)


@click.command("cache")
@click.option("--dc", required=True, help="Datacenter whose caches this daemon keeps.")
@click.option(
    "--topology", "topology_path", default="topology.yaml", show_default=True, envvar="WMB_TOPOLOGY"
)
@click.option("--metrics-port", type=int, default=None, help="Serve /metrics and /health here (0 = any).")
def cache(dc: str, topology_path: str, metrics_port: int | None) -> None:
    """Keep the Redis caches of DC in step with the change topics (version-guarded writes)."""
    from cache_updater.cache_daemon import CacheDaemon

    settings = settings_from_topology(_load(topology_path), dc)
    stop = StopToken().install()
    daemon = CacheDaemon(settings, stop=stop)
    server = None
    if metrics_port is not None:
        server = MetricsServer(metrics_port, daemon.health, registry=daemon.metrics.registry).start()
    try:
        daemon.run()
    finally:
        if server is not None:
            server.stop()
    _log.info("cache_stopped", **daemon.metrics.snapshot())


@click.group("dlq")
def dlq_group() -> None:
    """Inspect and replay the dead-letter topic of a datacenter."""


@dlq_group.command("list")
@click.option("--dc", required=True)
@click.option(
    "--topology", "topology_path", default="topology.yaml", show_default=True, envvar="WMB_TOPOLOGY"
)
@click.option("--bootstrap", default=None, help="Kafka of the dc (default: from the topology).")
@click.option("--json", "as_json", is_flag=True, help="One JSON array on stdout.")
def dlq_list(dc: str, topology_path: str, bootstrap: str | None, as_json: bool) -> None:
    """Every dead letter: where it came from, why, and the original value."""
    entries = dlq.read_dlq(bootstrap or _load(topology_path).dc(dc).kafka.bootstrap, dc)
    if as_json:
        sys.stdout.write(orjson.dumps([e.as_json() for e in entries]).decode() + "\n")
        return
    click.echo(f"{len(entries)} dead letter(s) in {topics.dead_letter_topic(dc)}")
    for e in entries:
        value = (e.as_json()["value"] or "")[:80]
        click.echo(
            f"{e.dlq_partition}:{e.dlq_offset}\t{e.reason}\t{e.stage}\t{e.topic}[{e.partition}]@{e.offset}"
            f"\t{e.detail[:80]}\t{value}"
        )


@dlq_group.command("replay")
@click.option("--dc", required=True)
@click.option(
    "--topology", "topology_path", default="topology.yaml", show_default=True, envvar="WMB_TOPOLOGY"
)
@click.option("--bootstrap", default=None, help="Kafka of the dc (default: from the topology).")
@click.option("--offset", "offsets", type=int, multiple=True, help="DLQ offset to replay (repeatable).")
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead letter.")
def dlq_replay(
    dc: str, topology_path: str, bootstrap: str | None, offsets: tuple[int, ...], replay_all: bool
) -> None:
    """Re-inject dead letters into their original topic and partition (every consumer sees them again)."""
    if not offsets and not replay_all:
        raise click.UsageError("give --offset N (repeatable) or --all")
    servers = bootstrap or _load(topology_path).dc(dc).kafka.bootstrap
    entries = dlq.read_dlq(servers, dc)
    if not replay_all:
        wanted = set(offsets)
        entries = [e for e in entries if e.dlq_offset in wanted]
        missing = wanted - {e.dlq_offset for e in entries}
        if missing:
            raise click.UsageError(f"no dead letter at offset(s) {sorted(missing)}")
    producer = dlq.make_producer(servers)
    try:
        sent = dlq.replay(producer, entries, topics.dead_letter_topic(dc))
    finally:
        producer.close()
    click.echo(f"replayed {sent} record(s)")
