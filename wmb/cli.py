"""The one entry point, ``wmb``.  Each stage keeps its own command module; this file wires them."""

from __future__ import annotations

import sys
from importlib.metadata import EntryPoint, entry_points

import click

from wmb import __version__, log
from wmb.errors import ExitCode, WmbError


class _StageCommands(click.Group):
    """Stage commands come from the ``wmb.commands`` entry points (pyproject.toml) and are imported
    only when named: ``wmb`` depends on no stage, and one stage that fails to import (a missing
    optional library, say) breaks its own command, not ``wmb config check`` or the others."""

    def _entries(self) -> dict[str, EntryPoint]:
        return {e.name: e for e in entry_points(group="wmb.commands")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._entries()})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None and (entry := self._entries().get(cmd_name)) is not None:
            loaded = entry.load()
            command = loaded if isinstance(loaded, click.Command) else None
        return command


@click.group(cls=_StageCommands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wmb")
@click.option("--log-level", default="INFO", show_default=True, envvar="WMB_LOG_LEVEL")
@click.option("--log-json/--log-text", default=None, help="JSON log lines (default: when not a TTY).")
def cli(log_level: str, log_json: bool | None) -> None:
    """wmb: MySQL/MariaDB binlog -> Kafka -> inter-region link -> Redis caches and read replicas."""
    log.configure(log_level, log_json)


def _register() -> None:
    """The shared package's own commands; the stages' come lazily through :class:`_StageCommands`."""
    from wmb.config_cli import config
    from wmb.ops_cli import lag, run, sandbox

    for command in (config, run, sandbox, lag):
        cli.add_command(command)


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
