"""A private Redis cache server: no persistence, like the caches wmb fills (they are rebuilt from Kafka)."""

from __future__ import annotations

import os
from typing import Any

import redis

from wmb.servers.base import ManagedProcess, find_binary, saved_port

_REDIS_HINT = "apt-get install redis-server"


class RedisServer(ManagedProcess):
    """``redis-server`` on 127.0.0.1:<port>; nothing is saved, so a restart starts empty."""

    kind = "redis"
    default_timeout_s = 30.0

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        port: int | None = None,
        password: str | None = None,
        *,
        redis_bin: str | None = None,
        extra_args: tuple[str, ...] = (),
        die_with_parent: bool = False,
    ) -> None:
        super().__init__(data_dir, die_with_parent=die_with_parent)
        self.port = saved_port(self.data_dir, "port", port)
        self.password = password
        self.redis_bin = redis_bin
        self.extra_args = extra_args

    @property
    def url(self) -> str:
        """``redis://[:password@]127.0.0.1:<port>/0``."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def _command(self) -> list[str]:
        binary = find_binary("redis-server", self.redis_bin, "WMB_REDIS_SERVER", _REDIS_HINT)
        cmd = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.data_dir),
            "--daemonize",
            "no",
            "--logfile",
            "",  # stdout, which goes to the log file of the ManagedProcess
        ]
        if self.password:
            cmd += ["--requirepass", self.password]
        return cmd + list(self.extra_args)

    def _ports(self) -> dict[str, int]:
        return {"port": self.port}

    def _probe(self) -> bool:
        client = self.client(socket_connect_timeout=1, socket_timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()

    def client(self, **kw: Any) -> redis.Redis:
        """A new redis-py client on this server (db 0)."""
        params: dict[str, Any] = {"host": self.host, "port": self.port, "password": self.password}
        params.update(kw)
        return redis.Redis(**params)
