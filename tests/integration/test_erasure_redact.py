"""`erasure redact`: an address kept in timeline text after its contact's deletion (both databases).

A new user's trial (trial 9) deleted a contact without ``redact_timeline``: its note still
held the address, `erasure check` answered FOUND with a hint to wait for the scrub (which
never removes a live row), and nothing in the service could complete the erasure. Now the
check names the remedy and `contact-deletion erasure redact` cuts the address out of every
timeline item that holds it (any case; a live contact's note too: an address names one
person), writes one audit event per workspace, and scrubs; names and phone numbers are
left (they may be someone else's).
"""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest

from service.app import Services
from service.audit.store import load_hash_key, verify_workspace
from service.config import Settings
from service.erasure.check import ErasureCheck
from service.erasure.timeline import redact_address
from tests.components import COMMAND
from tests.conftest import Tenant, components_running, make_settings
from tests.integration.test_erasure import create_person, person


@pytest.fixture
def settings(db_url: str, kafka_bootstrap: str) -> Settings:
    return make_settings(db_url, kafka_bootstrap_servers=kafka_bootstrap)


def _redact(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """`contact-deletion erasure redact` as an operator runs it, with the service's database."""
    return subprocess.run(
        [COMMAND, "erasure", "redact", *args],
        env={"DATABASE_URL": settings.database_url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


async def _timeline_text(tenant: Tenant, contact_id: str) -> str:
    status, body, _ = await tenant.call("GET", f"/v1/audit/contacts/{contact_id}/timeline")
    assert status == 200, body
    return json.dumps(body)


async def test_an_address_kept_in_timeline_text_is_redacted_on_request(
    services: Services, tenant: Tenant, other_tenant: Tenant, settings: Settings
) -> None:
    tag = uuid.uuid4().hex[:8]
    p = person(tag, 1)
    cid = await create_person(tenant, p)
    # A live contact's note naming p (any case), and another workspace's.
    mention = {"body": f"cc {p.email.upper()} on this"}
    for who in (tenant, other_tenant):
        status, other, _ = await who.call(
            "POST", "/v1/contacts", {"email": f"live.{uuid.uuid4().hex[:8]}@example.com"}
        )
        assert status == 201, other
        status, body, _ = await who.call(
            "POST", f"/v1/contacts/{other['data']['id']}/notes", mention
        )
        assert status == 201, body
    async with components_running(services, "relay", "worker"):
        status, body, _ = await tenant.call(
            "POST", "/v1/contacts/bulk-delete", {"contact_ids": [cid]}, {"Prefer": "wait=60"}
        )
        assert status == 200 and body["data"]["status"] == "completed", body

    report = await ErasureCheck(settings, services.db, p.stored).run()
    timeline = next(x for x in report.places if x.place == "live rows: timeline content")
    assert timeline.status == "found" and timeline.detail.startswith("5 "), report.lines()
    assert any("erasure redact" in h for h in report.hints), report.hints
    assert not any("check again" in h for h in report.hints), report.hints

    key = await load_hash_key(services.db, None)
    nowhere = await redact_address(
        settings, services.db, p.stored, key, workspace_id=uuid.uuid4(), dry_run=True
    )
    assert nowhere.items == 0
    dry = await redact_address(
        settings, services.db, p.stored, key, workspace_id=tenant.workspace_id, dry_run=True
    )
    assert dry.items == 4 and dry.scrubbed is None
    assert p.email in await _timeline_text(tenant, cid)  # a dry run changes nothing

    run = _redact(settings, "--email", p.email, "--workspace", str(tenant.workspace_id))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "redacted 4 item(s)" in run.stdout and "scrubbed" in run.stdout, run.stdout
    assert p.email not in run.stdout + run.stderr and p.stored not in run.stdout + run.stderr

    text = await _timeline_text(tenant, cid)
    assert p.email not in text and p.stored not in text and "[redacted email]" in text
    assert p.first in text and p.phone in text  # only the address: names may be others'
    mine = str(tenant.workspace_id)
    report = await ErasureCheck(settings, services.db, p.stored, workspace=mine).run()
    places = {x.place: x.status for x in report.places}
    assert places["live rows: timeline content"] == "not found", report.lines()
    # The other workspace was not asked for: its note still holds it.
    report = await ErasureCheck(settings, services.db, p.stored).run()
    timeline = next(x for x in report.places if x.place == "live rows: timeline content")
    assert timeline.detail.startswith("1 "), report.lines()

    status, body, _ = await tenant.call("GET", "/v1/audit/events?action=timeline.redacted")
    assert status == 200, body
    [event] = body["data"]
    assert event["data"]["timeline_redaction"]["items_redacted"] == 4
    assert event["data"]["timeline_redaction"]["values"] == ["email"]
    assert p.stored not in json.dumps(event)
    assert (await verify_workspace(services.db, tenant.workspace_id)).ok

    again = _redact(settings, "--email", p.email, "--workspace", str(tenant.workspace_id))
    assert again.returncode == 0 and "nothing to redact" in again.stdout, again.stdout
