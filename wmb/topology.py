"""The topology model: one ``topology.yaml`` says which datacenters exist and what each one runs.

Datacenters and their servers, the sources captured from MySQL/MariaDB masters, the routes that
relay change topics between datacenters, the Redis caches and the read replicas kept in each
datacenter.  Every daemon loads the same file and takes its own slice through the accessors of
:class:`Topology` (``sources_in(dc)``, ``routes_to(dc)``, ``caches_in(dc)`` ...), so adding a
datacenter is a change of this file, not of code.

Loading is two passes, and both report *every* problem they find, each line prefixed with the field
path (``routes[0].to: unknown datacenter 'sz'``):

1. structure: YAML syntax, ``${ENV}`` expansion, types, enums, unknown keys (pydantic, with
   ``extra="forbid"`` everywhere so a typo is an error and not a silently ignored key);
2. cross-checks over the whole topology (references, uniqueness, cycles, key templates ...), run
   only once the structure is valid, since they need whole objects to look at.

The field docstrings below are the documentation of ``topology.yaml`` (``docs/configuration.md``
follows them).  Secrets are :class:`pydantic.SecretStr`: their value never appears in ``repr``,
``model_dump`` or any error message.
"""

from __future__ import annotations

import difflib
import enum
import os
import re
import string
import types
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from wmb.errors import ConfigError
from wmb.event import Gtid
from wmb.topics import changes_topic

__all__ = [
    "Cache",
    "CacheTable",
    "CdcStart",
    "ConflictPolicy",
    "Conflicts",
    "Consistency",
    "Datacenter",
    "DdlPolicy",
    "GroupCommit",
    "KafkaCluster",
    "MaskKind",
    "MysqlServer",
    "MysqlServers",
    "Ordering",
    "Parallel",
    "RedisServer",
    "Replica",
    "RetryPolicy",
    "Route",
    "Source",
    "Topology",
    "check_topology",
    "load_topology",
    "parse_topology",
]

MASTER = "master"
"""The server name that always means a datacenter's writable master."""

# Never captured whatever ``include`` says: replicating them would clobber the replica's own
# grants and statistics.
SYSTEM_SCHEMAS = frozenset({"mysql", "information_schema", "performance_schema", "sys"})


# --------------------------------------------------------------------------------------------------
# Scalar types with their own validation
# --------------------------------------------------------------------------------------------------

_NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_IDENT_RE = re.compile(r"[\w$]+")
_HOSTPORT_RE = re.compile(r"[A-Za-z0-9._\-\[\]:]+:\d{1,5}")


def _check_name(value: str) -> str:
    # Datacenter, source, server and cache names end up in Kafka topic names, transactional ids and
    # metric labels, so they keep to the characters all three accept.
    if not _NAME_RE.fullmatch(value):
        raise ValueError(
            f"bad name {value!r}: use 1-32 lowercase letters, digits, '_' or '-', starting with a letter"
        )
    return value


def _check_table(value: str) -> str:
    parts = value.split(".")
    if len(parts) != 2 or not all(_IDENT_RE.fullmatch(p) for p in parts):
        raise ValueError(f"bad table name {value!r}: write it as db.table")
    return value


def _check_column(value: str) -> str:
    if not _IDENT_RE.fullmatch(value):
        raise ValueError(f"bad column name {value!r}")
    return value


def _glob_checker(parts: int, what: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        problem = _glob_problem(value, parts)
        if problem:
            raise ValueError(f"bad {what} pattern {value!r}: {problem}")
        return value

    return check


def _glob_problem(pattern: str, parts: int) -> str | None:
    """Why ``pattern`` is not a valid fnmatch glob of ``parts`` dot-separated names (None if it is)."""
    shape = "db.table" if parts == 2 else "db.table.column"
    i, segments, current = 0, [], ""
    while i < len(pattern):
        ch = pattern[i]
        if ch == "[":
            end = pattern.find("]", i + 2 if pattern[i + 1 : i + 2] in ("!", "]") else i + 1)
            if end < 0:
                return "'[' without a closing ']'"
            body = pattern[i + 1 : end]
            if "." in body or "[" in body or body in ("", "!"):
                return f"bad character class [{body}]"
            current += pattern[i : end + 1]
            i = end + 1
            continue
        if ch == "]":
            return "']' without an opening '['"
        if ch == ".":
            segments.append(current)
            current = ""
        elif not (ch in "*?$" or ch.isalnum() or ch == "_"):
            return f"character {ch!r} is not allowed (names, '*', '?', '[...]' only)"
        else:
            current += ch
        i += 1
    segments.append(current)
    if len(segments) != parts or not all(segments):
        return f"write it as {shape} (each part a name or a glob)"
    return None


Name = Annotated[str, AfterValidator(_check_name)]
TableName = Annotated[str, AfterValidator(_check_table)]
ColumnName = Annotated[str, AfterValidator(_check_column)]
TableGlob = Annotated[str, AfterValidator(_glob_checker(2, "table"))]
ColumnGlob = Annotated[str, AfterValidator(_glob_checker(3, "column"))]
ServerId = Annotated[int, Field(ge=1, le=4_294_967_295)]
Port = Annotated[int, Field(ge=1, le=65_535)]
PositiveInt = Annotated[int, Field(gt=0)]


def _check_bootstrap(value: str) -> str:
    hosts = [h.strip() for h in value.split(",")]
    if not hosts or not all(_HOSTPORT_RE.fullmatch(h) for h in hosts):
        raise ValueError(f"bad bootstrap {value!r}: write host:port[,host:port...]")
    return ",".join(hosts)


Bootstrap = Annotated[str, AfterValidator(_check_bootstrap)]


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


class _Model(BaseModel):
    # frozen: a loaded topology is shared by every component of a process and must not drift.
    # use_attribute_docstrings: the docstring under each field is its description (and its docs).
    model_config = ConfigDict(
        extra="forbid", frozen=True, use_attribute_docstrings=True, validate_default=True
    )


# --------------------------------------------------------------------------------------------------
# Enums
# --------------------------------------------------------------------------------------------------


class Ordering(enum.StrEnum):
    """How a source's events are spread over its topic's partitions (the ordering scope)."""

    DATABASE = "database"
    TABLE = "table"
    ROW = "row"


class MaskKind(enum.StrEnum):
    HASH = "hash"
    NULL = "null"


class Compression(enum.StrEnum):
    NONE = "none"
    GZIP = "gzip"
    LZ4 = "lz4"
    ZSTD = "zstd"


class CacheMode(enum.StrEnum):
    REFRESH = "refresh"
    INVALIDATE = "invalidate"


class CacheFormat(enum.StrEnum):
    HASH = "hash"
    JSON = "json"


class Consistency(enum.StrEnum):
    IMMEDIATE = "immediate"
    AFTER_REPLICA = "after-replica"


class DdlPolicy(enum.StrEnum):
    APPLY = "apply"
    SKIP = "skip"
    HALT = "halt"


class ConflictPolicy(enum.StrEnum):
    OVERWRITE = "overwrite"
    SKIP = "skip"
    HALT = "halt"


# --------------------------------------------------------------------------------------------------
# Datacenters and their servers
# --------------------------------------------------------------------------------------------------


class KafkaCluster(_Model):
    """The Kafka cluster of one datacenter."""

    bootstrap: Bootstrap
    """``host:port[,host:port...]`` that clients inside this datacenter use."""
    wan_bootstrap: Bootstrap | None = None
    """Address that relays in *other* datacenters use to fetch from this cluster (through the link);
    null = same as ``bootstrap``."""
    replication_factor: PositiveInt = 1
    """Replication factor of the topics wmb creates in this cluster (changes, checkpoints, dlq)."""

    @property
    def remote_bootstrap(self) -> str:
        """What a relay in another datacenter connects to."""
        return self.wan_bootstrap or self.bootstrap


class RedisServer(_Model):
    """The Redis that holds this datacenter's caches."""

    url: str
    """``redis://host:port/db``, ``rediss://`` (TLS) or ``unix:///path.sock?db=N``; no password in it."""
    username: str | None = None
    """ACL user name; null = the default user."""
    password: SecretStr | None = None
    """Password (secret; use ``${ENV}``); null or empty = no AUTH."""
    tls: bool = False
    """Use TLS (also implied by a ``rediss://`` url)."""
    tls_ca_file: str | None = None
    """PEM file of the CA that signed the server's certificate; null = the system's trust store
    (which ``SSL_CERT_FILE`` also extends)."""
    cluster: bool = False
    """The url points at a Redis Cluster node; keys of one row stay in one slot."""

    @field_validator("url")
    @classmethod
    def _url_shape(cls, value: str) -> str:
        scheme, sep, rest = value.partition("://")
        if not sep or scheme not in ("redis", "rediss", "unix") or not rest:
            raise ValueError("must start with redis://, rediss:// or unix://")
        # The url is printed in logs and `wmb config show`; a password inside it would leak there.
        # (The message deliberately does not echo the url.)
        netloc = rest.split("/", 1)[0]
        if "@" in netloc:
            raise ValueError("must not carry credentials; put them in `username` and `password`")
        return value

    @property
    def use_tls(self) -> bool:
        return self.tls or self.url.startswith("rediss://")


class MysqlServer(_Model):
    """One MySQL/MariaDB server."""

    host: str
    """Host name or address."""
    port: Port = 3306
    """TCP port."""
    user: str
    """User wmb connects as (capture needs REPLICATION SLAVE/CLIENT and SELECT; the replica applier
    needs write grants on the replicated tables and on ``wmb_apply_state``)."""
    password: SecretStr = SecretStr("")
    """Password (secret; use ``${ENV}``)."""
    server_id: ServerId
    """The server's ``server_id``; unique across the whole topology (GTIDs carry it)."""
    log_slave_updates: bool = False
    """The server writes replicated changes to its own binlog; required to capture from a replica."""


class MysqlServers(_Model):
    """The MySQL/MariaDB servers of one datacenter: at most one writable master, any replicas."""

    master: MysqlServer | None = None
    """The writable master; null = this datacenter holds no master (it only receives changes)."""
    replicas: dict[Name, MysqlServer] = {}
    """Read replicas by name (the name ``master`` is reserved)."""

    @field_validator("replicas")
    @classmethod
    def _master_reserved(cls, value: dict[str, MysqlServer]) -> dict[str, MysqlServer]:
        if MASTER in value:
            raise ValueError(f"the name {MASTER!r} is reserved for the writable master")
        return value

    def get(self, name: str) -> MysqlServer | None:
        return self.master if name == MASTER else self.replicas.get(name)

    def named(self) -> Iterator[tuple[str, MysqlServer]]:
        if self.master is not None:
            yield MASTER, self.master
        yield from self.replicas.items()


class Datacenter(_Model):
    """One datacenter (region): its Kafka, its Redis and its database servers."""

    kafka: KafkaCluster
    """Kafka of this datacenter (every datacenter runs one)."""
    redis: RedisServer | None = None
    """Redis of this datacenter; required when a cache lives here."""
    mysql: MysqlServers = MysqlServers()
    """Database servers of this datacenter."""
    metrics_port_base: Annotated[int, Field(ge=1024, le=65_000)] = 9400
    """First port of this datacenter's daemons' ``/metrics`` + ``/health`` servers (one port each,
    counting up; see ``wmb run``)."""

    _name: str = PrivateAttr(default="")

    @property
    def name(self) -> str:
        return self._name


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


class CdcStart(_Model):
    """Where a source starts when it has no saved checkpoint yet (ignored once it has one)."""

    gtid: str | None = None
    """MariaDB GTID position ``domain-server-seq[,...]``: start *after* it."""
    file: str | None = None
    """Binlog file name for a file/pos start (with ``pos``)."""
    pos: Annotated[int, Field(ge=4)] | None = None
    """Binlog offset for a file/pos start (with ``file``)."""

    @model_validator(mode="after")
    def _one_kind(self) -> CdcStart:
        if (self.file is None) != (self.pos is None):
            raise ValueError("`file` and `pos` go together")
        if self.gtid is not None and self.file is not None:
            raise ValueError("give either `gtid` or `file`+`pos`, not both")
        if self.gtid is not None:
            for part in self.gtid.split(","):
                Gtid.parse(part)  # ValueError names the bad part
        return self


class Source(_Model):
    """One captured binlog: a master (or a replica of it) in one datacenter.

    The source name derives the capturer's Kafka ``transactional.id`` (so a second capturer of the
    same source fences the first) and its topic names (see :mod:`wmb.topics`)."""

    dc: Name
    """Datacenter of the server."""
    server: Name = MASTER
    """``master``, or the name of a replica with ``log_slave_updates`` (to take the load off the master)."""
    replication_server_id: ServerId | None = None
    """``server_id`` the capturer registers with as a replication client; unique across the topology.
    null = derived from the source name (4200000000 + crc32(name) % 90000000)."""
    include: list[TableGlob] = ["*.*"]
    """Tables to capture, ``db.table`` globs (fnmatch: ``*``, ``?``, ``[...]``). System schemas
    (mysql, information_schema, performance_schema, sys) are never captured."""
    exclude: list[TableGlob] = []
    """Tables not to capture even if included (globs)."""
    exclude_columns: list[ColumnGlob] = []
    """Columns dropped from every event, ``db.table.column`` globs (e.g. secrets)."""
    mask_columns: dict[ColumnGlob, MaskKind] = {}
    """Columns whose values are replaced: ``hash`` (HMAC-SHA256 hex under ``mask_key``) or ``null``."""
    mask_key: SecretStr | None = None
    """Key of the ``hash`` masks (secret; use ``${ENV}``), required when any mask is ``hash``: an
    unkeyed digest of a phone number or an e-mail address is reversed by trying every candidate.
    Changing it changes every masked value downstream."""
    ordering: Ordering = Ordering.DATABASE
    """Ordering scope = partition key: ``database`` keeps whole transactions in one partition
    (total order per database); ``table`` and ``row`` trade that for parallelism."""
    partitions: Annotated[int, Field(ge=1, le=10_000)] = 8
    """Partitions of the changes topic."""
    heartbeat_interval_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    """How often the capturer updates its heartbeat row on the master (lag is measured with it)."""
    commit_interval_ms: Annotated[int, Field(ge=1, le=60_000)] = 10
    """A Kafka transaction (whole source transactions + checkpoint) is committed at least this often..."""
    commit_max_events: Annotated[int, Field(ge=1)] = 5000
    """...or after this many events, whichever comes first."""
    compression: Compression = Compression.ZSTD
    """Compression of the capturer's produced batches: none, gzip, lz4, zstd. The relay ships these
    stored batches over the WAN as they are (a route's ``compression`` only applies to its local
    writes), so this is what the WAN link carries."""
    start: CdcStart = CdcStart()
    """Start position when there is no checkpoint; default: the master's current position."""
    retry_max_elapsed_s: Annotated[float, Field(gt=0)] | None = 300.0
    """Give up (exit with GAVE_UP) after retrying a lost MySQL or local Kafka connection this long;
    null = retry forever."""
    kafka_call_timeout_s: Annotated[float, Field(gt=0, le=300)] = 60.0
    """How long one Kafka transactional call (begin/commit) may block before the capturer treats
    its local Kafka as lost and recovers in process (new producer, resume after the checkpoint)."""

    _name: str = PrivateAttr(default="")

    @property
    def name(self) -> str:
        return self._name

    @property
    def effective_replication_server_id(self) -> int:
        if self.replication_server_id is not None:
            return self.replication_server_id
        return 4_200_000_000 + zlib.crc32(self._name.encode()) % 90_000_000

    @property
    def topic(self) -> str:
        """The changes topic in the source's own datacenter."""
        return changes_topic(self._name)

    def captures(self, table: str) -> bool:
        """True if ``db.table`` is captured by this source's include/exclude."""
        if table.split(".", 1)[0] in SYSTEM_SCHEMAS:
            return False
        return any(fnmatchcase(table, p) for p in self.include) and not any(
            fnmatchcase(table, p) for p in self.exclude
        )

    def column_excluded(self, table: str, column: str) -> bool:
        return any(fnmatchcase(f"{table}.{column}", p) for p in self.exclude_columns)

    def mask_for(self, table: str, column: str) -> MaskKind | None:
        for pattern, kind in self.mask_columns.items():
            if fnmatchcase(f"{table}.{column}", pattern):
                return kind
        return None


# --------------------------------------------------------------------------------------------------
# Routes
# --------------------------------------------------------------------------------------------------


class RetryPolicy(_Model):
    """Retries of an I/O edge (exponential backoff with jitter)."""

    max_elapsed_s: Annotated[float, Field(gt=0)] | None = None
    """Give up (exit with GAVE_UP) after retrying this long; null = retry forever (a link cut of
    any length the source retention covers must heal by itself)."""
    initial_backoff_s: Annotated[float, Field(gt=0)] = 0.5
    """First sleep."""
    max_backoff_s: Annotated[float, Field(gt=0)] = 30.0
    """Longest sleep."""


class Route(_Model):
    """A relay from one datacenter's Kafka to another's; it runs in the destination (remote consume,
    local produce) and commits its checkpoint with the produced messages in one local transaction."""

    model_config = ConfigDict(populate_by_name=True)

    from_: Name = Field(alias="from")
    """Source datacenter (fetched over the link)."""
    to: Name
    """Destination datacenter (where the relay runs)."""
    sources: list[Name] | None = None
    """Sources whose change topics this route carries; null = every source that reaches ``from``."""
    topic_prefix: str = ""
    """Destination topic = prefix + topic in ``from``."""
    compression: Compression = Compression.ZSTD
    """Compression of the produced batches: none, gzip, lz4, zstd."""
    max_bytes_per_s: PositiveInt | None = None
    """Throttle of the fetches over the link; null = unthrottled."""
    fetch_max_bytes: PositiveInt = 64 * 1024 * 1024
    """Upper bound of one fetch response (sized for a 40 ms RTT: throughput <= fetch bytes / RTT)."""
    max_partition_fetch_bytes: PositiveInt = 8 * 1024 * 1024
    """Upper bound per partition in one fetch."""
    fetch_max_wait_ms: Annotated[int, Field(ge=0)] = 200
    """Long-poll: the broker answers a fetch after this long even with little data."""
    socket_receive_buffer_bytes: PositiveInt = 4 * 1024 * 1024
    """TCP receive buffer of the WAN connection (>= bandwidth x RTT)."""
    socket_send_buffer_bytes: PositiveInt = 1024 * 1024
    """TCP send buffer."""
    commit_interval_ms: Annotated[int, Field(ge=1, le=60_000)] = 50
    """The relay commits a local transaction (messages + checkpoint) at least this often..."""
    commit_max_messages: PositiveInt = 10_000
    """...or after this many messages, whichever comes first."""
    loop_protection: bool = True
    """Drop messages that have already visited the destination; required for routes in a cycle."""
    retry: RetryPolicy = RetryPolicy()
    """Retry bound of the relay's I/O edges."""

    _index: int = PrivateAttr(default=-1)

    @field_validator("topic_prefix")
    @classmethod
    def _prefix_chars(cls, value: str) -> str:
        if value and not re.fullmatch(r"[A-Za-z0-9._-]+", value):
            raise ValueError("Kafka topic names allow only letters, digits, '.', '_' and '-'")
        return value

    @property
    def name(self) -> str:
        """``bj->gz``: the route's id in checkpoints, logs and metrics."""
        return f"{self.from_}->{self.to}"

    def carries(self, source: str) -> bool:
        return self.sources is None or source in self.sources


# --------------------------------------------------------------------------------------------------
# Caches and replicas
# --------------------------------------------------------------------------------------------------


class CacheTable(_Model):
    """How one table is kept in a cache."""

    key: str
    """Redis key template with ``{col}`` placeholders: exactly the ``primary_key`` columns
    (e.g. ``user:{id}``)."""
    primary_key: Annotated[list[ColumnName], Field(min_length=1)]
    """The table's primary key columns (the row identity a key stands for)."""
    mode: CacheMode = CacheMode.REFRESH
    """``refresh``: write the new row; ``invalidate``: delete the key (readers reload it)."""
    format: CacheFormat = CacheFormat.HASH
    """``hash``: a Redis hash, one field per column; ``json``: one JSON string."""
    ttl_s: PositiveInt | None = None
    """Expiry of a written key; null = none."""
    columns: list[ColumnName] | None = None
    """Columns to store; null = all captured columns."""
    consistency: Consistency = Consistency.IMMEDIATE
    """``immediate``: update as soon as the event arrives; ``after-replica``: only once the replica in
    this datacenter has applied it (a reader that falls back to the replica never sees it older)."""

    @property
    def key_fields(self) -> list[str]:
        return [f for _, f, _, _ in string.Formatter().parse(self.key) if f is not None]


class Cache(_Model):
    """A named set of cached tables in one datacenter's Redis."""

    dc: Name
    """Datacenter (its ``redis`` holds the cache)."""
    name: Name
    """Cache name, unique per datacenter (consumer group and metric label)."""
    source: Name | None = None
    """Source feeding the cache; null = the only source whose changes reach ``dc``."""
    tables: Annotated[dict[TableName, CacheTable], Field(min_length=1)]
    """Cached tables by ``db.table``."""
    tombstone_ttl_s: PositiveInt = 3600
    """Lifetime of the versioned tombstone a delete leaves (stops a late old insert from resurrecting
    the row); must exceed the longest expected redelivery delay."""


class Conflicts(_Model):
    """What the replica applier does when a row does not match the event (missing row on update or
    delete, existing row on insert)."""

    default: ConflictPolicy = ConflictPolicy.HALT
    """``overwrite``: make the replica row equal the event; ``skip``: log and go on; ``halt``: stop
    (exit HALTED) for an operator."""
    per_table: dict[TableGlob, ConflictPolicy] = {}
    """Overrides by ``db.table`` glob (first match wins)."""

    def for_table(self, table: str) -> ConflictPolicy:
        for pattern, policy in self.per_table.items():
            if fnmatchcase(table, pattern):
                return policy
        return self.default


class GroupCommit(_Model):
    """Several source transactions committed in one replica transaction (with the position row)."""

    max_txns: Annotated[int, Field(ge=1)] = 100
    """At most this many source transactions per commit..."""
    max_ms: Annotated[int, Field(ge=0)] = 50
    """...or at most this long after the first one, whichever first."""


class Parallel(_Model):
    """Parallel apply across ordering keys (only keys that cannot conflict run in parallel)."""

    enabled: bool = False
    """Off: one transaction at a time, in source order."""
    workers: Annotated[int, Field(ge=1, le=64)] = 4
    """Worker connections when enabled."""


class Replica(_Model):
    """A MySQL/MariaDB server in one datacenter that the replica applier keeps up to date."""

    dc: Name
    """Datacenter of the server."""
    server: Name
    """Server name in ``datacenters.<dc>.mysql`` (usually a replica)."""
    source: Name | None = None
    """Source to apply; null = the only source whose changes reach ``dc``."""
    tables: Annotated[list[TableGlob], Field(min_length=1)]
    """Tables to apply, ``db.table`` globs."""
    ddl: DdlPolicy = DdlPolicy.APPLY
    """DDL of applied tables: ``apply``, ``skip`` (log it) or ``halt``."""
    conflicts: Conflicts = Conflicts()
    """Row conflict policy."""
    group_commit: GroupCommit = GroupCommit()
    """Batching of replica commits."""
    parallel: Parallel = Parallel()
    """Parallel apply."""

    def covers(self, table: str) -> bool:
        return any(fnmatchcase(table, p) for p in self.tables)


# --------------------------------------------------------------------------------------------------
# The topology
# --------------------------------------------------------------------------------------------------

_T = TypeVar("_T")


class Topology(_Model):
    """The whole deployment.  Building one (``model_validate`` or :func:`load_topology`) runs every
    cross-check; a :class:`~wmb.errors.ConfigError` lists all that fail."""

    version: Literal[1] = 1
    """Format version of this file."""
    epoch: Annotated[int, Field(ge=1)] = 1
    """Raised by failover; the first part of every event version, so versions keep growing when the
    master moves."""
    datacenters: Annotated[dict[Name, Datacenter], Field(min_length=1)]
    """Datacenters by name."""
    sources: dict[Name, Source] = {}
    """Captured binlogs by source name."""
    routes: list[Route] = []
    """Relays between datacenters."""
    caches: list[Cache] = []
    """Redis caches."""
    replicas: list[Replica] = []
    """Read replicas kept by the applier."""

    @model_validator(mode="after")
    def _cross_check(self) -> Topology:
        for name, dc in self.datacenters.items():
            dc._name = name
        for name, src in self.sources.items():
            src._name = name
        for i, route in enumerate(self.routes):
            route._index = i
        errors = _cross_check(self)
        if errors:
            # Not a ValueError on purpose: pydantic would fold the lines into one error at loc ().
            raise ConfigError("\n".join(errors))
        return self

    # -- accessors: each daemon takes its own slice ------------------------------------------------

    def dc(self, name: str) -> Datacenter:
        return _lookup(self.datacenters, name, "datacenter")

    def source(self, name: str) -> Source:
        return _lookup(self.sources, name, "source")

    def server(self, dc: str, name: str) -> MysqlServer:
        server = self.dc(dc).mysql.get(name)
        if server is None:
            raise ConfigError(f"unknown server {name!r} in datacenter {dc!r}")
        return server

    def sources_in(self, dc: str) -> list[Source]:
        """Sources captured in ``dc`` (run by its capture daemons)."""
        return [s for s in self.sources.values() if s.dc == dc]

    def routes_to(self, dc: str) -> list[Route]:
        """Routes into ``dc`` (its relays run there)."""
        return [r for r in self.routes if r.to == dc]

    def routes_from(self, dc: str) -> list[Route]:
        return [r for r in self.routes if r.from_ == dc]

    def caches_in(self, dc: str) -> list[Cache]:
        return [c for c in self.caches if c.dc == dc]

    def replicas_in(self, dc: str) -> list[Replica]:
        return [r for r in self.replicas if r.dc == dc]

    def sources_reaching(self, dc: str) -> list[Source]:
        """Sources whose changes are in ``dc``'s Kafka: captured there, or relayed there by routes."""
        return [s for s in self.sources.values() if dc in _paths_of(self, s)]

    def route_path(self, source: str, dc: str) -> list[Route]:
        """The routes ``source``'s changes take to ``dc`` (empty when captured there)."""
        src = self.source(source)
        paths = _paths_of(self, src)
        if dc not in paths:
            raise ConfigError(f"source {source!r} does not reach datacenter {dc!r}")
        return paths[dc][0]

    def topic_in(self, source: str, dc: str) -> str:
        """Name of ``source``'s changes topic in ``dc``'s Kafka (route prefixes applied in order)."""
        prefix = ""
        for route in self.route_path(source, dc):
            prefix = route.topic_prefix + prefix
        return changes_topic(source, prefix)

    def source_for(self, item: Cache | Replica) -> Source:
        """The source feeding a cache or replica (its ``source``, or the only one reaching its dc)."""
        if item.source is not None:
            return self.source(item.source)
        reaching = self.sources_reaching(item.dc)
        if len(reaching) != 1:
            raise ConfigError(f"{item.dc}: {len(reaching)} sources reach it; name one with `source`")
        return reaching[0]

    def redacted(self) -> dict[str, Any]:
        """The topology as JSON-able data with secrets shown as ``**********``."""
        return self.model_dump(mode="json", by_alias=True)


def _lookup(mapping: Mapping[str, _T], name: str, what: str) -> _T:
    try:
        return mapping[name]
    except KeyError:
        raise ConfigError(f"unknown {what} {name!r}") from None


def _paths_of(topo: Topology, src: Source) -> dict[str, list[list[Route]]]:
    """Every loop-free route path from ``src``'s datacenter, grouped by the datacenter it ends in."""
    found: dict[str, list[list[Route]]] = {src.dc: [[]]}

    def walk(dc: str, visited: frozenset[str], path: list[Route]) -> None:
        for route in topo.routes:
            # Loop protection never ships a message to a datacenter it has already visited.
            if route.from_ != dc or not route.carries(src.name) or route.to in visited:
                continue
            if route.to not in topo.datacenters:
                continue
            longer = [*path, route]
            found.setdefault(route.to, []).append(longer)
            walk(route.to, visited | {route.to}, longer)

    walk(src.dc, frozenset({src.dc}), [])
    return found


# --------------------------------------------------------------------------------------------------
# Cross-checks
# --------------------------------------------------------------------------------------------------


def _key(name: str) -> str:
    """A mapping key as a path element: ``.bj``, or ``['app.users']`` when it is not a plain name."""
    return f".{name}" if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", name) else f"[{name!r}]"


def _cross_check(topo: Topology) -> list[str]:
    errors: list[str] = []
    err = errors.append
    dcs = topo.datacenters

    # -- servers: unique ids and addresses across the topology ----------------------------------
    ids: dict[int, str] = {}
    addresses: dict[tuple[str, int], str] = {}
    for dc_name, dc in dcs.items():
        for srv_name, srv in dc.mysql.named():
            where = (
                f"datacenters.{dc_name}.mysql.master"
                if srv_name == MASTER
                else f"datacenters.{dc_name}.mysql.replicas.{srv_name}"
            )
            if srv.server_id in ids:
                err(f"{where}.server_id: server_id {srv.server_id} is also used by {ids[srv.server_id]}")
            else:
                ids[srv.server_id] = where
            addr = (srv.host, srv.port)
            if addr in addresses:
                err(f"{where}.port: {srv.host}:{srv.port} is also declared as {addresses[addr]}")
            else:
                addresses[addr] = where

    # -- sources: one writable master each, one source per master ----------------------------------
    applied_into = {(r.dc, r.server) for r in topo.replicas}
    master_taken: dict[str, str] = {}
    for name, src in topo.sources.items():
        where = f"sources.{name}"
        sid = src.effective_replication_server_id
        if sid in ids:
            err(f"{where}.replication_server_id: server_id {sid} is also used by {ids[sid]}")
        else:
            ids[sid] = f"{where}.replication_server_id"
        if "hash" in src.mask_columns.values() and not (src.mask_key and src.mask_key.get_secret_value()):
            err(f"{where}.mask_key: hash masks need a key; set it from the environment (${{WMB_MASK_KEY}})")
        src_dc = dcs.get(src.dc)
        if src_dc is None:
            err(f"{where}.dc: unknown datacenter {src.dc!r}")
            continue
        if src_dc.mysql.master is None:
            err(f"{where}.server: datacenter {src.dc!r} has no master (a source needs one writable master)")
            continue
        captured = src_dc.mysql.get(src.server)
        if captured is None:
            err(f"{where}.server: unknown server {src.server!r} in datacenter {src.dc!r}")
            continue
        if src.server != MASTER and not captured.log_slave_updates:
            err(
                f"{where}.server: replica {src.server!r} needs log_slave_updates: true to be captured "
                f"(its binlog would not carry the master's changes)"
            )
        if (src.dc, src.server) in applied_into:
            err(
                f"{where}.server: {src.dc}.{src.server} is also a target of `replicas`; capturing it "
                f"would re-capture the changes wmb applies (a loop the envelope cannot see)"
            )
        if src.dc in master_taken:
            err(
                f"{where}.server: the master of {src.dc!r} is already captured by source "
                f"{master_taken[src.dc]!r}; one source per writable master (else every change twice)"
            )
        else:
            master_taken[src.dc] = name

    # -- routes -------------------------------------------------------------------------------------
    seen_routes: dict[tuple[str, str], int] = {}
    for i, route in enumerate(topo.routes):
        where = f"routes[{i}]"
        for field, dc_name in (("from", route.from_), ("to", route.to)):
            if dc_name not in dcs:
                err(f"{where}.{field}: unknown datacenter {dc_name!r}")
        if route.from_ == route.to:
            err(f"{where}.to: a route from {route.from_!r} to itself")
        pair = (route.from_, route.to)
        if pair in seen_routes:
            err(f"{where}: duplicate of routes[{seen_routes[pair]}] ({route.name})")
        else:
            seen_routes[pair] = i
        for j, source in enumerate(route.sources or []):
            if source not in topo.sources:
                err(f"{where}.sources[{j}]: unknown source {source!r}")
    for i, route in enumerate(topo.routes):
        if route.loop_protection or route.from_ == route.to:
            continue
        back = _dc_path(topo.routes, route.to, route.from_)
        if back is not None:
            cycle = "->".join([route.from_, *back])
            err(
                f"routes[{i}].loop_protection: route {route.name} is part of the cycle {cycle}; "
                f"loop_protection must be on for every route of a cycle"
            )
    for name, src in topo.sources.items():
        if src.dc not in dcs:
            continue
        for dc_name, paths in _paths_of(topo, src).items():
            # Two identical dc sequences come from a duplicate route, reported above.
            if len({_path_text(src.dc, p) for p in paths}) > 1:
                shown = " and ".join(_path_text(src.dc, p) for p in paths[:2])
                last = paths[1][-1]._index
                err(
                    f"routes[{last}]: source {name!r} reaches {dc_name!r} by more than one path ({shown}); "
                    f"every message would arrive twice: restrict a route with `sources`"
                )

    # -- caches and replicas -------------------------------------------------------------------------
    seen_caches: dict[tuple[str, str], int] = {}
    for i, cache in enumerate(topo.caches):
        where = f"caches[{i}]"
        cache_dc = dcs.get(cache.dc)
        if cache_dc is None:
            err(f"{where}.dc: unknown datacenter {cache.dc!r}")
            continue
        if cache_dc.redis is None:
            err(f"{where}.dc: datacenter {cache.dc!r} has no redis")
        pair = (cache.dc, cache.name)
        if pair in seen_caches:
            err(
                f"{where}.name: cache {cache.name!r} is also defined in {cache.dc!r} "
                f"by caches[{seen_caches[pair]}]"
            )
        else:
            seen_caches[pair] = i
        feeder = _feeding_source(topo, cache, where, err)
        for table, spec in cache.tables.items():
            twhere = f"{where}.tables{_key(table)}"
            _check_key_template(spec, twhere, err)
            if feeder is not None:
                if not feeder.captures(table):
                    err(
                        f"{twhere}: source {feeder.name!r} does not capture {table} (see its include/exclude)"
                    )
                for col in [*spec.primary_key, *(spec.columns or [])]:
                    if feeder.column_excluded(table, col):
                        err(f"{twhere}: column {col!r} is dropped by sources.{feeder.name}.exclude_columns")
            if spec.consistency is Consistency.AFTER_REPLICA:
                covering = [
                    r
                    for r in topo.replicas
                    if r.dc == cache.dc
                    and r.covers(table)
                    and (feeder is None or r.source in (None, feeder.name))
                ]
                if not covering:
                    err(
                        f"{twhere}.consistency: after-replica needs a replica in {cache.dc!r} that "
                        f"applies {table} (see `replicas`)"
                    )

    seen_replicas: dict[tuple[str, str], int] = {}
    for i, rep in enumerate(topo.replicas):
        where = f"replicas[{i}]"
        rep_dc = dcs.get(rep.dc)
        if rep_dc is None:
            err(f"{where}.dc: unknown datacenter {rep.dc!r}")
            continue
        if rep_dc.mysql.get(rep.server) is None:
            err(f"{where}.server: unknown server {rep.server!r} in datacenter {rep.dc!r}")
        pair = (rep.dc, rep.server)
        if pair in seen_replicas:
            err(f"{where}.server: {rep.dc}.{rep.server} is already kept by replicas[{seen_replicas[pair]}]")
        else:
            seen_replicas[pair] = i
        rep_feeder = _feeding_source(topo, rep, where, err)
        if rep_feeder is not None:
            for j, pattern in enumerate(rep.tables):
                if not _is_glob(pattern) and not rep_feeder.captures(pattern):
                    err(f"{where}.tables[{j}]: source {rep_feeder.name!r} does not capture {pattern}")
    return errors


def _dc_path(routes: Sequence[Route], start: str, goal: str) -> list[str] | None:
    """Datacenters from ``start`` to ``goal`` along routes (breadth first), or None."""
    prev: dict[str, str | None] = {start: None}
    queue = [start]
    while queue:
        here = queue.pop(0)
        if here == goal:
            path = [here]
            while (step := prev[path[-1]]) is not None:
                path.append(step)
            return path[::-1]
        for r in routes:
            if r.from_ == here and r.to not in prev:
                prev[r.to] = here
                queue.append(r.to)
    return None


def _path_text(start: str, path: Sequence[Route]) -> str:
    return "->".join([start, *(r.to for r in path)])


def _feeding_source(
    topo: Topology, item: Cache | Replica, where: str, err: Callable[[str], None]
) -> Source | None:
    if item.source is not None:
        src = topo.sources.get(item.source)
        if src is None:
            err(f"{where}.source: unknown source {item.source!r}")
            return None
        if src.dc in topo.datacenters and item.dc not in _paths_of(topo, src):
            err(f"{where}.source: changes of source {item.source!r} do not reach {item.dc!r} (no route)")
            return None
        return src
    reaching = [
        s for s in topo.sources.values() if s.dc in topo.datacenters and item.dc in _paths_of(topo, s)
    ]
    if len(reaching) == 1:
        return reaching[0]
    if not reaching:
        err(f"{where}.dc: no source's changes reach {item.dc!r} (add a route or a source)")
    else:
        names = ", ".join(repr(s.name) for s in reaching)
        err(f"{where}.source: several sources reach {item.dc!r} ({names}); name one")
    return None


def _check_key_template(spec: CacheTable, where: str, err: Callable[[str], None]) -> None:
    try:
        parts = list(string.Formatter().parse(spec.key))
    except ValueError as exc:
        err(f"{where}.key: bad template {spec.key!r}: {exc}")
        return
    used: list[str] = []
    for _, field, fmt, conv in parts:
        if field is None:
            continue
        if not field or fmt or conv or not _IDENT_RE.fullmatch(field):
            err(f"{where}.key: placeholder {{{field}}} in {spec.key!r} must be a plain {{column}}")
            continue
        if field not in spec.primary_key:
            err(
                f"{where}.key: placeholder {{{field}}} is not a primary_key column "
                f"({', '.join(spec.primary_key)}); a key must name the row identity only"
            )
        used.append(field)
    missing = [c for c in spec.primary_key if c not in used]
    if missing:
        err(
            f"{where}.key: template {spec.key!r} lacks primary_key column(s) {', '.join(missing)}; "
            f"rows differing only there would share a key"
        )


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        seen[key] = key_node
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

_ENV_REF = re.compile(r"\$\$|\$\{([^}]*)\}|\$\{")
_ENV_BODY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)


def _path_text_of(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            out += " (key)"
        else:
            out += _key(part) if out else part
    return out or "(top level)"


def _expand(value: Any, env: Mapping[str, str], loc: tuple[str | int, ...], errors: list[str]) -> Any:
    """Expand ``${NAME}`` / ``${NAME:-default}`` in every string value (not in keys); ``$$`` is ``$``."""
    if isinstance(value, dict):
        return {k: _expand(v, env, (*loc, str(k)), errors) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, env, (*loc, i), errors) for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        body = match.group(1)
        parsed = _ENV_BODY.fullmatch(body) if body is not None else None
        if parsed is None:
            # The value may be a secret: say what is wrong without echoing it.
            errors.append(f"{_path_text_of(loc)}: malformed ${{...}}: write ${{NAME}} or ${{NAME:-default}}")
            return ""
        name, default = parsed.group(1), parsed.group(2)
        found = env.get(name)
        if default is not None and not found:  # like the shell's :- (unset or empty)
            return default
        if found is None:
            errors.append(
                f"{_path_text_of(loc)}: environment variable {name} is not set "
                f"(set it, or write ${{{name}:-default}})"
            )
            return ""
        return found

    return _ENV_REF.sub(substitute, value)


def _did_you_mean(loc: Sequence[str | int]) -> str:
    """`` (did you mean 'port'?)`` for an unknown key, from the fields of the model that holds it."""
    current: Any = Topology
    for part in loc[:-1]:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel) and isinstance(part, str):
            fields = {(f.alias or n): f for n, f in current.model_fields.items()}
            current = fields[part].annotation if part in fields else None
        elif get_origin(current) is dict:
            current = get_args(current)[1]
        elif get_origin(current) is list and isinstance(part, int):
            current = get_args(current)[0]
        else:
            return ""
    current = _unwrap(current)
    if not (isinstance(current, type) and issubclass(current, BaseModel)):
        return ""
    names = [f.alias or n for n, f in current.model_fields.items()]
    close = difflib.get_close_matches(str(loc[-1]), names, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(names)})"


def _unwrap(tp: Any) -> Any:
    """``X | None`` and ``Annotated[X, ...]`` -> ``X``."""
    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
            continue
        args = [a for a in get_args(tp) if a is not type(None)]
        if get_origin(tp) in (Union, types.UnionType) and len(args) == 1:
            tp = args[0]
            continue
        return tp


def _pydantic_lines(exc: ValidationError) -> list[str]:
    lines = []
    # The input is looked at (never printed: it may be a secret) to explain YAML's typing surprises.
    for e in exc.errors(include_url=False, include_context=False):
        msg = e["msg"]
        if e["type"] == "string_type" and isinstance(e.get("input"), int | float | bool):
            msg += " (YAML read a number or a boolean here: put the value in quotes)"
        for prefix in ("Value error, ", "Assertion failed, "):
            msg = msg.removeprefix(prefix)
        if e["type"] == "extra_forbidden":
            msg = "unknown field" + _did_you_mean(e["loc"])
        elif e["type"] == "missing":
            msg = "required field missing"
        lines.append(f"{_path_text_of(e['loc'])}: {msg}")
    return lines


def _parse(text: str, env: Mapping[str, str] | None, name: str) -> tuple[Topology | None, list[str]]:
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{name}: line {mark.line + 1}, column {mark.column + 1}" if mark else name
        return None, [f"{where}: YAML error: {exc.problem or exc}"]
    except yaml.YAMLError as exc:
        return None, [f"{name}: YAML error: {exc}"]
    if not isinstance(data, dict):
        return None, [f"{name}: the top level must be a mapping (version, datacenters, sources ...)"]
    errors: list[str] = []
    data = _expand(data, os.environ if env is None else env, (), errors)
    try:
        topo = Topology.model_validate(data)
    except ValidationError as exc:
        return None, errors + _pydantic_lines(exc)
    except ConfigError as exc:
        return None, errors + str(exc).splitlines()
    if errors:
        return None, errors
    return topo, []


def parse_topology(text: str, env: Mapping[str, str] | None = None, name: str = "<string>") -> Topology:
    """Build a :class:`Topology` from YAML text; raise :class:`ConfigError` listing every error."""
    topo, errors = _parse(text, env, name)
    if topo is None:
        raise ConfigError("\n".join(errors))
    return topo


def _read(path: str | Path) -> tuple[str | None, list[str]]:
    try:
        return Path(path).read_text(encoding="utf-8"), []
    except (OSError, UnicodeDecodeError) as exc:
        return None, [f"{path}: cannot read: {exc}"]


def load_topology(path: str | Path, env: Mapping[str, str] | None = None) -> Topology:
    """Load and check ``topology.yaml``; ``env`` replaces ``os.environ`` for ``${...}`` expansion.

    Raises :class:`~wmb.errors.ConfigError` whose message has one line per error, each starting with
    the field path (or ``file: line L, column C`` for YAML syntax)."""
    text, errors = _read(path)
    if text is None:
        raise ConfigError("\n".join(errors))
    return parse_topology(text, env, str(path))


def check_topology(path: str | Path, env: Mapping[str, str] | None = None) -> list[str]:
    """Every error line of the topology at ``path`` (an empty list when it is valid)."""
    text, errors = _read(path)
    if text is None:
        return errors
    return _parse(text, env, str(path))[1]
