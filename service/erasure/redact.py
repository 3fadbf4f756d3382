"""The ``redact_timeline`` option: a deleted contact's values cut out of the text it leaves.

The timeline (activities, notes, tasks) survives its contact by design, and its text may
name the contact. With ``redact_timeline`` the worker replaces, inside the text fields of
the items it preserves, the contact's email address, phone number and first and last name
by a marker saying what stood there (``[redacted email]`` ...). What was redacted (which
kinds of value, how many items and fields) goes into the ``contact.deleted`` audit event;
the values themselves go nowhere.

Matching (pure, no I/O):

- email: the address, any letter case;
- phone: its digits (at least ``MIN_PHONE_DIGITS``) in order, whatever separators
  (spaces, dots, dashes, brackets) stand between them, with or without a leading ``+``;
- names: each name (at least ``MIN_NAME_CHARS`` characters) as a whole word, any case.

The email goes first, so that a name inside the address does not break the address match.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MIN_PHONE_DIGITS = 6
MIN_NAME_CHARS = 2

# The text fields of each timeline kind that redaction rewrites.
TEXT_FIELDS: dict[str, tuple[str, ...]] = {
    "activity": ("subject", "body"),
    "note": ("body",),
    "task": ("title", "body"),
}


@dataclass(frozen=True)
class Redactor:
    """The patterns of one contact's values, in the order they are applied."""

    patterns: tuple[tuple[str, re.Pattern[str]], ...]

    @classmethod
    def of(cls, contact: Mapping[Any, Any]) -> Redactor:
        """The redactor of a contact row (``email``, ``phone``, ``first_name``, ``last_name``)."""
        patterns: list[tuple[str, re.Pattern[str]]] = []
        email = (contact.get("email") or "").strip()
        if email:
            patterns.append(("email", re.compile(re.escape(email), re.IGNORECASE)))
        digits = re.sub(r"\D", "", contact.get("phone") or "")
        if len(digits) >= MIN_PHONE_DIGITS:
            between = r"[\s().\-/]*"
            body = between.join(re.escape(d) for d in digits)
            patterns.append(("phone", re.compile(rf"(?<![\d+])(?:\+{between})?{body}(?!\d)")))
        for kind in ("first_name", "last_name"):
            name = (contact.get(kind) or "").strip()
            if len(name) >= MIN_NAME_CHARS:
                patterns.append((kind, re.compile(rf"(?<!\w){re.escape(name)}(?!\w)", re.I)))
        return cls(tuple(patterns))

    def redact(self, text: str) -> tuple[str, frozenset[str]]:
        """The text with every value replaced, and which kinds of value were found."""
        found: set[str] = set()
        for kind, pattern in self.patterns:
            marker = f"[redacted {'name' if kind.endswith('_name') else kind}]"
            text, count = pattern.subn(marker, text)
            if count:
                found.add(kind)
        return text, frozenset(found)

    def redact_item(
        self, kind: str, item: Mapping[Any, Any]
    ) -> tuple[dict[str, str], frozenset[str]]:
        """The changed text fields of one timeline item, and which kinds of value were found."""
        changed: dict[str, str] = {}
        found: set[str] = set()
        for field in TEXT_FIELDS[kind]:
            value = item.get(field)
            if not value:
                continue
            new, kinds = self.redact(value)
            if new != value:
                changed[field] = new
                found |= kinds
        return changed, frozenset(found)


@dataclass
class RedactionSummary:
    """What redaction did to one contact's timeline: kinds, items and fields, never values."""

    items: int = 0
    values: frozenset[str] = frozenset()
    fields: dict[str, int] | None = None

    def add(self, kind: str, changed: Mapping[str, str], values: frozenset[str]) -> None:
        if not changed:
            return
        self.items += 1
        self.values = self.values | values
        fields = self.fields if self.fields is not None else {}
        for name in changed:
            key = f"{TEXT_FIELD_PREFIX[kind]}.{name}"
            fields[key] = fields.get(key, 0) + 1
        self.fields = fields

    def to_audit(self) -> dict[str, Any]:
        """The audit event's ``timeline_redaction`` object."""
        return {
            "items_redacted": self.items,
            "values": sorted(self.values),
            "fields": dict(sorted((self.fields or {}).items())),
        }


TEXT_FIELD_PREFIX = {"activity": "activities", "note": "notes", "task": "tasks"}
