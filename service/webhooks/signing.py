"""Standard Webhooks signing: endpoint secrets, the signature header, the delivery headers.

A delivery is signed as the Standard Webhooks specification says, so that a receiver can
verify it with any library that implements it (e.g. PyPI ``standardwebhooks``)::

    webhook-signature: v1,<base64 HMAC-SHA256(key, "{webhook-id}.{webhook-timestamp}.{body}")>

where ``key`` is the endpoint secret ``whsec_<base64>`` decoded from base64. While a secret
is being rotated both the new and the old one are live, and the header carries one
signature per secret, space-separated, so a receiver holding either one verifies.

Pure functions; nothing here does I/O.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import secrets as _secrets
from collections.abc import Sequence

# The Standard Webhooks prefix of a secret, not a secret itself.
SECRET_PREFIX = "whsec_"  # noqa: S105
SECRET_BYTES = 32
SIGNATURE_VERSION = "v1"


def generate_secret() -> str:
    """A new endpoint secret: ``whsec_`` and the base64 of 32 random bytes."""
    raw = _secrets.token_bytes(SECRET_BYTES)
    return SECRET_PREFIX + base64.b64encode(raw).decode("ascii")


@functools.lru_cache(maxsize=1024)
def secret_bytes(secret: str) -> bytes:
    """The HMAC key of an endpoint secret: the base64 after ``whsec_``, decoded.

    The prefix is optional, as in the reference libraries. Raises ValueError when the
    rest is not strict base64 or decodes to nothing; the message never repeats the secret.
    Decoded once per secret (a sender signs every delivery of an endpoint with it).
    """
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded, validate=True)
    except binascii.Error as exc:
        raise ValueError("webhook secret is not valid base64 after the 'whsec_' prefix") from exc
    if not key:
        raise ValueError("webhook secret is empty")
    return key


@functools.lru_cache(maxsize=1024)
def _keyed(secret: str) -> hmac.HMAC:
    """An HMAC-SHA256 with the secret's key absorbed and nothing else: copied per
    message (`sign`), so the key is hashed once per secret, not once per delivery."""
    return hmac.new(secret_bytes(secret), digestmod=hashlib.sha256)


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One signature, ``v1,<base64 HMAC-SHA256 of "{msg_id}.{timestamp}." + body>``."""
    # A copy of the keyed HMAC, not the one-shot ``hmac.digest``: that one releases the
    # GIL on every call, and in a process whose database threads want it (aiosqlite)
    # taking it back cost ~50-80 us of the event loop's time per delivery, against ~1 us
    # this way (issue 8). An update releases it only for messages of 2 KiB or more.
    mac = _keyed(secret).copy()
    mac.update(f"{msg_id}.{timestamp}.".encode())
    mac.update(body)
    return f"{SIGNATURE_VERSION},{base64.b64encode(mac.digest()).decode('ascii')}"


def signature_header(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: one signature per live secret, space-separated.

    Give the current secret first, then the previous one while a rotation overlaps.
    """
    if not secrets:
        raise ValueError("at least one live secret is needed to sign a delivery")
    return " ".join(sign(secret, msg_id, timestamp, body) for secret in secrets)


def webhook_headers(
    secrets: Sequence[str],
    msg_id: str,
    timestamp: int,
    body: bytes,
    user_agent: str,
) -> dict[str, str]:
    """Every header of one delivery attempt.

    ``msg_id`` is the event id (the same on every retry, so receivers can dedupe);
    ``timestamp`` is the unix time in seconds of this attempt.
    """
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature_header(secrets, msg_id, timestamp, body),
        "Content-Type": "application/json",
        "User-Agent": user_agent,
    }


def email_sha256(email: str) -> str:
    """The hex SHA-256 of an email address, stripped and lowercased.

    This is what travels in ``contact.deleted`` instead of the address: a receiver that
    already knows the address computes the same digest and matches it, and nobody else
    learns it. The normalisation is part of that contract; changing it breaks matching.
    """
    return hashlib.sha256(email.strip().lower().encode("utf-8")).hexdigest()
