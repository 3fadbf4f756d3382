"""Settings from the environment: defaults, overrides and refused values (DESIGN §5)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.config import DEFAULT_RETRY_SCHEDULE, Settings

_ENV_VARS = (
    "DATABASE_URL",
    "KAFKA_BOOTSTRAP_SERVERS",
    "KAFKA_TOPIC_PREFIX",
    "HTTP_HOST",
    "HTTP_PORT",
    "WEBHOOK_RETRY_SCHEDULE",
    "WEBHOOK_TIMEOUT_S",
    "WEBHOOK_ALLOW_PRIVATE_NETWORKS",
    "LOG_FORMAT",
    "LOG_LEVEL",
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts from an environment without the service's variables."""
    for name in _ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def test_defaults_are_the_local_ones() -> None:
    settings = Settings()

    assert settings.database_url.startswith("sqlite+aiosqlite:///")
    assert settings.database_url.endswith(".db")
    assert settings.is_sqlite
    assert (settings.http_host, settings.http_port) == ("127.0.0.1", 8080)
    assert settings.kafka_bootstrap_servers == "127.0.0.1:9092"
    assert settings.webhook_allow_private_networks is False
    assert settings.log_format == "json"
    assert settings.log_level == "INFO"


def test_default_retry_schedule_is_the_documented_one() -> None:
    """Immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h."""
    expected = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)

    assert Settings().retry_schedule == expected
    assert expected == DEFAULT_RETRY_SCHEDULE


def test_environment_overrides_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql+asyncpg://u:p@db/contacts")
    monkeypatch.setenv("HTTP_PORT", "9000")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "broker:29092")
    monkeypatch.setenv("WEBHOOK_RETRY_SCHEDULE", "0,5,300")
    monkeypatch.setenv("WEBHOOK_ALLOW_PRIVATE_NETWORKS", "true")
    monkeypatch.setenv("LOG_FORMAT", "console")

    settings = Settings()

    assert settings.database_url == "postgresql+asyncpg://u:p@db/contacts"
    assert not settings.is_sqlite
    assert settings.http_port == 9000
    assert settings.kafka_bootstrap_servers == "broker:29092"
    assert settings.retry_schedule == (0, 5, 300)
    assert settings.webhook_allow_private_networks is True
    assert settings.log_format == "console"


def test_retry_schedule_tolerates_spaces_and_empty_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEBHOOK_RETRY_SCHEDULE", " 1 , 2,,3 ")

    assert Settings().retry_schedule == (1, 2, 3)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("WEBHOOK_RETRY_SCHEDULE", "a,b"),
        ("WEBHOOK_RETRY_SCHEDULE", "5,-1"),
        ("WEBHOOK_RETRY_SCHEDULE", " , "),
        ("LOG_FORMAT", "xml"),
        ("LOG_LEVEL", "TRACE"),
        ("HTTP_PORT", "70000"),
        ("HTTP_PORT", "eighty"),
        ("WEBHOOK_ALLOW_PRIVATE_NETWORKS", "perhaps"),
    ],
)
def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)

    with pytest.raises(ValidationError) as excinfo:
        Settings()

    assert [e["loc"] for e in excinfo.value.errors()] == [(name.lower(),)]


def test_topic_names_carry_the_configured_prefix() -> None:
    assert Settings().topic("deletion.requested") == "deletion.requested"
    assert (
        Settings(kafka_topic_prefix="staging.").topic("deletion.requested")
        == "staging.deletion.requested"
    )
