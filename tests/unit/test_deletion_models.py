"""The pure rules of deletion: selectors and per-contact outcomes."""

from __future__ import annotations

import uuid

import pytest
from aiohttp.test_utils import make_mocked_request

from service.deletion.models import (
    BulkDeleteRequest,
    ErrorCode,
    ItemStatus,
    decide,
    final_status,
)
from service.deletion.routes import prefer_wait
from service.errors import ValidationFailed


def contact(role: str | None = None, billing: bool = False) -> dict[str, object]:
    return {"member_role": role, "has_billing_subscription": billing}


@pytest.mark.parametrize(
    ("role", "billing", "delete_members", "expected"),
    [
        (None, False, False, None),
        (None, True, False, ErrorCode.BILLING),
        ("member", False, False, ErrorCode.SITE_MEMBER),
        ("member", True, False, ErrorCode.SITE_MEMBER),
        ("member", False, True, None),
        ("member", True, True, ErrorCode.BILLING),
        ("owner", False, True, ErrorCode.OWNER_OR_CONTRIBUTOR),
        ("contributor", False, True, ErrorCode.OWNER_OR_CONTRIBUTOR),
        ("owner", False, False, ErrorCode.SITE_MEMBER),
    ],
)
def test_outcome_rules(
    role: str | None, billing: bool, delete_members: bool, expected: ErrorCode | None
) -> None:
    """Each role, billing and delete_members combination gets the product's outcome."""
    outcome = decide(contact(role, billing), delete_members)
    assert outcome.code == expected
    assert outcome.status is (ItemStatus.DELETED if expected is None else ItemStatus.FAILED)


ROLES = (None, "member", "owner", "contributor")
EVERY_CONTACT = [
    (role, billing, dm) for role in ROLES for billing in (False, True) for dm in (False, True)
]


@pytest.mark.parametrize(("role", "billing", "delete_members"), EVERY_CONTACT)
def test_a_blockers_message_names_a_remedy_only_where_it_works(
    role: str | None, billing: bool, delete_members: bool
) -> None:
    """An owner failed with "set delete_members to delete it", which cannot delete an owner:
    a message advises delete_members exactly when the same request with it deletes the
    contact, and names the contact's own role."""
    outcome = decide(contact(role, billing), delete_members)
    if outcome.status is ItemStatus.DELETED:
        assert outcome.message is None
        return
    assert outcome.message
    with_option = decide(contact(role, billing), delete_members=True)
    advises = "set delete_members" in outcome.message
    assert advises == (with_option.status is ItemStatus.DELETED), outcome.message
    if role is not None:
        assert f"site {role}" in outcome.message
    if billing:
        assert "billing subscription" in outcome.message


def test_a_missing_contact_is_not_found_never_an_error() -> None:
    outcome = decide(None, delete_members=True)
    assert outcome.status is ItemStatus.NOT_FOUND
    assert outcome.code is None


def test_final_status_has_errors_only_when_an_item_failed() -> None:
    assert final_status(0) == "completed"
    assert final_status(1) == "completed_with_errors"


def test_duplicates_in_the_selector_count_once() -> None:
    same = uuid.uuid4()
    req = BulkDeleteRequest(contact_ids=[same, same, uuid.uuid4()])
    assert len(req.selector()["contact_ids"]) == 2
    emails = BulkDeleteRequest(emails=["A@x.io", "a@x.io ", "b@x.io"])
    assert emails.selector()["emails"] == ["a@x.io", "b@x.io"]


def test_an_empty_filter_is_refused_rather_than_selecting_everyone() -> None:
    with pytest.raises(ValidationFailed) as caught:
        BulkDeleteRequest(filter={})
    assert caught.value.details[0]["field"] == "filter"


def test_an_empty_filter_with_a_search_is_a_search() -> None:
    assert BulkDeleteRequest(filter={}, search="smith").selector() == {
        "filter": {},
        "search": "smith",
    }


@pytest.mark.parametrize(
    ("prefer", "seconds"),
    [
        ("wait=5", 5.0),
        ('wait="7"', 7.0),  # RFC 7240 §2: a value may be a quoted-string
        ("respond-async, wait=10", 10.0),
        ('handling=lenient; wait = "3"', 3.0),
        ("wait=600", 60.0),
        ("wait=soon", 0.0),
        ("", 0.0),
    ],
)
def test_prefer_wait_reads_tokens_and_quoted_strings(prefer: str, seconds: float) -> None:
    request = make_mocked_request("POST", "/", headers={"Prefer": prefer} if prefer else {})
    assert prefer_wait(request) == seconds
