"""The capture's producer process: errors cross the process boundary intact, and a lost or hung
child becomes a retriable error instead of a hang.  No broker is needed: the child's librdkafka
points at a closed port."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, KafkaException
from kafka import errors as kerr

from binlog_capture.producer_host import RemoteProducer, _error_state, _rebuild
from binlog_capture.sink import is_fenced


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _producer(**conf: object) -> RemoteProducer:
    return RemoteProducer(
        {
            "bootstrap.servers": f"127.0.0.1:{_closed_port()}",
            "transactional.id": "unit-test",
            "log_level": 0,
            **conf,
        }
    )


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


@pytest.mark.parametrize(
    ("code", "fatal", "retriable", "abortable"),
    [
        (KafkaError._FENCED, True, False, False),
        (KafkaError._TIMED_OUT, False, True, False),
        (KafkaError.INVALID_TXN_STATE, False, False, True),
    ],
)
def test_a_kafka_error_keeps_code_and_flags_across_the_process_boundary(
    code: int, fatal: bool, retriable: bool, abortable: bool
) -> None:
    original = KafkaException(
        KafkaError(code, "why", fatal=fatal, retriable=retriable, txn_requires_abort=abortable)
    )
    rebuilt = _rebuild(_error_state(original))
    assert isinstance(rebuilt, KafkaException)
    err = rebuilt.args[0]
    assert (err.code(), err.str(), err.fatal(), err.retriable(), err.txn_requires_abort()) == (
        code,
        "why",
        fatal,
        retriable,
        abortable,
    )
    assert is_fenced(rebuilt) == (code == KafkaError._FENCED)


def test_a_call_that_fails_in_the_child_raises_in_the_parent() -> None:
    producer = _producer()
    try:
        with pytest.raises(KafkaException) as info:
            producer.init_transactions(1.0)  # no broker: the coordinator cannot be found
        assert info.value.args[0].code() == KafkaError._TIMED_OUT
    finally:
        producer.close()
    assert not _alive(producer.pid)


def test_a_failed_produce_is_reported_by_the_commit() -> None:
    producer = _producer()
    try:
        # Before init_transactions a transactional producer refuses every message at once; the
        # commit must report that refusal (not its own complaint about the state).
        producer.produce("t", b"x", b"k", 0)
        with pytest.raises(KafkaException) as info:
            producer.commit_transaction(1.0)
        assert info.value.args[0].code() == KafkaError._STATE
        assert info.value.args[0].str().startswith("Unable to produce message")
    finally:
        producer.close()


def test_a_killed_child_is_a_retriable_error() -> None:
    producer = _producer()
    try:
        os.kill(producer.pid, signal.SIGKILL)
        with pytest.raises(kerr.KafkaTimeoutError, match="producer process lost"):
            producer.begin_transaction()
        assert isinstance(kerr.KafkaTimeoutError(), kerr.RetriableError)
        with pytest.raises(kerr.KafkaTimeoutError):
            producer.produce_many("t", [(b"v", None, 0, None)] * 5000)  # closed: refuses
    finally:
        producer.close()


def test_the_child_ignores_sigterm_and_leaves_on_close() -> None:
    producer = _producer()
    try:
        os.kill(producer.pid, signal.SIGTERM)  # the parent owns the shutdown
        time.sleep(0.3)
        assert _alive(producer.pid)
        assert producer.poll(0) >= 0  # and still serves calls
    finally:
        producer.close()
    assert not _alive(producer.pid)
