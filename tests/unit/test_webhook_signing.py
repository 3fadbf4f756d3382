"""Webhook signing, checked against the independent PyPI ``standardwebhooks`` library."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from service.webhooks.signing import (
    email_sha256,
    generate_secret,
    secret_bytes,
    sign,
    signature_header,
    webhook_headers,
)

BODY = json.dumps({"type": "contact.deleted", "data": {"contact_id": "c_1"}}).encode()
MSG_ID = "evt_01HZX3K9V7"


def _headers(secrets: list[str], body: bytes = BODY, msg_id: str = MSG_ID) -> dict[str, str]:
    return webhook_headers(secrets, msg_id, int(time.time()), body, "contact-deletion/test")


def test_a_signed_delivery_verifies_with_the_reference_library() -> None:
    secret = generate_secret()
    headers = _headers([secret])

    assert Webhook(secret).verify(BODY, headers) == json.loads(BODY)


def test_the_signature_matches_the_reference_library_byte_for_byte() -> None:
    secret = generate_secret()
    timestamp = 1_614_265_330
    expected = Webhook(secret).sign(
        MSG_ID, datetime.fromtimestamp(timestamp, tz=UTC), BODY.decode()
    )

    assert sign(secret, MSG_ID, timestamp, BODY) == expected


@pytest.mark.parametrize("size", [0, 1, 2047, 2048, 70_000])
def test_each_delivery_of_one_secret_is_signed_as_the_reference_library_signs_it(
    size: int,
) -> None:
    """One secret signs many bodies (its keyed HMAC is reused: never changed by a
    signature), small and large (large ones are hashed without the GIL)."""
    secret = generate_secret()
    when = datetime.fromtimestamp(1_614_265_330, tz=UTC)
    for n, body in enumerate([b"x" * size, BODY, b"y" * size, BODY]):
        msg_id = f"{MSG_ID}{n}"
        expected = Webhook(secret).sign(msg_id, when, body.decode())
        assert sign(secret, msg_id, 1_614_265_330, body) == expected


def test_the_specification_example_signature() -> None:
    """The worked example of the Standard Webhooks specification."""
    signature = sign(
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1_614_265_330,
        b'{"test": 2432232314}',
    )

    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_a_wrong_secret_does_not_verify() -> None:
    headers = _headers([generate_secret()])

    with pytest.raises(WebhookVerificationError):
        Webhook(generate_secret()).verify(BODY, headers)


def test_during_rotation_the_header_verifies_under_each_live_secret() -> None:
    current, previous = generate_secret(), generate_secret()
    headers = _headers([current, previous])

    assert len(headers["webhook-signature"].split(" ")) == 2
    assert Webhook(current).verify(BODY, headers) == json.loads(BODY)
    assert Webhook(previous).verify(BODY, headers) == json.loads(BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(generate_secret()).verify(BODY, headers)


def test_the_current_secret_signs_first() -> None:
    current, previous = generate_secret(), generate_secret()
    header = signature_header([current, previous], MSG_ID, 1_700_000_000, BODY)

    assert header.split(" ") == [
        sign(current, MSG_ID, 1_700_000_000, BODY),
        sign(previous, MSG_ID, 1_700_000_000, BODY),
    ]


def test_a_changed_body_does_not_verify() -> None:
    secret = generate_secret()
    headers = _headers([secret])
    tampered = BODY.replace(b"c_1", b"c_2")

    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(tampered, headers)


def test_a_changed_webhook_id_or_timestamp_does_not_verify() -> None:
    secret = generate_secret()
    headers = _headers([secret])

    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY, {**headers, "webhook-id": "evt_other"})
    later = str(int(headers["webhook-timestamp"]) + 1)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY, {**headers, "webhook-timestamp": later})


def test_the_delivery_headers() -> None:
    secret = generate_secret()
    headers = webhook_headers([secret], MSG_ID, 1_700_000_000, BODY, "contact-deletion/1.0")

    assert headers == {
        "webhook-id": MSG_ID,
        "webhook-timestamp": "1700000000",
        "webhook-signature": sign(secret, MSG_ID, 1_700_000_000, BODY),
        "Content-Type": "application/json",
        "User-Agent": "contact-deletion/1.0",
    }


def test_signing_needs_at_least_one_secret() -> None:
    with pytest.raises(ValueError, match="at least one"):
        signature_header([], MSG_ID, 1_700_000_000, BODY)


def test_a_secret_is_whsec_and_the_base64_of_32_random_bytes() -> None:
    secret = generate_secret()

    assert re.fullmatch(r"whsec_[A-Za-z0-9+/]{43}=", secret)
    raw = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    assert len(raw) == 32
    assert secret_bytes(secret) == raw
    assert len({generate_secret() for _ in range(100)}) == 100


@pytest.mark.parametrize("bad", ["whsec_not base64!", "whsec_abc", "whsec_", ""])
def test_a_malformed_secret_is_a_value_error(bad: str) -> None:
    with pytest.raises(ValueError):
        secret_bytes(bad)


@pytest.mark.parametrize(
    "address",
    ["alice@example.com", "Alice@Example.COM", "  ALICE@EXAMPLE.COM\n", "\talice@example.com "],
)
def test_email_sha256_is_the_digest_of_the_stripped_lowercased_address(address: str) -> None:
    expected = hashlib.sha256(b"alice@example.com").hexdigest()

    assert email_sha256(address) == expected
    assert email_sha256("bob@example.com") != expected
