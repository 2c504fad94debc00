"""`wmb run --dc X`: one supervisor for every daemon that topology.yaml assigns to a datacenter.

Each daemon (capture, relay, cache, apply) runs as its own child process, so a crash of one never
takes the others down and kill -9 semantics stay those of the daemon itself.  The supervisor:

- restarts a child that crashed (killed by a signal or exited with a plain error) with exponential
  backoff, reset once the child has stayed up for ``stable_after_s``;
- does *not* restart a child whose exit code means an operator must act (bad config, preflight,
  lost position, fenced by another instance, retries exhausted, halted on a conflict): restarting
  those would only repeat the failure, or, for a fenced one, fence the instance that replaced it;
- on SIGTERM/SIGINT forwards SIGTERM to every child, waits for them to drain (each daemon commits
  what it holds and exits 0), and SIGKILLs only those still running after ``stop_timeout_s``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import Counter, Gauge

from wmb import log
from wmb.errors import ExitCode
from wmb.runtime import MetricsServer, StopToken
from wmb.topology import Topology

_log = log.get("wmb.supervisor")

# Exit codes after which a restart cannot help: the operator must look first.
NO_RESTART = frozenset(
    {
        ExitCode.CONFIG,
        ExitCode.PREFLIGHT,
        ExitCode.POSITION_LOST,
        ExitCode.FENCED,
        ExitCode.GAVE_UP,
        ExitCode.HALTED,
    }
)

RESTARTS = Counter("wmb_supervisor_restarts_total", "Daemon restarts by the supervisor", ["daemon"])
UP = Gauge("wmb_supervisor_daemon_up", "1 while the daemon process runs", ["daemon"])


@dataclass(frozen=True)
class DaemonSpec:
    """One child: its name (``capture:main``), the ``wmb`` arguments that start it, its metrics port."""

    name: str
    args: tuple[str, ...]
    metrics_port: int


def daemons_for(topology: Topology, dc: str, topology_path: str | Path) -> list[DaemonSpec]:
    """Every daemon datacenter ``dc`` runs, with metrics ports counted up from its base port."""
    base = topology.dc(dc).metrics_port_base
    path = str(topology_path)
    wanted: list[tuple[str, tuple[str, ...]]] = []
    for src in sorted(topology.sources_in(dc), key=lambda s: s.name):
        wanted.append((f"capture:{src.name}", ("capture", "--source", src.name)))
    for route in sorted(topology.routes_to(dc), key=lambda r: r.name):
        spec = f"{route.from_}:{route.to}"
        wanted.append((f"relay:{spec}", ("relay", "--route", spec)))
    if topology.caches_in(dc):
        wanted.append(("cache", ("cache", "--dc", dc)))
    if topology.replicas_in(dc):
        wanted.append(("apply", ("apply", "--dc", dc)))
    return [
        DaemonSpec(name, (*args, "--topology", path, "--metrics-port", str(base + 1 + i)), base + 1 + i)
        for i, (name, args) in enumerate(wanted)
    ]


@dataclass
class _Child:
    spec: DaemonSpec
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    next_start_at: float = 0.0
    backoff_s: float = 0.0
    final_code: int | None = None  # set when the child exited with a code that forbids a restart
    history: list[int] = field(default_factory=list)


class Supervisor:
    """Starts, watches and stops the daemons of one datacenter."""

    def __init__(
        self,
        specs: list[DaemonSpec],
        *,
        wmb_argv: tuple[str, ...] = (sys.executable, "-m", "wmb.cli"),
        log_dir: Path | None = None,
        initial_backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        stable_after_s: float = 60.0,
        stop_timeout_s: float = 15.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.children = [_Child(s) for s in specs]
        self._wmb = wmb_argv
        self._log_dir = log_dir
        self._initial_backoff_s = initial_backoff_s
        self._max_backoff_s = max_backoff_s
        self._stable_after_s = stable_after_s
        self._stop_timeout_s = stop_timeout_s
        self._env = env

    def _spawn(self, child: _Child) -> None:
        out: Any = None
        if self._log_dir is not None:
            self._log_dir.mkdir(parents=True, exist_ok=True)
            safe = child.spec.name.replace(":", "-")
            out = open(self._log_dir / f"{safe}.log", "ab")  # noqa: SIM115 - handed to the child
        child.proc = subprocess.Popen(
            [*self._wmb, *child.spec.args],
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
            env=self._env,
        )
        if out is not None:
            out.close()
        child.started_at = time.monotonic()
        UP.labels(child.spec.name).set(1)
        _log.info("daemon_started", daemon=child.spec.name, pid=child.proc.pid, port=child.spec.metrics_port)

    def _reap(self, child: _Child, now: float) -> None:
        assert child.proc is not None
        code = child.proc.poll()
        if code is None:
            if child.backoff_s and now - child.started_at > self._stable_after_s:
                child.backoff_s = 0.0  # stayed up long enough: the next crash starts the backoff anew
            return
        UP.labels(child.spec.name).set(0)
        child.proc = None
        child.history.append(code)
        if code in NO_RESTART:
            child.final_code = code
            _log.error(
                "daemon_exited_needs_operator",
                daemon=child.spec.name,
                exit_code=code,
                meaning=ExitCode(code).name,
            )
            return
        child.backoff_s = min(
            self._max_backoff_s, child.backoff_s * 2 if child.backoff_s else self._initial_backoff_s
        )
        child.next_start_at = now + child.backoff_s
        child.restarts += 1
        RESTARTS.labels(child.spec.name).inc()
        _log.warning(
            "daemon_crashed_restarting",
            daemon=child.spec.name,
            exit_code=code,
            restart_in_s=child.backoff_s,
            restarts=child.restarts,
        )

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Healthy when every child runs and its own ``/health`` says so."""
        daemons: dict[str, Any] = {}
        for c in self.children:
            child_ok, detail = False, dict[str, Any]()
            if c.proc is not None and c.proc.poll() is None:
                child_ok, detail = _child_health(c.spec.metrics_port)
            daemons[c.spec.name] = {
                "ok": child_ok,
                "pid": c.proc.pid if c.proc else None,
                "metrics_port": c.spec.metrics_port,
                "restarts": c.restarts,
                "final_exit_code": c.final_code,
                "health": detail,
            }
        return all(d["ok"] for d in daemons.values()), {"daemons": daemons}

    def run(self, stop: StopToken, poll_s: float = 0.2) -> int:
        """Supervise until ``stop`` is set or every child has exited for good; return the exit code."""
        for child in self.children:
            self._spawn(child)
        while not stop.wait(poll_s):
            now = time.monotonic()
            for child in self.children:
                if child.proc is not None:
                    self._reap(child, now)
                elif child.final_code is None and now >= child.next_start_at:
                    self._spawn(child)
            if all(c.final_code is not None for c in self.children):
                _log.error("all_daemons_exited")
                break
        self.stop()
        finals = [c.final_code for c in self.children if c.final_code is not None]
        return max(finals) if finals else ExitCode.OK

    def stop(self) -> None:
        """SIGTERM every child, wait for them to drain, SIGKILL what is left after the deadline."""
        running = [c for c in self.children if c.proc is not None and c.proc.poll() is None]
        for child in running:
            assert child.proc is not None
            child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._stop_timeout_s
        for child in running:
            assert child.proc is not None
            try:
                code = child.proc.wait(max(0.0, deadline - time.monotonic()))
                _log.info("daemon_stopped", daemon=child.spec.name, exit_code=code)
            except subprocess.TimeoutExpired:
                _log.error("daemon_kill_after_deadline", daemon=child.spec.name, pid=child.proc.pid)
                child.proc.kill()
                child.proc.wait()
            UP.labels(child.spec.name).set(0)
            child.proc = None


def _child_health(port: int, timeout_s: float = 1.0) -> tuple[bool, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=timeout_s) as resp:
            return True, orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:  # 503: the daemon runs but says it is not healthy
        try:
            return False, orjson.loads(exc.read())
        except orjson.JSONDecodeError:
            return False, {"error": f"HTTP {exc.code}"}
    except (OSError, orjson.JSONDecodeError) as exc:
        return False, {"error": f"unreachable: {exc}"}


def run_dc(
    topology: Topology,
    topology_path: str | Path,
    dc: str,
    metrics_port: int | None,
    log_dir: Path | None = None,
) -> int:
    """Supervise datacenter ``dc`` until SIGTERM; the supervisor's own /health lists its children."""
    specs = daemons_for(topology, dc, topology_path)
    if not specs:
        _log.warning("nothing_to_run", dc=dc)
        return ExitCode.OK
    stop = StopToken().install()
    sup = Supervisor(specs, log_dir=log_dir, env=dict(os.environ))
    port = metrics_port if metrics_port is not None else topology.dc(dc).metrics_port_base
    server = MetricsServer(port, sup.health).start()
    try:
        return sup.run(stop)
    finally:
        server.stop()
