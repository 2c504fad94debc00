"""What one capture daemon needs to know, independent of the topology file's shape.

The daemon core takes a :class:`CaptureSettings` and nothing else, so tests build one directly and
the CLI builds one from ``topology.yaml`` (:func:`settings_from_topology`) or from a JSON file
(``python -m binlog_capture --settings-json FILE``, used by tests that ``kill -9`` a subprocess).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from wmb.errors import ConfigError

Ordering = Literal["database", "table", "row"]
MaskKind = Literal["hash", "null"]
CompressionKind = Literal["none", "gzip", "lz4", "zstd"]


@dataclass(frozen=True)
class CaptureSettings:
    """Settings of one capture daemon (one source = one MariaDB/MySQL master)."""

    source: str
    origin_dc: str
    mysql_host: str
    mysql_port: int
    mysql_user: str
    mysql_password: str
    kafka_bootstrap: str
    #: server id the replication client registers with; must differ from the master's and replicas'.
    server_id: int = 4242
    ordering: Ordering = "database"
    partitions: int = 1
    #: ``db.table`` fnmatch globs; empty include = everything.
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    #: ``db.table.col`` globs of columns dropped before anything leaves the daemon.
    exclude_columns: tuple[str, ...] = ()
    #: ``db.table.col`` -> "hash" (HMAC-SHA256 hex of the canonical bytes under ``mask_key``) or "null".
    mask_columns: Mapping[str, MaskKind] = field(default_factory=dict)
    #: key of the hash masks (a secret: never logged; ``repr`` hides it).
    mask_key: str = field(default="", repr=False)
    heartbeat_interval_s: float = 1.0
    commit_interval_ms: int = 10
    commit_max_events: int = 5000
    #: raised by a failover so that row versions keep growing when the master moves.
    epoch: int = 1
    metrics_port: int | None = None
    #: bound of the reconnect loops (binlog stream, Kafka); None = retry forever.
    reconnect_max_attempts: int | None = None
    reconnect_max_elapsed_s: float | None = 300.0
    #: False for the MySQL ``uuid:n`` code path (written, not exercised by the tests).
    is_mariadb: bool = True
    heartbeat_database: str = "wmb"
    heartbeat_table: str = "wmb_heartbeat"
    #: where a source with NO checkpoint record starts (topology ``start``); default: current position.
    start_gtid: str | None = None
    start_file: str | None = None
    start_pos: int | None = None
    #: how long a SIGTERM may take to commit the in-flight Kafka transaction.
    stop_timeout_s: float = 10.0
    #: codec of the produced batches; the relay ships them over the WAN as stored, so this is what
    #: the WAN link carries (librdkafka compresses off the GIL).
    compression: CompressionKind = "zstd"
    #: how long one transactional call (init/commit/abort) may block before the daemon treats the
    #: local Kafka as lost and recovers (new producer, resume after the committed checkpoint).
    kafka_call_timeout_s: float = 60.0
    #: the broker aborts a transaction left open this long.  Far above ``kafka_call_timeout_s``, so
    #: an outage of the local Kafka ends in a recovery, never in a "fenced" exit (the coordinator
    #: bumps the epoch of a timed-out transaction, which this producer would read as fencing).
    kafka_transaction_timeout_ms: int = 600_000

    def __post_init__(self) -> None:
        if self.ordering not in ("database", "table", "row"):
            raise ConfigError(f"capture.ordering: {self.ordering!r} is not database|table|row")
        if self.partitions < 1:
            raise ConfigError("capture.partitions must be >= 1")
        for col, kind in self.mask_columns.items():
            if kind not in ("hash", "null"):
                raise ConfigError(f"capture.mask_columns[{col!r}]: {kind!r} is not hash|null")
            if col.count(".") < 2:
                raise ConfigError(f"capture.mask_columns: {col!r} is not db.table.column")
        if "hash" in self.mask_columns.values() and not self.mask_key:
            raise ConfigError(
                "capture.mask_key: hash masks need a key (set sources.<name>.mask_key, e.g. ${WMB_MASK_KEY})"
            )
        if self.compression not in ("none", "gzip", "lz4", "zstd"):
            raise ConfigError(f"capture.compression: {self.compression!r} is not none|gzip|lz4|zstd")
        if self.commit_interval_ms <= 0 or self.commit_max_events <= 0:
            raise ConfigError("capture.commit_interval_ms and commit_max_events must be > 0")
        call_s, txn_ms = self.kafka_call_timeout_s, self.kafka_transaction_timeout_ms
        if call_s <= 0 or txn_ms < 2_000 * call_s:
            raise ConfigError(
                "capture: kafka_transaction_timeout_ms must be at least twice kafka_call_timeout_s "
                f"(got {self.kafka_transaction_timeout_ms} ms and {self.kafka_call_timeout_s} s)"
            )

    @property
    def transactional_id(self) -> str:
        """Derived from the source name so that a second capturer of the same source fences the first."""
        return f"wmb-capture-{self.source}"

    # -- (de)serialization for the subprocess entry point --------------------------------------
    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["mask_columns"] = dict(self.mask_columns)
        return json.dumps(data, indent=2)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> CaptureSettings:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"capture settings: unknown keys {sorted(unknown)}")
        kwargs = dict(data)
        for key in ("include", "exclude", "exclude_columns"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"capture settings: {exc}") from exc

    @classmethod
    def from_json_file(cls, path: str | Path) -> CaptureSettings:
        try:
            return cls.from_mapping(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"capture settings file {path}: {exc}") from exc


def settings_from_topology(topology: Any, source_name: str, *, metrics_port: int | None = None) -> Any:
    """Build :class:`CaptureSettings` for ``source_name`` from a :class:`wmb.topology.Topology`.

    Reads the model through attribute access only so the daemon core never imports the topology
    module; see ``binlog_capture/topology_adapter.py`` for the field mapping.
    """
    from binlog_capture.topology_adapter import from_topology

    return from_topology(topology, source_name, metrics_port=metrics_port)


def table_matches(globs: tuple[str, ...], db: str, table: str) -> bool:
    name = f"{db}.{table}"
    return any(fnmatch.fnmatchcase(name, g) for g in globs)
