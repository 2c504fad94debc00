"""Stage 1: MariaDB/MySQL binlog -> Kafka, exactly once (see :mod:`binlog_capture.daemon`)."""

from binlog_capture.daemon import CaptureDaemon
from binlog_capture.settings import CaptureSettings

__all__ = ["CaptureDaemon", "CaptureSettings"]
