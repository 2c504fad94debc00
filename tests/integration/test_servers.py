"""The server fixtures really start MariaDB, Kafka and Redis, side by side, and each one works."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import redis.exceptions
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from redis.backoff import NoBackoff
from redis.retry import Retry

from wmb.errors import ServerStartError
from wmb.servers import KafkaServer, MariaDBServer, RedisServer, ServerPool, free_port, port_open

pytestmark = pytest.mark.integration


def wait_until(cond: Callable[[], bool], timeout_s: float = 60.0, what: str = "condition") -> None:
    """Poll ``cond`` until true; errors count as "not yet" (a restarted broker answers late)."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            if cond():
                return
        except Exception as exc:
            last_error = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} (last error: {last_error!r})")
        time.sleep(0.2)


def _seq(gtid_pos: str) -> int:
    """Sequence number of domain 0 in a MariaDB gtid position like '0-1-7'."""
    for gtid in gtid_pos.split(","):
        domain, _server, seq = gtid.split("-")
        if domain == "0":
            return int(seq)
    return 0


def _read_all(kafka: KafkaServer, topic: str, isolation_level: str) -> list[bytes]:
    """Every record of partition 0 up to its end offset (the LSO for read_committed)."""
    consumer = KafkaConsumer(
        bootstrap_servers=kafka.bootstrap,
        isolation_level=isolation_level,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        end = consumer.end_offsets([tp])[tp]
        values: list[bytes] = []
        deadline = time.monotonic() + 60
        while consumer.position(tp) < end:
            assert time.monotonic() < deadline, f"could not read {topic} up to offset {end}"
            for records in consumer.poll(timeout_ms=500).values():
                values.extend(r.value for r in records)
        return values
    finally:
        consumer.close()


def check_mariadb(db: MariaDBServer) -> None:
    assert db.query("SELECT @@binlog_format, @@binlog_row_image, @@binlog_row_metadata") == [
        ("ROW", "FULL", "FULL")
    ]
    assert db.query("SELECT @@log_bin, @@gtid_strict_mode, @@server_id") == [(1, 1, db.server_id)]
    name = f"t_{uuid.uuid4().hex[:8]}"
    db.execute("CREATE DATABASE IF NOT EXISTS wmb_servers_test")
    before = _seq(db.gtid_binlog_pos())
    db.execute(f"CREATE TABLE wmb_servers_test.{name} (id INT PRIMARY KEY, v VARCHAR(20))")
    db.execute(f"INSERT INTO wmb_servers_test.{name} VALUES (%s, %s), (%s, %s)", 1, "héllo", 2, "b")
    assert db.query(f"SELECT id, v FROM wmb_servers_test.{name} ORDER BY id") == [(1, "héllo"), (2, "b")]
    assert _seq(db.gtid_binlog_pos()) >= before + 2  # DDL + one DML transaction
    with db.connect(database="wmb_servers_test") as conn, conn.cursor() as cur:
        cur.execute(f"SELECT COUNT(*) FROM {name}")
        assert cur.fetchone() == (2,)


def check_kafka(kafka: KafkaServer) -> None:
    topic = f"wmb-servers-{uuid.uuid4().hex[:8]}"
    kafka.create_topic(topic, partitions=1)
    assert topic in kafka.list_topics()
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, transactional_id=f"tx-{topic}")
    try:
        producer.init_transactions()
        producer.begin_transaction()
        producer.send(topic, key=b"k", value=b"committed-1")
        producer.send(topic, key=b"k", value=b"committed-2")
        producer.commit_transaction()
        producer.begin_transaction()
        producer.send(topic, key=b"k", value=b"aborted")
        producer.flush()  # the record really reaches the log before the abort
        producer.abort_transaction()
        producer.begin_transaction()
        producer.send(topic, key=b"k", value=b"committed-3")
        producer.commit_transaction()
    finally:
        producer.close()
    # commit_transaction() returns once the coordinator logged the commit; the markers that move the
    # last stable offset land just after, so wait for them instead of reading once.
    committed = [b"committed-1", b"committed-2", b"committed-3"]
    wait_until(lambda: len(_read_all(kafka, topic, "read_committed")) >= 3, what="committed records")
    assert _read_all(kafka, topic, "read_committed") == committed
    # read_uncommitted sees the aborted record: proof it was written and then hidden by the abort.
    assert b"aborted" in _read_all(kafka, topic, "read_uncommitted")


def test_free_port_never_repeats() -> None:
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)


def test_all_servers_side_by_side(
    mariadb_master: MariaDBServer,
    mariadb_replica: MariaDBServer,
    kafka_bj: KafkaServer,
    kafka_gz: KafkaServer,
    redis_bj: RedisServer,
    redis_gz: RedisServer,
) -> None:
    servers = [mariadb_master, mariadb_replica, kafka_bj, kafka_gz, redis_bj, redis_gz]
    assert all(s.alive for s in servers)
    ports = [mariadb_master.port, mariadb_replica.port, redis_bj.port, redis_gz.port]
    for k in (kafka_bj, kafka_gz):
        ports += [k.port, k.controller_port]
    assert kafka_bj.wan_port is not None and kafka_bj.wan_advertised_port is not None
    ports += [kafka_bj.wan_port, kafka_bj.wan_advertised_port]
    assert len(set(ports)) == len(ports)
    assert len({s.data_dir for s in servers}) == len(servers)

    assert (mariadb_master.server_id, mariadb_replica.server_id) == (1, 2)
    for db in (mariadb_master, mariadb_replica):
        check_mariadb(db)

    # bj's WAN listener is bound; its advertised port is where the link emulator will listen.
    assert port_open(kafka_bj.wan_port)
    assert kafka_bj.wan_bootstrap == f"127.0.0.1:{kafka_bj.wan_advertised_port}"
    assert kafka_gz.wan_port is None
    for kafka in (kafka_bj, kafka_gz):
        check_kafka(kafka)

    key = f"k-{uuid.uuid4().hex[:8]}"
    redis_bj.client().set(key, "bj")
    redis_gz.client().set(key, "gz")
    assert redis_bj.client().get(key) == b"bj"
    assert redis_gz.client().get(key) == b"gz"


def test_mariadb_restart_keeps_data(server_factory: ServerPool) -> None:
    db = server_factory.mariadb(server_id=7, gtid_domain_id=3)
    port, pid = db.port, db.pid
    db.execute("CREATE DATABASE d")
    db.execute("CREATE TABLE d.t (id INT PRIMARY KEY)")
    db.execute("INSERT INTO d.t VALUES (1), (2)")
    pos = db.gtid_binlog_pos()
    assert pos.startswith("3-7-")

    db.restart()
    assert (db.port, db.alive) == (port, True) and db.pid != pid
    assert db.query("SELECT id FROM d.t ORDER BY id") == [(1,), (2,)]
    assert db.gtid_binlog_pos() == pos

    # A crash (SIGKILL) keeps committed data too, and the binlog continues from the same GTID.
    db.kill()
    assert not db.alive
    db.start()
    db.execute("INSERT INTO d.t VALUES (3)")
    assert db.query("SELECT COUNT(*) FROM d.t") == [(3,)]
    assert int(db.gtid_binlog_pos().split("-")[2]) > int(pos.split("-")[2])


def test_kafka_kill_and_restart_keeps_committed_records(server_factory: ServerPool) -> None:
    kafka = server_factory.kafka()
    port = kafka.port
    kafka.create_topic("keep", partitions=1, compacted=True)
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, transactional_id="tx-keep")
    producer.init_transactions()
    producer.begin_transaction()
    producer.send("keep", key=b"a", value=b"1")
    producer.commit_transaction()
    producer.close()

    kafka.kill()
    kafka.start()
    assert kafka.port == port
    wait_until(lambda: "keep" in kafka.list_topics(), what="topic after restart")
    # The commit markers may not have been written before the kill: the restarted transaction
    # coordinator completes the commit, and only then does the record become visible.
    wait_until(lambda: _read_all(kafka, "keep", "read_committed") == [b"1"], what="committed record")


def test_redis_password(server_factory: ServerPool) -> None:
    server = server_factory.redis(password="s3cret")
    assert server.url == f"redis://:s3cret@127.0.0.1:{server.port}/0"
    assert server.client().set("a", "1")
    with pytest.raises(redis.exceptions.RedisError, match=r"(?i)auth"):
        server.client(password=None, retry=Retry(NoBackoff(), 0)).get("a")


def test_missing_binary_gives_install_hint(tmp_path: Path) -> None:
    with pytest.raises(ServerStartError, match=r"mariadbd not found: run `bash scripts/install\.sh`"):
        MariaDBServer(tmp_path / "m", 1, mariadbd_bin="/nonexistent/mariadbd").start()
    with pytest.raises(ServerStartError, match=r"redis-server not found: .*apt-get install redis-server"):
        RedisServer(tmp_path / "r", redis_bin="/nonexistent/redis-server").start()
    with pytest.raises(ServerStartError, match=r"Kafka jars not found in .*dependency:copy-dependencies"):
        KafkaServer(tmp_path / "k", libs_dir=tmp_path / "no-libs").start()
    with pytest.raises(ServerStartError, match=r"java not found: .*openjdk-17-jre-headless"):
        KafkaServer(tmp_path / "k2", java_bin="/nonexistent/java").start()


def test_failed_start_carries_log_tail(server_factory: ServerPool) -> None:
    db = server_factory.mariadb(extra_args=("--wmb-no-such-option",), start=False)
    with pytest.raises(ServerStartError) as err:
        db.start(timeout_s=60)
    message = str(err.value)
    assert "exited with code" in message
    assert "wmb-no-such-option" in message  # mariadbd's own complaint, from the log tail
    assert not db.alive
