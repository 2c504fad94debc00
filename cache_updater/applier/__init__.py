"""The read-replica applier: Kafka change topics -> a MariaDB/MySQL replica, exactly once.

Public surface is re-exported by :mod:`cache_updater.apply`; the modules here are the parts:
``txn`` (pure transaction assembly and group commit), ``sql`` (pure statement building),
``marker`` (loop marking, used by the capture side too), ``mariadb`` (the replica I/O edge),
``runner`` (the Kafka consume loop) and ``topo`` (settings from ``topology.yaml``).
"""
