"""A private MariaDB server with the binlog settings the capture requires (ROW / FULL / FULL, GTIDs)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pymysql

from wmb.servers.base import ManagedProcess, find_binary, saved_port

_MARIADBD_HINT = "apt-get install mariadb-server"

# A unix socket path longer than sun_path (108 bytes) makes mariadbd refuse to start.
_MAX_SOCKET_PATH = 100


class MariaDBServer(ManagedProcess):
    """``mariadbd`` on 127.0.0.1:<port> with its data, binlog, socket and log in ``data_dir``.

    The root account has no password and is reachable over TCP from 127.0.0.1 (install-db with
    ``--auth-root-authentication-method=normal`` creates ``root@127.0.0.1``).
    """

    kind = "mariadb"
    default_timeout_s = 60.0

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        server_id: int,
        port: int | None = None,
        gtid_domain_id: int = 0,
        extra_args: Sequence[str] = (),
        *,
        mariadbd_bin: str | None = None,
        install_db_bin: str | None = None,
        die_with_parent: bool = False,
    ) -> None:
        super().__init__(data_dir, die_with_parent=die_with_parent)
        self.server_id = server_id
        self.gtid_domain_id = gtid_domain_id
        self.extra_args = tuple(extra_args)
        self.mariadbd_bin = mariadbd_bin
        self.install_db_bin = install_db_bin
        self.port = saved_port(self.data_dir, "port", port)
        self.user = "root"
        self.password = ""
        self.db_dir = self.data_dir / "db"
        self.socket_path = self._socket_path()

    @property
    def url(self) -> str:
        """``mysql://root:@127.0.0.1:<port>`` (the form topology.yaml and the CLI accept)."""
        return f"mysql://{self.user}:{self.password}@{self.host}:{self.port}"

    def _socket_path(self) -> Path:
        path = self.data_dir / "mysqld.sock"
        if len(str(path)) <= _MAX_SOCKET_PATH:
            return path
        digest = hashlib.sha1(str(self.data_dir).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"wmb-mariadb-{digest}.sock"

    def _prepared(self) -> bool:
        return (self.db_dir / "mysql").is_dir()

    def _prepare(self) -> None:
        # Resolve mariadbd first: a machine without MariaDB gets the install hint, not an
        # install-db error.
        find_binary("mariadbd", self.mariadbd_bin, "WMB_MARIADBD", _MARIADBD_HINT)
        install_db = find_binary(
            "mariadb-install-db", self.install_db_bin, "WMB_MARIADB_INSTALL_DB", _MARIADBD_HINT
        )
        self._run_setup(
            [
                install_db,
                "--no-defaults",
                f"--datadir={self.db_dir}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--user=root",
            ],
            "mariadb-install-db",
        )

    def _command(self) -> list[str]:
        mariadbd = find_binary("mariadbd", self.mariadbd_bin, "WMB_MARIADBD", _MARIADBD_HINT)
        d = self.data_dir
        return [
            mariadbd,
            "--no-defaults",
            f"--datadir={self.db_dir}",
            f"--port={self.port}",
            "--bind-address=127.0.0.1",
            f"--socket={self.socket_path}",
            f"--pid-file={d / 'mysqld.pid'}",
            # The capture refuses anything but ROW / FULL / FULL (see DESIGN.md); GTIDs in strict
            # mode so a resume position is unambiguous.
            f"--log-bin={d / 'binlog'}",
            "--binlog-format=ROW",
            "--binlog-row-image=FULL",
            "--binlog-row-metadata=FULL",
            f"--server-id={self.server_id}",
            "--log-slave-updates",
            f"--gtid-domain-id={self.gtid_domain_id}",
            "--gtid-strict-mode=1",
            "--skip-name-resolve",
            # Running as root (CI containers) needs this, otherwise mariadbd refuses to start.
            "--user=root",
            # utf8mb4 like every production server; the compiled-in default is latin1.
            "--character-set-server=utf8mb4",
            "--collation-server=utf8mb4_general_ci",
            # Small footprint: many servers share a 2-core machine.
            "--innodb-buffer-pool-size=64M",
            "--innodb-log-file-size=48M",
            "--performance-schema=OFF",
            "--innodb-doublewrite=0",  # a killed process cannot tear pages; only an OS crash can
            # Native AIO contexts are a machine-wide budget (fs.aio-max-nr); many test servers
            # exhaust it and then fail to start.
            "--innodb-use-native-aio=0",
            "--key-buffer-size=1M",
            "--max-connections=200",
            "--table-open-cache=400",
            "--max-allowed-packet=64M",
            *self.extra_args,
        ]

    def _ports(self) -> dict[str, int]:
        return {"port": self.port}

    def _probe(self) -> bool:
        with self.connect(connect_timeout=2) as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
            return bool(cur.fetchone() == (1,))

    # --- client helpers ----------------------------------------------------------------------
    def connect(self, database: str | None = None, **kw: Any) -> pymysql.Connection[Any]:
        """A new pymysql connection (autocommit on unless ``autocommit=False`` is passed)."""
        params: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "autocommit": True,
            "charset": "utf8mb4",
            "connect_timeout": 10,
        }
        if database is not None:
            params["database"] = database
        params.update(kw)
        return pymysql.connect(**params)

    def execute(self, sql: str, *params: Any) -> int:
        """Run one statement on a fresh autocommit connection; returns the affected row count."""
        with self.connect() as conn, conn.cursor() as cur:
            return int(cur.execute(sql, params or None))

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Run one statement and return all rows as tuples."""
        with self.connect() as conn, conn.cursor() as cur:
            cur.execute(sql, params or None)
            return list(cur.fetchall())

    def gtid_binlog_pos(self) -> str:
        """``@@gtid_binlog_pos``: the last GTID written to this server's binlog per domain."""
        return str(self.query("SELECT @@gtid_binlog_pos")[0][0])
