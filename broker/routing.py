"""Loop prevention and the route headers: pure functions, unit-tested without Kafka.

Every shipped message carries ``wmb-origin`` (the datacenter whose master produced it) and
``wmb-route`` (comma-separated datacenters it has been in, in order).  A relay never ships a message
into a datacenter it has already visited, so a two-way (or ring) topology cannot ping-pong.
"""

from __future__ import annotations

from collections.abc import Sequence

ORIGIN_HEADER = "wmb-origin"
ROUTE_HEADER = "wmb-route"
TS_HEADER = "wmb-ts-ms"

Headers = list[tuple[str, bytes]]


def _get(headers: Sequence[tuple[str, bytes]], name: str) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def visited(headers: Sequence[tuple[str, bytes]], src_dc: str) -> list[str]:
    """Datacenters the message has been in; a message without headers has only been at its source."""
    route = _get(headers, ROUTE_HEADER)
    if route:
        return [dc for dc in route.decode("utf-8", "replace").split(",") if dc]
    origin = _get(headers, ORIGIN_HEADER)
    return [origin.decode("utf-8", "replace")] if origin else [src_dc]


def relay_headers(
    headers: Sequence[tuple[str, bytes]], src_dc: str, dst_dc: str, loop_protection: bool = True
) -> Headers | None:
    """The headers to ship with, or None if shipping to ``dst_dc`` would make a loop.

    Existing headers are copied in order (the codec's own headers pass through untouched); the
    origin is added if missing and the route gets the destination appended.
    """
    origin = _get(headers, ORIGIN_HEADER)
    origin_dc = origin.decode("utf-8", "replace") if origin else src_dc
    path = visited(headers, src_dc)
    if loop_protection and (origin_dc == dst_dc or dst_dc in path):
        return None
    if not path or path[-1] != src_dc:
        path.append(src_dc)  # a route header written before this hop's source: keep the full trail
    path.append(dst_dc)
    out: Headers = [(k, v) for k, v in headers if k != ROUTE_HEADER]
    if origin is None:
        out.append((ORIGIN_HEADER, origin_dc.encode()))
    out.append((ROUTE_HEADER, ",".join(path).encode()))
    return out


def commit_ts_ms(headers: Sequence[tuple[str, bytes]]) -> int | None:
    """Source commit time from the ``wmb-ts-ms`` header, for lag in seconds; None if absent."""
    raw = _get(headers, TS_HEADER)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return None
