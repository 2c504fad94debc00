"""The one entry point, ``wmb``.  Each stage keeps its own command module; this file wires them."""

from __future__ import annotations

import sys

import click

from wmb import __version__, log
from wmb.errors import ExitCode, WmbError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wmb")
@click.option("--log-level", default="INFO", show_default=True, envvar="WMB_LOG_LEVEL")
@click.option("--log-json/--log-text", default=None, help="JSON log lines (default: when not a TTY).")
def cli(log_level: str, log_json: bool | None) -> None:
    """wmb: MySQL/MariaDB binlog -> Kafka -> inter-region link -> Redis caches and read replicas."""
    log.configure(log_level, log_json)


def _register() -> None:
    """The shared package's own commands, then each stage's, found through the ``wmb.commands``
    entry points (pyproject.toml): ``wmb`` depends on no stage, the stages plug into it."""
    from importlib.metadata import entry_points

    from wmb.config_cli import config
    from wmb.ops_cli import lag, run, sandbox

    for command in (config, run, sandbox, lag):
        cli.add_command(command)
    for entry in entry_points(group="wmb.commands"):
        cli.add_command(entry.load(), entry.name)


def main() -> None:
    _register()
    try:
        code = cli(standalone_mode=False)
        if isinstance(code, int):
            sys.exit(code)
    except click.exceptions.Abort:
        sys.exit(ExitCode.ERROR)
    except click.exceptions.ClickException as exc:
        exc.show()
        sys.exit(ExitCode.CONFIG)
    except WmbError as exc:
        click.echo(f"wmb: {exc}", err=True)
        sys.exit(exc.exit_code)
    except SystemExit:
        raise


if __name__ == "__main__":
    main()
