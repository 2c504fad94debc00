"""`wmb lag`: how far behind each hop of the pipeline is, in messages and in seconds.

Hops, per datacenter:

- ``capture:<source>`` (in the source's dc): the master's ``@@gtid_binlog_pos`` against the
  capturer's last committed checkpoint.  Messages behind = source transactions not yet in Kafka.
- ``relay:<from>-><to>`` (in ``to``): the relay's checkpoint (next source offset per partition,
  committed in the destination with every relayed batch) against the source topic's log end.
- ``cache:<dc>`` and ``apply:<dc>``: the cache updater's and the replica applier's consumer groups
  on the dc's own cluster.

For the consumer groups "messages behind" is exactly what Kafka's ``kafka-consumer-groups.sh
--describe`` prints as LAG: the log end offset (high watermark) minus the group's committed offset,
so the two always agree.  (The relay also commits its group ``wmb-relay-<from>-<to>`` on the source
cluster for those tools, every few seconds; its checkpoint is the exact position, so the relay row
reads that.)  "Seconds behind" is the age of the oldest message the hop has not consumed yet (0 when
nothing is pending).  The capturer writes a heartbeat row every second and it flows through every
partition, so a hop that stops moving shows a growing age even when the application writes nothing.

Status per hop follows Burrow's rules: OK; WARN past ``--warn`` seconds; ERR past ``--crit`` or with
no committed position while there is data; STALL when messages are pending but the position did not
move between two samples.  The exit code is 0 for OK, 1 for WARN and 2 for ERR or STALL.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import orjson
import pymysql
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import OffsetSpec
from kafka.errors import KafkaError

from wmb import topics
from wmb.event import Gtid
from wmb.topology import Topology


class Status(enum.IntEnum):
    OK = 0
    WARN = 1
    STALL = 2
    ERR = 3

    @property
    def exit_code(self) -> int:
        return min(int(self), 2)


@dataclass
class PartitionLag:
    partition: int
    position: int | None  # committed offset (Kafka hops) or GTID sequence (capture)
    end: int
    behind: int
    seconds: float


@dataclass
class HopLag:
    dc: str
    hop: str
    group: str | None
    topic: str | None
    behind: int = 0
    seconds: float = 0.0
    status: Status = Status.OK
    detail: str = ""
    partitions: list[PartitionLag] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["status"] = self.status.name
        out["seconds"] = round(self.seconds, 3)
        return out


@dataclass
class LagReport:
    hops: list[HopLag]
    taken_at_ms: int

    @property
    def status(self) -> Status:
        return max((h.status for h in self.hops), default=Status.OK)

    def end_to_end_s(self, dc: str) -> float | None:
        """Worst seconds-behind over the hops that deliver into ``dc`` (sources, relays, consumers)."""
        seconds = [h.seconds for h in self.hops if h.dc == dc or h.hop.startswith("capture:")]
        return max(seconds) if seconds else None

    def caught_up(self) -> bool:
        """Nothing pending anywhere: every hop holds the end of its input."""
        return all(h.seconds == 0.0 and h.status != Status.ERR for h in self.hops)

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status.name,
            "exit_code": self.status.exit_code,
            "taken_at_ms": self.taken_at_ms,
            "hops": [h.as_dict() for h in self.hops],
        }


# -- reading positions ---------------------------------------------------------------------------------


@contextmanager
def _consumer(bootstrap: str, isolation: str) -> Iterator[KafkaConsumer]:
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        isolation_level=isolation,
        request_timeout_ms=10_000,
        client_id="wmb-lag",
    )
    try:
        yield consumer
    finally:
        consumer.close()


def _ts_ms(value: bytes | None) -> int | None:
    """The envelope's commit time, without decoding the rest (a poison message has none)."""
    if not value:
        return None
    try:
        ts = orjson.loads(value).get("ts_ms")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return int(ts) if isinstance(ts, int) else None


def _oldest_pending_age_s(
    consumer: KafkaConsumer, pending: dict[TopicPartition, int], now_ms: int
) -> dict[TopicPartition, float]:
    """Age of the first committed record at each pending position (0 where only markers remain)."""
    ages = {tp: 0.0 for tp in pending}
    if not pending:
        return ages
    consumer.assign(list(pending))
    for tp, offset in pending.items():
        consumer.seek(tp, offset)
    todo = set(pending)
    deadline = time.monotonic() + 3.0
    while todo and time.monotonic() < deadline:
        for tp, records in consumer.poll(timeout_ms=200, max_records=500).items():
            if tp in todo and records:
                ts = _ts_ms(records[0].value)
                ages[tp] = max(0.0, (now_ms - ts) / 1000.0) if ts is not None else 0.0
                todo.discard(tp)
                consumer.pause(tp)
    return ages


def _end_offsets(bootstrap: str, topic: str) -> dict[TopicPartition, int]:
    """Log end offsets (ListOffsets latest, read_uncommitted), as kafka-consumer-groups.sh reads them."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="wmb-lag", request_timeout_ms=10_000)
    try:
        parts = admin.describe_topics([topic])[0].get("partitions", [])
        tps = sorted(
            (TopicPartition(topic, p["partition_index"]) for p in parts), key=lambda tp: tp.partition
        )
        latest = admin.list_partition_offsets({tp: OffsetSpec.LATEST for tp in tps}) if tps else {}
        return {tp: latest[tp].offset for tp in tps}
    finally:
        admin.close()


def _partition_lags(
    bootstrap: str, topic: str, positions: dict[TopicPartition, int], now_ms: int
) -> list[PartitionLag]:
    ends = _end_offsets(bootstrap, topic)
    pending = {tp: positions[tp] for tp in ends if tp in positions and ends[tp] > positions[tp]}
    with _consumer(bootstrap, "read_committed") as reader:
        ages = _oldest_pending_age_s(reader, pending, now_ms)
    out = []
    for tp, end in ends.items():
        pos = positions.get(tp)
        out.append(PartitionLag(tp.partition, pos, end, end - (pos or 0), ages.get(tp, 0.0)))
    return out


def group_lag(bootstrap: str, group: str, topic: str, now_ms: int) -> list[PartitionLag] | None:
    """Per partition: committed offset of ``group``, log end offset, LAG, seconds; None if no group.

    The same two numbers ``kafka-consumer-groups.sh --describe`` reads: OffsetFetch for the group,
    ListOffsets(latest, read_uncommitted) for the log end, so LAG here is LAG there.
    """
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="wmb-lag", request_timeout_ms=10_000)
    try:
        fetched = admin.list_group_offsets({group: None}).get(group, {})
    finally:
        admin.close()
    committed = {
        tp: meta.offset
        for tp, meta in fetched.items()
        if tp.topic == topic and meta.offset is not None and meta.offset >= 0
    }
    return _partition_lags(bootstrap, topic, committed, now_ms) if committed else None


def relay_positions(dst_bootstrap: str, src_dc: str, dst_dc: str, topic: str) -> dict[TopicPartition, int]:
    """The relay's committed checkpoints (next source offset per partition), read from the tail of the
    compacted checkpoint topic: heartbeats move every partition each second, so a recent tail holds
    the latest record of each."""
    prefix = topics.relay_checkpoint_key(src_dc, dst_dc, topic, 0)[:-1]
    cp_topic = topics.relay_checkpoint_topic()
    out: dict[TopicPartition, int] = {}
    with _consumer(dst_bootstrap, "read_committed") as reader:
        parts = reader.partitions_for_topic(cp_topic) or set()
        tps = [TopicPartition(cp_topic, p) for p in parts]
        if not tps:
            return out
        reader.assign(tps)
        ends = reader.end_offsets(tps)
        for tp in tps:
            reader.seek(tp, max(0, ends[tp] - 5000))
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(reader.position(tp) < ends[tp] for tp in tps):
            for records in reader.poll(timeout_ms=200, max_records=5000).values():
                for rec in records:
                    if rec.key and rec.key.startswith(prefix) and rec.value:
                        partition = int(rec.key[len(prefix) :])
                        out[TopicPartition(topic, partition)] = int(orjson.loads(rec.value)["next_offset"])
    return out


def _last_checkpoint(bootstrap: str, topic: str) -> dict[str, Any] | None:
    tp = TopicPartition(topic, 0)
    with _consumer(bootstrap, "read_committed") as reader:
        if not reader.partitions_for_topic(topic):
            return None
        reader.assign([tp])
        end = reader.end_offsets([tp])[tp]
        if end == 0:
            return None
        reader.seek(tp, max(0, end - 20))
        last: dict[str, Any] | None = None
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            batch = reader.poll(timeout_ms=200).get(tp, [])
            for rec in batch:
                last = orjson.loads(rec.value)
            if reader.position(tp) >= end:
                break
        return last


def capture_lag(topology: Topology, source: str, now_ms: int) -> HopLag:
    src = topology.source(source)
    dc = topology.dc(src.dc)
    hop = HopLag(src.dc, f"capture:{source}", None, topics.capture_checkpoint_topic(source))
    server = topology.server(src.dc, src.server)
    conn = pymysql.connect(
        host=server.host,
        port=server.port,
        user=server.user,
        password=server.password.get_secret_value() if server.password else "",
        connect_timeout=5,
    )
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT @@gtid_binlog_pos")
            row = cur.fetchone()
            master_pos = str(row[0]) if row and row[0] else ""
    finally:
        conn.close()
    cp = _last_checkpoint(dc.kafka.bootstrap, topics.capture_checkpoint_topic(source))
    if cp is None:
        hop.status, hop.detail = Status.ERR, "no checkpoint committed yet"
        return hop
    cp_gtid = Gtid.parse(cp["gtid"]) if cp.get("gtid") else None
    master = {g.domain: g for g in (Gtid.parse(p) for p in master_pos.split(",") if p)}
    head = master.get(cp_gtid.domain) if cp_gtid else None
    if cp_gtid is None or head is None:
        hop.detail = f"master at {master_pos or '-'}, checkpoint at {cp.get('gtid')}"
        return hop
    hop.behind = max(0, head.seq - cp_gtid.seq)
    # The capturer commits every few ms while it has work: time since its last commit, while
    # something is pending, is how long the binlog has been waiting for it.
    hop.seconds = max(0.0, (now_ms - int(cp["written_ms"])) / 1000.0) if hop.behind else 0.0
    hop.partitions = [PartitionLag(0, cp_gtid.seq, head.seq, hop.behind, hop.seconds)]
    hop.detail = f"master {head}, captured {cp_gtid}"
    return hop


def _relay_hop(topology: Topology, route_from: str, route_to: str, topic: str, now_ms: int) -> HopLag:
    """The relay's exact position is its checkpoint in the destination (committed with every local
    transaction); its consumer group on the source cluster is only refreshed every few seconds, for
    Kafka's own tools."""
    hop = HopLag(route_to, f"relay:{route_from}->{route_to}", topics.relay_group(route_from, route_to), topic)
    positions = relay_positions(topology.dc(route_to).kafka.bootstrap, route_from, route_to, topic)
    if not positions:
        hop.status, hop.detail = Status.ERR, "no relay checkpoint committed yet"
        return hop
    hop.partitions = _partition_lags(topology.dc(route_from).kafka.bootstrap, topic, positions, now_ms)
    hop.behind = sum(p.behind for p in hop.partitions)
    hop.seconds = max((p.seconds for p in hop.partitions), default=0.0)
    hop.detail = "position: relay checkpoint"
    return hop


def _group_hop(dc: str, hop_name: str, bootstrap: str, group: str, topic: str, now_ms: int) -> HopLag:
    hop = HopLag(dc, hop_name, group, topic)
    parts = group_lag(bootstrap, group, topic, now_ms)
    if parts is None:
        hop.status, hop.detail = Status.ERR, "no committed offsets for this group yet"
        return hop
    hop.partitions = parts
    hop.behind = sum(p.behind for p in parts)
    hop.seconds = max((p.seconds for p in parts), default=0.0)
    return hop


def _hops(topology: Topology, now_ms: int) -> list[HopLag]:
    """Every hop of the topology, each read independently (one unreachable server spoils one row)."""
    todo: list[tuple[str, str, Callable[[], HopLag]]] = []
    for name in sorted(topology.sources):
        todo.append(
            (topology.source(name).dc, f"capture:{name}", partial(capture_lag, topology, name, now_ms))
        )
    for route in topology.routes:
        src_cluster = topology.dc(route.from_).kafka.bootstrap
        group = topics.relay_group(route.from_, route.to)
        for src in topology.sources_reaching(route.from_):
            if route.carries(src.name):
                topic = topology.topic_in(src.name, route.from_)
                hop = f"relay:{route.name}"
                todo.append(
                    (route.to, hop, partial(_group_hop, route.to, hop, src_cluster, group, topic, now_ms))
                )
    for dc_name, dc in topology.datacenters.items():
        consumers = {("cache", topology.source_for(c).name) for c in topology.caches_in(dc_name)}
        consumers |= {("apply", topology.source_for(r).name) for r in topology.replicas_in(dc_name)}
        for kind, source in sorted(consumers):
            group = topics.cache_group(dc_name) if kind == "cache" else topics.apply_group(dc_name)
            topic = topology.topic_in(source, dc_name)
            hop = f"{kind}:{dc_name}"
            todo.append(
                (dc_name, hop, partial(_group_hop, dc_name, hop, dc.kafka.bootstrap, group, topic, now_ms))
            )
    return [_guard(dc, name, fn) for dc, name, fn in todo]


def _guard(dc: str, name: str, fn: Callable[[], HopLag]) -> HopLag:
    """A hop whose servers do not answer is an ERR row, not a crash of the whole report."""
    try:
        hop: HopLag = fn()
    except (KafkaError, pymysql.MySQLError, OSError) as exc:
        return HopLag(dc, name, None, None, status=Status.ERR, detail=f"unreachable: {exc!r}")
    return hop


def _judge(hop: HopLag, warn_s: float, crit_s: float, before: HopLag | None) -> None:
    if hop.status == Status.ERR:
        return
    if hop.seconds >= crit_s:
        hop.status = Status.ERR
    elif (
        before is not None and hop.behind > 0 and before.behind > 0 and _positions(hop) == _positions(before)
    ):
        # Burrow's STALL: there is work, the hop still commits (it answers), but its position sits still.
        hop.status = Status.STALL
        hop.detail = (hop.detail + "; " if hop.detail else "") + "position did not move"
    elif hop.seconds >= warn_s:
        hop.status = Status.WARN


def _positions(hop: HopLag) -> list[int | None]:
    return [p.position for p in hop.partitions]


def collect(
    topology: Topology, warn_s: float = 5.0, crit_s: float = 30.0, sample_s: float = 1.0
) -> LagReport:
    """One report; with ``sample_s`` > 0 positions are read twice that far apart to detect a STALL."""
    before = None
    if sample_s > 0:
        before = {h.hop + (h.topic or ""): h for h in _hops(topology, int(time.time() * 1000))}
        time.sleep(sample_s)
    now_ms = int(time.time() * 1000)
    hops = _hops(topology, now_ms)
    for hop in hops:
        _judge(hop, warn_s, crit_s, before.get(hop.hop + (hop.topic or "")) if before else None)
    return LagReport(hops, now_ms)


def render_table(report: LagReport) -> str:
    rows = [("DC", "HOP", "GROUP", "BEHIND", "SECONDS", "STATUS", "DETAIL")]
    for h in report.hops:
        rows.append(
            (h.dc, h.hop, h.group or "-", str(h.behind), f"{h.seconds:.3f}", h.status.name, h.detail[:60])
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
