"""Process management for the real servers that tests and `wmb sandbox` run.

One :class:`ManagedProcess` is one server process with a private data dir, a log file inside it and
fixed loopback ports.  The ports and the data dir survive :meth:`ManagedProcess.restart`, so a fault
test can kill a server and bring the *same* server back, with its data, where its clients expect it.
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from wmb import log
from wmb.errors import ServerStartError

_log = log.get("wmb.servers")

INSTALL_SCRIPT = "bash scripts/install.sh"
LOG_TAIL_LINES = 60

_handed_out: set[int] = set()
_ports_lock = threading.Lock()


def free_port() -> int:
    """A loopback TCP port that is free now and that this process has never handed out before.

    The kernel picks it (bind to port 0); the process-wide set stops two servers started in the
    same test session from getting the same port between the probe and their own bind.
    """
    with _ports_lock:
        for _ in range(200):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("127.0.0.1", 0))
                port = int(sock.getsockname()[1])
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise RuntimeError("no free loopback port after 200 attempts")


def reserve_port(port: int) -> int:
    """Record a port chosen elsewhere (e.g. read back from a state file) so free_port skips it."""
    with _ports_lock:
        _handed_out.add(port)
    return port


def port_open(port: int, host: str = "127.0.0.1", timeout_s: float = 0.5) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def find_binary(name: str, override: str | None, env_var: str, hint: str) -> str:
    """Resolve a server binary: explicit override, then ``$env_var``, then PATH, then /usr/sbin.

    A missing binary raises ServerStartError that says exactly how to install it.
    """
    candidate = override or os.environ.get(env_var)
    if candidate:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
        found = shutil.which(candidate)
    else:
        # /usr/sbin is not on PATH for non-root users, but that is where Debian puts mariadbd.
        found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if not found:
        raise ServerStartError(f"{name} not found: run `{INSTALL_SCRIPT}` ({hint})")
    return found


def _die_with_parent() -> None:
    """preexec_fn: ask Linux to SIGKILL the child when the process that started it dies.

    Test servers must not outlive a pytest run that was itself killed; `wmb sandbox` servers opt
    out because the CLI that starts them exits at once.
    """
    pr_set_pdeathsig = 1
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


class ManagedProcess(abc.ABC):
    """One server process: private data dir, log file in it, fixed ports across restarts.

    Subclasses say how to prepare the data dir once (:meth:`_prepare`), which command runs the
    server (:meth:`_command`) and when it is ready (:meth:`_probe`).
    """

    #: short name used in logs, the log file name and error messages ("mariadb", "kafka", "redis")
    kind: str = "server"
    #: seconds wait_ready waits by default
    default_timeout_s: float = 60.0

    def __init__(self, data_dir: str | os.PathLike[str], *, die_with_parent: bool = False) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.die_with_parent = die_with_parent
        self.log_path = self.data_dir / f"{self.kind}.log"
        self.host = "127.0.0.1"
        #: seconds from spawn to ready on the last start (prepare excluded), and for the prepare step
        self.startup_s: float | None = None
        self.prepare_s: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._starts = 0
        self._log_file_offset = 0

    # --- what subclasses provide -------------------------------------------------------------
    @abc.abstractmethod
    def _command(self) -> list[str]:
        """argv of the server process."""

    @abc.abstractmethod
    def _probe(self) -> bool:
        """True once the server answers real requests; may raise (treated as not ready)."""

    def _prepared(self) -> bool:
        """True when the data dir needs no first-time setup (install-db, storage format ...)."""
        return True

    def _prepare(self) -> None:  # noqa: B027 - optional hook, most servers need no setup
        """First-time setup of the data dir; never run by restart() on a prepared dir."""

    def _env(self) -> dict[str, str] | None:
        return None

    def _ports(self) -> dict[str, int]:
        """Ports to persist in the state file, so a later process can find the server."""
        return {}

    # --- lifecycle ---------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float | None = None) -> Self:
        """Prepare the data dir if needed, spawn the server and wait until it answers."""
        if self.alive:
            return self
        if not self._prepared():
            began = time.monotonic()
            self._prepare()
            self.prepare_s = time.monotonic() - began
        cmd = self._command()
        self._starts += 1
        began = time.monotonic()
        with self.log_path.open("ab") as logf:
            self._log_file_offset = logf.tell()
            header = f"\n===== wmb start #{self._starts} at {time.strftime('%Y-%m-%d %H:%M:%S')}: "
            logf.write((header + " ".join(cmd) + "\n").encode())
            logf.flush()
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                env=self._env(),
                # Own process group: a Ctrl-C meant for pytest does not hit the servers mid-test;
                # teardown stops them in order.
                start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        self._write_state()
        self.wait_ready(timeout_s if timeout_s is not None else self.default_timeout_s)
        self.startup_s = time.monotonic() - began
        _log.info(
            "server_started",
            kind=self.kind,
            pid=self.pid,
            ports=self._ports(),
            startup_s=round(self.startup_s, 3),
            prepare_s=None if self.prepare_s is None else round(self.prepare_s, 3),
            data_dir=str(self.data_dir),
        )
        return self

    def wait_ready(self, timeout_s: float) -> None:
        """Poll the readiness probe; raise ServerStartError (with the log tail) on death or timeout."""
        deadline = time.monotonic() + timeout_s
        last_error: BaseException | None = None
        while True:
            if self._proc is None:
                raise ServerStartError(f"{self.kind} was never started")
            code = self._proc.poll()
            if code is not None:
                raise self._start_error(f"exited with code {code} before it was ready")
            try:
                if self._probe():
                    return
            except Exception as exc:  # any probe failure means "not ready yet"
                last_error = exc
            if time.monotonic() >= deadline:
                self.kill()
                why = f" (last probe error: {last_error!r})" if last_error else ""
                raise self._start_error(f"not ready after {timeout_s:.0f}s{why}; killed it")
            time.sleep(0.1)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (a clean shutdown), wait up to ``timeout_s``, then SIGKILL."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        began = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            _log.warning("server_stop_timeout_kill", kind=self.kind, pid=proc.pid, timeout_s=timeout_s)
            self.kill()
            return
        _log.info("server_stopped", kind=self.kind, pid=proc.pid, stop_s=round(time.monotonic() - began, 3))

    def kill(self) -> None:
        """SIGKILL without any chance to clean up: the crash that fault tests want."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        _log.info("server_killed", kind=self.kind, pid=proc.pid)

    def restart(self, timeout_s: float | None = None) -> Self:
        """Stop if running, then start again on the same ports and data dir (data is kept)."""
        self.stop()
        return self.start(timeout_s)

    def log_tail(self, lines: int = LOG_TAIL_LINES, this_start_only: bool = True) -> str:
        """The last ``lines`` lines of the server log (by default only what the last start wrote)."""
        try:
            with self.log_path.open("rb") as logf:
                if this_start_only:
                    logf.seek(self._log_file_offset)
                tail = deque(logf, maxlen=lines)
        except OSError:
            return "(no log file)"
        return b"".join(tail).decode("utf-8", "replace")

    def _start_error(self, what: str) -> ServerStartError:
        return ServerStartError(
            f"{self.kind} in {self.data_dir} {what}; last {LOG_TAIL_LINES} lines of {self.log_path}:\n"
            f"{self.log_tail()}"
        )

    def _run_setup(self, cmd: Sequence[str], what: str, timeout_s: float = 120.0) -> None:
        """Run a one-shot setup command with its output appended to the log; fail with the tail."""
        with self.log_path.open("ab") as logf:
            self._log_file_offset = logf.tell()
            logf.write(f"\n===== wmb {what}: {' '.join(cmd)}\n".encode())
            logf.flush()
            try:
                code = subprocess.run(
                    list(cmd),
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    cwd=self.data_dir,
                    env=self._env(),
                    timeout=timeout_s,
                    check=False,
                ).returncode
            except subprocess.TimeoutExpired:
                raise self._start_error(f"{what} did not finish in {timeout_s:.0f}s") from None
        if code != 0:
            raise self._start_error(f"{what} failed with code {code}")

    def _write_state(self) -> None:
        """`<data_dir>/wmb-server.json`: pid and ports, for `wmb sandbox status|down` in a later process."""
        state = {"kind": self.kind, "pid": self.pid, "ports": self._ports()}
        (self.data_dir / "wmb-server.json").write_text(json.dumps(state, indent=2) + "\n")

    @staticmethod
    def read_state(data_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
        """The state file a previous start wrote, or None."""
        path = Path(data_dir) / "wmb-server.json"
        try:
            loaded: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return loaded

    # --- context manager ---------------------------------------------------------------------
    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} pid={self.pid} ports={self._ports()} dir={self.data_dir}>"


def saved_port(data_dir: Path, name: str, given: int | None) -> int:
    """The port to use: the one given, else the one a previous start saved, else a fresh one.

    Reusing the saved port lets `wmb sandbox up` bring a stopped sandbox back where clients expect it.
    """
    if given is not None:
        return reserve_port(given)
    state = ManagedProcess.read_state(data_dir)
    if state and isinstance(state.get("ports"), dict) and isinstance(state["ports"].get(name), int):
        return reserve_port(int(state["ports"][name]))
    return free_port()
