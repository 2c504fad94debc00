"""``wmb relay`` and ``wmb route pause|resume|throttle`` from a topology file, as an operator runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from broker.cli import route
from broker.testing import REPO, TxnWorkload, read_topic, values, wait_mirrored, wait_until
from wmb.linkemu import LinkEmulator
from wmb.servers import KafkaServer, free_port

pytestmark = pytest.mark.integration

TOPOLOGY = """
version: 1
datacenters:
  bj:
    kafka: {{bootstrap: "{bj}", wan_bootstrap: "{bj_wan}"}}
    mysql:
      master: {{host: 127.0.0.1, port: 3306, user: wmb, server_id: 1}}
  gz:
    kafka: {{bootstrap: "{gz}"}}
sources:
  {source}: {{dc: bj, server: master}}
routes:
  - {{from: bj, to: gz, topic_prefix: "cli."}}
"""


def health(port: int) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
            return dict(json.loads(resp.read()))
    except urllib.error.HTTPError as exc:  # 503 while the link is not up yet
        return dict(json.loads(exc.read()))
    except OSError:
        return {}


def test_relay_command_and_route_switches(
    kafka_bj: KafkaServer, kafka_gz: KafkaServer, link_bj_gz: LinkEmulator, tmp_path: Path
) -> None:
    source = f"cli{uuid.uuid4().hex[:8]}"
    topic = f"wmb.{source}.changes"
    kafka_bj.create_topic(topic, partitions=2)
    path = tmp_path / "topology.yaml"
    path.write_text(
        TOPOLOGY.format(
            bj=kafka_bj.bootstrap, bj_wan=kafka_bj.wan_bootstrap, gz=kafka_gz.bootstrap, source=source
        )
    )
    TxnWorkload(kafka_bj.bootstrap, topic, 2, batch=10, abort_every=3, max_txns=6).start().join()
    port = free_port()
    log_path = tmp_path / "relay.log"
    cmd = [sys.executable, "-c", "from broker.cli import relay; relay()", "--route", "bj:gz"]
    cmd += ["--topology", str(path), "--metrics-port", str(port)]
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            cmd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
    try:
        wait_mirrored(kafka_bj.bootstrap, kafka_gz.bootstrap, topic, "cli." + topic)
        runner = CliRunner()
        result = runner.invoke(route, ["pause", "bj:gz", "--topology", str(path)])
        assert result.exit_code == 0, result.output
        wait_until(lambda: health(port).get("paused") is True, 60, "paused via the CLI")
        result = runner.invoke(
            route, ["throttle", "bj->gz", "--bytes-per-s", "5000", "--topology", str(path)]
        )
        assert result.exit_code == 0, result.output
        wait_until(lambda: health(port).get("throttle_bytes_per_s") == 5000, 60, "throttled via the CLI")
        TxnWorkload(
            kafka_bj.bootstrap, topic, 2, batch=10, abort_every=0, max_txns=3, origin="x"
        ).start().join()
        result = runner.invoke(route, ["resume", "bj:gz", "--topology", str(path)])
        assert result.exit_code == 0, result.output
        wait_mirrored(kafka_bj.bootstrap, kafka_gz.bootstrap, topic, "cli." + topic)
        assert values(read_topic(kafka_gz.bootstrap, "cli." + topic)) == values(
            read_topic(kafka_bj.bootstrap, topic)
        )
        result = runner.invoke(route, ["throttle", "bj:gz", "--bytes-per-s", "0", "--topology", str(path)])
        assert result.exit_code == 0
        bad = runner.invoke(route, ["pause", "gz:bj", "--topology", str(path)])
        assert bad.exit_code != 0
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0, log_path.read_text()[-3000:]
