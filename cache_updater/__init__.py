"""Last stage in each datacenter: keeps Redis caches and read replicas in step with the change topics.

The cache half (``cache.py``, ``guard.lua``, ``cache_cli.py``, ``verify_cache.py``) writes Redis
through a Lua version guard; the replica half (``apply*.py``) writes a MySQL read replica.  Both
park poison messages with :mod:`cache_updater.dlq`.
"""
