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
  and for a number stored in international form (``+`` and a country code), also its
  national forms, as people write it at home: the national significant number and the
  national format with its trunk prefix (``+44 20 7946 0018`` is also ``20 7946 0018`` and
  ``020 7946 0018``; ``+1 (555) 010-2031`` also ``(555) 010-2031``), per the ITU-T E.164
  numbering plans of Google's libphonenumber (PyPI ``phonenumbers``);
- names: each name (at least ``MIN_NAME_CHARS`` characters) as a whole word, any case.

The email goes first, so that a name inside the address does not break the address match.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import phonenumbers

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
        forms = phone_forms(contact.get("phone") or "")
        if forms:
            between = r"[\s().\-/]*"
            bodies = "|".join(between.join(re.escape(d) for d in form) for form in forms)
            # An opening bracket before the first digit is part of it: "(555) 010-2031".
            pattern = rf"(?<![\d+])(?:\+{between}|\(\s*)?(?:{bodies})(?!\d)"
            patterns.append(("phone", re.compile(pattern)))
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


def phone_forms(phone: str) -> tuple[str, ...]:
    """The digit strings a stored phone number may be written as, longest first.

    Its own digits; and when it is in international form (a leading ``+``) and valid for
    libphonenumber, its national significant number and the digits of its national
    format (with the trunk prefix, e.g. the ``0`` of ``020 7946 0018``). Forms shorter
    than ``MIN_PHONE_DIGITS`` are left out: too short to redact safely.
    """
    forms = {re.sub(r"\D", "", phone)}
    if phone.strip().startswith("+"):
        try:
            number = phonenumbers.parse(phone, None)
        except phonenumbers.NumberParseException:
            number = None
        if number is not None and phonenumbers.is_possible_number(number):
            forms.add(phonenumbers.national_significant_number(number))
            national = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.NATIONAL)
            forms.add(re.sub(r"\D", "", national))
    return tuple(sorted((f for f in forms if len(f) >= MIN_PHONE_DIGITS), key=len, reverse=True))


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
