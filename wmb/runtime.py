"""Runtime helpers shared by every daemon: stop signals, the metrics/health endpoint, retries."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    stop_never,
    wait_exponential_jitter,
)

from wmb import log

_log = log.get("wmb.runtime")


class StopToken:
    """Set by the first SIGTERM/SIGINT; a second signal exits at once.

    Long-running loops wait on :meth:`wait` (never ``time.sleep``) so a stop is seen immediately.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def install(self) -> StopToken:
        def handler(signum: int, _frame: Any) -> None:
            name = signal.Signals(signum).name
            if self._event.is_set():
                _log.warning("second_signal_exit_now", signal=name)
                os._exit(130)
            _log.info("stop_requested", signal=name)
            self.stop(name)

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        return self

    def stop(self, reason: str = "requested") -> None:
        self.reason = reason
        self._event.set()

    @property
    def stopped(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout_s: float) -> bool:
        """Sleep up to ``timeout_s``; True if a stop was requested."""
        return self._event.wait(timeout_s)


HealthCheck = Callable[[], tuple[bool, dict[str, Any]]]


class MetricsServer:
    """``/metrics`` (Prometheus text format) and ``/health`` (JSON, 200 or 503) on one port."""

    def __init__(
        self,
        port: int,
        health: HealthCheck,
        host: str | None = None,
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        # Loopback unless told otherwise: in a container Prometheus scrapes from another address,
        # so docker-compose.yml and the systemd env file set WMB_METRICS_HOST=0.0.0.0.
        host = host or os.environ.get("WMB_METRICS_HOST") or "127.0.0.1"
        self._health = health
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/metrics"):
                    body, status, ctype = generate_latest(registry), 200, CONTENT_TYPE_LATEST
                elif self.path.startswith("/health"):
                    ok, detail = outer._health()
                    body = orjson.dumps({"ok": ok, **detail}, default=str)
                    status, ctype = (200 if ok else 503), "application/json"
                else:
                    body, status, ctype = b"not found\n", 404, "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)

    def start(self) -> MetricsServer:
        self._thread.start()
        _log.info("metrics_listening", port=self.port)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def io_retry(
    what: str,
    *,
    retry_on: tuple[type[BaseException], ...],
    max_attempts: int | None = None,
    max_elapsed_s: float | None = None,
    initial_s: float = 0.2,
    max_backoff_s: float = 30.0,
    stop: StopToken | None = None,
    on_retry: Callable[[RetryCallState], None] | None = None,
) -> Retrying:
    """Retrying for one I/O edge: exponential backoff with jitter, a log line before each sleep.

    ``max_attempts``/``max_elapsed_s`` are the operator's bound (None = retry forever); past it the
    last exception is re-raised, and the caller turns it into :class:`wmb.errors.GaveUpError`.
    """
    bound: Any = stop_never
    if max_attempts is not None:
        bound = stop_after_attempt(max_attempts)
    if max_elapsed_s is not None:
        bound = (
            bound | stop_after_delay(max_elapsed_s)
            if bound is not stop_never
            else stop_after_delay(max_elapsed_s)
        )

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        _log.warning(
            "io_retry",
            what=what,
            attempt=state.attempt_number,
            sleep_s=round(state.next_action.sleep, 3) if state.next_action else None,
            error=repr(exc),
        )
        if on_retry:
            on_retry(state)

    def sleep(seconds: float) -> None:
        if stop is not None:
            stop.wait(seconds)
        else:
            threading.Event().wait(seconds)

    return Retrying(
        retry=retry_if_exception_type(retry_on),
        wait=wait_exponential_jitter(multiplier=initial_s, max=max_backoff_s),
        stop=bound,
        before_sleep=before_sleep,
        sleep=sleep,
        reraise=True,
    )
