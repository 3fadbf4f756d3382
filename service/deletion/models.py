"""Deletion jobs: the request, the job and item states, and the outcome rules (pure)."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.apimodels import Out, Time, UuidText
from service.contacts.filters import ALL, Node, parse_filter, simplify
from service.contacts.models import Email
from service.errors import ValidationFailed
from service.events import OrphanedTimeline
from service.limits import (
    MAX_FILTER_DEPTH,
    MAX_FILTER_NODES,
    MAX_FILTER_STRING,
    MAX_FILTER_VALUES,
    MAX_IN_VALUES,
    MAX_SEARCH_LENGTH,
    not_null_in_schema,
    refuse_nulls,
)

MAX_IDS = 500
MAX_EMAILS = 1000
DRY_RUN_PAGE = 100
SELECTOR_GROUPS = {
    "contact_ids": "contact_ids",
    "emails": "emails",
    "filter": "filter/search",
    "search": "filter/search",
}
SELECTOR_FIELDS = tuple(SELECTOR_GROUPS)


class JobStatus(enum.StrEnum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    COMPLETED_WITH_ERRORS = "completed_with_errors"
    FAILED = "failed"


class ItemStatus(enum.StrEnum):
    PENDING = "pending"
    DELETED = "deleted"
    NOT_FOUND = "not_found"
    FAILED = "failed"


class ErrorCode(enum.StrEnum):
    SITE_MEMBER = "CANNOT_DELETE_SITE_MEMBERS"
    BILLING = "CANNOT_DELETE_CONTACT_WITH_BILLING_SUBSCRIPTION"
    OWNER_OR_CONTRIBUTOR = "CANNOT_DELETE_MEMBER_OWNER_OR_CONTRIBUTOR"
    AFTER_MEMBER_DELETION = "FAILED_DELETE_CONTACT_AFTER_MEMBER_DELETION"
    FAILED = "FAILED_DELETE_CONTACT"


def _exactly_one_selector(schema: dict[str, Any]) -> None:
    """The selector rule in the document: contact_ids, or emails, or filter/search/match_all."""

    def any_of(*names: str) -> dict[str, Any]:
        return {"anyOf": [{"required": [name]} for name in names]}

    # A selector given as null is refused (refuse_nulls); the document offers real values.
    not_null_in_schema(schema, SELECTOR_FIELDS)
    schema["oneOf"] = [
        {"required": ["contact_ids"], "not": any_of("emails", "filter", "search", "match_all")},
        {"required": ["emails"], "not": any_of("contact_ids", "filter", "search", "match_all")},
        {**any_of("filter", "search", "match_all"), "not": any_of("contact_ids", "emails")},
    ]


class BulkDeleteRequest(BaseModel):
    """POST /v1/contacts/bulk-delete: exactly one selector, and options."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_exactly_one_selector)

    contact_ids: list[uuid.UUID] | None = Field(default=None, min_length=1, max_length=MAX_IDS)
    emails: list[Email] | None = Field(default=None, min_length=1, max_length=MAX_EMAILS)
    filter: dict[str, Any] | None = Field(
        default=None,
        description=f"At most {MAX_FILTER_NODES} conditions and combinations, "
        f"{MAX_FILTER_DEPTH} levels deep, {MAX_FILTER_VALUES} values in all "
        f"({MAX_IN_VALUES} per $in), {MAX_FILTER_STRING} characters a value. A filter "
        "that matches every contact (after simplification: {}, {'$or': [{}]}, "
        "x exists or does not ...), or that selects every contact of the workspace on "
        "today's data, is refused unless match_all is true.",
    )
    search: str | None = Field(default=None, min_length=1, max_length=MAX_SEARCH_LENGTH)
    match_all: bool = Field(
        default=False,
        description="The explicit opt-in to delete every contact: alone, it selects the "
        "whole workspace; with a filter, it allows one that matches every contact.",
    )
    dry_run: bool = False
    delete_members: bool = False
    redact_timeline: bool = Field(
        default=False,
        description=(
            "Replace the deleted contacts' email, phone and first and last name inside the "
            "timeline items (activities, notes, tasks) that survive them; the contact.deleted "
            "audit event records what was redacted, never the values."
        ),
    )
    # Paging of a dry run's `contact_ids` (refused without dry_run).
    dry_run_limit_: int | None = Field(default=None, ge=1, le=1000, alias="dry_run_limit")
    dry_run_cursor: str | None = Field(default=None, min_length=1, max_length=200)

    @property
    def dry_run_limit(self) -> int:
        """Contact ids per page of a dry run (default 100)."""
        return self.dry_run_limit_ if self.dry_run_limit_ is not None else DRY_RUN_PAGE

    @model_validator(mode="before")
    @classmethod
    def _no_null_selector(cls, data: Any) -> Any:
        return refuse_nulls(data, SELECTOR_FIELDS)

    @model_validator(mode="after")
    def _one_selector(self) -> BulkDeleteRequest:
        # ValidationFailed (not ValueError, which pydantic would file under the whole body)
        # so that the 400 names the selector fields at fault.
        if not self.dry_run:
            paging = [
                name
                for name, value in (
                    ("dry_run_limit", self.dry_run_limit_),
                    ("dry_run_cursor", self.dry_run_cursor),
                )
                if value is not None
            ]
            if paging:
                raise ValidationFailed(
                    "the request body is invalid",
                    [{"field": f, "message": "only with dry_run: true"} for f in paging],
                )
        selectors = (self.filter, self.search, self.contact_ids, self.emails)
        if self.match_all and all(s is None for s in selectors):
            self.filter = {}  # every contact, asked for by name
        given = [name for name in SELECTOR_FIELDS if getattr(self, name) is not None]
        chosen = list(dict.fromkeys(SELECTOR_GROUPS[name] for name in given))
        if len(chosen) == 1:
            if self.match_all and chosen[0] != "filter/search":
                raise ValidationFailed(
                    "the request body is invalid",
                    [{"field": "match_all", "message": "match_all goes with filter/search only"}],
                )
            if self.search is None and not self.match_all and self.filter_tree() == ALL:
                # A filter that matches every contact must be asked for by name.
                raise ValidationFailed(
                    "the filter matches every contact; send match_all: true to mean that",
                    [
                        {
                            "field": "filter",
                            "message": "after simplification this filter selects every "
                            'contact; add "match_all": true to delete them all',
                        }
                    ],
                )
            return self
        if not chosen:
            message = "give exactly one selector: contact_ids, emails, or filter/search"
            given = list(SELECTOR_FIELDS)
        else:
            message = f"give exactly one selector, not {' and '.join(chosen)}"
        raise ValidationFailed(
            "the request body is invalid", [{"field": f, "message": message} for f in given]
        )

    def filter_tree(self) -> Node | None:
        """The parsed, simplified filter (raises ValidationFailed naming the bad part)."""
        return simplify(parse_filter(self.filter)) if self.filter is not None else None

    def selector(self) -> dict[str, Any]:
        """The selector as stored on the job, duplicates removed."""
        if self.contact_ids is not None:
            return {"contact_ids": [str(i) for i in dict.fromkeys(self.contact_ids)]}
        if self.emails is not None:
            return {"emails": list(dict.fromkeys(self.emails))}
        selector: dict[str, Any] = {}
        if self.filter is not None:
            selector["filter"] = self.filter
        if self.search is not None:
            selector["search"] = self.search
        if self.match_all:
            selector["match_all"] = True
        return selector


@dataclass(frozen=True)
class Outcome:
    """What deleting one contact does: its item's status and, for a failure, the code and
    a message that names the contact's blocker and the remedy that applies to it (or
    that none does)."""

    status: ItemStatus
    code: ErrorCode | None = None
    message: str | None = None


DELETE = Outcome(ItemStatus.DELETED)
NOT_FOUND = Outcome(ItemStatus.NOT_FOUND)


def _failed(code: ErrorCode, role: str | None, billing: bool) -> Outcome:
    """A failure whose message names what keeps this contact and a remedy only where
    one works: "set delete_members" for a member that nothing else keeps."""
    who = f"the contact is a site {role}" if role is not None else "the contact"
    if billing:
        who += " with a billing subscription" if role is not None else " has a billing subscription"
    rules = []
    if role in ("owner", "contributor"):
        rules.append("site owners and contributors are never deleted")
    if billing:
        rules.append(
            "a contact with a billing subscription is never deleted"
            if role
            else "it is never deleted"
        )
    if not rules:
        return Outcome(ItemStatus.FAILED, code, f"{who}: set delete_members to delete it")
    whatever = ", with or without delete_members" if role is not None else ""
    return Outcome(ItemStatus.FAILED, code, f"{who}: {' and '.join(rules)}{whatever}")


def decide(contact: Mapping[Any, Any] | None, delete_members: bool) -> Outcome:
    """What deleting this contact should do, by the product's rules (DESIGN §3, no I/O).

    A contact with a ``member_role`` fails as a site member unless ``delete_members``;
    one with a billing subscription is never deleted, nor is an owner or a contributor.
    The message names every rule that keeps this contact, so that the remedy it gives is
    one that works (an owner, or a paying member, stays whatever delete_members says).
    """
    if contact is None:
        return NOT_FOUND
    role = contact["member_role"]
    billing = bool(contact["has_billing_subscription"])
    if role is not None and not delete_members:
        return _failed(ErrorCode.SITE_MEMBER, role, billing)
    if billing:
        return _failed(ErrorCode.BILLING, role, billing)
    if role in ("owner", "contributor"):
        return _failed(ErrorCode.OWNER_OR_CONTRIBUTOR, role, billing)
    return DELETE


def final_status(failed: int) -> JobStatus:
    """A finished job's status. (`failed` is kept for a job that could not run at all.)"""
    return JobStatus.COMPLETED_WITH_ERRORS if failed else JobStatus.COMPLETED


# --- Answers ---------------------------------------------------------------------------


class JobError(Out):
    """A contact the job could not delete, and why."""

    contact_id: str
    code: ErrorCode
    message: str


class JobFailure(Out):
    """Why a job ended ``failed``: it could not run at all (for instance, its selection
    could not be expanded). Per-contact failures are in ``errors``, not here."""

    code: ErrorCode
    message: str


class Job(Out):
    """A deletion job (DESIGN §3)."""

    job_id: UuidText
    status: JobStatus
    phase: Literal["finding_contacts", "deleting", "done"] = Field(
        description="finding_contacts: a filter/search job still expanding its matches "
        "(total_requested is what was found so far); deleting; done"
    )
    dry_run: bool
    delete_members: bool
    redact_timeline: bool = Field(
        default=False,
        description="Whether the deleted contacts' values are redacted inside the timeline "
        "items they leave",
    )
    selector: dict[str, Any] = Field(
        description="contact_ids, emails (a count), or filter and/or search"
    )
    total_requested: int = Field(ge=0)
    estimated_total: int | None = Field(
        ge=0,
        description="Filter/search jobs: the matches counted when the job was accepted "
        "(contacts may come and go meanwhile); null for ids and emails",
    )
    processed_count: int = Field(ge=0)
    deleted_count: int = Field(ge=0)
    not_found_count: int = Field(ge=0)
    failed_count: int = Field(ge=0)
    not_found: list[str] = Field(
        description="Ids that matched nothing, and addresses by their place in the request's"
        " `emails` array (`emails[3]`, 0-based), so no address is kept (the first 1000)"
    )
    errors: list[JobError]
    failure: JobFailure | None = Field(
        default=None,
        description="Why the job ended `failed` (it could not run at all); null otherwise",
    )
    created_at: Time
    started_at: Time | None
    completed_at: Time | None


class DryRun(Out):
    """What a real run would do (``dry_run: true``); no job is created, so no job id."""

    dry_run: Literal[True]
    selector: dict[str, Any] = Field(description="As a job would show it")
    would_delete_count: int = Field(ge=0)
    would_fail_count: int = Field(
        ge=0, description="Contacts a real run would refuse (their errors are listed)"
    )
    not_found_count: int = Field(ge=0)
    not_found: list[str] = Field(
        description="Ids that match nothing, and addresses by their place in the request's"
        " `emails` array (`emails[3]`, 0-based), as a job names them (the first 1000)"
    )
    errors: list[JobError]
    orphaned_timeline: OrphanedTimeline = Field(
        description="Timeline items that would lose their back-reference"
    )
    would_redact_count: int = Field(
        ge=0, description="Timeline items whose text would be redacted (redact_timeline)"
    )
    contact_ids: list[UuidText] = Field(
        description="One page of the ids it would delete, sorted (dry_run_limit per page)"
    )
    next_cursor: str | None = Field(
        description="Send back as dry_run_cursor for the next page; null on the last"
    )


class JobItem(Out):
    """One contact's outcome in a job."""

    ref: str = Field(description="The contact id or email asked for")
    contact_id: UuidText | None
    status: ItemStatus
    error_code: ErrorCode | None
    error_message: str | None
    processed_at: Time | None
