"""The heartbeat row: written to the master through a normal connection, read back from the binlog.

Every ``heartbeat_interval_s`` the daemon upserts its row in ``wmb.wmb_heartbeat``; the change comes
back through the binlog like any data and is emitted to every partition of the changes topic, so each
hop downstream can measure time lag from heartbeats even when there is no traffic.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import pymysql

from wmb import log
from wmb.errors import PreflightError
from wmb.runtime import StopToken

_log = log.get("binlog_capture.heartbeat")


def ensure_table(conn: pymysql.connections.Connection, database: str, table: str) -> None:
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE IF NOT EXISTS `{database}`")
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS `{database}`.`{table}` ("
                " source VARCHAR(128) NOT NULL PRIMARY KEY,"
                " ts_ms BIGINT NOT NULL,"
                " origin VARCHAR(64) NOT NULL,"
                " seq BIGINT NOT NULL DEFAULT 0"
                ") ENGINE=InnoDB"
            )
    except pymysql.err.OperationalError as exc:
        if exc.args and exc.args[0] in (1044, 1142, 1227):  # access denied variants
            raise PreflightError(
                f"cannot create the heartbeat table {database}.{table}: {exc.args[1]}; "
                f"GRANT CREATE, INSERT, UPDATE ON `{database}`.* TO the capture user"
            ) from exc
        raise


class HeartbeatWriter:
    """A thread that upserts ``(source, ts_ms)`` every interval; connection errors are retried."""

    def __init__(
        self,
        connect: Any,
        database: str,
        table: str,
        source: str,
        origin: str,
        interval_s: float,
        stop: StopToken,
    ) -> None:
        self._connect = connect
        self._sql = (
            f"INSERT INTO `{database}`.`{table}` (source, ts_ms, origin, seq) VALUES (%s, %s, %s, 1) "
            "ON DUPLICATE KEY UPDATE ts_ms=VALUES(ts_ms), origin=VALUES(origin), seq=seq+1"
        )
        self._source, self._origin = source, origin
        self._interval_s = interval_s
        self._stop = stop
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self.beats = 0

    def start(self) -> HeartbeatWriter:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._halt.set()

    def _run(self) -> None:
        conn: Any = None
        while not (self._stop.stopped or self._halt.is_set()):
            try:
                if conn is None:
                    conn = self._connect()
                with conn.cursor() as cur:
                    cur.execute(self._sql, (self._source, int(time.time() * 1000), self._origin))
                self.beats += 1
            except pymysql.err.MySQLError as exc:
                # The I/O edge: log and try again next interval with a fresh connection.
                _log.warning("heartbeat_failed", error=repr(exc))
                conn = None
            if self._halt.wait(self._interval_s):
                break
        if conn is not None:
            with contextlib.suppress(pymysql.err.MySQLError):
                conn.close()
