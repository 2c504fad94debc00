"""``python -m broker --settings-json FILE``: one relay process without a topology file.

Used by fault tests (kill -9 a subprocess) and by anything that builds :class:`RelaySettings`
itself.  The operator entry point is ``wmb relay --route bj:gz`` (:mod:`broker.cli`).
"""

from __future__ import annotations

import sys

import click

from broker.cli import run_relay
from broker.settings import RelaySettings
from wmb import log
from wmb.errors import WmbError


@click.command()
@click.option("--settings-json", "settings_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--log-level", default="INFO", show_default=True)
@click.option("--log-json/--log-text", default=None)
def main(settings_path: str, log_level: str, log_json: bool | None) -> None:
    """Run the relay described by a RelaySettings JSON file until SIGTERM."""
    log.configure(log_level, log_json)
    try:
        settings = RelaySettings.from_file(settings_path)
    except WmbError as exc:
        click.echo(f"wmb relay: {exc}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(run_relay(settings))


if __name__ == "__main__":
    main()
