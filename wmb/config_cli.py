"""``wmb config check|show``: validate ``topology.yaml`` offline, and show what a datacenter runs."""

from __future__ import annotations

import sys

import click
import orjson

from wmb.errors import ConfigError, ExitCode
from wmb.topology import Topology, load_topology

DEFAULT_PATH = "topology.yaml"

topology_option = click.option(
    "--topology",
    "topology_path",
    default=DEFAULT_PATH,
    show_default=True,
    envvar="WMB_TOPOLOGY",
    type=click.Path(dir_okay=False),
    help="The deployment's topology file (or $WMB_TOPOLOGY).",
)
"""The ``--topology`` option every daemon and tool shares."""

_path_argument = click.argument(
    "path", required=False, default=DEFAULT_PATH, envvar="WMB_TOPOLOGY", type=click.Path(dir_okay=False)
)


@click.group()
def config() -> None:
    """Check and inspect the topology (PATH defaults to $WMB_TOPOLOGY, else ./topology.yaml)."""


@config.command()
@_path_argument
@click.option("--json", "as_json", is_flag=True, help='Print {"ok": bool, "errors": [...]} on stdout.')
def check(path: str, as_json: bool) -> None:
    """Validate PATH: structure, ${ENV} expansion and every cross-check.  Exit 0 if valid, else 2.

    Prints every error, one per line, each starting with its field path.  Secret values (passwords)
    are never printed.
    """
    topo: Topology | None = None
    try:
        topo = load_topology(path)
        errors: list[str] = []
    except ConfigError as exc:
        errors = str(exc).splitlines()
    if as_json:
        click.echo(orjson.dumps({"ok": not errors, "path": path, "errors": errors}).decode())
    elif errors:
        for line in errors:
            click.echo(line, err=True)
        click.echo(f"{path}: {len(errors)} error(s)", err=True)
    elif topo is not None:
        click.echo(
            f"OK: {path}: {len(topo.datacenters)} datacenters, {len(topo.sources)} sources, "
            f"{len(topo.routes)} routes, {len(topo.caches)} caches, {len(topo.replicas)} replicas"
        )
    if errors:
        # sys.exit, not ctx.exit: `wmb` runs click with standalone_mode=False, which would turn
        # ctx.exit into a return value and lose the exit code.
        sys.exit(int(ExitCode.CONFIG))


@config.command()
@_path_argument
@click.option(
    "--dc", default=None, help="Only what this datacenter runs (its sources, routes in, caches, replicas)."
)
def show(path: str, dc: str | None) -> None:
    """Print the checked topology (defaults filled in, secrets masked) as JSON."""
    try:
        topo = load_topology(path)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(int(ExitCode.CONFIG))
    data = topo.redacted()
    if dc is not None:
        if dc not in topo.datacenters:
            click.echo(f"unknown datacenter {dc!r} (known: {', '.join(topo.datacenters)})", err=True)
            sys.exit(int(ExitCode.CONFIG))
        data = {
            "epoch": data["epoch"],
            "dc": dc,
            "datacenter": data["datacenters"][dc],
            "sources": {s.name: data["sources"][s.name] for s in topo.sources_in(dc)},
            "routes_in": [data["routes"][i] for i, r in enumerate(topo.routes) if r.to == dc],
            "caches": [data["caches"][i] for i, c in enumerate(topo.caches) if c.dc == dc],
            "replicas": [data["replicas"][i] for i, r in enumerate(topo.replicas) if r.dc == dc],
            "topics": {s.name: topo.topic_in(s.name, dc) for s in topo.sources_reaching(dc)},
        }
    click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
