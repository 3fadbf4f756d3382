"""The Kafka topics of the service, and creating them at start-up."""

from __future__ import annotations

from service.config import Settings
from service.events import (
    DLQ_SUFFIX,
    TOPIC_CONTACT_DELETED,
    TOPIC_DELETION_REQUESTED,
    TOPIC_JOB_COMPLETED,
)
from service.kafka import ensure_topics


def all_topics(settings: Settings) -> list[str]:
    names = [TOPIC_DELETION_REQUESTED, TOPIC_CONTACT_DELETED, TOPIC_JOB_COMPLETED]
    full = [settings.topic(n) for n in names]
    return full + [t + DLQ_SUFFIX for t in full]


async def create_topics(settings: Settings, *, timeout_s: float = 30.0) -> None:
    """Create every topic that is missing, with the configured partition count; retries
    a broker that does not answer for up to `timeout_s`, then raises KafkaUnavailable."""
    await ensure_topics(
        settings.kafka_bootstrap_servers,
        all_topics(settings),
        settings.kafka_partitions,
        replication_factor=settings.kafka_replication_factor,
        timeout_s=timeout_s,
    )
