"""The README's first command, end to end: `make demo` (install, `wmb sandbox up`, `demo`), then
`status`, `lag` and `down`.

Everything runs as the operator would run it: separate `wmb` processes against one state directory.
The demo writes a social-app load on the bj master for a few seconds; the test then checks that it
reached gz (the lag probe times each write until it is visible in the gz replica and the gz cache),
that `wmb verify` found the replica and the caches identical to the master, and that `down` leaves
no process and no listening port behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from wmb.servers.base import port_open

ROOT = Path(__file__).resolve().parents[2]
DEMO_SECONDS = float(os.environ.get("WMB_TEST_DEMO_SECONDS", "8"))


def _wmb(state_dir: Path, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
    return _run(state_dir, sys.executable, "-m", "wmb.cli", *args, timeout_s=timeout_s)


def _run(state_dir: Path, *argv: str, timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, WMB_SANDBOX_DIR=str(state_dir), WMB_LOG_LEVEL="WARNING")
    return subprocess.run(
        list(argv),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_make_demo_then_status_lag_and_down(tmp_path: Path) -> None:
    """`make demo` (the README's first command: install, `sandbox up`, `sandbox demo`) with a short
    duration, then `status`, `lag` and `down` against the sandbox it left up."""
    state_dir = tmp_path / "sandbox"
    status: dict[str, Any] = {}
    try:
        demo = _run(
            state_dir,
            "make",
            "demo",
            f"DURATION={DEMO_SECONDS:g}",
            "DEMO_FLAGS=--json --rate 100",
            timeout_s=900,
        )
        assert demo.returncode == 0, (demo.stdout[-3000:], demo.stderr[-4000:])
        report = json.loads([line for line in demo.stdout.splitlines() if line.startswith("{")][-1])

        st = _wmb(state_dir, "sandbox", "status", "--json")
        assert st.returncode == 0, st.stderr[-2000:]
        status = json.loads(st.stdout)
        servers = status["servers"]
        for name in ("bj-mariadb", "gz-mariadb", "bj-kafka", "gz-kafka", "bj-redis", "gz-redis", "link"):
            assert servers[name]["alive"] and port_open(servers[name]["port"]), name
        assert servers["bj-mariadb"]["user"] == "wmb"
        daemons = {**servers["run-bj"]["daemons"], **servers["run-gz"]["daemons"]}
        assert set(daemons) == {"capture:main", "relay:bj:gz", "cache", "apply"}
        assert all(d["ok"] and d["pid"] and d["metrics_port"] for d in daemons.values()), daemons

        print(json.dumps({k: v for k, v in report.items() if k != "verify"}, indent=1))
        assert report["transactions"] > 0 and report["workload_errors"] == 0
        assert report["caught_up"]
        assert report["verify"]["ok"], report["verify"]
        assert report["verify"]["replica"]["tables"] and report["verify"]["caches"]["checked_keys"] > 0
        e2e = report["end_to_end_s"]
        assert e2e["not_arrived_in_10s"] == 0
        assert e2e["replica"]["samples"] > 0 and e2e["cache"]["samples"] > 0
        # The bound: data reaches gz (replica and cache) with lag under one second.
        assert e2e["replica"]["p50_s"] < 1.0, e2e
        assert e2e["cache"]["p50_s"] < 1.0, e2e

        lag = _wmb(state_dir, "lag", "--json", "--topology", str(state_dir / "topology.yaml"))
        hops = {h["hop"]: h for h in json.loads(lag.stdout)["hops"]}
        assert set(hops) == {"capture:main", "relay:bj->gz", "cache:gz", "apply:gz"}, lag.stdout
        if lag.returncode == 2 and all(h["status"] in ("OK", "WARN", "STALL") for h in hops.values()):
            # STALL compares positions 1 s apart; on a loaded CI machine the relay has been seen
            # to ship nothing for ~1.7 s while heartbeats arrived.  A real stall persists.
            time.sleep(2.0)
            lag = _wmb(state_dir, "lag", "--json", "--topology", str(state_dir / "topology.yaml"))
        assert lag.returncode in (0, 1), lag.stdout
    finally:
        down = _wmb(state_dir, "sandbox", "down")
    assert down.returncode == 0, down.stderr[-2000:]
    assert not state_dir.exists()
    for name, entry in status.get("servers", {}).items():
        assert not _pid_alive(entry["pid"]), f"{name} still running"
        for key in ("port", "metrics_port", "control_port"):
            if entry.get(key):
                assert not port_open(entry[key]), f"{name} still listens on {entry[key]}"
        for daemon in entry.get("daemons", {}).values():
            assert not _pid_alive(daemon["pid"]), daemon
            assert not port_open(daemon["metrics_port"]), daemon
