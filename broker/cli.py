"""``wmb relay`` (the daemon) and ``wmb route pause|resume|throttle`` (its runtime switches)."""

from __future__ import annotations

import sys

import click

from broker.control import ControlCommand
from broker.relay import Relay, write_control
from broker.settings import RelaySettings, parse_route, settings_from_topology
from wmb import log
from wmb.config_cli import topology_option
from wmb.errors import ExitCode, WmbError

_log = log.get("broker.cli")


def run_relay(settings: RelaySettings) -> int:
    """Run until SIGTERM/SIGINT; the process exit code (FENCED, GAVE_UP, ... as documented)."""
    relay = Relay(settings)
    relay.stop.install()
    try:
        relay.run()
    except WmbError as exc:
        _log.error("relay_exit", error=str(exc), exit_code=int(exc.exit_code), kind=type(exc).__name__)
        return int(exc.exit_code)
    return int(ExitCode.OK)


def _load(topology_path: str, route: str, metrics_port: int | None) -> RelaySettings:
    from wmb.topology import load_topology

    return settings_from_topology(load_topology(topology_path), route, metrics_port)


@click.command("relay")
@click.option("--route", required=True, help="SRC:DST, e.g. bj:gz (runs in DST).")
@topology_option
@click.option("--metrics-port", type=int, default=None, help="Serve /metrics and /health here (0 = any).")
def relay(route: str, topology_path: str, metrics_port: int | None) -> None:
    """Relay committed change events from SRC's Kafka (over the WAN) into this datacenter's Kafka,
    exactly once.  Exit codes: 0 stopped, 2 config, 5 fenced by another relay, 6 gave up retrying."""
    settings = _load(topology_path, route, metrics_port)
    sys.exit(run_relay(settings))


@click.group("route")
def route() -> None:
    """Pause, resume or throttle a relay route at runtime (no restart)."""


def _send(route_name: str, topology_path: str, cmd: str, rate: int | None) -> None:
    from wmb.topology import load_topology

    src_dc, dst_dc = parse_route(route_name)
    topo = load_topology(topology_path)
    if not any(r.from_ == src_dc and r.to == dst_dc for r in topo.routes):
        raise click.UsageError(f"route {src_dc}:{dst_dc} is not in {topology_path}")
    command = ControlCommand(f"{src_dc}:{dst_dc}", cmd, rate)
    write_control(topo.dc(dst_dc).kafka.bootstrap, command)
    click.echo(f"{command.route}: {cmd}" + (f" {rate} bytes/s" if cmd == "throttle" else ""))


@route.command()
@click.argument("route_name", metavar="ROUTE")
@topology_option
def pause(route_name: str, topology_path: str) -> None:
    """Stop shipping on ROUTE (the relay keeps its checkpoint and resumes from it)."""
    _send(route_name, topology_path, "pause", None)


@route.command()
@click.argument("route_name", metavar="ROUTE")
@topology_option
def resume(route_name: str, topology_path: str) -> None:
    """Resume a paused ROUTE."""
    _send(route_name, topology_path, "resume", None)


@route.command()
@click.argument("route_name", metavar="ROUTE")
@click.option("--bytes-per-s", "rate", type=int, required=True, help="0 = unlimited.")
@topology_option
def throttle(route_name: str, rate: int, topology_path: str) -> None:
    """Cap ROUTE at N bytes/s of shipped key+value bytes (overrides max_bytes_per_s)."""
    _send(route_name, topology_path, "throttle", rate)
