"""``wmb apply`` and ``wmb bootstrap``: the replica applier's commands (registered by ``wmb.cli``)."""

from __future__ import annotations

import sys
from typing import Any

import click

from cache_updater.apply_settings import ApplySettings, settings_from_topology
from wmb import log
from wmb.config_cli import topology_option
from wmb.errors import ExitCode
from wmb.runtime import MetricsServer, StopToken
from wmb.topology import load_topology

_log = log.get("wmb.apply.cli")


def load_settings(topology_path: str, dc: str, server: str | None) -> ApplySettings:
    return settings_from_topology(load_topology(topology_path), dc, server)


def run_applier(
    settings: ApplySettings, metrics_port: int | None = None, stop: StopToken | None = None
) -> None:
    """Run the applier until SIGTERM/SIGINT (then commit what is whole and return)."""
    from cache_updater.applier.runner import ApplyRunner
    from cache_updater.dlq import DeadLetterSink

    stop = stop or StopToken().install()
    sink = DeadLetterSink(
        settings.kafka_bootstrap, settings.dc, "apply", stop=stop, max_elapsed_s=settings.max_retry_elapsed_s
    )

    def dead_letter(record: Any, reason: str, detail: str) -> None:
        sink.park(record, reason, detail)
        # Durable now: the replica commit that moves the position past this record comes later.
        sink.flush()

    runner = ApplyRunner(settings, stop, dlq=dead_letter)
    metrics = MetricsServer(metrics_port, runner.status.health).start() if metrics_port is not None else None
    try:
        runner.run()
    finally:
        if metrics is not None:
            metrics.stop()
        sink.close()


@click.command("apply")
@click.option("--dc", required=True, help="Datacenter whose replica to keep up to date.")
@topology_option
@click.option("--server", default=None, help="Replica server name when the datacenter has several.")
@click.option("--metrics-port", type=int, default=None, help="Serve /metrics and /health on this port.")
def apply(dc: str, topology_path: str, server: str | None, metrics_port: int | None) -> None:
    """Apply the change topics in DC's Kafka to its read replica, exactly once.

    Exit codes: 0 stopped by SIGTERM, 2 config, 6 gave up retrying, 7 halted by a conflict or DDL
    policy (the message names the event).
    """
    settings = load_settings(topology_path, dc, server)
    run_applier(settings, metrics_port)


@click.command("bootstrap")
@click.option("--dc", required=True, help="Datacenter whose replica to seed.")
@topology_option
@click.option("--server", default=None, help="Replica server name when the datacenter has several.")
@click.option("--dump-file", default=None, type=click.Path(dir_okay=False), help="Keep the dump here.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def bootstrap(dc: str, topology_path: str, server: str | None, dump_file: str | None, as_json: bool) -> None:
    """Seed DC's replica from a consistent dump of the master and set the applier's position.

    Dumps with ``mariadb-dump --single-transaction --gtid --master-data=2``, loads the dump into the
    replica, then sets each partition's position to the first event after the dump's GTID.
    """
    import orjson

    from cache_updater.bootstrap import bootstrap_replica

    settings = load_settings(topology_path, dc, server)
    result = bootstrap_replica(settings, dump_file=dump_file)
    if as_json:
        click.echo(orjson.dumps(result.as_json()).decode())
    else:
        click.echo(result.describe())
    sys.exit(int(ExitCode.OK))
