"""`wmb sandbox demo`: a steady social-app write load on bj, a live lag table, then a verification of gz.

The report it returns (and prints with ``--json``) is what the fresh-machine test checks: data reached
gz, the worst end-to-end lag seen while the load ran, and whether the replica and the caches equal
the master row by row.
"""

from __future__ import annotations

import subprocess
import threading
import time
from typing import Any

import orjson

from wmb import log
from wmb.lag import LagReport, collect, render_table
from wmb.runtime import StopToken
from wmb.sandbox import Sandbox, SocialWorkload, wmb_argv

_log = log.get("wmb.demo")


def _verify(box: Sandbox) -> dict[str, Any]:
    """`wmb verify --dc gz --caches --json`: the replica and the caches of gz against the bj master.

    Run as the operator would run it (a process), so the shared package needs no stage imported.
    """
    proc = subprocess.run(
        [*wmb_argv(), "verify", "--dc", "gz", "--caches", "--json", "--topology", str(box.paths.topology)],
        capture_output=True,
        check=False,
    )
    try:
        result: dict[str, Any] = orjson.loads(proc.stdout)
    except orjson.JSONDecodeError:
        result = {"error": proc.stderr.decode(errors="replace")[-2000:]}
    result["ok"] = proc.returncode == 0
    result["exit_code"] = proc.returncode
    return result


def run_demo(box: Sandbox, duration_s: float, rate_per_s: float, progress: Any) -> dict[str, Any]:
    """Run the workload for ``duration_s``, redraw the lag table every second, wait for gz, verify."""
    state = box.load_state()
    topology = box.topology()
    stop = StopToken()
    workload = SocialWorkload(state["processes"]["bj-mariadb"], rate_per_s)
    worker = threading.Thread(target=workload.run, args=(stop, duration_s), name="workload", daemon=True)
    progress(f"demo: {rate_per_s:.0f} txn/s on the bj master for {duration_s:.0f} s")
    worker.start()
    max_lag_s = 0.0
    samples: list[float] = []
    try:
        while worker.is_alive():
            report = collect(topology, sample_s=0.0)
            lag = report.end_to_end_s("gz")
            if lag is not None:
                samples.append(lag)
                max_lag_s = max(max_lag_s, lag)
            progress(
                f"t={len(samples):>4}s txns={workload.stats.transactions} rows={workload.stats.rows}\n"
                + render_table(report)
            )
            worker.join(1.0)
    except KeyboardInterrupt:
        progress("demo: interrupted, stopping the workload")
        stop.stop("interrupt")
        worker.join()
    finally:
        workload.close()
    progress("demo: load done; waiting for gz to catch up ...")
    caught_up = _wait_caught_up(topology, timeout_s=120.0)
    progress("demo: verifying the gz replica and caches against the bj master ...")
    verify = _verify(box)
    samples.sort()
    report_out: dict[str, Any] = {
        "ok": bool(caught_up and verify["ok"] and workload.stats.transactions > 0),
        "transactions": workload.stats.transactions,
        "rows": workload.stats.rows,
        "workload_errors": workload.stats.errors,
        "lag_s": {
            "max": round(max_lag_s, 3),
            "p50": round(samples[len(samples) // 2], 3) if samples else None,
            "samples": len(samples),
        },
        "caught_up": caught_up,
        "verify": verify,
    }
    progress(
        f"demo: {workload.stats.transactions} transactions, max lag {max_lag_s:.3f} s, "
        f"verify {'identical' if verify['ok'] else 'DIFFERENT'}"
    )
    return report_out


def _wait_caught_up(topology: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    last: LagReport | None = None
    while time.monotonic() < deadline:
        last = collect(topology, sample_s=0.0)
        if last.caught_up():
            return True
        time.sleep(0.5)
    _log.warning("demo_not_caught_up", report=last.as_dict() if last else None)
    return False
