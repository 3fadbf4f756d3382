"""API keys: generation, the stored hash, scope validation and what a principal may do."""

from __future__ import annotations

import hashlib
import re
import uuid

import pytest

from service.keys import KEY_PREFIX, SCOPES, Principal, generate_key, hash_key, validate_scopes


def test_generated_keys_carry_the_prefix_and_256_bits_of_url_safe_randomness() -> None:
    key = generate_key()

    assert key.startswith("cdk_")
    body = key.removeprefix(KEY_PREFIX)
    # token_urlsafe(32): 32 random bytes as unpadded URL-safe base64 = 43 characters.
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", body)


def test_generated_keys_are_unique() -> None:
    keys = {generate_key() for _ in range(1000)}

    assert len(keys) == 1000


def test_hash_key_is_the_hex_sha256_of_the_key() -> None:
    key = generate_key()

    digest = hash_key(key)

    assert digest == hashlib.sha256(key.encode()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", digest)


def test_hash_key_is_deterministic_and_never_the_key_itself() -> None:
    key = generate_key()

    assert hash_key(key) == hash_key(key)
    assert hash_key(key) != key
    assert key.removeprefix(KEY_PREFIX) not in hash_key(key)
    assert hash_key(key) != hash_key(generate_key())


def test_validate_scopes_refuses_an_unknown_scope() -> None:
    with pytest.raises(ValueError, match="contacts:nuke"):
        validate_scopes(["contacts:read", "contacts:nuke"])


def test_validate_scopes_refuses_an_empty_list() -> None:
    with pytest.raises(ValueError, match="at least one scope"):
        validate_scopes([])


def test_validate_scopes_deduplicates_and_returns_the_canonical_order() -> None:
    given = ["audit:read", "contacts:read", "audit:read", "contacts:write"]

    assert validate_scopes(given) == ("contacts:read", "contacts:write", "audit:read")
    assert validate_scopes(list(reversed(SCOPES))) == SCOPES


def test_principal_allows_exactly_its_scopes() -> None:
    who = Principal(uuid.uuid4(), uuid.uuid4(), frozenset({"contacts:read"}))

    assert who.allows("contacts:read")
    assert not who.allows("contacts:write")
    assert not who.allows("webhooks:manage")
    assert not who.allows("")
