"""Topic names: one place, so every stage and `wmb lag` agree on them."""

from __future__ import annotations


def changes_topic(source: str, prefix: str = "") -> str:
    """Change events of one source (all its databases); partitioned by the ordering scope."""
    return f"{prefix}wmb.{source}.changes"


def capture_checkpoint_topic(source: str) -> str:
    """Compacted; the capturer's position, written in the same Kafka transaction as the events."""
    return f"wmb.{source}.checkpoint"


def relay_checkpoint_topic() -> str:
    """Compacted, in the destination cluster; key ``route|topic|partition`` -> next source offset."""
    return "wmb.relay.checkpoint"


def relay_checkpoint_key(src_dc: str, dst_dc: str, topic: str, partition: int) -> bytes:
    """Key of one relay checkpoint record; the value is ``{"next_offset": N}`` (next source offset)."""
    return f"{src_dc}:{dst_dc}|{topic}|{partition}".encode()


def control_topic() -> str:
    """Runtime commands for the daemons of one datacenter (route pause/resume/throttle)."""
    return "wmb.control"


def dead_letter_topic(dc: str) -> str:
    """Poison messages of one datacenter, with the reason and the original offset in headers."""
    return f"wmb.{dc}.dlq"


# Consumer groups: offsets are committed after each durable write, for monitoring (`wmb lag` and
# Kafka's own kafka-consumer-groups.sh); the daemons resume from their own checkpoints, not from these.


def relay_group(src_dc: str, dst_dc: str) -> str:
    """On the *source* cluster: how far the relay into ``dst_dc`` has shipped."""
    return f"wmb-relay-{src_dc}-{dst_dc}"


def cache_group(dc: str) -> str:
    """On ``dc``'s cluster: how far the cache updater has applied to Redis."""
    return f"wmb-cache-{dc}"


def apply_group(dc: str) -> str:
    """On ``dc``'s cluster: how far the replica applier has committed."""
    return f"wmb-apply-{dc}"


# Loop marking (the applier writes it, the capturer reads it).  Every replica transaction the applier
# commits writes one row of ``<state schema>.wmb_apply_marker`` first; applied DDL carries a comment.
# A capturer reading such a database (after a failover, or in a two-way setup) drops those
# transactions, so applied changes are never shipped again as new ones.

APPLIER_MARKER_TABLE = "wmb_apply_marker"
APPLIER_DDL_MARKER = "/* wmb:applier */"


def is_applier_marker_table(table: str) -> bool:
    """True for the applier's marker table, in whatever schema it lives."""
    return table.strip("`").lower() == APPLIER_MARKER_TABLE


def is_applier_ddl(sql: str) -> bool:
    """True if a DDL statement seen in a binlog was applied by a wmb applier."""
    return APPLIER_DDL_MARKER in sql
