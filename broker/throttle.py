"""A token bucket on bytes shipped: the per-route ``max_bytes_per_s`` degradation switch."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """Allows ``rate`` bytes/s on average with bursts up to ``burst_s`` seconds' worth.

    :meth:`charge` takes the bytes already shipped (a relay cannot un-fetch a batch) and returns how
    long to wait before shipping more; the debt is paid by that wait, so the long-run rate holds
    even when one batch is larger than the burst.
    """

    def __init__(self, rate: int | None, burst_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._burst_s = burst_s
        self.rate: int | None = None
        self._tokens = 0.0
        self._at = clock()
        self.set_rate(rate)

    def set_rate(self, rate: int | None) -> None:
        """``None`` or 0 = unlimited."""
        self.rate = rate if rate else None
        self._at = self._clock()
        self._tokens = float(self.rate or 0) * self._burst_s

    def _refill(self) -> None:
        now = self._clock()
        if self.rate is not None:
            cap = self.rate * self._burst_s
            self._tokens = min(cap, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def charge(self, nbytes: int) -> float:
        """Account ``nbytes`` shipped; the seconds to wait before the next batch (0 if none)."""
        if self.rate is None:
            return 0.0
        self._refill()
        self._tokens -= nbytes
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def wait_s(self) -> float:
        """Seconds until the bucket is out of debt."""
        if self.rate is None:
            return 0.0
        self._refill()
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate
