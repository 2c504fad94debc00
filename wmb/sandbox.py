"""`wmb sandbox up|demo|status|down`: the whole two-datacenter deployment on one machine.

bj holds the MariaDB master, its Kafka and Redis; gz holds its own Kafka and Redis and a MariaDB read
replica; between them runs the WAN link emulator at 20 ms one way, in front of bj Kafka's WAN
listener.  ``wmb run --dc bj`` (capture) and ``wmb run --dc gz`` (relay, cache updater, applier) are
started as the two datacenters' supervisors.  Everything lives under one state directory (default
``.wmb/sandbox``): the servers' data dirs and logs, the generated ``topology.yaml``, and
``state.json`` with every pid and port, so ``status`` and ``down`` work from any later process.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
import pymysql
import yaml

from wmb import log
from wmb.errors import WmbError
from wmb.runtime import StopToken
from wmb.servers.base import free_port, port_open
from wmb.servers.kafka import KafkaServer
from wmb.servers.mariadb import MariaDBServer
from wmb.servers.redis import RedisServer
from wmb.topology import Topology, load_topology

_log = log.get("wmb.sandbox")

DEFAULT_DIR = Path(os.environ.get("WMB_SANDBOX_DIR", ".wmb/sandbox"))
LINK_DELAY_MS = 20.0
MYSQL_USER = "wmb"
# A loopback-only sandbox: the password is not a secret, but the topology still reads it from the
# environment like a real deployment would (WMB_SANDBOX_MYSQL_PASSWORD overrides it).
MYSQL_PASSWORD_ENV = "WMB_SANDBOX_MYSQL_PASSWORD"
MYSQL_PASSWORD_DEFAULT = "wmb-sandbox"

# The demo's application schema; docker-compose.yml mounts the same file into its MariaDB servers.
APP_SCHEMA = (resources.files("wmb") / "sql" / "app-schema.sql").read_text()


def _sql_statements(script: str) -> list[str]:
    """The statements of a plain SQL script (no ';' inside literals), without its comment lines."""
    code = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("--"))
    return [stmt.strip() for stmt in code.split(";") if stmt.strip()]


@dataclass
class SandboxPaths:
    root: Path

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def topology(self) -> Path:
        return self.root / "topology.yaml"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def server(self, name: str) -> Path:
        return self.root / name


def _sandbox_topology(ports: dict[str, int]) -> dict[str, Any]:
    password = f"${{{MYSQL_PASSWORD_ENV}:-{MYSQL_PASSWORD_DEFAULT}}}"
    return {
        "version": 1,
        "epoch": 1,
        "datacenters": {
            "bj": {
                "kafka": {
                    "bootstrap": f"127.0.0.1:{ports['bj_kafka']}",
                    "wan_bootstrap": f"127.0.0.1:{ports['link']}",
                },
                "redis": {"url": f"redis://127.0.0.1:{ports['bj_redis']}/0"},
                "mysql": {
                    "master": {
                        "host": "127.0.0.1",
                        "port": ports["bj_mariadb"],
                        "user": MYSQL_USER,
                        "password": password,
                        "server_id": 1,
                    }
                },
                "metrics_port_base": ports["bj_metrics"],
            },
            "gz": {
                "kafka": {"bootstrap": f"127.0.0.1:{ports['gz_kafka']}"},
                "redis": {"url": f"redis://127.0.0.1:{ports['gz_redis']}/0"},
                "mysql": {
                    "master": None,
                    "replicas": {
                        "gzrep1": {
                            "host": "127.0.0.1",
                            "port": ports["gz_mariadb"],
                            "user": MYSQL_USER,
                            "password": password,
                            "server_id": 2,
                        }
                    },
                },
                "metrics_port_base": ports["gz_metrics"],
            },
        },
        "sources": {
            "main": {
                "dc": "bj",
                "server": "master",
                "replication_server_id": 1001,
                "include": ["app.*"],
                "ordering": "database",
                "partitions": 4,
                "heartbeat_interval_s": 1.0,
                "commit_interval_ms": 10,
            }
        },
        "routes": [{"from": "bj", "to": "gz", "compression": "zstd"}],
        "caches": [
            {
                "dc": "gz",
                "name": "social",
                "source": "main",
                "tables": {
                    "app.users": {"key": "user:{id}", "primary_key": ["id"], "format": "hash"},
                    "app.posts": {"key": "post:{id}", "primary_key": ["id"], "format": "json"},
                    "app.counters": {
                        "key": "counters:{user_id}",
                        "primary_key": ["user_id"],
                        "format": "hash",
                        "consistency": "after-replica",
                    },
                },
            }
        ],
        "replicas": [{"dc": "gz", "server": "gzrep1", "source": "main", "tables": ["app.*"]}],
    }


def wmb_argv() -> list[str]:
    return [sys.executable, "-m", "wmb.cli"]


def _grant(server: MariaDBServer, password: str, replica: bool) -> None:
    conn = server.connect()
    try:
        with conn.cursor() as cur:
            for host in ("127.0.0.1", "localhost"):
                cur.execute(
                    f"CREATE USER IF NOT EXISTS '{MYSQL_USER}'@'{host}' IDENTIFIED BY %s", (password,)
                )
                if replica:
                    # The applier writes every replicated table and its own state tables.
                    cur.execute(f"GRANT ALL PRIVILEGES ON *.* TO '{MYSQL_USER}'@'{host}'")
                else:
                    # The minimal grants of the capturer (README): read the binlog, read rows, and
                    # write its heartbeat row.
                    cur.execute(
                        "GRANT REPLICATION SLAVE, REPLICATION CLIENT, SELECT ON *.* "
                        f"TO '{MYSQL_USER}'@'{host}'"
                    )
                    cur.execute("CREATE DATABASE IF NOT EXISTS wmb")
                    cur.execute(f"GRANT INSERT, UPDATE, DELETE, CREATE ON wmb.* TO '{MYSQL_USER}'@'{host}'")
    finally:
        conn.close()


def _spawn_detached(
    argv: list[str], log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # survives the CLI that started it; Ctrl-C in a shell won't hit it
            env=env,
        )


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie of ours still "exists": look at its state
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _terminate(pid: int | None, timeout_s: float) -> None:
    """SIGTERM a process group leader and its group; SIGKILL what is left after the deadline."""
    if not _pid_alive(pid):
        return
    assert pid is not None
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _pid_alive(pid):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    if _pid_alive(pid):
        _log.warning("sandbox_kill_after_deadline", pid=pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


class Sandbox:
    """The local two-datacenter deployment under one state directory."""

    def __init__(self, root: Path = DEFAULT_DIR) -> None:
        self.paths = SandboxPaths(root.resolve())

    # -- state -----------------------------------------------------------------------------------
    def load_state(self) -> dict[str, Any]:
        try:
            state: dict[str, Any] = orjson.loads(self.paths.state.read_bytes())
        except FileNotFoundError:
            raise WmbError(f"no sandbox at {self.paths.root}: run `wmb sandbox up` first") from None
        return state

    def _save_state(self, state: dict[str, Any]) -> None:
        self.paths.root.mkdir(parents=True, exist_ok=True)
        tmp = self.paths.state.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(state, option=orjson.OPT_INDENT_2))
        tmp.replace(self.paths.state)

    def topology(self) -> Topology:
        return load_topology(self.paths.topology)

    @property
    def exists(self) -> bool:
        return self.paths.state.exists()

    # -- up ----------------------------------------------------------------------------------------
    def up(self, progress: Any = print) -> dict[str, Any]:
        """Start every server and daemon (idempotent: a running sandbox is left as it is)."""
        if self.exists:
            previous = self.load_state()
            if all(_pid_alive(p["pid"]) for p in previous["processes"].values()):
                progress(f"sandbox already up at {self.paths.root}")
                return previous
            progress("sandbox state found but some processes are gone: taking it down and starting anew")
            self.down(progress)
        root = self.paths.root
        root.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        password = os.environ.get(MYSQL_PASSWORD_ENV, MYSQL_PASSWORD_DEFAULT)
        # Every daemon of a dc takes metrics port base+1.. base+N: keep a block clear above each base.
        ports = {
            "link": free_port(),
            "link_control": free_port(),
            "bj_metrics": _free_block(8),
            "gz_metrics": _free_block(8),
        }
        state: dict[str, Any] = {"root": str(root), "ports": ports, "processes": {}, "servers": {}}

        def record(name: str, pid: int | None, **endpoint: Any) -> None:
            state["processes"][name] = {"pid": pid, **endpoint}
            self._save_state(state)

        try:
            progress("starting MariaDB master (bj) and replica (gz) ...")
            master = MariaDBServer(self.paths.server("bj-mariadb"), server_id=1).start()
            replica = MariaDBServer(self.paths.server("gz-mariadb"), server_id=2).start()
            ports["bj_mariadb"], ports["gz_mariadb"] = master.port, replica.port
            record("bj-mariadb", master.pid, host=master.host, port=master.port, user=MYSQL_USER)
            record("gz-mariadb", replica.pid, host=replica.host, port=replica.port, user=MYSQL_USER)
            _grant(master, password, replica=False)
            _grant(replica, password, replica=True)
            for server in (master, replica):
                conn = server.connect()
                with conn.cursor() as cur:
                    for stmt in _sql_statements(APP_SCHEMA):
                        cur.execute(stmt)
                conn.close()

            progress("starting Redis (bj, gz) ...")
            for dc in ("bj", "gz"):
                redis_server = RedisServer(self.paths.server(f"{dc}-redis")).start()
                ports[f"{dc}_redis"] = redis_server.port
                record(f"{dc}-redis", redis_server.pid, host=redis_server.host, port=redis_server.port)

            progress("starting Kafka (bj with a WAN listener behind the link, gz) ...")
            kafka_bj = KafkaServer(self.paths.server("bj-kafka"), wan_advertised_port=ports["link"])
            kafka_gz = KafkaServer(self.paths.server("gz-kafka"))
            # The two JVMs start in parallel: on 2 cores that saves most of one start-up.
            _start_all([kafka_bj, kafka_gz])
            ports["bj_kafka"], ports["gz_kafka"] = kafka_bj.port, kafka_gz.port
            assert kafka_bj.wan_port is not None
            ports["bj_kafka_wan"] = kafka_bj.wan_port
            record("bj-kafka", kafka_bj.pid, host="127.0.0.1", port=kafka_bj.port)
            record("gz-kafka", kafka_gz.pid, host="127.0.0.1", port=kafka_gz.port)

            progress(f"starting the link emulator bj->gz ({LINK_DELAY_MS:.0f} ms one way) ...")
            link = _spawn_detached(
                [
                    sys.executable,
                    "-m",
                    "wmb.linkemu",
                    "--listen",
                    f"127.0.0.1:{ports['link']}",
                    "--target",
                    f"127.0.0.1:{kafka_bj.wan_port}",
                    "--delay-ms",
                    str(LINK_DELAY_MS),
                    "--control-port",
                    str(ports["link_control"]),
                    "--name",
                    "bj-gz",
                ],
                self.paths.logs / "link.log",
            )
            record("link", link.pid, host="127.0.0.1", port=ports["link"], control_port=ports["link_control"])
            _wait_port(ports["link"], "link emulator", self.paths.logs / "link.log")

            self.paths.topology.write_text(
                "# Written by `wmb sandbox up`; the sandbox's own deployment.\n"
                + yaml.safe_dump(_sandbox_topology(ports), sort_keys=False)
            )
            load_topology(self.paths.topology)  # refuse to go on with a topology that doesn't check

            progress("starting the daemons: wmb run --dc bj, wmb run --dc gz ...")
            for dc in ("bj", "gz"):
                proc = _spawn_detached(
                    [*wmb_argv(), "--log-json", "run", "--dc", dc, "--topology", str(self.paths.topology)],
                    self.paths.logs / f"run-{dc}.log",
                )
                record(f"run-{dc}", proc.pid, metrics_port=ports[f"{dc}_metrics"])
            for dc in ("bj", "gz"):
                _wait_health(ports[f"{dc}_metrics"], f"wmb run --dc {dc}", self.paths.logs / f"run-{dc}.log")
        except BaseException:
            progress(f"sandbox start failed; logs are under {root}; taking it down")
            self.down(progress, keep_dir=True)
            raise
        state["started_in_s"] = round(time.monotonic() - began, 1)
        self._save_state(state)
        progress(f"sandbox up in {state['started_in_s']} s: {self.paths.topology}")
        return state

    # -- status ------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        state = self.load_state()
        out: dict[str, Any] = {"root": state["root"], "topology": str(self.paths.topology), "servers": {}}
        for name, proc in state["processes"].items():
            entry = {**proc, "alive": _pid_alive(proc["pid"])}
            if name.startswith("run-"):
                entry["daemons"] = _health(proc["metrics_port"]).get("daemons", {})
            out["servers"][name] = entry
        out["ok"] = all(s["alive"] for s in out["servers"].values())
        return out

    # -- down --------------------------------------------------------------------------------------
    def down(self, progress: Any = print, keep_dir: bool = False) -> None:
        """Stop every daemon (SIGTERM, they drain), then the link and the servers; remove the state."""
        try:
            state = self.load_state()
        except WmbError:
            if self.paths.root.exists() and not keep_dir:
                shutil.rmtree(self.paths.root, ignore_errors=True)
            progress("no sandbox running")
            return
        procs: dict[str, Any] = state.get("processes", {})
        order = [n for n in procs if n.startswith("run-")] + [n for n in procs if n == "link"]
        order += [n for n in procs if n not in order]
        for name in order:
            progress(f"stopping {name} ...")
            _terminate(procs[name].get("pid"), timeout_s=30.0 if name.startswith("run-") else 20.0)
        # Any port still open now belongs to something we failed to stop: say so loudly.
        left = [n for n, p in procs.items() if _pid_alive(p.get("pid"))]
        if left:
            raise WmbError(f"sandbox down: still running: {', '.join(left)}")
        if not keep_dir:
            shutil.rmtree(self.paths.root, ignore_errors=True)
        progress("sandbox down")


def _free_block(size: int) -> int:
    """A base port whose next ``size`` ports are free (daemon metrics ports count up from it)."""
    for _ in range(50):
        base = random.randint(20000, 60000)
        if not any(port_open(base + i) for i in range(size + 1)):
            return base
    return free_port()


def _start_all(servers: list[KafkaServer]) -> None:
    errors: list[BaseException] = []

    def start(server: KafkaServer) -> None:
        try:
            server.start()
        except BaseException as exc:  # re-raised below in the calling thread
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _wait_port(port: int, what: str, log_path: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if port_open(port):
            return
        time.sleep(0.1)
    raise WmbError(f"{what} did not listen on {port} in {timeout_s:.0f}s; log: {log_path}")


def _health(port: int) -> dict[str, Any]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
            body: dict[str, Any] = orjson.loads(resp.read())
            return body
    except urllib.error.HTTPError as exc:
        body = orjson.loads(exc.read() or b"{}")
        return body
    except (OSError, ValueError):
        return {"ok": False, "error": "unreachable"}


def _wait_health(port: int, what: str, log_path: Path, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        last = _health(port)
        if last.get("ok"):
            return
        time.sleep(0.25)
    raise WmbError(f"{what} not healthy after {timeout_s:.0f}s: {last}; log: {log_path}")


# -- the demo workload ---------------------------------------------------------------------------------


@dataclass
class WorkloadStats:
    transactions: int = 0
    rows: int = 0
    errors: int = 0


class SocialWorkload:
    """A steady write load on the social schema: sign-ups, posts, likes, follows, edits, deletes.

    Every transaction keeps ``app.counters`` consistent with the rows it touches, so a replica or a
    cache that applied half a transaction would show it.
    """

    def __init__(self, server: dict[str, Any], rate_per_s: float, seed: int = 7) -> None:
        self._conn = pymysql.connect(
            host=server["host"], port=server["port"], user="root", password="", autocommit=False
        )
        self._rate = rate_per_s
        self._rng = random.Random(seed)
        with self._conn.cursor() as cur:
            cur.execute(
                "SELECT (SELECT COALESCE(MAX(id), 0) FROM app.users WHERE id < 1 << 63), "
                "(SELECT COALESCE(MAX(id), 0) FROM app.posts)"
            )
            max_user, max_post = cur.fetchone() or (0, 0)
            self._next_user, self._next_post = int(max_user) + 1, int(max_post) + 1
        self.stats = WorkloadStats()

    def _one(self) -> None:
        rng = self._rng
        now = "NOW(6)"
        users = self._next_user - 1
        with self._conn.cursor() as cur:
            choice = rng.random()
            if users < 20 or choice < 0.15:
                uid = self._next_user
                self._next_user += 1
                cur.execute(
                    f"INSERT INTO app.users VALUES (%s, %s, %s, NULL, {now})",
                    (uid, f"user{uid}", f"user{uid}@example.com"),
                )
                cur.execute("INSERT INTO app.counters (user_id) VALUES (%s)", (uid,))
                self.stats.rows += 2
            elif choice < 0.45:
                uid = rng.randint(1, users)
                pid = self._next_post
                self._next_post += 1
                cur.execute(
                    f"INSERT INTO app.posts VALUES (%s, %s, %s, 0, {now})",
                    (pid, uid, f"post {pid} by {uid} \N{GLOBE WITH MERIDIANS}"),
                )
                cur.execute("UPDATE app.counters SET posts = posts + 1 WHERE user_id = %s", (uid,))
                self.stats.rows += 2
            elif choice < 0.7:
                hot = rng.randint(1, max(1, min(50, self._next_post - 1)))  # hot keys: the first posts
                self.stats.rows += cur.execute("UPDATE app.posts SET likes = likes + 1 WHERE id = %s", (hot,))
            elif choice < 0.85:
                a, b = rng.randint(1, users), rng.randint(1, users)
                if a != b and cur.execute(f"INSERT IGNORE INTO app.follows VALUES (%s, %s, {now})", (a, b)):
                    cur.execute("UPDATE app.counters SET following = following + 1 WHERE user_id = %s", (a,))
                    cur.execute("UPDATE app.counters SET followers = followers + 1 WHERE user_id = %s", (b,))
                    self.stats.rows += 3
            elif choice < 0.95:
                uid = rng.randint(1, users)
                self.stats.rows += cur.execute(
                    "UPDATE app.users SET bio = %s WHERE id = %s", (f"bio v{rng.randint(0, 10**6)}", uid)
                )
            else:
                cur.execute("SELECT id, user_id FROM app.posts ORDER BY RAND() LIMIT 1")
                row = cur.fetchone()
                if row:
                    cur.execute("DELETE FROM app.posts WHERE id = %s", (row[0],))
                    cur.execute("UPDATE app.counters SET posts = posts - 1 WHERE user_id = %s", (row[1],))
                    self.stats.rows += 2
        self._conn.commit()
        self.stats.transactions += 1

    def run(self, stop: StopToken, duration_s: float) -> None:
        interval = 1.0 / self._rate
        began = time.monotonic()
        next_at = began
        while not stop.stopped and time.monotonic() - began < duration_s:
            try:
                self._one()
            except pymysql.MySQLError as exc:
                self.stats.errors += 1
                _log.warning("workload_error", error=str(exc))
                self._conn.rollback()
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                stop.wait(delay)

    def close(self) -> None:
        self._conn.close()
