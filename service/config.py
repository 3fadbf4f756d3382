"""Settings: the only module that reads the environment (DESIGN §5)."""

from __future__ import annotations

import ipaddress
import os
import re
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_RETRY_SCHEDULE = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
# The shortest AUDIT_HASH_KEY accepted: 32 characters (the generated one is 64 hex digits).
MIN_AUDIT_HASH_KEY_CHARS = 32

_HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")
_TOPIC_CHARS = re.compile(r"[A-Za-z0-9._-]*")
# Fields whose value a settings error must not repeat (a secret, or a URL with a password).
_SECRET_FIELDS = frozenset({"audit_hash_key", "database_url"})


class StartupError(Exception):
    """A process cannot start as configured: ``str()`` is one line for the operator, saying
    what to change; the command prints it and exits with 2 (never a traceback)."""


class SettingsError(StartupError):
    """A setting from the environment is invalid: ``str()`` is one line for the operator,
    naming each environment variable and what is wrong with it."""


def load_settings() -> Settings:
    """The settings from the environment; an invalid one raises :class:`SettingsError`
    (one line naming the variable, e.g. ``HTTP_PORT='abc': not an integer``)."""
    try:
        return Settings()
    except ValidationError as exc:
        raise SettingsError(describe_settings_error(exc)) from None


def describe_settings_error(exc: ValidationError) -> str:
    """A pydantic error on Settings as one line, by environment variable (upper case)."""
    parts = []
    for err in exc.errors(include_url=False):
        field = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        if not field:  # a model check: its message names the variables itself
            parts.append(msg)
            continue
        name = field.upper()
        if field in _SECRET_FIELDS or not isinstance(err.get("input"), str | int | float):
            parts.append(f"{name}: {msg}")
        else:
            parts.append(f"{name}={err['input']!r}: {msg}")
    return "invalid setting: " + "; ".join(parts)


def normalise_database_url(url: str) -> str:
    """The SQLAlchemy async URL of a database URL as operators write it.

    ``postgres://`` and ``postgresql://`` (any ``+driver``) mean PostgreSQL through asyncpg;
    ``sqlite:///path`` means SQLite through aiosqlite. Anything else raises ValueError
    saying what is accepted.
    """
    url = url.strip()
    scheme, sep, rest = url.partition("://")
    accepted = (
        "use postgresql://user:password@host:5432/name (postgres:// and "
        "postgresql+asyncpg:// work too) or sqlite:///path/to/file.db"
    )
    if not sep:
        raise ValueError(f"not a database URL: {accepted}")
    backend, _, driver = scheme.lower().partition("+")
    if backend in ("postgres", "postgresql"):
        if driver not in ("", "asyncpg"):
            raise ValueError(f"PostgreSQL is reached through asyncpg, not {driver}: {accepted}")
        if not rest.split("/", 1)[0].rpartition("@")[2]:
            raise ValueError(f"names no host: {accepted}")
        return f"postgresql+asyncpg://{rest}"
    if backend == "sqlite":
        if driver not in ("", "aiosqlite"):
            raise ValueError(f"SQLite is reached through aiosqlite, not {driver}: {accepted}")
        if not rest.startswith("/"):
            raise ValueError(f"an SQLite URL has three slashes and a path: {accepted}")
        return f"sqlite+aiosqlite://{rest}"
    raise ValueError(f"unknown database {backend!r}: {accepted}")


def default_data_dir() -> Path:
    """Where local state lives when DATA_DIR is not set, whatever the current directory:
    ``data/`` of the source checkout the package runs from (a clone after ``make
    install``), else ``$XDG_DATA_HOME/contact-deletion`` (``~/.local/share/...``)."""
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "service").is_dir():
        return checkout / "data"
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "contact-deletion"


def sqlite_url(path: Path) -> str:
    """The SQLAlchemy URL of an SQLite file."""
    return f"sqlite+aiosqlite:///{path}"


class Settings(BaseSettings):
    """Every knob of the service, from environment variables, with local defaults."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", frozen=True)

    # Default: <data_dir>/contact-deletion.db (an absolute path; see default_data_dir).
    database_url: str = ""
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_topic_prefix: str = ""
    kafka_partitions: int = Field(default=6, ge=1)
    kafka_consumer_group_prefix: str = "contact-deletion"
    # How often a relay, worker or dispatcher process asks whether the broker answers, to
    # say when it stops and when it is back (service.watch), seconds.
    kafka_watch_interval_s: float = Field(default=5.0, gt=0, le=3600)
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)
    # When set, the process also serves GET /healthz, /readyz and /metrics (nothing else) on
    # HTTP_HOST:OPS_PORT: the probes and counters of a relay, worker or dispatcher run apart.
    ops_port: int | None = Field(default=None, ge=0, le=65535)
    public_base_url: str | None = None

    log_format: Literal["json", "console"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    rate_limit_per_s: float = Field(default=50.0, gt=0)
    rate_limit_burst: int = Field(default=100, ge=1)
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)

    webhook_retry_schedule: str = ",".join(str(s) for s in DEFAULT_RETRY_SCHEDULE)
    webhook_timeout_s: float = Field(default=15.0, gt=0)
    webhook_connect_timeout_s: float = Field(default=5.0, gt=0)
    webhook_allow_private_networks: bool = False
    webhook_secret_overlap_s: int = Field(default=24 * 3600, ge=0)
    # 0 is refused: it would disable an endpoint at its first failed attempt, before any retry.
    webhook_disable_after_s: int = Field(default=5 * 24 * 3600, ge=1)
    webhook_max_in_flight_per_endpoint: int = Field(default=4, ge=1)
    # Deliveries a dispatcher claims ahead per endpoint: what the endpoint takes in this
    # many seconds (or in two sender passes, if longer) at its max_in_flight and fastest
    # recent latency (at least twice its max_in_flight, at most WEBHOOK_CLAIM_AHEAD_MAX),
    # so that one claim and one recording transaction cover many deliveries, and a buffer
    # lasts while a pass waits for SQLite's writer. At most a quarter of the ownership lease.
    webhook_claim_ahead_s: float = Field(default=0.5, gt=0, le=10)
    webhook_claim_ahead_max: int = Field(default=2000, ge=1, le=10_000)
    # Finished attempts are recorded together, at the latest this long after the first
    # of them ended (or as soon as WEBHOOK_CLAIM_AHEAD_MAX of them are waiting). Each
    # recording is a transaction with a fixed cost: at 0.05 s it was a tenth of the
    # sender's CPU per delivery (issue 8); a webhook is sent no later for it.
    webhook_group_commit_s: float = Field(default=0.2, gt=0, le=5)
    # While the fan-out is idle and caught up (each partition it owns read to its end), an
    # event the outbox published before then with no delivery for an endpoint that took it
    # was lost unseen (its topic deleted and created again: no gap shows): checked at most
    # this often, over the rows published since the last check (the first: the last
    # 24 hours), and its deliveries are made (service.webhooks.refanout.LostEvents). 0: never.
    webhook_lost_events_check_s: float = Field(default=300.0, ge=0)

    audit_hash_key: SecretStr | None = None
    data_dir: Path = Field(default_factory=default_data_dir)

    # Outbox rows per relay pass, at most: one read, one publish and one mark each. Unset:
    # `relay_batch` (1,000 on PostgreSQL, 500 on SQLite, as `worker_batch`).
    relay_batch_size: int | None = Field(default=None, ge=1)
    relay_poll_interval_s: float = Field(default=0.05, gt=0)
    # How long the relay's producer lets a batch wait for more records (Kafka linger.ms).
    # 0: a pass enqueues its whole batch before the sender runs, so the records still
    # share requests; waiting longer would only add to every event's latency (issue 8).
    relay_linger_ms: int = Field(default=0, ge=0, le=1000)
    # The largest record the relay's producer sends (Kafka max.request.size, bytes); a
    # larger outbox row is set aside as refused (MessageSizeTooLargeError), never sent.
    # Keep it at or below the broker's message.max.bytes (1,048,588 by default).
    relay_max_request_size: int = Field(default=1024 * 1024, ge=1024)
    # Messages per worker transaction, at most: larger batches amortise the statements
    # and commits. Unset: `worker_batch`. At most 10,000: a batch's ids are bound three
    # times in one statement, under the databases' limit of 32,766 bound values.
    worker_batch_size: int | None = Field(default=None, ge=1, le=10_000)
    # A filter/search job turns its matches into items this many at a time, and only while
    # fewer than `expand_ahead_max` of its items wait for deletion: the pipeline stays fed
    # without a million-contact job queueing a million messages at once.
    expand_page_size: int = Field(default=2000, ge=1)
    expand_ahead_max: int = Field(default=10_000, ge=1)
    # Worker batches in flight at once in one worker process, each in its own transaction:
    # while one holds its job row and the audit chain head to commit, the next one reads,
    # deletes and writes its items (PostgreSQL; SQLite's one writer runs them in turn).
    # Offsets are still committed in batch order, each after its batch's commit. 1 = one
    # batch at a time.
    worker_concurrency: int = Field(default=2, ge=1, le=8)
    # While the worker is idle and caught up (each partition it owns read to its end, the
    # outbox holding nothing unpublished), a job created before that with an item pending
    # on one of its partitions waits for a command that was lost unseen (the topic deleted
    # and created again: the broker drops the group's offsets with it, so no gap shows):
    # checked at most this often, those commands are written again, at most once an hour
    # per job (service.deletion.backstop). 0: never.
    worker_lost_work_check_s: float = Field(default=300.0, ge=0)
    idempotency_ttl_s: int = Field(default=24 * 3600, ge=1)
    kafka_replication_factor: int = Field(default=1, ge=1)
    # How fast the group notices a member that died (kill -9, a lost host): its partitions
    # move after this many ms without a heartbeat. 6 s is the broker's minimum
    # (group.min.session.timeout.ms); aiokafka's default is 10 s. Heartbeats every 1 s.
    # Kafka requires the heartbeat interval below the session timeout (typically at most a
    # third of it): a larger one is refused at start-up (`_kafka_timings`).
    kafka_session_timeout_ms: int = Field(default=6000, ge=1000)
    kafka_heartbeat_interval_ms: int = Field(default=1000, ge=100)
    # How long a SQLite writer waits for a lock another process holds before the error
    # (SQLITE_BUSY, transient: retried with back-off; the API's 503 database_busy) reaches
    # the caller. Also about how long the API takes to answer while another process holds
    # the lock (SQLAlchemy's 30 s default made that 32 s in a trial).
    sqlite_busy_timeout_ms: int = Field(default=5_000, ge=0)
    # Bounds on every wait on the database (service.db.Timeouts), in seconds: opening a
    # PostgreSQL connection (and pinging a pooled one; asyncpg's default is 60 s), one
    # PostgreSQL statement's answer (0: none), a connection from the pool. A database that
    # stops answering without refusing (paused, a black-holed network) is then a transient
    # `database_timeout` within these, not a hang.
    database_connect_timeout_s: float = Field(default=5.0, gt=0)
    database_statement_timeout_s: float = Field(default=30.0, ge=0)
    database_pool_timeout_s: float = Field(default=10.0, gt=0)
    # Longest back-off between retries of a transient error (database or broker down).
    retry_max_backoff_s: float = Field(default=5.0, gt=0)

    # Erasure (DESIGN "Erasure"): at most this long after deletions commit, SQLite's WAL is
    # checkpointed and truncated, or PostgreSQL's touched tables are vacuumed; runs are
    # also at least this far apart, which is what bounds their cost.
    erasure_delay_s: float = Field(default=30.0, gt=0, le=3600)
    # PostgreSQL: "full" rewrites the touched tables (VACUUM FULL: no byte of a deleted row
    # is left in the relation files, at the price of a short exclusive lock per table);
    # "plain" only marks the space reusable (no lock, but stale bytes can stay in free
    # space until overwritten); "off" leaves it to autovacuum.
    erasure_pg_vacuum: Literal["full", "plain", "off"] = "full"
    # How long a vacuum waits for its table lock before giving up until the next run.
    erasure_lock_timeout_s: float = Field(default=2.0, gt=0)

    # Retention (service.retention, run by the relay's process): published outbox rows and
    # finished webhook deliveries (with their attempts) are deleted after this long; the
    # audit trail, jobs and items are kept. The outbox default is Kafka's default topic
    # retention (7 days): an event no longer in Kafka has nothing left to recover it from.
    outbox_retention_s: int = Field(default=7 * 24 * 3600, ge=3600)
    webhook_delivery_retention_s: int = Field(default=30 * 24 * 3600, ge=3600)
    retention_interval_s: float = Field(default=3600.0, gt=0)

    # Fault injection for the crash tests: a named point at which the process kills
    # itself with SIGKILL (e.g. "worker_after_db_commit", "relay_after_publish").
    failpoint: str | None = None

    @model_validator(mode="after")
    def _local_paths(self) -> Settings:
        # Relative paths are anchored once, here, so that no later `cd` changes them.
        object.__setattr__(self, "data_dir", self.data_dir.expanduser().resolve())
        if not self.database_url:
            db_file = self.data_dir / "contact-deletion.db"
            object.__setattr__(self, "database_url", sqlite_url(db_file))
        return self

    @property
    def sqlite_path(self) -> Path | None:
        """The database file when the database is SQLite (None for :memory: or PostgreSQL)."""
        return sqlite_file(self.database_url)

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

    @field_validator("log_level", "log_format", "erasure_pg_vacuum", mode="before")
    @classmethod
    def _any_case(cls, value: object, info: ValidationInfo) -> object:
        # LOG_LEVEL=debug, LOG_FORMAT=JSON: the choices are case-insensitive words.
        if not isinstance(value, str):
            return value
        value = value.strip()
        return value.upper() if info.field_name == "log_level" else value.lower()

    @field_validator("database_url")
    @classmethod
    def _database_driver(cls, value: str) -> str:
        return normalise_database_url(value) if value.strip() else ""

    @field_validator("http_host")
    @classmethod
    def _host_syntax(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("must be an IP address or a host name (e.g. 127.0.0.1, 0.0.0.0)")
        try:
            ipaddress.ip_address(value)
        except ValueError:
            # Digits and dots only but no address (999.1.1.1, 10.0.0): a mistyped address,
            # never a host name (RFC 1123 §2.1: a top-level label is not all-numeric).
            if all(c.isdigit() or c == "." for c in value) or not _HOST_NAME.fullmatch(value):
                raise ValueError(
                    "not an IP address or a host name (e.g. 127.0.0.1, 0.0.0.0, localhost)"
                ) from None
        return value

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _servers(cls, value: str) -> str:
        servers = [s.strip() for s in value.split(",") if s.strip()]
        if not servers:
            raise ValueError("must list at least one broker as host:port")
        for server in servers:
            host, sep, port = server.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"not host:port (a port from 1 to 65535): {server!r}")
        return ",".join(servers)

    @field_validator("kafka_topic_prefix")
    @classmethod
    def _topic_prefix(cls, value: str) -> str:
        # Kafka's topic names: ASCII letters, digits, '.', '_' and '-', at most 249 of them
        # (org.apache.kafka.common.internals.Topic); the longest name we add is 27.
        if not _TOPIC_CHARS.fullmatch(value) or len(value) > 200:
            raise ValueError(
                "may hold only ASCII letters, digits, '.', '_' and '-' (at most 200 of them)"
            )
        return value

    @field_validator("kafka_consumer_group_prefix")
    @classmethod
    def _group_prefix(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError(
                "must not be empty: it names the consumer groups (<prefix>.worker, "
                "<prefix>.dispatcher) whose committed offsets say what was consumed"
            )
        return value

    @field_validator("public_base_url")
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip()
        if not value.startswith(("http://", "https://")) or len(value.split("://", 1)[1]) < 1:
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("audit_hash_key")
    @classmethod
    def _hash_key_length(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        if len(value.get_secret_value()) < MIN_AUDIT_HASH_KEY_CHARS:
            raise ValueError(
                f"is too short: at least {MIN_AUDIT_HASH_KEY_CHARS} characters "
                "(e.g. `openssl rand -hex 32`)"
            )
        return value

    @model_validator(mode="after")
    def _kafka_timings(self) -> Settings:
        # Kafka: heartbeat.interval.ms "must be set lower than session.timeout.ms, but
        # typically should be set no higher than 1/3 of that value" (consumer configs).
        if self.kafka_heartbeat_interval_ms >= self.kafka_session_timeout_ms:
            raise ValueError(
                f"KAFKA_HEARTBEAT_INTERVAL_MS ({self.kafka_heartbeat_interval_ms}) must be "
                f"below KAFKA_SESSION_TIMEOUT_MS ({self.kafka_session_timeout_ms}); Kafka "
                "advises at most a third of it"
            )
        return self

    @cached_property
    def retry_schedule(self) -> tuple[int, ...]:
        """The webhook retry schedule in seconds, first attempt first."""
        return tuple(int(p) for p in self.webhook_retry_schedule.split(","))

    def describe_database(self) -> str:
        """The database for a human: the file of SQLite, host and name of PostgreSQL."""
        path = self.sqlite_path
        if path is not None:
            return str(path)
        return _without_password(self.database_url)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def worker_batch(self) -> int:
        """Messages per worker transaction: WORKER_BATCH_SIZE, else 1,000 on PostgreSQL and
        500 on SQLite. Measured (issue 8, back-to-back pairs, 3 receivers): on PostgreSQL
        1,000 (with the relay's 1,000) spent 27 % less service and server CPU per contact
        than 500; on SQLite, whose one writer a transaction holds for its whole length,
        1,000 held the API's and the dispatcher's writes back: the deletions ended later
        (end to end 1,990 against 2,396 contacts/s) for 7 % less CPU in all."""
        if self.worker_batch_size is not None:
            return self.worker_batch_size
        return 500 if self.is_sqlite else 1000

    @property
    def relay_batch(self) -> int:
        """Outbox rows per relay pass: RELAY_BATCH_SIZE, else as `worker_batch`."""
        if self.relay_batch_size is not None:
            return self.relay_batch_size
        return 500 if self.is_sqlite else 1000

    def topic(self, name: str) -> str:
        """The full name of a topic, with the configured prefix."""
        return f"{self.kafka_topic_prefix}{name}"


def sqlite_file(url: str) -> Path | None:
    """The file of an SQLite URL, absolute (None for :memory: or another backend)."""
    if not url.startswith("sqlite"):
        return None
    _, _, rest = url.partition(":///")
    rest = rest.split("?", 1)[0]
    if not rest or rest == ":memory:" or "mode=memory" in url:
        return None
    return Path(rest).expanduser().resolve()


def _without_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}@{host}" if user else f"{scheme}://{host}"
