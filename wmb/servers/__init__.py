"""Real MariaDB, Kafka and Redis processes on loopback ports, for tests and `wmb sandbox`.

Each server owns a private data dir (its log file lives there), keeps its ports across
``restart()``, and raises :class:`wmb.errors.ServerStartError` with its log tail when it does not
come up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from wmb.servers.base import ManagedProcess, free_port, port_open, reserve_port
from wmb.servers.kafka import KafkaServer
from wmb.servers.mariadb import MariaDBServer
from wmb.servers.redis import RedisServer

_S = TypeVar("_S", bound=ManagedProcess)


class ServerPool:
    """Creates servers in numbered data dirs under ``root``, remembers them, stops them all.

    The ``server_factory`` test fixture is one (fault tests kill and restart private servers);
    `wmb sandbox` can use one to bring a whole topology up and down.
    """

    def __init__(self, root: str | Path, *, die_with_parent: bool = False) -> None:
        self.root = Path(root)
        self.die_with_parent = die_with_parent
        self.servers: list[ManagedProcess] = []

    def _make(self, build: Callable[[Path], _S], kind: str, name: str | None, start: bool) -> _S:
        server = build(self.root / (name or f"{kind}{len(self.servers) + 1}"))
        self.servers.append(server)
        return server.start() if start else server

    def mariadb(
        self, server_id: int = 101, *, name: str | None = None, start: bool = True, **kw: Any
    ) -> MariaDBServer:
        """``MariaDBServer(root/name, server_id, **kw)``; kw: port, gtid_domain_id, extra_args ..."""
        kw.setdefault("die_with_parent", self.die_with_parent)
        return self._make(lambda d: MariaDBServer(d, server_id, **kw), "mariadb", name, start)

    def kafka(
        self,
        wan_advertised_port: int | None = None,
        *,
        name: str | None = None,
        start: bool = True,
        **kw: Any,
    ) -> KafkaServer:
        """``KafkaServer(root/name, wan_advertised_port, **kw)``; kw: port, libs_dir, jvm_opts ..."""
        kw.setdefault("die_with_parent", self.die_with_parent)
        return self._make(lambda d: KafkaServer(d, wan_advertised_port, **kw), "kafka", name, start)

    def redis(
        self, password: str | None = None, *, name: str | None = None, start: bool = True, **kw: Any
    ) -> RedisServer:
        """``RedisServer(root/name, password=password, **kw)``; kw: port, redis_bin ..."""
        kw.setdefault("die_with_parent", self.die_with_parent)
        return self._make(lambda d: RedisServer(d, password=password, **kw), "redis", name, start)

    def stop_all(self) -> None:
        """Stop every server, newest first (clients before the servers they depend on)."""
        for server in reversed(self.servers):
            try:
                server.stop()
            except Exception:
                with contextlib.suppress(Exception):
                    server.kill()


__all__ = [
    "KafkaServer",
    "ManagedProcess",
    "MariaDBServer",
    "RedisServer",
    "ServerPool",
    "free_port",
    "port_open",
    "reserve_port",
]
