"""``verify``: chunked checksums find and show every kind of difference; exit 8 on a mismatch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cache_updater.applier.testing import topology_yaml
from cache_updater.verify_replica import format_report, verify_replica
from wmb.errors import ExitCode
from wmb.servers import KafkaServer, MariaDBServer

from .test_apply import conn_of

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _load(server: MariaDBServer, db: str) -> None:
    server.execute(f"DROP DATABASE IF EXISTS {db}")
    server.execute(f"CREATE DATABASE {db}")
    server.execute(f"CREATE TABLE {db}.t (a INT, b VARCHAR(10), c BLOB, d DOUBLE, PRIMARY KEY (a, b))")
    server.execute(f"CREATE TABLE {db}.nopk (x INT, y TEXT)")
    values = ",".join(
        f"({i}, 'k{i % 7}', {'NULL' if i % 5 == 0 else f'0x{i:04x}'}, {i / 3})" for i in range(2500)
    )
    server.execute(f"INSERT INTO {db}.t VALUES {values}")
    server.execute(f"INSERT INTO {db}.nopk VALUES (1, 'a'), (1, 'a'), (2, NULL)")


def test_verify_finds_differences(
    tmp_path: Path, mariadb_master: MariaDBServer, mariadb_replica: MariaDBServer, kafka_gz: KafkaServer
) -> None:
    db = "verify_t"
    _load(mariadb_master, db)
    _load(mariadb_replica, db)
    m, r = conn_of(mariadb_master), conn_of(mariadb_replica)
    report = verify_replica(m, r, [f"{db}.*"], chunk_size=1000)
    assert report.ok, format_report(report)
    assert [t.chunks for t in report.tables] == [1, 3]  # nopk is one chunk; 2500 rows -> 3 chunks

    mariadb_replica.execute(f"UPDATE {db}.t SET c=NULL WHERE a=7")  # a value became NULL
    mariadb_replica.execute(f"UPDATE {db}.t SET c='' WHERE a=10")  # NULL became '' (NULL marker)
    mariadb_replica.execute(f"DELETE FROM {db}.t WHERE a=1500")
    mariadb_replica.execute(
        f"INSERT INTO {db}.t VALUES (-1, 'zz', NULL, 0), (99999, 'zz', NULL, 0)"
    )  # outside
    mariadb_replica.execute(f"DELETE FROM {db}.nopk WHERE x=1 LIMIT 1")  # a duplicate row lost
    report = verify_replica(m, r, [f"{db}.*"], chunk_size=1000)
    assert not report.ok
    by_table = {t.table: t for t in report.tables}
    kinds = sorted((d.kind, tuple(d.pk.values()), d.columns) for d in by_table[f"{db}.t"].diffs)
    assert kinds == [
        ("different", (7, "k0"), ("c",)),
        ("different", (10, "k3"), ("c",)),
        ("extra_on_replica", (-1, "zz"), ()),
        ("extra_on_replica", (99999, "zz"), ()),
        ("missing_on_replica", (1500, "k2"), ()),
    ]
    assert [d.kind for d in by_table[f"{db}.nopk"].diffs] == ["missing_on_replica"]
    text = format_report(report)
    assert "MISMATCH" in text and 'pk={"a":7' in text.replace(" ", "")

    topo = tmp_path / "topology.yaml"
    topo.write_text(
        topology_yaml(
            kafka_bootstrap=kafka_gz.bootstrap, master=m, replica=r, source="apverify", tables=[f"{db}.*"]
        )
    )
    cmd = [sys.executable, "-m", "wmb.cli", "verify", "--dc", "gz", "--topology", str(topo)]
    res = subprocess.run([*cmd, "--json"], cwd=ROOT, capture_output=True, timeout=120)
    assert res.returncode == ExitCode.MISMATCH, res.stderr.decode()[-2000:]
    assert b'"ok":false' in res.stdout
    res = subprocess.run([*cmd, "--table", f"{db}.nopk_none"], cwd=ROOT, capture_output=True, timeout=120)
    assert res.returncode == ExitCode.OK, res.stderr.decode()[-2000:]
    for server in (mariadb_master, mariadb_replica):
        server.execute(f"DROP DATABASE {db}")
