"""The broker watch's lines and gauge (service.watch), with a scripted answer and clock.

The real outage (a broker stopped and started under running processes) is in
tests/integration/test_outages.py; here, the rules between the answers: one warning when
the broker stops answering, again every REPEAT_S while it stays down, one line when it is
back, and the gauge.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge

from service.watch import REPEAT_S, BrokerWatch
from tests.logcapture import json_logs


async def test_an_outage_is_said_when_it_starts_while_it_lasts_and_when_it_ends() -> None:
    answers = iter([True, False, False, False, True, True])
    now = [0.0]

    async def probe() -> bool:
        return next(answers)

    registry = CollectorRegistry()
    up = Gauge("dependency_up", "", ["dependency"], registry=registry)
    watch = BrokerWatch(probe, 5.0, ["worker", "relay"], up, clock=lambda: now[0])

    def gauge() -> float | None:
        return registry.get_sample_value("dependency_up", {"dependency": "kafka"})

    with json_logs() as lines:
        for at in (0.0, 5.0, 10.0, 5.0 + REPEAT_S, 70.0 + 1, 80.0):
            now[0] = at
            await watch.check()
            if at == 10.0:
                assert gauge() == 0
    logs = [e for e in lines.all() if e["event"].startswith("dependency_")]
    events = [(e["event"], e.get("down_s")) for e in logs]
    assert events == [
        ("dependency_unavailable", 0.0),
        ("dependency_unavailable", REPEAT_S),
        ("dependency_recovered", 66.0),
    ], events
    assert logs[0]["waiting"] == ["relay", "worker"] and logs[0]["cause"] == "kafka_unavailable"
    assert gauge() == 1
