"""One grammar for every time a client gives (RFC 3339 date-time with an offset): the audit
trail's since/until, recover's since, a filter's created_at, an activity's occurred_at and a
task's due_at. Before, ISO week dates and the basic format were accepted in the first three
and refused in the last two, and a lowercase "z" the other way round (trial 6)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import pytest

from service.apimodels import parse_instant
from tests.conftest import Tenant

ACCEPTED = [
    ("2026-11-30T10:20:30Z", datetime(2026, 11, 30, 10, 20, 30, tzinfo=UTC)),
    ("2026-11-30t10:20:30z", datetime(2026, 11, 30, 10, 20, 30, tzinfo=UTC)),
    ("2026-11-30 10:20:30+01:00", datetime(2026, 11, 30, 9, 20, 30, tzinfo=UTC)),
    ("2026-11-30T10:20Z", datetime(2026, 11, 30, 10, 20, tzinfo=UTC)),
    ("2026-11-30T10:20:30.123456789Z", datetime(2026, 11, 30, 10, 20, 30, 123456, tzinfo=UTC)),
]
REFUSED = [
    "2026-W48-1T00:00:00Z",  # an ISO week date
    "2026-334T00:00:00Z",  # an ISO ordinal date
    "20261130T000000Z",  # the ISO basic format
    "2026-11-30T10:20:30",  # no offset: a wall-clock time somewhere
    "2026-11-30",  # a date alone
    "2026-13-01T00:00:00Z",  # no month 13
    "1700000000",  # a Unix time
]


@pytest.mark.parametrize(("text", "meant"), ACCEPTED)
def test_rfc3339_date_times_are_read_as_the_instant_they_name(text: str, meant: datetime) -> None:
    assert parse_instant(text) == meant


@pytest.mark.parametrize("text", REFUSED)
def test_other_iso_8601_forms_are_refused_with_an_example(text: str) -> None:
    with pytest.raises(ValueError, match="2024-05-01T12:00:00Z"):
        parse_instant(text)


async def _answers(tenant: Tenant, text: str) -> dict[str, int]:
    """The status of each place a client gives a time, for one spelling of it."""
    status, created, _ = await tenant.call(
        "POST", "/v1/contacts", {"email": f"t-{uuid.uuid4().hex[:8]}@example.com"}
    )
    assert status == 201, created
    contact = created["data"]["id"]
    status, endpoint, _ = await tenant.call(
        "POST", "/v1/webhooks/endpoints", {"url": "http://127.0.0.1:9/hook"}
    )
    assert status == 201, endpoint
    places: dict[str, tuple[str, str, Any]] = {
        "audit since": ("GET", f"/v1/audit/events?since={quote(text)}", None),
        "audit until (POST)": ("POST", "/v1/audit/events/query", {"until": text}),
        "recover since": (
            "POST",
            f"/v1/webhooks/endpoints/{endpoint['data']['id']}/recover",
            {"since": text},
        ),
        "filter created_at": (
            "POST",
            "/v1/contacts/query",
            {"filter": {"created_at": {"$lt": text}}},
        ),
        "occurred_at": (
            "POST",
            f"/v1/contacts/{contact}/activities",
            {"type": "call", "occurred_at": text},
        ),
        "due_at": ("POST", f"/v1/contacts/{contact}/tasks", {"title": "t", "due_at": text}),
    }
    answers = {}
    for name, (method, path, body) in places.items():
        status, answer, _ = await tenant.call(method, path, body)
        answers[name] = status
        if status == 400:
            assert answer["error"]["code"] == "validation_error", answer
    return answers


@pytest.mark.parametrize("text", [t for t, _ in ACCEPTED[:3]] + REFUSED[:4])
async def test_every_place_a_client_gives_a_time_reads_it_alike(tenant: Tenant, text: str) -> None:
    answers = await _answers(tenant, text)
    assert len({s // 100 for s in answers.values()}) == 1, answers
    assert {s // 100 for s in answers.values()} == ({4} if text in REFUSED else {2}), answers
