"""Loop marking: how a capturer tells the applier's own writes apart from application writes.

Every replica transaction the applier commits writes, as its *first* statement, one row of
``<state_schema>.wmb_apply_marker`` (Otter's "mark table" idea).  In the replica's ROW binlog that
transaction therefore carries a rows event on that table.  A capturer that reads this database
(after a failover made it a master, or in a two-way setup) calls :func:`is_applier_transaction` with
the tables of one binlog transaction and drops the transaction if it returns True.  DDL cannot share
a transaction with a row, so applied DDL carries the comment :data:`DDL_MARKER` instead, which the
binlog Query event keeps verbatim; :func:`is_applier_ddl` tests for it.
"""

from __future__ import annotations

from collections.abc import Iterable

from wmb.topics import APPLIER_DDL_MARKER, APPLIER_MARKER_TABLE, is_applier_ddl, is_applier_marker_table

MARKER_TABLE = APPLIER_MARKER_TABLE
STATE_TABLE = "wmb_apply_state"
CONFLICTS_TABLE = "wmb_apply_conflicts"
DONE_TABLE = "wmb_apply_done"  # parallel apply: transactions committed beyond the position row
DDL_MARKER = APPLIER_DDL_MARKER


def is_applier_transaction(table_names_in_txn: Iterable[str | tuple[str, str]]) -> bool:
    """True if a binlog transaction touching these tables was written by a wmb applier.

    Accepts ``"db.table"`` strings, bare ``"table"`` strings, or ``(db, table)`` tuples; the marker
    table is recognised in any schema (the state schema is configurable), case-insensitively.
    """
    return any(
        is_applier_marker_table(name[1] if isinstance(name, tuple) else name.rsplit(".", 1)[-1])
        for name in table_names_in_txn
    )


__all__ = ["DDL_MARKER", "MARKER_TABLE", "is_applier_ddl", "is_applier_transaction"]


def mark_ddl(sql: str) -> str:
    """Prefix a DDL statement with the applier's marker comment (kept verbatim in the binlog)."""
    return f"{DDL_MARKER} {sql}"
