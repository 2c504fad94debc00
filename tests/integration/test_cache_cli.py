"""The click commands on a real topology: `cache` (daemon, /health, SIGTERM) and the verify command."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from cache_updater.verify_cache import verify_caches
from cache_updater.verify_cli import verify
from wmb.servers import KafkaServer, MariaDBServer, RedisServer, free_port
from wmb.topology import load_topology

from .test_cache_e2e import History, names, produce, wait_until, write_master  # noqa: F401

pytestmark = pytest.mark.integration

TOPOLOGY = """
version: 1
datacenters:
  bj:
    kafka: {{bootstrap: "{kafka}", wan_bootstrap: "{kafka}"}}
    mysql:
      master: {{host: 127.0.0.1, port: {master_port}, user: root, password: "", server_id: 1}}
  gz:
    kafka: {{bootstrap: "{kafka}"}}
    redis: {{url: "{redis}"}}
sources:
  {source}: {{dc: bj, partitions: 2}}
routes:
  - {{from: bj, to: gz, topic_prefix: ""}}
caches:
  - dc: gz
    name: c1
    source: {source}
    tombstone_ttl_s: 600
    tables:
      {db}.users: {{key: "{db}:u:{{id}}", primary_key: [id]}}
"""


def test_cache_command_health_sigterm_and_verify(
    kafka_gz: KafkaServer,
    redis_gz: RedisServer,
    mariadb_master: MariaDBServer,
    names: tuple[str, str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    source, db, topic = names
    kafka_gz.create_topic(topic, partitions=2)
    path = tmp_path / "topology.yaml"
    path.write_text(
        TOPOLOGY.format(
            kafka=kafka_gz.bootstrap,
            master_port=mariadb_master.port,
            redis=f"redis://127.0.0.1:{redis_gz.port}/0",
            source=source,
            db=db,
        )
    )
    topo = load_topology(path, env={})
    history = History(source, db)
    produce(kafka_gz, topic, [history.txn(4, 50, 5) for _ in range(50)], f"tx-{source}")
    write_master(mariadb_master, db, history.rows)

    port = free_port()
    code = "from cache_updater.cache_cli import cache; cache()"
    args = ["--dc", "gz", "--topology", str(path), "--metrics-port", str(port)]
    log = open(tmp_path / "daemon.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=log, stderr=subprocess.STDOUT)
    try:

        def applied() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    body = json.loads(r.read())
            except OSError:
                return False
            return bool(body["ok"]) and body["events"] >= 200

        wait_until(applied, what="daemon applied every event")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            assert b"wmb_cache_stale_rejected_total" in r.read()
        wait_until(lambda: verify_caches(topo, "gz", strict=True).ok, what="cache equals master")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, (tmp_path / "daemon.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()

    ok = CliRunner().invoke(verify, ["--dc", "gz", "--caches", "--topology", str(path), "--json"])
    assert ok.exit_code == 0, ok.output
    client = redis_gz.client()
    key = next(iter(client.scan_iter(match=f"{db}:u:*")))
    client.hset(key, "name", "corrupted")
    client.close()
    bad = CliRunner().invoke(verify, ["--dc", "gz", "--caches", "--topology", str(path)])
    assert bad.exit_code == 8, bad.output
    assert key.decode() in bad.output and "mismatched" in bad.output
