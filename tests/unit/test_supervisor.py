"""The supervisor behind `wmb run`: restart policy and clean stop, with real child processes."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from wmb.errors import ExitCode
from wmb.runtime import StopToken
from wmb.supervisor import DaemonSpec, Supervisor, daemons_for
from wmb.topology import load_topology

ROOT = Path(__file__).resolve().parents[2]


def _script(tmp_path: Path, name: str, body: str) -> DaemonSpec:
    path = tmp_path / f"{name}.py"
    path.write_text(body)
    return DaemonSpec(name, (str(path),), 0)


def _run(sup: Supervisor, until: object, timeout_s: float = 30.0) -> int:
    stop = StopToken()
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(sup.run(stop, poll_s=0.05)))
    thread.start()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not until():  # type: ignore[operator]
        time.sleep(0.05)
    stop.stop()
    thread.join(timeout_s)
    assert result, "supervisor did not return"
    return result[0]


def test_crashed_child_is_restarted_but_operator_exit_codes_are_not(tmp_path: Path) -> None:
    crashing = _script(tmp_path, "crashing", "import sys; sys.exit(1)\n")
    fenced = _script(tmp_path, "fenced", f"import sys; sys.exit({int(ExitCode.FENCED)})\n")
    sup = Supervisor(
        [crashing, fenced], wmb_argv=(sys.executable,), initial_backoff_s=0.01, max_backoff_s=0.05
    )
    _run(sup, lambda: sup.children[0].restarts >= 3 and sup.children[1].final_code is not None)
    assert sup.children[0].restarts >= 3
    assert sup.children[0].final_code is None
    assert sup.children[1].final_code == ExitCode.FENCED
    assert sup.children[1].restarts == 0


def test_sigterm_reaches_every_child_and_they_drain(tmp_path: Path) -> None:
    marker = tmp_path / "drained"
    body = (
        "import signal, sys, time, pathlib\n"
        "def bye(*_):\n"
        f"    pathlib.Path({str(marker)!r}).write_text('ok')\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "while True: time.sleep(0.05)\n"
    )
    child = _script(tmp_path, "draining", body)
    sup = Supervisor([child], wmb_argv=(sys.executable,), stop_timeout_s=10)

    def started() -> bool:
        if sup.children[0].proc is None:
            return False
        time.sleep(0.5)  # let the child install its SIGTERM handler
        return True

    code = _run(sup, started)
    assert code == ExitCode.OK
    assert marker.read_text() == "ok"
    assert sup.children[0].proc is None


def test_all_children_gone_for_good_ends_the_supervisor_with_their_code(tmp_path: Path) -> None:
    halted = _script(tmp_path, "halted", f"import sys; sys.exit({int(ExitCode.HALTED)})\n")
    sup = Supervisor([halted], wmb_argv=(sys.executable,))
    assert sup.run(StopToken(), poll_s=0.05) == ExitCode.HALTED


def test_daemons_for_the_example_topology() -> None:
    topo = load_topology(ROOT / "topology.yaml")
    bj = [s.name for s in daemons_for(topo, "bj", "topology.yaml")]
    gz = daemons_for(topo, "gz", "topology.yaml")
    assert bj == ["capture:main"]
    assert [s.name for s in gz] == ["relay:bj:gz", "cache", "apply"]
    base = topo.dc("gz").metrics_port_base
    assert [s.metrics_port for s in gz] == [base + 1, base + 2, base + 3]
    assert gz[0].args[:3] == ("relay", "--route", "bj:gz")
