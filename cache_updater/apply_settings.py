"""Settings of the replica applier, decoupled from the topology model.

The applier core only ever sees :class:`ApplySettings`; :func:`settings_from_topology` is the one
place that knows how ``topology.yaml`` (``wmb.topology``) spells them.  Tests build settings directly.
"""

from __future__ import annotations

import enum
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class ConflictPolicy(enum.StrEnum):
    OVERWRITE = "overwrite"  # make the replica row equal the event's after image
    SKIP = "skip"  # leave the replica as is, record the conflict in wmb_apply_conflicts
    HALT = "halt"  # stop with ExitCode.HALTED, naming the event


class DdlPolicy(enum.StrEnum):
    APPLY = "apply"
    SKIP = "skip"
    HALT = "halt"


@dataclass(frozen=True, slots=True)
class ReplicaConn:
    """How to reach the replica database (a MariaDB/MySQL server)."""

    host: str
    port: int
    user: str
    password: str = ""


@dataclass(frozen=True, slots=True)
class ApplySettings:
    """Everything one applier process needs.

    ``topics``: ``(source, topic)`` pairs: the change topics (``wmb.<source>.changes``, with any
    route prefix) applied from the local Kafka.  ``master``: the source database (verify, bootstrap).
    ``tables``: ``db.table`` globs to apply; events of other tables only advance the position.
    ``state_schema``: where ``wmb_apply_state`` / ``wmb_apply_marker`` / ``wmb_apply_conflicts`` live.
    ``group_max_txns`` / ``group_max_ms``: group commit bound (several whole source transactions in
    one replica transaction; a source transaction is never split).
    ``parallel_workers``: > 1 applies transactions whose write sets do not overlap concurrently on
    that many connections (:mod:`cache_updater.applier.parallel`); topology ``parallel.enabled``
    (default false) gates it.
    """

    dc: str
    replica: ReplicaConn
    kafka_bootstrap: str
    topics: tuple[tuple[str, str], ...]  # (source, changes topic in this dc's Kafka)
    tables: tuple[str, ...] = ("*.*",)
    ddl: DdlPolicy = DdlPolicy.APPLY
    conflict_default: ConflictPolicy = ConflictPolicy.HALT
    conflict_per_table: Mapping[str, ConflictPolicy] = field(default_factory=dict)
    group_max_txns: int = 200
    group_max_ms: int = 50
    parallel_workers: int = 0  # 0/1 = one connection; N > 1 = applier.parallel on N workers
    state_schema: str = "wmb"
    topic_prefix: str = ""
    consumer_group: str = ""  # default: wmb-apply-<dc>; offsets committed for monitoring only
    connect_timeout_s: float = 5.0
    max_retry_elapsed_s: float | None = None  # None = retry the replica/Kafka edge forever
    master: ReplicaConn | None = None

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(s for s, _ in self.topics)

    def wants(self, database: str, table: str) -> bool:
        name = f"{database}.{table}"
        return any(fnmatch.fnmatchcase(name, g) for g in self.tables)

    def conflict_policy(self, database: str, table: str) -> ConflictPolicy:
        name = f"{database}.{table}"
        if name in self.conflict_per_table:
            return self.conflict_per_table[name]
        for pattern, policy in self.conflict_per_table.items():
            if fnmatch.fnmatchcase(name, pattern):
                return policy
        return self.conflict_default

    @property
    def group_id(self) -> str:
        return self.consumer_group or f"wmb-apply-{self.dc}"


def settings_from_topology(topology: Any, dc: str, server: str | None = None) -> ApplySettings:
    """Build the applier settings of datacenter ``dc`` from a ``wmb.topology.Topology``.

    ``server`` picks one of the datacenter's ``replicas`` entries when it has several.
    """
    from wmb.errors import ConfigError

    entries = [r for r in topology.replicas_in(dc) if server is None or r.server == server]
    if not entries:
        raise ConfigError(f"no replica in datacenter {dc!r}" + (f" for server {server!r}" if server else ""))
    if len(entries) > 1:
        names = ", ".join(r.server for r in entries)
        raise ConfigError(f"datacenter {dc!r} has several replicas ({names}): pick one with --server")
    rep = entries[0]
    target = topology.server(dc, rep.server)
    src = topology.source_for(rep)
    master = topology.server(src.dc, src.server)
    return ApplySettings(
        dc=dc,
        replica=ReplicaConn(target.host, target.port, target.user, target.password.get_secret_value()),
        master=ReplicaConn(master.host, master.port, master.user, master.password.get_secret_value()),
        kafka_bootstrap=topology.dc(dc).kafka.bootstrap,
        topics=((src.name, topology.topic_in(src.name, dc)),),
        tables=tuple(rep.tables),
        ddl=DdlPolicy(str(rep.ddl)),
        conflict_default=ConflictPolicy(str(rep.conflicts.default)),
        conflict_per_table={k: ConflictPolicy(str(v)) for k, v in rep.conflicts.per_table.items()},
        group_max_txns=rep.group_commit.max_txns,
        group_max_ms=rep.group_commit.max_ms,
        parallel_workers=rep.parallel.workers if rep.parallel.enabled else 0,
    )
