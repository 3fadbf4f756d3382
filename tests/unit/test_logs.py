"""Log set-up as an operator meets it: one format, no colour codes in files, no start-up noise."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from service.logs import configure_logging, get_logger


class Captured:
    """stderr as pytest captures it: not a terminal, as when logs go to a file."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def getvalue(self) -> str:
        return self.capsys.readouterr().err


@pytest.fixture
def stderr(capsys: pytest.CaptureFixture[str]) -> Iterator[Captured]:
    capsys.readouterr()
    yield Captured(capsys)
    configure_logging("json", "WARNING")


def test_console_format_writes_no_colour_codes_when_stderr_is_not_a_terminal(
    stderr: Captured,
) -> None:
    configure_logging("console", "INFO")
    get_logger("test").info("something_happened", job_id="j1")
    text = stderr.getvalue()
    assert "something_happened" in text and "job_id=j1" in text
    assert "\x1b[" not in text


def test_kafka_coordinator_lookups_are_quiet_but_other_warnings_are_json_lines(
    stderr: Captured,
) -> None:
    configure_logging("json", "INFO")
    coordinator = logging.getLogger("aiokafka.consumer.group_coordinator")
    coordinator.error("Group Coordinator Request failed: %s", "[Error 15] NotAvailable")
    coordinator.warning("Marking the coordinator dead (node %s)for group %s.", 1, "g")
    logging.getLogger("aiokafka.conn").warning("Unable to connect to %s", "127.0.0.1:9")
    lines = [json.loads(line) for line in stderr.getvalue().splitlines()]
    assert [(line["event"], line["level"], line["logger"]) for line in lines] == [
        ("Unable to connect to 127.0.0.1:9", "warning", "aiokafka.conn")
    ]


def test_at_debug_the_coordinator_lookups_are_kept(stderr: Captured) -> None:
    configure_logging("json", "DEBUG")
    logging.getLogger("aiokafka.consumer.group_coordinator").warning(
        "Marking the coordinator dead (node %s)for group %s.", 1, "g"
    )
    assert "Marking the coordinator dead" in stderr.getvalue()


def test_retriable_broker_errors_that_aiokafka_retries_itself_are_warnings(
    stderr: Captured,
) -> None:
    """A partition's leader moving is a passing broker state: a warning, not an error line
    (the schemathesis run fails on any error line); a real error stays an error."""
    configure_logging("json", "INFO")
    fetcher = logging.getLogger("aiokafka.consumer.fetcher")
    fetcher.error("Failed fetch offsets from %s: %s", 1, "[Error 6] NotLeaderForPartitionError: tp")
    fetcher.error("Unexpected error in fetcher routine: %s", "boom")
    lines = [json.loads(line) for line in stderr.getvalue().splitlines()]
    assert [line["level"] for line in lines] == ["warning", "error"]


def test_lines_go_to_the_stderr_of_the_moment_not_the_one_configured_with(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import io
    import sys

    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    configure_logging("json", "INFO")
    first.close()  # e.g. a test's capture that ended
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    get_logger("test").info("after_the_swap", job_id="j2")
    logging.getLogger("aiokafka").warning("a library warning")
    lines = [json.loads(line) for line in second.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["after_the_swap", "a library warning"]
    configure_logging("json", "WARNING")


def test_a_librarys_repeated_warning_is_written_once_per_window_with_a_count() -> None:
    """aiokafka retrying a broker that is down wrote the same two ERROR lines ~2,300 times
    a second (1.3 GB an hour). A library's warning or error repeated word for word is
    written once per window, the next one after it with the count; another message, an
    INFO line and our own events are never held back."""
    from service.logs import REPEAT_WINDOW_S, _RepeatsCollapsed

    now = [0.0]
    collapse = _RepeatsCollapsed(clock=lambda: now[0])

    def record(name: str, level: int, msg: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, msg, args, None)

    def written(r: logging.LogRecord) -> bool:
        return collapse.filter(r)

    node = "Unable connect to node with id %s: %s"
    assert written(record("aiokafka", logging.ERROR, node, 1, "refused"))
    assert not any(
        written(record("aiokafka", logging.ERROR, node, 1, "refused")) for _ in range(999)
    )
    assert written(record("aiokafka", logging.ERROR, node, 2, "refused"))  # another node
    assert written(record("aiokafka", logging.INFO, node, 1, "refused"))
    assert all(written(record("service.relay", logging.ERROR, "relay_retrying")) for _ in range(5))
    now[0] += REPEAT_WINDOW_S
    after = record("aiokafka", logging.ERROR, node, 1, "refused")
    assert written(after)
    assert after.getMessage() == "Unable connect to node with id 1: refused (repeated 999 times)"
    assert not written(record("aiokafka", logging.ERROR, node, 1, "refused"))
