"""An operator's bad setting is one line naming the environment variable, exit 2: never a
traceback, whichever command reads it (service.config.load_settings, service.cli.main)."""

from __future__ import annotations

import pytest

from service.cli import main
from service.config import Settings, SettingsError, load_settings

COMMANDS = [
    ["api"],
    ["relay"],
    ["worker"],
    ["dispatcher"],
    ["run"],
    ["migrate"],
    ["dev", "--no-kafka"],
    ["keys", "list"],
    ["audit", "verify"],
    ["erasure", "check", "--email", "someone@example.com"],
]

# (variable, value, what the line must say besides the variable's name)
BAD = [
    ("HTTP_PORT", "abc", "integer"),
    ("HTTP_PORT", "70000", "65535"),
    ("HTTP_HOST", "999.1.1.1", "not an IP address"),
    ("HTTP_HOST", "my host", "not an IP address"),
    ("DATABASE_URL", "garbage", "postgresql://"),
    ("DATABASE_URL", "mysql://u@h/db", "unknown database"),
    ("DATABASE_URL", "postgresql+psycopg2://u:hunter2hunter2@h/db", "asyncpg"),
    ("DATABASE_URL", "sqlite://relative.db", "three slashes"),
    ("KAFKA_BOOTSTRAP_SERVERS", "localhost", "host:port"),
    ("KAFKA_BOOTSTRAP_SERVERS", "h:1,h:99999", "host:port"),
    ("KAFKA_TOPIC_PREFIX", "my topics/", "letters"),
    ("KAFKA_CONSUMER_GROUP_PREFIX", "", "must not be empty"),
    ("KAFKA_CONSUMER_GROUP_PREFIX", "  ", "must not be empty"),
    ("KAFKA_PARTITIONS", "0", "greater than or equal to 1"),
    ("WEBHOOK_DISABLE_AFTER_S", "0", "greater than or equal to 1"),
    ("MAX_BODY_BYTES", "0", "1024"),
    ("RELAY_MAX_REQUEST_SIZE", "100", "1024"),
    ("AUDIT_HASH_KEY", "s3cr3t-s3cr3t", "at least 32"),
    ("PUBLIC_BASE_URL", "example.com", "http"),
    ("LOG_FORMAT", "xml", "json"),
    ("LOG_LEVEL", "verbose", "DEBUG"),
    ("WEBHOOK_ALLOW_PRIVATE_NETWORKS", "perhaps", "boolean"),
    ("ERASURE_PG_VACUUM", "sometimes", "full"),
]


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(("name", "value", "says"), BAD, ids=[f"{n}={v!r}" for n, v, _ in BAD])
def test_a_bad_value_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
    value: str,
    says: str,
) -> None:
    monkeypatch.setenv(name, value)

    assert main(["api"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("contact-deletion: error: invalid setting: "), line
    assert name in line and says in line, line
    assert name.lower() not in line.replace(name, ""), line  # the variable, not the field
    if name in ("AUDIT_HASH_KEY", "DATABASE_URL"):  # a secret, or a URL with a password
        assert f"{name}=" not in line and "hunter2" not in line and "s3cr3t" not in line


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(a) for a in COMMANDS])
def test_every_command_answers_a_bad_setting_the_same_way(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    monkeypatch.setenv("HTTP_PORT", "abc")

    assert main(argv) == 2
    assert "HTTP_PORT='abc'" in _one_line(capsys.readouterr().err)


def test_heartbeat_at_or_above_the_session_timeout_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Kafka: heartbeat.interval.ms must be lower than session.timeout.ms."""
    monkeypatch.setenv("KAFKA_SESSION_TIMEOUT_MS", "6000")
    monkeypatch.setenv("KAFKA_HEARTBEAT_INTERVAL_MS", "6000")
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert "KAFKA_HEARTBEAT_INTERVAL_MS (6000)" in str(refused.value)
    assert "KAFKA_SESSION_TIMEOUT_MS (6000)" in str(refused.value)
    monkeypatch.setenv("KAFKA_HEARTBEAT_INTERVAL_MS", "2000")
    assert load_settings().kafka_heartbeat_interval_ms == 2000


def test_choices_are_accepted_in_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOG_LEVEL", "debug")
    monkeypatch.setenv("LOG_FORMAT", "Console")
    monkeypatch.setenv("ERASURE_PG_VACUUM", "PLAIN")
    settings = load_settings()
    assert (settings.log_level, settings.log_format, settings.erasure_pg_vacuum) == (
        "DEBUG",
        "console",
        "plain",
    )


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("postgres://u:p@db:5432/cd", "postgresql+asyncpg://u:p@db:5432/cd"),
        ("postgresql://u@db/cd", "postgresql+asyncpg://u@db/cd"),
        ("PostgreSQL+asyncpg://u@db/cd", "postgresql+asyncpg://u@db/cd"),
        ("sqlite:////var/lib/cd.db", "sqlite+aiosqlite:////var/lib/cd.db"),
        ("sqlite:///:memory:", "sqlite+aiosqlite:///:memory:"),
        ("sqlite+aiosqlite:///cd.db", "sqlite+aiosqlite:///cd.db"),
    ],
)
def test_database_urls_as_operators_write_them_are_normalised(
    monkeypatch: pytest.MonkeyPatch, given: str, used: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", given)
    assert load_settings().database_url == used


def test_batch_sizes_default_by_database_and_a_setting_wins() -> None:
    """1,000 per worker transaction and relay pass on PostgreSQL, 500 on SQLite, whose one
    writer a longer transaction holds from the API and the dispatcher (issue 8 pairs)."""
    pg = Settings(database_url="postgresql+asyncpg://u@127.0.0.1/db")
    lite = Settings(database_url="sqlite+aiosqlite:////tmp/x.db")
    assert (pg.worker_batch, pg.relay_batch) == (1000, 1000)
    assert (lite.worker_batch, lite.relay_batch) == (500, 500)
    tuned = Settings(database_url="sqlite+aiosqlite:////tmp/x.db", worker_batch_size=70)
    assert (tuned.worker_batch, tuned.relay_batch) == (70, 500)
