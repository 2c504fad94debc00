"""Runtime switches for a route: pause, resume, throttle, through the control topic.

The control topic (``wmb.topics.control_topic()``, in the destination cluster) is compacted and
keyed ``<route>|pause`` and ``<route>|throttle``: two independent keys, so a throttle command does
not erase a pause and a restarted relay reads back the latest state of both by reading the topic
from the beginning.  Values are JSON ``{"route": "bj:gz", "cmd": "pause"|"resume"|"throttle",
"max_bytes_per_s": N}``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import orjson

from wmb.errors import ConfigError

COMMANDS = ("pause", "resume", "throttle")


@dataclass(frozen=True)
class ControlCommand:
    route: str
    cmd: str
    max_bytes_per_s: int | None = None

    def __post_init__(self) -> None:
        if self.cmd not in COMMANDS:
            raise ConfigError(f"unknown route command {self.cmd!r}; expected one of {COMMANDS}")
        if self.max_bytes_per_s is not None and self.max_bytes_per_s < 0:
            raise ConfigError("max_bytes_per_s must be >= 0 (0 = unlimited)")

    @property
    def key(self) -> bytes:
        kind = "throttle" if self.cmd == "throttle" else "pause"
        return f"{self.route}|{kind}".encode()

    def to_bytes(self) -> bytes:
        return orjson.dumps({"route": self.route, "cmd": self.cmd, "max_bytes_per_s": self.max_bytes_per_s})

    @classmethod
    def from_bytes(cls, raw: bytes) -> ControlCommand:
        try:
            data: Any = orjson.loads(raw)
            return cls(str(data["route"]), str(data["cmd"]), data.get("max_bytes_per_s"))
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(f"bad control message {raw[:200]!r}: {exc}") from exc


@dataclass(frozen=True)
class RouteState:
    """What the operator asked for; ``max_bytes_per_s=None`` means "use the configured default"."""

    paused: bool = False
    max_bytes_per_s: int | None = None
    throttle_set: bool = False  # a throttle command was seen (0 = explicitly unlimited)

    def apply(self, command: ControlCommand) -> RouteState:
        if command.cmd == "pause":
            return replace(self, paused=True)
        if command.cmd == "resume":
            return replace(self, paused=False)
        return replace(self, max_bytes_per_s=command.max_bytes_per_s or None, throttle_set=True)

    def effective_rate(self, configured: int | None) -> int | None:
        return self.max_bytes_per_s if self.throttle_set else configured
