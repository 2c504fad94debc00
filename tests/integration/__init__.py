"""Integration tests: real MariaDB, Kafka and Redis processes started by the fixtures in tests/conftest.py."""
