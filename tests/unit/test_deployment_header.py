"""service.deployment.ForeignRecords.mine: what another deployment's records are, and how
often that is said (the end-to-end cases, with two real deployments on a real broker:
tests/integration/test_foreign_records.py)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from service.deployment import DEPLOYMENT_HEADER, LOG_EVERY_S, ForeignRecords
from service.kafka import InMessage
from tests.logcapture import json_logs


def _message(offset: int, stamp: bytes | None, partition: int = 0) -> InMessage:
    headers: tuple[tuple[str, bytes], ...] = (("ce_type", b"contact.deleted"),)
    if stamp is not None:
        headers += ((DEPLOYMENT_HEADER, stamp),)
    return InMessage("t.contact.deleted", partition, offset, b"k", b"{}", headers)


def test_only_records_stamped_by_another_deployment_are_left_out_and_said_once_a_minute() -> None:
    registry = CollectorRegistry()
    counter = Counter("foreign_total", "", ("topic", "case"), registry=registry)
    foreign = ForeignRecords("aaaa", counter, "dispatcher")
    now = [1000.0]
    foreign.clock = lambda: now[0]
    ours = [_message(0, b"aaaa"), _message(1, None)]  # unstamped: read as before
    with json_logs() as lines:
        assert foreign.mine(ours) is ours  # nothing foreign: the same list, no copy
        batch = [_message(2, b"bbbb"), *ours, _message(3, b"bbbb"), _message(4, b"cccc", 1)]
        assert foreign.mine(batch) == ours
        now[0] += LOG_EVERY_S / 2
        assert foreign.mine([_message(5, b"bbbb")]) == []  # counted, said in the next line
        now[0] += LOG_EVERY_S / 2
        assert foreign.mine([_message(6, b"bbbb")]) == []
    said = [
        (line["partition"], line["other_deployment"], line["count"])
        for line in lines.events("foreign_records_skipped")
    ]
    assert said == [(0, "bbbb", 2), (1, "cccc", 1), (0, "bbbb", 2)]
    assert all(
        line["case"] == "another_deployment" for line in lines.events("foreign_records_skipped")
    )
    value = registry.get_sample_value(
        "foreign_total", {"topic": "t.contact.deleted", "case": "another_deployment"}
    )
    assert value == 5
