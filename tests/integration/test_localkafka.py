"""The real Kafka broker from service.localkafka, and the typed aiokafka wrapper against it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import selectors
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from service.faults import is_transient, producer_state_lost
from service.kafka import (
    Consumer,
    InMessage,
    KafkaUnavailable,
    OutMessage,
    Producer,
    ensure_topics,
    kafka_reachable,
    read_topics,
)
from service.localkafka import LocalKafka, broker_answers
from service.procs import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def _consume(consumer: Consumer, count: int, timeout_s: float = 20.0) -> list[InMessage]:
    """Poll until ``count`` messages arrived (or fail after ``timeout_s``)."""
    received: list[InMessage] = []
    deadline = time.monotonic() + timeout_s
    while len(received) < count:
        assert time.monotonic() < deadline, f"only {len(received)} of {count} messages arrived"
        received.extend(await consumer.getmany(timeout_ms=500, max_records=100))
    return received


async def test_message_round_trips_with_key_value_and_headers(kafka_bootstrap: str) -> None:
    """What is produced is consumed unchanged, and a committed offset is not read again."""
    topic, group = _unique("roundtrip"), _unique("group")
    await ensure_topics(kafka_bootstrap, [topic], partitions=1)
    await ensure_topics(kafka_bootstrap, [topic], partitions=1)  # already there: no error

    producer = Producer(kafka_bootstrap)
    await producer.start()
    try:
        sent = OutMessage(topic, b"contact-1", b'{"a": 1}', (("ce_type", b"x"), ("n", b"")))
        await producer.send_many([sent])
    finally:
        await producer.stop()

    consumer = Consumer(kafka_bootstrap, [topic], group)
    await consumer.start()
    try:
        [got] = await _consume(consumer, 1)
        assert (got.topic, got.partition, got.offset) == (topic, 0, 0)
        assert (got.key, got.value, got.headers) == (sent.key, sent.value, sent.headers)
        await consumer.commit({(got.topic, got.partition): got.offset + 1})
    finally:
        await consumer.stop()

    again = Consumer(kafka_bootstrap, [topic], group)
    await again.start()
    try:
        assert await again.getmany(timeout_ms=1500, max_records=10) == []
    finally:
        await again.stop()


async def test_a_producer_whose_sequence_the_broker_refuses_is_replaced(
    kafka_bootstrap: str,
) -> None:
    """After a broker restart loses batches in flight, the broker refuses the idempotent
    producer's next sequence number (OutOfOrderSequenceNumber) and would refuse it forever
    (aiokafka issue #1017): that send fails as transient, and the caller's resend goes
    through on a new producer. The desynchronised sequence is injected into the client's
    real state (a gap of 5), the refusal is the real broker's."""
    topic = _unique("sequence")
    await ensure_topics(kafka_bootstrap, [topic], partitions=1)
    producer = Producer(kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_many([OutMessage(topic, b"k", b"first")])
        inner = producer._started()
        inner._txn_manager.increment_sequence_number(TopicPartition(topic, 0), 5)
        with pytest.raises(KafkaUnavailable) as refused:
            await producer.send_many([OutMessage(topic, b"k", b"second")])
        assert is_transient(refused.value) and producer_state_lost(refused.value)
        await producer.send_many([OutMessage(topic, b"k", b"second")])  # the caller's retry
        assert producer._started() is not inner
        await producer.send_many([OutMessage(topic, b"k", b"third")])
    finally:
        await producer.stop()

    got = [m.value async for m in read_topics(kafka_bootstrap, [topic])]
    assert got == [b"first", b"second", b"third"]


def _open_clients() -> set[int]:
    """The aiokafka producers and consumers of this process not closed yet (by id)."""
    kinds = (AIOKafkaProducer, AIOKafkaConsumer)
    return {id(o) for o in gc.get_objects() if isinstance(o, kinds) and o._closed is False}


async def _stop_while_it_connects(
    client: Producer | Consumer, connecting: asyncio.Task[None]
) -> None:
    """Stop ``client`` while ``connecting`` (its start, or a send replacing its client) is
    under way in another task: that task fails as transient and leaves no client open."""
    await asyncio.sleep(0)  # the task is now waiting on the broker
    await client.stop()
    with pytest.raises(KafkaUnavailable):
        await connecting


async def test_a_client_stopped_while_it_starts_keeps_none_open(
    kafka_bootstrap: str,
) -> None:
    """A component stopping while its producer or consumer still connects (another task's start)
    closes what that start opens: no client outlives its owner (an unclosed one leaked
    its connections and warned at collection)."""
    before = _open_clients()
    producer = Producer(kafka_bootstrap)
    await _stop_while_it_connects(producer, asyncio.create_task(producer.start()))
    consumer = Consumer(kafka_bootstrap, [_unique("stopped-starting")], _unique("group"))
    await _stop_while_it_connects(consumer, asyncio.create_task(consumer.start()))
    assert _open_clients() - before == set()


async def test_a_producer_stopped_while_a_send_replaces_its_client_keeps_none_open(
    kafka_bootstrap: str,
) -> None:
    """The same for the replacement of a client whose sequence the broker refused (a batch
    under way in a worker's task when the worker stops): the send fails as transient, the
    new client is closed, and the stopped producer opens no other."""
    topic = _unique("stopped-replacing")
    await ensure_topics(kafka_bootstrap, [topic], partitions=1)
    before = _open_clients()
    producer = Producer(kafka_bootstrap)
    await producer.start()
    await producer.send_many([OutMessage(topic, b"k", b"first")])
    producer._started()._txn_manager.increment_sequence_number(TopicPartition(topic, 0), 5)
    with pytest.raises(KafkaUnavailable):
        await producer.send_many([OutMessage(topic, b"k", b"second")])
    replacing = asyncio.create_task(producer.send_many([OutMessage(topic, b"k", b"second")]))
    await _stop_while_it_connects(producer, replacing)
    with pytest.raises(KafkaUnavailable):  # stopped: no new client for a late send
        await producer.send_many([OutMessage(topic, b"k", b"third")])
    assert _open_clients() - before == set()


async def test_send_many_puts_each_key_where_the_default_partitioner_does_in_order(
    kafka_bootstrap: str,
) -> None:
    """Records are batched per partition by the producer itself: each lands in the partition
    aiokafka's DefaultPartitioner picks for its key, in the order given (also across the
    several batches a small batch size forces), headers intact; a keyless one lands too."""
    topics = [_unique("batched-a"), _unique("batched-b")]
    await ensure_topics(kafka_bootstrap, topics, partitions=5)
    keys = [str(uuid.uuid4()).encode() for _ in range(40)]
    sent = [
        OutMessage(topics[i % 2], keys[i % 40], f"{i}".encode() * 20, (("ce_type", b"t"),))
        for i in range(400)
    ]
    sent.append(OutMessage(topics[0], None, b"keyless"))
    producer = Producer(kafka_bootstrap, max_batch_size=1024)
    await producer.start()
    try:
        await producer.send_many(sent)
    finally:
        await producer.stop()

    got = [m async for m in read_topics(kafka_bootstrap, topics)]
    assert sorted(m.value for m in got) == sorted(m.value for m in sent)
    partitioner = DefaultPartitioner()
    for m in got:
        if m.key is not None:
            assert m.partition == partitioner(m.key, list(range(5)), list(range(5)))
            assert m.headers == (("ce_type", b"t"),)
    for topic in topics:
        for key in keys:
            order = [m.value for m in sent if m.topic == topic and m.key == key]
            arrived = sorted(
                (m for m in got if m.topic == topic and m.key == key), key=lambda m: m.offset
            )
            assert [m.value for m in arrived] == order
    assert max(m.offset for m in got) > 20  # many records per partition: several batches


async def test_seek_to_committed_rereads_an_uncommitted_batch(kafka_bootstrap: str) -> None:
    """A failed batch is read again from the last commit, without restarting the consumer."""
    topic = _unique("retry")
    await ensure_topics(kafka_bootstrap, [topic], partitions=1)
    producer = Producer(kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_many([OutMessage(topic, b"k", str(i).encode()) for i in range(3)])
    finally:
        await producer.stop()

    consumer = Consumer(kafka_bootstrap, [topic], _unique("group"))
    await consumer.start()
    try:
        first = await _consume(consumer, 3)
        assert [m.value for m in first] == [b"0", b"1", b"2"]

        await consumer.seek_to_committed()  # nothing committed yet: back to the start
        assert [m.offset for m in await _consume(consumer, 3)] == [0, 1, 2]

        await consumer.commit({(topic, 0): 1})
        await consumer.seek_to_committed()
        assert [m.offset for m in await _consume(consumer, 2)] == [1, 2]
    finally:
        await consumer.stop()


async def test_kafka_reachable_tells_a_broker_from_a_closed_port(kafka_bootstrap: str) -> None:
    """A running broker answers; a closed port says no within the timeout."""
    assert await kafka_reachable(kafka_bootstrap)
    started = time.monotonic()
    assert not await kafka_reachable(f"127.0.0.1:{free_port()}", timeout_s=2.0)
    assert time.monotonic() - started < 3.0


# --- process lifetime ------------------------------------------------------------------------


def _gone(pid: int) -> bool:
    """The process no longer runs (a zombie awaiting its reaper counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pid: int, timeout_s: float, bootstrap: str | None = None) -> bool:
    """Wait until the process is gone and, if given, nothing listens on ``bootstrap``.

    A killed JVM's main thread can show as a zombie while its other threads still exit and
    still hold the listening socket, hence the second condition.
    """
    deadline = time.monotonic() + timeout_s
    while not _gone(pid) or (bootstrap is not None and _answers(bootstrap)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _answers(bootstrap: str) -> bool:
    host, port = bootstrap.rsplit(":", 1)
    return broker_answers(host, int(port), timeout_s=0.5)


def _read_ready_line(runner: subprocess.Popen[str], timeout_s: float, log: Path) -> str:
    assert runner.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(runner.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if selector.select(timeout=0.5):
                line = runner.stdout.readline()
                if line.startswith("READY "):
                    return line.strip()
                if not line:
                    break
    raise AssertionError(f"no READY line; runner said:\n{log.read_text(errors='replace')}")


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, int]]:
    """``python -m service.localkafka`` started and ready: (process, bootstrap, broker pid)."""
    log = tmp_path / "runner.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service.localkafka",
                "--port",
                str(free_port()),
                "--data-dir",
                str(tmp_path / "kafka"),
            ],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            cwd=REPO_ROOT,
        )
    broker_pid: int | None = None
    try:
        ready = _read_ready_line(process, 90.0, log)
        _, bootstrap, pid_field = ready.split()
        broker_pid = int(pid_field.removeprefix("pid="))
        yield process, bootstrap, broker_pid
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        assert process.stdout is not None
        process.stdout.close()
        if broker_pid is not None and not _gone(broker_pid):  # never leak a broker
            with contextlib.suppress(ProcessLookupError):
                os.kill(broker_pid, signal.SIGKILL)


@pytest.mark.slow
def test_sigterm_to_the_runner_stops_the_broker(
    runner: tuple[subprocess.Popen[str], str, int],
) -> None:
    """SIGTERM makes `python -m service.localkafka` stop its broker and exit cleanly."""
    process, bootstrap, broker_pid = runner
    assert _answers(bootstrap)
    assert not _gone(broker_pid)

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    assert _wait_gone(broker_pid, 5.0, bootstrap)


@pytest.mark.slow
def test_sigkill_of_the_runner_also_ends_the_broker(
    runner: tuple[subprocess.Popen[str], str, int],
) -> None:
    """The broker never outlives its parent, even one killed with SIGKILL (PDEATHSIG)."""
    process, bootstrap, broker_pid = runner
    assert _answers(bootstrap)

    process.kill()
    process.wait(timeout=10)
    assert _wait_gone(broker_pid, 15.0, bootstrap), "the broker survived its parent"


@pytest.mark.slow
def test_start_then_stop_leaves_no_process_and_no_temp_dir() -> None:
    """LocalKafka without a data dir cleans up after itself."""
    kafka = LocalKafka(port=free_port())
    kafka.start()
    pid, data_dir = kafka.pid, kafka.data_dir
    try:
        assert pid is not None and data_dir is not None
        assert not _gone(pid)
        assert broker_answers(kafka.host, kafka.port)
    finally:
        kafka.stop()
    assert _wait_gone(pid, 5.0, kafka.bootstrap)
    assert not data_dir.exists()
    assert kafka.pid is None
    kafka.stop()  # idempotent


def _thread_names(pid: int) -> list[str]:
    tasks = Path(f"/proc/{pid}/task")
    return sorted((task / "comm").read_text().strip() for task in tasks.iterdir())


@pytest.mark.slow
def test_the_broker_jit_compiles_with_c1_alone_and_collects_on_one_thread() -> None:
    """A local broker lives for a session: C2's optimising compiles were most of its CPU
    per contact in the bench (service.localkafka.JVM_OPTIONS). Its JVM has no C2
    compiler thread and none of G1's collector threads, and serves requests all the
    same."""
    kafka = LocalKafka(port=free_port())
    kafka.start()
    try:
        assert kafka.pid is not None
        names = _thread_names(kafka.pid)
        assert any(name.startswith("C1 CompilerThre") for name in names), names
        assert not [name for name in names if name.startswith(("C2 ", "G1 "))], names
        assert not [name for name in names if name.startswith("GC Thread#")], names
        assert broker_answers(kafka.host, kafka.port)
    finally:
        kafka.stop()
