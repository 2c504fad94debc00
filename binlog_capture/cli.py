"""``wmb capture``: run the capture daemon of one source."""

from __future__ import annotations

import sys

import click

from binlog_capture.daemon import StartMode, run_daemon
from binlog_capture.settings import CaptureSettings, settings_from_topology
from wmb.errors import ConfigError


@click.command("capture")
@click.option("--source", "source", help="Source name in the topology.")
@click.option("--topology", "topology_path", default="topology.yaml", show_default=True, type=click.Path())
@click.option("--settings-json", type=click.Path(exists=True), help="CaptureSettings as JSON (tests).")
@click.option(
    "--from-now", is_flag=True, help="Ignore any checkpoint; start at the master's current position."
)
@click.option(
    "--from-gtid", metavar="GTID", help="Ignore any checkpoint; start after this GTID (d-s-n[,...])."
)
@click.option("--metrics-port", type=int, help="Serve /metrics and /health on this port (0 = any free).")
def capture(
    source: str | None,
    topology_path: str,
    settings_json: str | None,
    from_now: bool,
    from_gtid: str | None,
    metrics_port: int | None,
) -> None:
    """Capture one source's binlog into Kafka, exactly once.

    Resumes after the last checkpoint committed to Kafka.  A brand-new source (no checkpoint record)
    starts at the topology's ``start`` position or else at the master's current position; a
    checkpoint that exists but cannot be served (purged, unknown GTID domain) is fatal (exit 4).
    Exit codes: 0 stopped, 2 config, 3 preflight, 4 position lost, 5 fenced, 6 gave up.
    """
    if from_now and from_gtid:
        raise ConfigError("--from-now and --from-gtid exclude each other")
    if settings_json:
        settings = CaptureSettings.from_json_file(settings_json)
    else:
        if not source:
            raise ConfigError("--source is required (or --settings-json)")
        from wmb.topology import load_topology

        settings = settings_from_topology(load_topology(topology_path), source)
    if metrics_port is not None:
        settings = CaptureSettings.from_mapping({**_asdict(settings), "metrics_port": metrics_port})
    mode: StartMode = "now" if from_now else "gtid" if from_gtid else "checkpoint"
    sys.exit(run_daemon(settings, start=mode, from_gtid=from_gtid))


def _asdict(settings: CaptureSettings) -> dict[str, object]:
    import dataclasses

    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
