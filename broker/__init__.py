"""The cross-datacenter relay: remote consume over the WAN, local produce, exactly once.

The relay runs in the *destination* datacenter.  It fetches committed change events from the source
cluster (read_committed), copies key, value, headers and partition number into the local cluster,
and commits them in one Kafka transaction together with its per-partition checkpoint.  See
:mod:`broker.relay` for the loop and ``docs/relay.md`` for the guarantees.
"""

from broker.settings import RelaySettings

__all__ = ["RelaySettings"]
