"""Session fixtures: real MariaDB, Kafka and Redis processes, started only when a test asks for one.

Two datacenters: ``bj`` holds the master (``mariadb_master``, ``kafka_bj``, ``redis_bj``), ``gz`` the
remote side (``kafka_gz``, ``redis_gz``, ``mariadb_replica``: a separate read replica that wmb applies
to, not native replication).  Session servers are shared: never kill them in a test, use
``server_factory`` for a private instance instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from wmb.errors import ServerStartError
from wmb.servers import KafkaServer, ManagedProcess, MariaDBServer, RedisServer, ServerPool, free_port
from wmb.servers.redis import RedisClusterServers, RedisTlsServer

S = TypeVar("S", bound=ManagedProcess)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long",
        action="store_true",
        default=False,
        help="also run tests marked `slow` (soaks, long fault durations)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--long"):
        return
    # The one allowed skip, and it says why in the -ra summary.
    needs_long = pytest.mark.skip(reason="needs --long")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(needs_long)


def _start(server: S) -> S:
    """Start a server; a failed start fails the test with the server's log tail, not a traceback."""
    try:
        return server.start()
    except ServerStartError as exc:
        with contextlib.suppress(Exception):
            server.kill()
        pytest.fail(f"{type(server).__name__} did not start:\n{exc}", pytrace=False)


def _serve(server: S) -> Iterator[S]:
    _start(server)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def servers_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of the session servers' data dirs (each server's log is `<dir>/<kind>.log`)."""
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="session")
def mariadb_master(servers_dir: Path) -> Iterator[MariaDBServer]:
    """The bj master: server_id 1, GTID domain 0, binlog ROW / FULL / FULL."""
    yield from _serve(MariaDBServer(servers_dir / "mariadb_master", server_id=1, die_with_parent=True))


@pytest.fixture(scope="session")
def mariadb_replica(servers_dir: Path) -> Iterator[MariaDBServer]:
    """The gz read replica wmb applies to (server_id 2, domain 0; not native replication)."""
    yield from _serve(MariaDBServer(servers_dir / "mariadb_replica", server_id=2, die_with_parent=True))


@pytest.fixture(scope="session")
def kafka_bj(servers_dir: Path) -> Iterator[KafkaServer]:
    """Kafka in bj, with a WAN listener on ``wan_port`` advertised as ``wan_advertised_port``.

    The link emulator listens on ``wan_advertised_port`` and forwards to ``wan_port``; the relay in
    gz bootstraps from ``kafka_bj.wan_bootstrap`` so every fetch crosses the emulated link.
    """
    yield from _serve(
        KafkaServer(servers_dir / "kafka_bj", wan_advertised_port=free_port(), die_with_parent=True)
    )


@pytest.fixture(scope="session")
def kafka_gz(servers_dir: Path) -> Iterator[KafkaServer]:
    """Kafka in gz (local listener only)."""
    yield from _serve(KafkaServer(servers_dir / "kafka_gz", die_with_parent=True))


@pytest.fixture(scope="session")
def redis_bj(servers_dir: Path) -> Iterator[RedisServer]:
    yield from _serve(RedisServer(servers_dir / "redis_bj", die_with_parent=True))


@pytest.fixture(scope="session")
def redis_gz(servers_dir: Path) -> Iterator[RedisServer]:
    yield from _serve(RedisServer(servers_dir / "redis_gz", die_with_parent=True))


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisClusterServers]:
    """A private 3-master Redis Cluster (no replicas), joined and ``cluster_state:ok`` on every node."""
    cluster = RedisClusterServers(tmp_path / "redis_cluster", die_with_parent=True)
    try:
        cluster.start()
    except ServerStartError as exc:
        cluster.stop()
        pytest.fail(f"RedisClusterServers did not start:\n{exc}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_tls(tmp_path: Path) -> Iterator[RedisTlsServer]:
    """A private TLS-only Redis (throwaway CA in ``ca_file``) with ACL user ``wmbcache``/``secret``."""
    yield from _serve(RedisTlsServer(tmp_path / "redis_tls", die_with_parent=True))


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[ServerPool]:
    """``server_factory.mariadb(...)``, ``.kafka(...)``, ``.redis(...)``: private, stopped after the test.

    Each returns a started server (``start=False`` for one to start yourself); a failed start raises
    ServerStartError carrying the server's log tail.
    """
    factory = ServerPool(tmp_path / "servers", die_with_parent=True)
    try:
        yield factory
    finally:
        factory.stop_all()
