"""``wmb bootstrap``: seed a replica from a consistent dump of the master, then set the applier's
position to the Kafka offsets that continue exactly after the dump (no gap, no overlap).

1. ``mariadb-dump --single-transaction --gtid --master-data=2 --hex-blob`` of the databases the
   replica's table globs name.  The dump is one consistent snapshot and records its GTID position
   (``-- SET GLOBAL gtid_slave_pos='d-s-n,...'``, one GTID per domain); ``--tz-utc`` (the default)
   writes TIMESTAMPs in UTC and ``--hex-blob`` writes binary strings exactly.
2. The dump is loaded into the replica with the ``mariadb`` client (it is binlogged there like any
   write; it carries no applier marker because it is a seed, not a change of the source).
3. For every partition of the change topic (read_committed) the first record whose GTID is after
   that position (``seq`` greater in its domain; a domain the dump never saw is "after") is the new
   ``next_offset``; with none, the partition's last stable offset.  Events are contiguous per source
   transaction and a transaction's events share its GTID, so this is a transaction boundary.
   The scan is linear from the start of each partition (fine for topics of a few million records;
   an offset-by-timestamp lookup to narrow it is the obvious next step).
4. The position rows are written; ``wmb apply`` then seeks there.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pymysql
from kafka import KafkaConsumer, TopicPartition

from cache_updater.applier.mariadb import MariaDBReplica
from cache_updater.apply_settings import ApplySettings, ReplicaConn
from cache_updater.verify_replica import SYSTEM_SCHEMAS
from wmb import codec, log
from wmb.errors import ConfigError, DecodeError, PreflightError, WmbError
from wmb.event import Gtid

_log = log.get("wmb.bootstrap")

_GTID_RE = re.compile(r"gtid_slave_pos\s*=\s*'([^']*)'")


@dataclass(slots=True)
class BootstrapResult:
    gtid_pos: str
    databases: list[str]
    positions: dict[str, int] = field(default_factory=dict)  # "topic[partition]" -> next_offset
    dump_file: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "gtid_pos": self.gtid_pos,
            "databases": self.databases,
            "positions": self.positions,
            "dump_file": self.dump_file,
        }

    def describe(self) -> str:
        pos = ", ".join(f"{k} -> {v}" for k, v in sorted(self.positions.items()))
        return f"seeded {', '.join(self.databases)} at GTID {self.gtid_pos}; positions: {pos}"


def parse_gtid_pos(text: str) -> dict[int, int]:
    """``'0-1-10,1-2-5'`` -> ``{domain: seq}``."""
    out: dict[int, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        g = Gtid.parse(part)
        out[g.domain] = max(out.get(g.domain, -1), g.seq)
    return out


def gtid_after(gtid: str, pos: dict[int, int]) -> bool:
    """True if the transaction ``gtid`` is not contained in the snapshot at ``pos``."""
    g = Gtid.parse(gtid)
    return g.seq > pos.get(g.domain, -1)


def dump_gtid(dump_head: str) -> str:
    m = _GTID_RE.search(dump_head)
    if m is None:
        raise PreflightError("the dump carries no gtid_slave_pos: is GTID enabled on the master?")
    return m.group(1)


def databases_for(master: ReplicaConn, globs: tuple[str, ...], state_schema: str) -> list[str]:
    conn = pymysql.connect(host=master.host, port=master.port, user=master.user, password=master.password)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT SCHEMA_NAME FROM information_schema.SCHEMATA ORDER BY SCHEMA_NAME")
            names = [str(r[0]) for r in cur.fetchall()]
    finally:
        conn.close()
    db_globs = [g.split(".", 1)[0] for g in globs]
    return [
        n
        for n in names
        if n not in SYSTEM_SCHEMAS and n != state_schema and any(fnmatch.fnmatchcase(n, g) for g in db_globs)
    ]


def _client_args(c: ReplicaConn) -> list[str]:
    args = ["-h", c.host, "-P", str(c.port), "-u", c.user]
    if c.password:
        args.append(f"-p{c.password}")
    return args


def find_offsets(
    settings: ApplySettings, gtid_pos: str, timeout_s: float = 30.0
) -> dict[tuple[str, int], int]:
    """Per partition of every change topic: offset of the first record after ``gtid_pos``."""
    pos = parse_gtid_pos(gtid_pos)
    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        enable_auto_commit=False,
        isolation_level="read_committed",
        max_poll_records=5000,
    )
    out: dict[tuple[str, int], int] = {}
    try:
        for _source, topic in settings.topics:
            parts = sorted(consumer.partitions_for_topic(topic) or ())
            if not parts:
                raise ConfigError(f"change topic {topic!r} does not exist in {settings.kafka_bootstrap}")
            for p in parts:
                tp = TopicPartition(topic, p)
                consumer.assign([tp])
                consumer.seek_to_beginning(tp)
                end = consumer.end_offsets([tp])[tp]
                found: int | None = None
                while found is None and consumer.position(tp) < end:
                    batch = consumer.poll(timeout_ms=int(timeout_s * 1000)).get(tp, [])
                    if not batch:
                        raise WmbError(f"no progress reading {topic}[{p}] at {consumer.position(tp)}")
                    for rec in batch:
                        if rec.offset >= end:
                            break
                        try:
                            ev = codec.decode(rec.value)
                        except DecodeError:
                            continue  # poison: the applier dead-letters it
                        if ev.position.gtid and gtid_after(ev.position.gtid, pos):
                            found = rec.offset
                            break
                out[(topic, p)] = end if found is None else found
    finally:
        consumer.close()
    return out


def bootstrap_replica(
    settings: ApplySettings,
    *,
    dump_file: str | None = None,
    dump_bin: str = "mariadb-dump",
    client_bin: str = "mariadb",
) -> BootstrapResult:
    """Dump the master, load the replica, set the applier's position (see the module doc)."""
    if settings.master is None:
        raise ConfigError("bootstrap needs the master's address (the source's server)")
    dump_exe, client_exe = shutil.which(dump_bin), shutil.which(client_bin)
    if not dump_exe or not client_exe:
        raise PreflightError(f"{dump_bin} and {client_bin} are needed (apt-get install mariadb-client)")
    dbs = databases_for(settings.master, settings.tables, settings.state_schema)
    if not dbs:
        raise ConfigError(f"no database on the master matches {list(settings.tables)}")
    path = Path(dump_file) if dump_file else Path(tempfile.mkdtemp(prefix="wmb-bootstrap-")) / "dump.sql"
    cmd = [
        dump_exe,
        *_client_args(settings.master),
        "--single-transaction",
        "--gtid",
        "--master-data=2",
        "--hex-blob",
        "--routines",
        "--events",
        "--triggers",
        "--databases",
        *dbs,
    ]
    _log.info("bootstrap_dump", databases=dbs, file=str(path))
    with path.open("wb") as out:
        res = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, check=False)
    if res.returncode != 0:
        raise WmbError(f"mariadb-dump failed ({res.returncode}): {res.stderr.decode()[-2000:]}")
    with path.open("r", encoding="utf-8", errors="replace") as f:
        head = "".join(next(f, "") for _ in range(200))
    gtid_pos = dump_gtid(head)
    _log.info("bootstrap_load", gtid_pos=gtid_pos)
    with path.open("rb") as src:
        res = subprocess.run(
            [client_exe, *_client_args(settings.replica)], stdin=src, stderr=subprocess.PIPE, check=False
        )
    if res.returncode != 0:
        raise WmbError(f"loading the dump into the replica failed: {res.stderr.decode()[-2000:]}")
    offsets = find_offsets(settings, gtid_pos)
    replica = MariaDBReplica(settings)
    replica.connect()
    try:
        replica.ensure_schema()
        source_of = dict((t, s) for s, t in settings.topics)
        replica.write_positions([(source_of[t], t, p, o, gtid_pos) for (t, p), o in sorted(offsets.items())])
    finally:
        replica.close()
    result = BootstrapResult(gtid_pos, dbs, {f"{t}[{p}]": o for (t, p), o in offsets.items()}, str(path))
    _log.info("bootstrap_done", **result.as_json())
    return result
