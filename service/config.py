"""Settings: the only module that reads the environment (DESIGN §5)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_RETRY_SCHEDULE = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)


class Settings(BaseSettings):
    """Every knob of the service, from environment variables, with local defaults."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", frozen=True)

    database_url: str = "sqlite+aiosqlite:///./data/contact-deletion.db"
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_topic_prefix: str = ""
    kafka_partitions: int = Field(default=6, ge=1)
    kafka_consumer_group_prefix: str = "contact-deletion"
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)
    public_base_url: str | None = None

    log_format: Literal["json", "console"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    rate_limit_per_s: float = Field(default=50.0, gt=0)
    rate_limit_burst: int = Field(default=100, ge=1)
    max_body_bytes: int = 1024 * 1024

    webhook_retry_schedule: str = ",".join(str(s) for s in DEFAULT_RETRY_SCHEDULE)
    webhook_timeout_s: float = Field(default=15.0, gt=0)
    webhook_connect_timeout_s: float = Field(default=5.0, gt=0)
    webhook_allow_private_networks: bool = False
    webhook_secret_overlap_s: int = Field(default=24 * 3600, ge=0)
    webhook_disable_after_s: int = Field(default=5 * 24 * 3600, ge=0)
    webhook_max_in_flight_per_endpoint: int = Field(default=4, ge=1)

    audit_hash_key: SecretStr | None = None
    data_dir: Path = Path("./data")

    relay_batch_size: int = Field(default=500, ge=1)
    relay_poll_interval_s: float = Field(default=0.05, gt=0)
    worker_batch_size: int = Field(default=200, ge=1)
    expand_page_size: int = Field(default=1000, ge=1)
    idempotency_ttl_s: int = Field(default=24 * 3600, ge=1)
    kafka_replication_factor: int = Field(default=1, ge=1)
    # How fast the group notices a member that died (kill -9, a lost host): its partitions
    # move after this many ms without a heartbeat. 6 s is the broker's minimum
    # (group.min.session.timeout.ms); aiokafka's default is 10 s. Heartbeats every 1 s.
    kafka_session_timeout_ms: int = Field(default=6000, ge=1000)
    kafka_heartbeat_interval_ms: int = Field(default=1000, ge=100)
    # How long a SQLite writer waits for a lock another process holds before the error
    # (SQLITE_BUSY, transient: retried with back-off) reaches the caller.
    sqlite_busy_timeout_ms: int = Field(default=30_000, ge=0)
    # Longest back-off between retries of a transient error (database or broker down).
    retry_max_backoff_s: float = Field(default=5.0, gt=0)

    # Fault injection for the crash tests: a named point at which the process kills
    # itself with SIGKILL (e.g. "worker_after_db_commit", "relay_after_publish").
    failpoint: str | None = None

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _schedule_is_seconds(cls, value: str) -> str:
        parts = [p.strip() for p in value.split(",") if p.strip()]
        if not parts:
            raise ValueError("must list at least one delay in seconds")
        for p in parts:
            if not p.isdigit():
                raise ValueError(f"not a whole number of seconds: {p!r}")
        return ",".join(parts)

    @cached_property
    def retry_schedule(self) -> tuple[int, ...]:
        """The webhook retry schedule in seconds, first attempt first."""
        return tuple(int(p) for p in self.webhook_retry_schedule.split(","))

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def topic(self, name: str) -> str:
        """The full name of a topic, with the configured prefix."""
        return f"{self.kafka_topic_prefix}{name}"
