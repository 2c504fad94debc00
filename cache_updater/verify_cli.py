"""``wmb verify --dc DC [--table T] [--caches]``: a datacenter's replicas and caches against the master."""

from __future__ import annotations

import sys
from typing import Any

import click
import orjson

from wmb.config_cli import topology_option
from wmb.errors import ExitCode
from wmb.topology import load_topology


@click.command("verify")
@click.option("--dc", required=True, help="Datacenter whose copies to compare with the master.")
@topology_option
@click.option("--server", default=None, help="Replica server name when the datacenter has several.")
@click.option("--table", "tables", multiple=True, help="db.table glob (repeatable); default: the replica's.")
@click.option("--chunk-size", default=1000, show_default=True, help="Primary keys per checksum chunk.")
@click.option("--caches", "with_caches", is_flag=True, help="Also compare every cached key with the master.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def verify(
    dc: str,
    topology_path: str,
    server: str | None,
    tables: tuple[str, ...],
    chunk_size: int,
    with_caches: bool,
    as_json: bool,
) -> None:
    """Chunked checksums of DC's replica against the master (and, with --caches, every cached key).

    Prints the mismatching ranges, rows and keys; exits 0 when identical, 8 on any difference.
    """
    from cache_updater.applier.mariadb import jsonable
    from cache_updater.apply_cli import load_settings
    from cache_updater.verify_cache import format_report as format_cache_report
    from cache_updater.verify_cache import verify_caches
    from cache_updater.verify_replica import format_report as format_replica_report
    from cache_updater.verify_replica import verify_replica

    topology = load_topology(topology_path)
    out: dict[str, Any] = {"dc": dc}
    ok = True
    if topology.replicas_in(dc):
        settings = load_settings(topology_path, dc, server)
        assert settings.master is not None
        replica = verify_replica(
            settings.master,
            settings.replica,
            tables or settings.tables,
            chunk_size=chunk_size,
            exclude_schemas=(settings.state_schema,),
        )
        ok &= replica.ok
        out["replica"] = replica.as_json()
        if not as_json:
            click.echo(format_replica_report(replica))
    elif not with_caches:
        raise click.UsageError(f"datacenter {dc!r} keeps no replica; add --caches to check its caches")
    if with_caches:
        caches = verify_caches(topology, dc)
        ok &= caches.ok
        out["caches"] = caches.as_json()
        if not as_json:
            click.echo(format_cache_report(caches))
    out["ok"] = ok
    if as_json:
        click.echo(orjson.dumps(out, default=jsonable).decode())
    sys.exit(int(ExitCode.OK if ok else ExitCode.MISMATCH))
