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
import pymysql
import redis

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


PROBE_USER_ID = 2**63  # above any id the workload hands out


class LagProbe:
    """End-to-end lag as a user sees it: write a value on the bj master, time its arrival in gz.

    Every ``interval_s`` it stamps the probe user's ``bio`` with the current time, then polls the gz
    replica and the gz Redis cache until that exact value shows up.  Both clocks are this process's,
    so the numbers need no clock sync and include every hop: binlog, capture, Kafka, link, relay,
    applier and cache updater.
    """

    def __init__(self, state: dict[str, Any], topology: Any, interval_s: float = 0.5) -> None:
        master, replica = state["processes"]["bj-mariadb"], state["processes"]["gz-mariadb"]
        self._master = pymysql.connect(host=master["host"], port=master["port"], user="root", autocommit=True)
        self._replica = pymysql.connect(
            host=replica["host"], port=replica["port"], user="root", autocommit=True
        )
        self._redis = redis.Redis.from_url(topology.dc("gz").redis.url)
        self._interval_s = interval_s
        self.replica_s: list[float] = []
        self.cache_s: list[float] = []
        self.lost = 0
        with self._master.cursor() as cur:
            cur.execute(
                "INSERT IGNORE INTO app.users VALUES (%s, 'probe', 'probe@example.com', 'probe', NOW(6))",
                (PROBE_USER_ID,),
            )

    def _replica_value(self) -> str | None:
        with self._replica.cursor() as cur:
            cur.execute("SELECT bio FROM app.users WHERE id = %s", (PROBE_USER_ID,))
            row = cur.fetchone()
        return str(row[0]) if row else None

    def _cache_value(self) -> str | None:
        raw = self._redis.hget(f"user:{PROBE_USER_ID}", "bio")
        return raw.decode() if isinstance(raw, bytes) else None

    def run(self, stop: StopToken, duration_s: float) -> None:
        began = time.monotonic()
        while not stop.stopped and time.monotonic() - began < duration_s:
            value = f"probe {time.time_ns()}"
            with self._master.cursor() as cur:
                cur.execute("UPDATE app.users SET bio = %s WHERE id = %s", (value, PROBE_USER_ID))
            written = time.monotonic()
            seen_replica = seen_cache = False
            while not (seen_replica and seen_cache) and time.monotonic() - written < 10.0:
                if not seen_replica and self._replica_value() == value:
                    self.replica_s.append(time.monotonic() - written)
                    seen_replica = True
                if not seen_cache and self._cache_value() == value:
                    self.cache_s.append(time.monotonic() - written)
                    seen_cache = True
                time.sleep(0.002)
            self.lost += (not seen_replica) + (not seen_cache)
            stop.wait(max(0.0, self._interval_s - (time.monotonic() - written)))

    def summary(self) -> dict[str, Any]:
        def stats(xs: list[float]) -> dict[str, Any]:
            xs = sorted(xs)
            if not xs:
                return {"samples": 0}
            return {
                "samples": len(xs),
                "p50_s": round(xs[len(xs) // 2], 3),
                "p99_s": round(xs[min(len(xs) - 1, int(len(xs) * 0.99))], 3),
                "max_s": round(xs[-1], 3),
            }

        return {
            "replica": stats(self.replica_s),
            "cache": stats(self.cache_s),
            "not_arrived_in_10s": self.lost,
        }

    def close(self) -> None:
        self._master.close()
        self._replica.close()
        self._redis.close()


def run_demo(box: Sandbox, duration_s: float, rate_per_s: float, progress: Any) -> dict[str, Any]:
    """Run the workload for ``duration_s``, redraw the lag table every second, wait for gz, verify."""
    state = box.load_state()
    topology = box.topology()
    stop = StopToken()
    workload = SocialWorkload(state["processes"]["bj-mariadb"], rate_per_s)
    worker = threading.Thread(target=workload.run, args=(stop, duration_s), name="workload", daemon=True)
    probe = LagProbe(state, topology)
    prober = threading.Thread(target=probe.run, args=(stop, duration_s), name="lag-probe", daemon=True)
    progress(f"demo: {rate_per_s:.0f} txn/s on the bj master for {duration_s:.0f} s")
    began = time.monotonic()
    worker.start()
    prober.start()
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
                f"t={time.monotonic() - began:5.1f}s txns={workload.stats.transactions} "
                f"rows={workload.stats.rows}\n" + render_table(report)
            )
            worker.join(1.0)
    except KeyboardInterrupt:
        progress("demo: interrupted, stopping the workload")
        stop.stop("interrupt")
        worker.join()
    finally:
        prober.join()
        workload.close()
        probe.close()
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
        # As `wmb lag` reported it each second (heartbeat ages, per hop) ...
        "lag_table_s": {
            "max": round(max_lag_s, 3),
            "p50": round(samples[len(samples) // 2], 3) if samples else None,
            "samples": len(samples),
        },
        # ... and as a reader in gz saw it: write on bj, time until the value is in gz.
        "end_to_end_s": probe.summary(),
        "caught_up": caught_up,
        "verify": verify,
    }
    e2e = report_out["end_to_end_s"]
    progress(
        f"demo: {workload.stats.transactions} transactions; bj->gz end to end: replica p50 "
        f"{e2e['replica'].get('p50_s')} s max {e2e['replica'].get('max_s')} s, cache p50 "
        f"{e2e['cache'].get('p50_s')} s max {e2e['cache'].get('max_s')} s; "
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
