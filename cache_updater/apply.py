"""The read-replica applier: public surface (``wmb apply``, ``wmb bootstrap``, ``wmb verify``).

Design in one screen (details in the modules of :mod:`cache_updater.applier`):

* **Exactly-once.**  Each replica transaction = marker row + the rows of one or more *whole* source
  transactions (group commit, bounded by ``group_commit.max_txns`` / ``max_ms``; ``txn.last`` marks
  a source transaction's end, it is never split) + the position rows
  ``wmb_apply_state(source, topic, kafka_partition) -> next_offset, gtid``.  On start and after any
  replica failure the applier rolls back, re-reads those rows and seeks Kafka there; group offsets
  are committed afterwards for monitoring only.
* **Idempotent statements.**  Upsert (``INSERT .. ON DUPLICATE KEY UPDATE`` on tables without a
  unique secondary key, ``INSERT`` + ``UPDATE`` by PK otherwise) and delete by PK, so a replay
  without the position row converges too (under the ``overwrite`` policy; under ``skip``/``halt`` a
  replay of rows changed later shows up as conflicts).  A PK update deletes the old PK and upserts
  the new one.  Not ``REPLACE``: it deletes rows that clash on a unique secondary key silently,
  fires DELETE triggers and cascades foreign keys.
* **Conflicts** (update/delete of a missing row, duplicate on a unique secondary key): per-table
  ``overwrite`` | ``skip`` (recorded in ``wmb_apply_conflicts`` in the same transaction) | ``halt``
  (default; :class:`wmb.errors.HaltedError` naming source, GTID, table and PK -> exit 7).
* **Loop marking**: :func:`is_applier_transaction` (capture side) and :func:`is_applier_ddl`.
* **DDL** is applied in order between groups (its own implicit commit), then its position row.
* **Parallel apply** is not built: ``parallel.enabled`` is accepted and ignored (single connection).
"""

from __future__ import annotations

from cache_updater.applier.mariadb import MariaDBReplica, ReplicaUnavailable
from cache_updater.applier.marker import DDL_MARKER, is_applier_ddl, is_applier_transaction
from cache_updater.applier.runner import CRASH_ENV, ApplyRunner, ApplyStatus
from cache_updater.applier.txn import GroupBuffer, SourceTxn, TxnAssembler
from cache_updater.apply_settings import (
    ApplySettings,
    ConflictPolicy,
    DdlPolicy,
    ReplicaConn,
    settings_from_topology,
)

__all__ = [
    "CRASH_ENV",
    "DDL_MARKER",
    "ApplyRunner",
    "ApplySettings",
    "ApplyStatus",
    "ConflictPolicy",
    "DdlPolicy",
    "GroupBuffer",
    "MariaDBReplica",
    "ReplicaConn",
    "ReplicaUnavailable",
    "SourceTxn",
    "TxnAssembler",
    "is_applier_ddl",
    "is_applier_transaction",
    "settings_from_topology",
]
