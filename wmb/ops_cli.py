"""``wmb run`` (the per-datacenter supervisor) and ``wmb sandbox`` (the local two-datacenter deployment)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import orjson

from wmb.config_cli import topology_option
from wmb.errors import ExitCode
from wmb.runtime import StopToken
from wmb.topology import load_topology


@click.command("run")
@click.option("--dc", required=True, help="Datacenter whose daemons to run.")
@topology_option
@click.option(
    "--metrics-port", type=int, default=None, help="Supervisor /health (default: the dc's base port)."
)
@click.option("--log-dir", type=click.Path(file_okay=False), default=None, help="One log file per daemon.")
def run(dc: str, topology_path: str, metrics_port: int | None, log_dir: str | None) -> None:
    """Supervise every daemon topology.yaml assigns to DC; restart crashed ones; SIGTERM stops all."""
    from wmb.supervisor import run_dc

    topology = load_topology(topology_path)
    topology.dc(dc)
    code = run_dc(topology, topology_path, dc, metrics_port, Path(log_dir) if log_dir else None)
    sys.exit(int(code))


@click.group("sandbox")
@click.option(
    "--dir",
    "root",
    default=None,
    envvar="WMB_SANDBOX_DIR",
    type=click.Path(file_okay=False),
    help="State directory (default .wmb/sandbox).",
)
@click.pass_context
def sandbox(ctx: click.Context, root: str | None) -> None:
    """A local two-datacenter deployment: bj (master) -> 20 ms link -> gz (replica, caches)."""
    from wmb.sandbox import DEFAULT_DIR, Sandbox

    ctx.obj = Sandbox(Path(root) if root else DEFAULT_DIR)


def _progress(msg: str) -> None:
    click.echo(f"[sandbox] {msg}", err=True)


@sandbox.command("up")
@click.pass_obj
def sandbox_up(box: object) -> None:
    """Start MariaDB x2, Kafka x2, Redis x2, the link emulator and every daemon."""
    from wmb.sandbox import Sandbox

    assert isinstance(box, Sandbox)
    box.up(_progress)
    click.echo(orjson.dumps(box.status(), option=orjson.OPT_INDENT_2).decode())


@sandbox.command("status")
@click.option("--json", "as_json", is_flag=True, help="Every endpoint, pid and metrics port as JSON.")
@click.pass_obj
def sandbox_status(box: object, as_json: bool) -> None:
    """Every server's endpoint (host, port, user) and every daemon's pid and metrics port."""
    from wmb.sandbox import Sandbox

    assert isinstance(box, Sandbox)
    status = box.status()
    if as_json:
        click.echo(orjson.dumps(status, option=orjson.OPT_INDENT_2).decode())
    else:
        for name, entry in status["servers"].items():
            where = f"{entry.get('host', '127.0.0.1')}:{entry.get('port', entry.get('metrics_port'))}"
            state = "up" if entry["alive"] else "DOWN"
            click.echo(f"{name:<12} {state:<5} pid={entry['pid']:<8} {where}")
            for daemon, info in entry.get("daemons", {}).items():
                click.echo(f"  {daemon:<18} pid={info.get('pid')} metrics=:{info.get('metrics_port')}")
    if not status["ok"]:
        sys.exit(int(ExitCode.ERROR))


@sandbox.command("down")
@click.pass_obj
def sandbox_down(box: object) -> None:
    """Stop every daemon (they drain and save their positions), the link and the servers; remove all."""
    from wmb.sandbox import Sandbox

    assert isinstance(box, Sandbox)
    box.down(_progress)


@sandbox.command("demo")
@click.option(
    "--duration", "duration_s", type=float, default=60.0, show_default=True, help="Seconds of load."
)
@click.option("--rate", "rate_per_s", type=float, default=200.0, show_default=True, help="Transactions/s.")
@click.option("--up/--no-up", "bring_up", default=True, show_default=True, help="Run `up` first if needed.")
@click.option("--json", "as_json", is_flag=True, help="Print the final report as JSON.")
@click.pass_obj
def sandbox_demo(box: object, duration_s: float, rate_per_s: float, bring_up: bool, as_json: bool) -> None:
    """Write a social-app workload on the bj master, show the live lag table, then verify gz."""
    from wmb.demo import run_demo
    from wmb.sandbox import Sandbox

    assert isinstance(box, Sandbox)
    if bring_up:
        box.up(_progress)
    began = time.monotonic()
    report = run_demo(box, duration_s, rate_per_s, _progress)
    report["wall_s"] = round(time.monotonic() - began, 1)
    if as_json:  # one line, so a script can find it in the output of `make demo`
        click.echo(orjson.dumps(report).decode())
    sys.exit(0 if report["ok"] else int(ExitCode.MISMATCH))


@click.command("lag")
@topology_option
@click.option("--watch", is_flag=True, help="Redraw the table every --interval seconds until Ctrl-C.")
@click.option("--interval", "interval_s", type=float, default=2.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON document (per refresh with --watch).")
@click.option(
    "--warn", "warn_s", type=float, default=5.0, show_default=True, help="WARN past this many seconds."
)
@click.option(
    "--crit", "crit_s", type=float, default=30.0, show_default=True, help="ERR past this many seconds."
)
@click.option(
    "--sample",
    "sample_s",
    type=float,
    default=1.0,
    show_default=True,
    help="STALL detection window (0 = off).",
)
def lag(
    topology_path: str,
    watch: bool,
    interval_s: float,
    as_json: bool,
    warn_s: float,
    crit_s: float,
    sample_s: float,
) -> None:
    """Messages and seconds behind for every hop of every datacenter.  Exit 0 OK, 1 WARN, 2 CRIT."""
    from wmb.lag import collect, render_table

    topology = load_topology(topology_path)
    stop = StopToken().install() if watch else None
    while True:
        report = collect(topology, warn_s, crit_s, sample_s if not watch else 0.0)
        if as_json:
            click.echo(orjson.dumps(report.as_dict()).decode())
        else:
            if watch:
                click.echo("\x1b[2J\x1b[H", nl=False)  # clear the screen, cursor home
                click.echo(time.strftime("%H:%M:%S ") + f"status {report.status.name}")
            click.echo(render_table(report))
        if stop is None or stop.wait(interval_s):
            break
    sys.exit(report.status.exit_code)
