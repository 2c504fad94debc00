"""``wmb.topology.Topology`` -> :class:`CaptureSettings` (the only module that reads the topology)."""

from __future__ import annotations

from typing import Any

from binlog_capture.settings import CaptureSettings
from wmb.errors import ConfigError


def from_topology(topology: Any, source_name: str, *, metrics_port: int | None = None) -> CaptureSettings:
    try:
        src = topology.source(source_name)
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"sources.{source_name}: no such source ({exc})") from exc
    dc = topology.dc(src.dc)
    server = topology.server(src.dc, src.server)
    if server.server_id == src.effective_replication_server_id:
        raise ConfigError(
            f"sources.{source_name}.replication_server_id equals the server_id of {src.dc}.{src.server}"
        )
    return CaptureSettings(
        source=source_name,
        origin_dc=src.dc,
        mysql_host=server.host,
        mysql_port=server.port,
        mysql_user=server.user,
        mysql_password=server.password.get_secret_value(),
        kafka_bootstrap=dc.kafka.bootstrap,
        server_id=src.effective_replication_server_id,
        ordering=str(src.ordering.value),  # type: ignore[arg-type]
        partitions=src.partitions,
        include=tuple(src.include),
        exclude=tuple(src.exclude),
        exclude_columns=tuple(src.exclude_columns),
        mask_columns={k: str(v.value) for k, v in src.mask_columns.items()},  # type: ignore[misc]
        heartbeat_interval_s=src.heartbeat_interval_s,
        commit_interval_ms=src.commit_interval_ms,
        commit_max_events=src.commit_max_events,
        compression=str(src.compression.value),  # type: ignore[arg-type]
        epoch=topology.epoch,
        metrics_port=metrics_port,
        start_gtid=src.start.gtid,
        start_file=src.start.file,
        start_pos=src.start.pos,
        reconnect_max_elapsed_s=src.retry_max_elapsed_s,
        kafka_call_timeout_s=src.kafka_call_timeout_s,
        mask_key=src.mask_key.get_secret_value() if src.mask_key is not None else "",
    )
