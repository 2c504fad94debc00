"""A private single-node Kafka (KRaft broker + controller in one JVM) from the pinned 4.3.x jars."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import uuid
from pathlib import Path
from typing import Any

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from wmb import log
from wmb.errors import ServerStartError
from wmb.servers.base import INSTALL_SCRIPT, ManagedProcess, find_binary, port_open, saved_port

_log = log.get("wmb.servers.kafka")

_REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_LIBS_DIR = _REPO_ROOT / "deps" / "kafka" / "target" / "libs"
_LIBS_HINT = "mvn -f deps/kafka/pom.xml dependency:copy-dependencies"
_JAVA_HINT = "apt-get install openjdk-17-jre-headless"

# Fast start and a small footprint matter more here than peak throughput: C1 only
# (TieredStopAtLevel=1) cut a start from 2.05 s to 1.6 s; SerialGC is the cheapest collector for a
# 512 MiB heap on 2 cores.  Override with WMB_KAFKA_JVM_OPTS (space separated) for benchmarks.
# On top of that an AppCDS archive (see _CdsArchive) brings a start down to ~1.0 s.
DEFAULT_JVM_OPTS = (
    "-Xmx512m",
    "-Xms256m",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-XX:-UsePerfData",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
    "-Djava.net.preferIPv4Stack=true",
)

# Root at WARN keeps the ~1,400 INFO lines of a start out of the log; errors and warnings (and the
# "Kafka Server started" lifecycle lines) stay, so a failed start explains itself.
_LOG4J2_XML = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders>
    <Console name="STDOUT" target="SYSTEM_OUT">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Logger name="kafka.server.KafkaRaftServer" level="INFO"/>
    <Logger name="kafka.Kafka$" level="INFO"/>
    <Logger name="kafka.tools.StorageTool$" level="INFO"/>
    <Root level="WARN"><AppenderRef ref="STDOUT"/></Root>
  </Loggers>
</Configuration>
"""


def _new_cluster_id() -> str:
    """What `kafka-storage random-uuid` prints: a url-safe base64 UUID without padding.

    Like Kafka's own Uuid.randomUuid, never one that starts with '-': the storage tool's argument
    parser would take it for an option (about one id in 64 did, and the format step failed).
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _kafka_classpath(libs_dir: Path) -> str:
    """``libs_dir/*``, or an explicit jar list without the SLF4J 1.x API when a 2.x one is also there.

    slf4j-api 1.7 cannot see the log4j2 (SLF4J 2) binding, and the broker then logs nothing at all,
    not even why it failed to start.
    """
    jars = sorted(libs_dir.glob("*.jar"))
    slf4j1 = [j for j in jars if re.match(r"slf4j-api-1\.", j.name)]
    if slf4j1 and any(re.match(r"slf4j-api-2\.", j.name) for j in jars):
        return os.pathsep.join(str(j) for j in jars if j not in slf4j1)
    return str(libs_dir / "*")


class _CdsArchive:
    """A dynamic AppCDS archive of the broker's classes, shared by every broker on this machine.

    The first broker that has no archive records one when it exits cleanly (JDK 17
    ``-XX:ArchiveClassesAtExit``, written to a private temp file and renamed into place, so two
    brokers never write the same file); later brokers map it (``-XX:SharedArchiveFile``) and start
    ~40% faster.  The key covers the JVM options and every jar's name, size and mtime, so a new jar
    set simply records a new archive.  A stale or unreadable archive only costs speed: the JVM
    falls back to loading classes normally (``-Xshare:auto``).
    """

    def __init__(self, cache_dir: Path, java: str, jvm_opts: tuple[str, ...], libs_dir: Path) -> None:
        digest = hashlib.sha1(java.encode())
        digest.update("\0".join(jvm_opts).encode())
        for jar in sorted(libs_dir.glob("*.jar")):
            stat = jar.stat()
            digest.update(f"{jar.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        self.path = cache_dir / f"kafka-{digest.hexdigest()[:16]}.jsa"
        self.recording: Path | None = None
        self.cache_dir = cache_dir

    def jvm_args(self) -> list[str]:
        # cds warnings (old class versions it skips) would bury the broker log.
        quiet = ["-Xlog:cds=off", "-Xlog:cds+dynamic=off"]
        if self.path.is_file():
            self.recording = None
            return [*quiet, f"-XX:SharedArchiveFile={self.path}"]
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError:
            return []
        self.recording = self.cache_dir / f"{self.path.stem}.{uuid.uuid4().hex[:8]}.tmp"
        return [*quiet, f"-XX:ArchiveClassesAtExit={self.recording}"]

    def finish(self, clean_exit: bool) -> None:
        """After the broker exited: publish the recorded archive (clean exit) or drop it."""
        rec, self.recording = self.recording, None
        if rec is None:
            return
        with contextlib.suppress(OSError):
            if clean_exit and rec.is_file() and rec.stat().st_size > 0 and not self.path.exists():
                os.replace(rec, self.path)
                _log.info("kafka_cds_archive_recorded", path=str(self.path))
            else:
                rec.unlink(missing_ok=True)


class KafkaServer(ManagedProcess):
    """One KRaft node (``process.roles=broker,controller``) on loopback ports in ``data_dir``.

    Listeners: PLAINTEXT on :attr:`port` for local clients, CONTROLLER on :attr:`controller_port`,
    and, when ``wan_advertised_port`` is given, WAN bound on :attr:`wan_port` but advertised as
    ``127.0.0.1:<wan_advertised_port>``: the link emulator listens there and forwards to
    :attr:`wan_port`, so a client that bootstraps through the emulator keeps going through it.
    """

    kind = "kafka"
    default_timeout_s = 90.0

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        wan_advertised_port: int | None = None,
        *,
        port: int | None = None,
        libs_dir: str | os.PathLike[str] | None = None,
        java_bin: str | None = None,
        jvm_opts: tuple[str, ...] | None = None,
        extra_properties: dict[str, str] | None = None,
        cds_dir: str | os.PathLike[str] | None = None,
        die_with_parent: bool = False,
    ) -> None:
        super().__init__(data_dir, die_with_parent=die_with_parent)
        env_libs = os.environ.get("WMB_KAFKA_LIBS")
        self.libs_dir = Path(libs_dir or env_libs or DEFAULT_LIBS_DIR).resolve()
        self.java_bin = java_bin
        env_opts = os.environ.get("WMB_KAFKA_JVM_OPTS")
        self.jvm_opts = (
            jvm_opts if jvm_opts is not None else tuple(env_opts.split()) if env_opts else DEFAULT_JVM_OPTS
        )
        self.extra_properties = dict(extra_properties or {})
        self.port = saved_port(self.data_dir, "port", port)
        self.controller_port = saved_port(self.data_dir, "controller_port", None)
        self.wan_advertised_port = wan_advertised_port
        self.wan_port: int | None = (
            saved_port(self.data_dir, "wan_port", None) if wan_advertised_port is not None else None
        )
        self.log_dirs = self.data_dir / "kraft-logs"
        self.properties_path = self.data_dir / "server.properties"
        self.log4j_path = self.data_dir / "log4j2.xml"
        self._warned_silent_log = False
        # "" (WMB_KAFKA_CDS_DIR= or cds_dir="") turns the class-data-sharing archive off.
        cds = cds_dir if cds_dir is not None else os.environ.get("WMB_KAFKA_CDS_DIR")
        self.cds_dir: Path | None = (
            (self.libs_dir.parent / "cds") if cds is None else (Path(cds) if str(cds) else None)
        )
        self._cds: _CdsArchive | None = None

    @property
    def bootstrap(self) -> str:
        """``127.0.0.1:<port>`` of the PLAINTEXT (local) listener."""
        return f"{self.host}:{self.port}"

    @property
    def wan_bootstrap(self) -> str | None:
        """``127.0.0.1:<wan_advertised_port>``: what a remote-DC client bootstraps from."""
        return None if self.wan_advertised_port is None else f"{self.host}:{self.wan_advertised_port}"

    # --- setup -------------------------------------------------------------------------------
    def properties(self) -> dict[str, str]:
        """The broker configuration (each name checked against the 4.3.1 jars: none is unknown)."""
        listeners = [f"PLAINTEXT://127.0.0.1:{self.port}", f"CONTROLLER://127.0.0.1:{self.controller_port}"]
        advertised = [f"PLAINTEXT://127.0.0.1:{self.port}"]
        protocols = ["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT"]
        if self.wan_port is not None:
            listeners.append(f"WAN://127.0.0.1:{self.wan_port}")
            advertised.append(f"WAN://127.0.0.1:{self.wan_advertised_port}")
            protocols.append("WAN:PLAINTEXT")
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "controller.listener.names": "CONTROLLER",
            "listeners": ",".join(listeners),
            "advertised.listeners": ",".join(advertised),
            "listener.security.protocol.map": ",".join(protocols),
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.log_dirs),
            # One node: every internal topic has one replica.  Few partitions keep the first
            # group / transaction start (which creates these topics) fast.
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "min.insync.replicas": "1",
            "group.initial.rebalance.delay.ms": "0",
            "num.partitions": "1",
            "default.replication.factor": "1",
            # The pipeline creates its topics with explicit settings; a typo must fail, not
            # silently create a one-partition topic.
            "auto.create.topics.enable": "false",
            # After a SIGKILL the restarted broker cannot register until the controller expires its
            # previous session (DUPLICATE_BROKER_REGISTRATION): 9 s by default, 3 s here.
            "broker.session.timeout.ms": "3000",
            "broker.heartbeat.interval.ms": "500",
            "num.network.threads": "2",
            "num.io.threads": "4",
            "num.recovery.threads.per.data.dir": "1",
            "log.segment.bytes": str(64 * 1024 * 1024),
        }
        props.update(self.extra_properties)
        return props

    def _check_install(self) -> str:
        java = find_binary("java", self.java_bin, "WMB_JAVA", _JAVA_HINT)
        if not any(self.libs_dir.glob("kafka_2.13-*.jar")):
            raise ServerStartError(
                f"Kafka jars not found in {self.libs_dir}: run `{INSTALL_SCRIPT}` ({_LIBS_HINT})"
            )
        if not self._warned_silent_log and not any(self.libs_dir.glob("slf4j-api-2.*.jar")):
            self._warned_silent_log = True
            _log.warning(
                "kafka_broker_log_silent",
                why="slf4j-api 1.x only in libs: the log4j2 binding is ignored and the broker logs nothing",
                fix="add org.slf4j:slf4j-api:2.0.17 to deps/kafka/pom.xml and re-run scripts/install.sh",
                libs_dir=str(self.libs_dir),
            )
        return java

    def _java(self, main_class: str, *args: str, cds: bool = False) -> list[str]:
        java = self._check_install()
        cds_args: list[str] = []
        if cds and self.cds_dir is not None:
            self._cds = _CdsArchive(self.cds_dir, java, self.jvm_opts, self.libs_dir)
            cds_args = self._cds.jvm_args()
        return [
            java,
            *self.jvm_opts,
            *cds_args,
            f"-Dlog4j2.configurationFile={self.log4j_path}",
            f"-Dkafka.logs.dir={self.data_dir}",
            "-cp",
            _kafka_classpath(self.libs_dir),
            main_class,
            *args,
        ]

    def _write_config(self) -> None:
        body = "".join(f"{k}={v}\n" for k, v in self.properties().items())
        self.properties_path.write_text("# written by wmb.servers.kafka; rewritten on every start\n" + body)
        self.log4j_path.write_text(_LOG4J2_XML)

    def _prepared(self) -> bool:
        return (self.log_dirs / "meta.properties").is_file()

    def _prepare(self) -> None:
        self._check_install()
        self._write_config()
        cmd = self._java(
            "kafka.tools.StorageTool",
            "format",
            "-t",
            _new_cluster_id(),
            "-c",
            str(self.properties_path),
        )
        self._run_setup(cmd, "kafka storage format")

    def _command(self) -> list[str]:
        self._write_config()
        return self._java("kafka.Kafka", str(self.properties_path), cds=True)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (controlled shutdown), then SIGKILL after ``timeout_s``."""
        was_alive = self.alive
        super().stop(timeout_s)
        if self._cds is not None and was_alive:
            code = self._proc.returncode if self._proc is not None else None
            # kafka.Kafka exits 143 (128 + SIGTERM) after a clean shutdown hook; both count as clean.
            self._cds.finish(clean_exit=code in (0, 143))

    def kill(self) -> None:
        """SIGKILL: the broker crash that fault tests want (no archive is recorded)."""
        super().kill()
        if self._cds is not None:
            self._cds.finish(clean_exit=False)

    def _ports(self) -> dict[str, int]:
        ports = {"port": self.port, "controller_port": self.controller_port}
        if self.wan_port is not None:
            ports["wan_port"] = self.wan_port
        if self.wan_advertised_port is not None:
            ports["wan_advertised_port"] = self.wan_advertised_port
        return ports

    def _probe(self) -> bool:
        # A cheap TCP check first: kafka-python logs an error for every refused bootstrap.
        if not port_open(self.port):
            return False
        admin = self.admin(request_timeout_ms=5000)
        try:
            cluster = admin.describe_cluster()
            brokers = cluster.get("brokers") or []
            # Registered and unfenced: only then does it accept produce / create-topic requests.
            return any(not b.get("is_fenced", False) for b in brokers) and isinstance(
                admin.list_topics(), list
            )
        finally:
            admin.close()

    # --- client helpers ----------------------------------------------------------------------
    def admin(self, **kw: Any) -> KafkaAdminClient:
        """A new KafkaAdminClient on the local listener; the caller closes it."""
        params: dict[str, Any] = {"bootstrap_servers": self.bootstrap, "client_id": "wmb-servers-admin"}
        params.update(kw)
        return KafkaAdminClient(**params)

    def create_topic(
        self,
        name: str,
        partitions: int = 1,
        compacted: bool = False,
        configs: dict[str, str] | None = None,
        exist_ok: bool = False,
    ) -> None:
        """Create a topic with one replica (``cleanup.policy=compact`` when ``compacted``)."""
        topic_configs = dict(configs or {})
        if compacted:
            topic_configs["cleanup.policy"] = "compact"
        admin = self.admin()
        try:
            admin.create_topics([NewTopic(name, partitions, 1, topic_configs=topic_configs)])
        except TopicAlreadyExistsError:
            if not exist_ok:
                raise
        finally:
            with contextlib.suppress(Exception):
                admin.close()

    def list_topics(self) -> list[str]:
        admin = self.admin()
        try:
            return sorted(admin.list_topics())
        finally:
            admin.close()
