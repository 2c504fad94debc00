"""The error tree and the process exit codes every `wmb` command documents."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    ERROR = 1  # unexpected failure: see the log
    CONFIG = 2  # topology.yaml or command line refused
    PREFLIGHT = 3  # source server settings or grants refused
    POSITION_LOST = 4  # saved position purged from the binlog or unknown to the server
    FENCED = 5  # another instance with the same transactional.id took over
    GAVE_UP = 6  # an I/O edge retried past the bound the operator set
    HALTED = 7  # a conflict or DDL policy halted the applier
    MISMATCH = 8  # `wmb verify` found differences


class WmbError(Exception):
    """Base of every error wmb raises on purpose; carries the exit code of the process it ends."""

    exit_code: ExitCode = ExitCode.ERROR


class ConfigError(WmbError):
    exit_code = ExitCode.CONFIG


class PreflightError(WmbError):
    exit_code = ExitCode.PREFLIGHT


class PositionLostError(WmbError):
    exit_code = ExitCode.POSITION_LOST


class FencedError(WmbError):
    exit_code = ExitCode.FENCED


class GaveUpError(WmbError):
    exit_code = ExitCode.GAVE_UP


class HaltedError(WmbError):
    exit_code = ExitCode.HALTED


class DecodeError(WmbError):
    """A message that cannot become a ChangeEvent: it goes to the dead-letter topic."""


class ServerStartError(WmbError):
    """A test or sandbox server (MariaDB, Kafka, Redis) failed to start; carries its log tail."""
