"""A private Redis cache server: no persistence, like the caches wmb fills (they are rebuilt from Kafka)."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import redis
from redis.cluster import ClusterNode, RedisCluster

from wmb import log
from wmb.errors import ServerStartError
from wmb.servers.base import ManagedProcess, find_binary, saved_port

_log = log.get("wmb.servers")

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


_REDIS_CLI_HINT = "apt-get install redis-tools"


class RedisTlsServer(RedisServer):
    """``redis-server`` answering only TLS on 127.0.0.1:<port>, with an ACL user and no default user.

    The first start writes a throwaway CA (``ca.crt``) and a server certificate for 127.0.0.1 /
    localhost into the data dir with the ``openssl`` CLI; clients verify against :attr:`ca_file`.
    The default user is switched off, so a client that forgets its ACL user cannot connect at all.
    """

    kind = "redis-tls"

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        port: int | None = None,
        *,
        username: str = "wmbcache",
        password: str = "secret",
        redis_bin: str | None = None,
        openssl_bin: str | None = None,
        die_with_parent: bool = False,
    ) -> None:
        super().__init__(data_dir, port, password, redis_bin=redis_bin, die_with_parent=die_with_parent)
        self.username = username
        self.openssl_bin = openssl_bin
        self.ca_file = self.data_dir / "ca.crt"
        self.cert_file = self.data_dir / "server.crt"
        self.key_file = self.data_dir / "server.key"

    @property
    def url(self) -> str:
        """``rediss://127.0.0.1:<port>/0`` (no credentials: they travel as username/password)."""
        return f"rediss://{self.host}:{self.port}/0"

    def _prepared(self) -> bool:
        return self.cert_file.exists() and self.key_file.exists() and self.ca_file.exists()

    def _prepare(self) -> None:
        openssl = find_binary("openssl", self.openssl_bin, "WMB_OPENSSL", "apt-get install openssl")
        # EC keys: generated in milliseconds, where RSA-2048 can take a second on a busy machine.
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        d = self.data_dir
        ca_key, csr, ext = str(d / "ca.key"), str(d / "server.csr"), str(d / "server.ext")
        ca_cmd = [openssl, "req", "-x509", *ec, "-keyout", ca_key, "-out", str(self.ca_file)]
        self._run_setup([*ca_cmd, "-days", "7", "-subj", "/CN=wmb test CA"], "openssl CA")
        key_cmd = [openssl, "req", *ec, "-keyout", str(self.key_file), "-out", csr]
        self._run_setup([*key_cmd, "-subj", "/CN=127.0.0.1"], "openssl server key")
        # Clients check the host name against the SAN, not the CN.
        (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        sign = [openssl, "x509", "-req", "-in", csr, "-CA", str(self.ca_file), "-CAkey", ca_key]
        sign += ["-CAcreateserial", "-out", str(self.cert_file), "-days", "7", "-extfile", ext]
        self._run_setup(sign, "openssl server cert")

    def _command(self) -> list[str]:
        cmd = super()._command()
        # The plain port is off (the last --port wins); requirepass would re-enable the default user.
        cmd = [a for a in cmd if a not in ("--requirepass", self.password)] if self.password else cmd
        cmd += ["--port", "0", "--tls-port", str(self.port)]
        cmd += ["--tls-cert-file", str(self.cert_file), "--tls-key-file", str(self.key_file)]
        cmd += ["--tls-ca-cert-file", str(self.ca_file), "--tls-auth-clients", "no"]
        cmd += ["--user", "default", "off"]
        cmd += ["--user", self.username, "on", f">{self.password}", "~*", "&*", "+@all"]
        return cmd

    def client(self, **kw: Any) -> redis.Redis:
        """A new TLS client logged in as the ACL user, verifying the server against :attr:`ca_file`."""
        params: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "username": self.username,
            "password": self.password,
            "ssl": True,
            "ssl_ca_certs": str(self.ca_file),
        }
        params.update(kw)
        return redis.Redis(**params)


class _ClusterNode(RedisServer):
    """One cluster node: its bus port is a free port too (port + 10000 may be above 65535)."""

    def __init__(self, data_dir: Path, *, redis_bin: str | None, die_with_parent: bool) -> None:
        super().__init__(data_dir, redis_bin=redis_bin, die_with_parent=die_with_parent)
        self.bus_port = saved_port(self.data_dir, "bus_port", None)
        self.extra_args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
        self.extra_args += ("--cluster-port", str(self.bus_port))

    def _ports(self) -> dict[str, int]:
        return {"port": self.port, "bus_port": self.bus_port}


class RedisClusterServers:
    """A Redis Cluster of ``masters`` masters (no replicas), each a :class:`RedisServer` in its own dir.

    :meth:`start` starts the nodes and, the first time, joins them with
    ``redis-cli --cluster create``; then waits until every node reports ``cluster_state:ok``.  Each
    node keeps ``nodes.conf`` in its data dir, so :meth:`restart` brings the same cluster back
    (empty: nothing is persisted).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        masters: int = 3,
        *,
        redis_bin: str | None = None,
        redis_cli_bin: str | None = None,
        die_with_parent: bool = False,
    ) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.data_dir = Path(data_dir).resolve()
        self.redis_cli_bin = redis_cli_bin
        self.nodes: list[RedisServer] = [
            _ClusterNode(self.data_dir / f"node{i + 1}", redis_bin=redis_bin, die_with_parent=die_with_parent)
            for i in range(masters)
        ]

    @property
    def url(self) -> str:
        """The first node's url: any node is a valid start-up node for a cluster client."""
        return self.nodes[0].url

    @property
    def addresses(self) -> list[str]:
        return [f"{n.host}:{n.port}" for n in self.nodes]

    def start(self, timeout_s: float = 60.0) -> RedisClusterServers:
        for node in self.nodes:
            node.start()
        if self._info(self.nodes[0]).get("cluster_slots_assigned", "0") == "0":
            cli = find_binary("redis-cli", self.redis_cli_bin, "WMB_REDIS_CLI", _REDIS_CLI_HINT)
            self.nodes[0]._run_setup(
                [cli, "--cluster", "create", *self.addresses, "--cluster-replicas", "0", "--cluster-yes"],
                "redis-cli --cluster create",
            )
        deadline = time.monotonic() + timeout_s
        while not all(self._ok(n) for n in self.nodes):
            if time.monotonic() >= deadline:
                states = {n.port: self._info(n).get("cluster_state") for n in self.nodes}
                raise ServerStartError(
                    f"redis cluster in {self.data_dir} not ok after {timeout_s:.0f}s: {states}"
                )
            time.sleep(0.1)
        _log.info("redis_cluster_ready", nodes=self.addresses)
        return self

    def _ok(self, node: RedisServer) -> bool:
        info = self._info(node)
        return info.get("cluster_state") == "ok" and info.get("cluster_known_nodes") == str(len(self.nodes))

    @staticmethod
    def _info(node: RedisServer) -> dict[str, str]:
        client = node.client(socket_connect_timeout=1, socket_timeout=2)
        try:
            raw = client.execute_command("CLUSTER", "INFO", NEVER_DECODE=True)  # type: ignore[no-untyped-call]
        finally:
            client.close()
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
        return {k.strip(): v.strip() for k, v in pairs}

    def client(self, **kw: Any) -> RedisCluster:
        """A redis-py cluster client bootstrapped from every node."""
        nodes = [ClusterNode(n.host, n.port) for n in self.nodes]  # type: ignore[no-untyped-call]
        return RedisCluster(startup_nodes=nodes, **kw)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            try:
                node.stop()
            except Exception:
                with contextlib.suppress(Exception):
                    node.kill()

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()

    def restart(self, timeout_s: float = 60.0) -> RedisClusterServers:
        self.stop()
        return self.start(timeout_s)

    def __enter__(self) -> RedisClusterServers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<RedisClusterServers nodes={self.addresses} dir={self.data_dir}>"
