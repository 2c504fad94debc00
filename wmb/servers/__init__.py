"""Real MariaDB, Kafka and Redis processes on loopback ports, for tests and `wmb sandbox`.

Each server owns a private data dir (its log file lives there), keeps its ports across
``restart()``, and raises :class:`wmb.errors.ServerStartError` with its log tail when it does not
come up.
"""

from wmb.servers.base import ManagedProcess, free_port, port_open, reserve_port
from wmb.servers.kafka import KafkaServer
from wmb.servers.mariadb import MariaDBServer
from wmb.servers.redis import RedisServer

__all__ = [
    "KafkaServer",
    "ManagedProcess",
    "MariaDBServer",
    "RedisServer",
    "free_port",
    "port_open",
    "reserve_port",
]
