"""Pure SQL building for the applier: quoting, exact literals, idempotent statements.

Values arrive as the exact Python values pymysql returns from SELECT (see :mod:`wmb.values`), so
pymysql's own escaping writes the same bytes back: ``bytes`` become ``_binary X'..'`` (hex: NUL,
quotes and empty strings survive any sql_mode), ``Decimal`` is printed exactly, ``float`` as its
shortest repr (a FLOAT column rounds it to the same float32), ``timedelta`` keeps its sign and
microseconds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pymysql.converters import escape_item, escape_string

_CHARSET = "utf8mb4"


def qident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def qtable(database: str, table: str) -> str:
    return f"{qident(database)}.{qident(table)}"


def adapt(value: Any) -> Any:
    """The few values pymysql cannot take as they come."""
    if isinstance(value, (set, frozenset)):
        # A SET as a Python set (older producers): the server takes the comma-joined members.
        return ",".join(sorted(str(v) for v in value))
    if isinstance(value, bool):
        return int(value)
    return value


def lit(value: Any) -> str:
    """One SQL literal (the two commonest types take a fast path with pymysql's own escaping)."""
    kind = type(value)
    if kind is int:
        return str(value)
    if kind is str:
        return "'" + escape_string(value) + "'"
    return str(escape_item(adapt(value), _CHARSET))


def where_pk(pk: Mapping[str, Any]) -> str:
    # Null-safe equality: a PK column is never NULL, but a PK-less table matches on its full
    # before image, where NULLs are common.
    return " AND ".join(f"{qident(c)} <=> {lit(v)}" for c, v in pk.items())


def upsert_many(
    database: str, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], pk_cols: Sequence[str]
) -> str:
    """``INSERT ... VALUES (..),(..) ON DUPLICATE KEY UPDATE`` every non-PK column.

    Only used on tables without a unique secondary key: there the only possible duplicate is the
    primary key, so the statement is an exact "make this row look like that" (idempotent).
    """
    cols = ", ".join(qident(c) for c in columns)
    values = ",".join("(" + ",".join(lit(v) for v in row) + ")" for row in rows)
    pkset = set(pk_cols)
    update_cols = [c for c in columns if c not in pkset] or list(columns[:1])
    update = ", ".join(f"{qident(c)}=VALUES({qident(c)})" for c in update_cols)
    return f"INSERT INTO {qtable(database, table)} ({cols}) VALUES {values} ON DUPLICATE KEY UPDATE {update}"


def insert_one(database: str, table: str, row: Mapping[str, Any]) -> str:
    cols = ", ".join(qident(c) for c in row)
    values = ",".join(lit(v) for v in row.values())
    return f"INSERT INTO {qtable(database, table)} ({cols}) VALUES ({values})"


def update_by_pk(database: str, table: str, row: Mapping[str, Any], pk: Mapping[str, Any]) -> str:
    sets = ", ".join(f"{qident(c)}={lit(v)}" for c, v in row.items() if c not in pk)
    if not sets:  # a table made only of its primary key: touch nothing, but still match the row
        c = next(iter(pk))
        sets = f"{qident(c)}={qident(c)}"
    limit = "" if pk else " LIMIT 1"
    return f"UPDATE {qtable(database, table)} SET {sets} WHERE {where_pk(pk)}{limit}"


def update_pkless(database: str, table: str, row: Mapping[str, Any], before: Mapping[str, Any]) -> str:
    sets = ", ".join(f"{qident(c)}={lit(v)}" for c, v in row.items())
    return f"UPDATE {qtable(database, table)} SET {sets} WHERE {where_pk(before)} LIMIT 1"


def delete_by_pk(database: str, table: str, pk: Mapping[str, Any], pkless: bool = False) -> str:
    limit = " LIMIT 1" if pkless else ""
    return f"DELETE FROM {qtable(database, table)} WHERE {where_pk(pk)}{limit}"


def delete_where(database: str, table: str, match: Mapping[str, Any], not_pk: Mapping[str, Any]) -> str:
    """Delete the rows holding ``match`` (a unique key's values) other than the row ``not_pk``."""
    cond = " AND ".join(f"{qident(c)} <=> {lit(v)}" for c, v in match.items())
    if not_pk:
        cond += " AND NOT (" + where_pk(not_pk) + ")"
    return f"DELETE FROM {qtable(database, table)} WHERE {cond}"
