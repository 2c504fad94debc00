"""``python -m binlog_capture --settings-json FILE [--from-now|--from-gtid G]`` (subprocess tests)."""

from __future__ import annotations

import sys

import click

from binlog_capture.cli import capture
from wmb import log
from wmb.errors import ExitCode, WmbError


def main() -> None:
    log.configure("INFO", json=True)
    try:
        capture.main(standalone_mode=False)
    except click.exceptions.ClickException as exc:
        exc.show()
        sys.exit(ExitCode.CONFIG)
    except WmbError as exc:
        click.echo(f"wmb capture: {exc}", err=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
