"""Start-up as an operator sees it: the topics are created once, not once per component."""

from __future__ import annotations

import asyncio

from service.config import Settings
from tests.conftest import components_running, opened_services
from tests.logcapture import json_logs


async def test_run_creates_the_topics_once_and_logs_it_once(kafka_settings: Settings) -> None:
    """relay, worker and dispatcher in one process share one topic creation (it used to
    log `kafka_topics_created` three times), and every line is JSON."""
    with json_logs() as logs:
        async with (
            opened_services(kafka_settings) as services,
            components_running(services, "relay", "worker", "dispatcher"),
        ):
            for _ in range(200):
                if logs.events("kafka_topics_created"):
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)  # the other components are past their start by now
    created = logs.events("kafka_topics_created")
    assert len(created) == 1, created
    assert kafka_settings.topic("contact.deletion-requested") in created[0]["topics"]
    assert all(isinstance(line, dict) for line in logs.all())
