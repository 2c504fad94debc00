"""Refuse to start against a source that would make the capture silently wrong.

python-mysql-replication only *warns* about these settings; with MINIMAL metadata it even labels
columns from an information_schema cache that is wrong after an ALTER.  Each refusal names the
setting and the fix.
"""

from __future__ import annotations

import re
from typing import Any

import pymysql

from wmb.errors import PreflightError

_REQUIRED_VARS: dict[str, str] = {
    "log_bin": "ON",
    "binlog_format": "ROW",
    "binlog_row_image": "FULL",
    "binlog_row_metadata": "FULL",
}


def _fix(name: str, value: str) -> str:
    return (
        f"set {name}={value} in my.cnf ([mysqld]) and restart, or SET GLOBAL {name}={value} "
        "(takes effect for new sessions: restart the capture after it)"
    )


_FIX = {
    "log_bin": "start mariadbd with log_bin (log-bin=<basename> in my.cnf [mysqld]) and restart",
    "binlog_format": _fix("binlog_format", "ROW"),
    "binlog_row_image": _fix("binlog_row_image", "FULL"),
    "binlog_row_metadata": _fix("binlog_row_metadata", "FULL"),
}

# Privilege -> names that grant it.  On MariaDB >= 10.5 REPLICATION CLIENT is an alias of BINLOG
# MONITOR and SHOW GRANTS prints the latter.
_NEEDED: dict[str, tuple[str, ...]] = {
    "REPLICATION SLAVE": ("REPLICATION SLAVE", "REPLICATION REPLICA"),
    "REPLICATION CLIENT": ("REPLICATION CLIENT", "BINLOG MONITOR", "SLAVE MONITOR"),
    "SELECT": ("SELECT",),
}
_GRANT_RE = re.compile(r"^GRANT (?P<privs>.+?) ON (?P<on>\S+) TO ", re.IGNORECASE)


def check_variables(conn: pymysql.connections.Connection) -> dict[str, str]:
    """Global values of the four binlog settings; raises PreflightError on the first wrong one."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT @@GLOBAL.log_bin, @@GLOBAL.binlog_format, @@GLOBAL.binlog_row_image, "
            "@@GLOBAL.binlog_row_metadata"
        )
        row = cur.fetchone()
    assert row is not None
    got = dict(zip(_REQUIRED_VARS, (_as_str(v) for v in row), strict=True))
    if got["log_bin"] in ("1", "ON"):
        got["log_bin"] = "ON"
    for name, want in _REQUIRED_VARS.items():
        if got[name].upper() != want:
            raise PreflightError(f"{name} is {got[name] or 'unset'} (need {want}); {_FIX[name]}")
    return got


def parse_grants(lines: list[str]) -> set[str]:
    """Global (``ON *.*``) privilege names of SHOW GRANTS lines, plus SELECT if granted anywhere."""
    privs: set[str] = set()
    for line in lines:
        m = _GRANT_RE.match(line.strip())
        if not m:
            continue
        names = {p.strip().upper() for p in re.sub(r"\([^)]*\)", "", m["privs"]).split(",")}
        if m["on"] == "*.*":
            privs |= names
        elif "SELECT" in names or "ALL PRIVILEGES" in names:
            privs.add("SELECT")
    return privs


def check_grants(conn: pymysql.connections.Connection, user: str) -> None:
    with conn.cursor() as cur:
        cur.execute("SHOW GRANTS FOR CURRENT_USER()")
        lines = [_as_str(r[0]) for r in cur.fetchall()]
    privs = parse_grants(lines)
    if "ALL PRIVILEGES" in privs or "ALL" in privs:
        return
    missing = [need for need, names in _NEEDED.items() if not privs & set(names)]
    if missing:
        raise PreflightError(
            f"user {user!r} lacks {', '.join(missing)}; as an admin run: "
            f"GRANT {', '.join(missing)} ON *.* TO {user!r}@'<host>'  "
            f"(has: {', '.join(sorted(privs)) or 'nothing global'})"
        )


def run(conn: pymysql.connections.Connection, user: str) -> dict[str, str]:
    """All checks; returns the binlog settings seen (for the start log line)."""
    got = check_variables(conn)
    check_grants(conn, user)
    return got


def _as_str(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode()
    return "" if v is None else str(v)
