"""wmb: cross-datacenter replication for MySQL-family databases.

The shared contract of the pipeline: the change event and its codec, the topology model, topic
names, errors and exit codes, and the runtime helpers every daemon uses.  The three stages
(``binlog_capture``, ``broker``, ``cache_updater``) depend on this package and never on each other.
"""

__version__ = "0.1.0"
