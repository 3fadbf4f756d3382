"""An audit record encoded ahead of its append (`encode_records`) is sealed to the same
event hash as the record appended as it is: `_seal` splices the seq into canonical JSON
encoded beforehand, which must be byte for byte what `event_hash` covers."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from service.audit.chain import GENESIS_HASH, event_hash, format_time
from service.audit.store import AuditRecord, _seal, encode_records

WORKSPACE = uuid.UUID("7d3f1c2e-5b7a-4c1d-9e8f-0a1b2c3d4e5f")
AT = datetime(2026, 11, 30, 6, 40, 1, 250, tzinfo=UTC)


@pytest.mark.parametrize(
    "record",
    [
        AuditRecord(
            workspace_id=WORKSPACE,
            actor={"type": "api_key", "id": "k1"},
            action="contact.deleted",
            target={"type": "contact", "id": str(uuid.uuid4())},
            job_id=str(uuid.uuid4()),
            request_id="req-1",
            data={
                "email_hmac": "ab" * 32,
                "preserved_timeline": {"notes": [{"id": "n", "kind": "note", "at": "x"}]},
                "member_role": None,
            },
            email_hmac="ab" * 32,
            occurred_at=AT,
        ),
        AuditRecord(
            workspace_id=WORKSPACE,
            actor={"type": "system", "id": "worker"},
            action="deletion.completed",
            target=None,
            job_id=None,
            request_id=None,
            data={"message": 'é "quoted" \n ✓', "count": 12345678901234567890},
            occurred_at=AT,
        ),
        AuditRecord(
            workspace_id=WORKSPACE,
            actor={"type": "system", "id": "worker"},
            action="contact.deletion_failed",
            target={"type": "contact", "id": "c"},
            data={},
            occurred_at=AT,
        ),
    ],
)
@pytest.mark.parametrize("seq", [1, 9, 10, 123456789])
def test_an_encoded_record_seals_to_the_hash_of_the_event_it_stands_for(
    record: AuditRecord, seq: int
) -> None:
    encoded = encode_records([record])[0]
    assert encoded.encoded is not None
    event: dict[str, Any] = {
        "seq": seq,
        "id": str(encoded.encoded.id),
        "workspace_id": str(record.workspace_id),
        "occurred_at": format_time(AT),
        "actor": dict(record.actor),
        "action": record.action,
        "target": dict(record.target) if record.target is not None else None,
        "job_id": record.job_id,
        "request_id": record.request_id,
        "data": dict(record.data),
    }
    for prev in (GENESIS_HASH, "f" * 64):
        assert _seal(encoded.encoded, seq, prev) == event_hash(prev, event)
    assert encoded == record  # the encoding is not part of what the record says
