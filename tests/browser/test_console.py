"""The console at /console and the reference at /docs, used through a real browser.

One flow per user task, as a person would click it, against the running service (real
Kafka, real database of each backend, a real webhook receiver on 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select

from service.db import Database, deletion_jobs
from tests.browser.conftest import (
    ConsoleService,
    Receiver,
    assert_no_console_errors,
    console_errors,
    new_driver,
    shot,
    wait_for,
)

ALL_SCOPES = ("contacts:read", "contacts:write", "webhooks:manage", "audit:read")

pytestmark = pytest.mark.slow


def css(driver: WebDriver, selector: str) -> WebElement:
    return driver.find_element(By.CSS_SELECTOR, selector)


def sign_in(driver: WebDriver, service: ConsoleService, key: str) -> list[str]:
    """Open / (redirected to /console), sign in, return the section names shown."""
    driver.get(service.base + "/")
    assert driver.current_url == service.base + "/console"
    field = wait_for(driver, lambda d: d.find_element(By.ID, "api-key"))
    shot(driver, "sign-in")
    assert_labelled(driver)
    field.send_keys(key + Keys.ENTER)  # the keyboard alone signs in
    wait_for(driver, lambda d: d.find_element(By.ID, "nav").is_displayed())
    # The key is in this tab's session storage only: not in the URL, not in a cookie.
    assert driver.execute_script("return sessionStorage.length") == 1
    assert key not in driver.current_url
    assert driver.get_cookies() == []
    return [a.text for a in driver.find_elements(By.CSS_SELECTOR, "#nav a")]


def go(driver: WebDriver, section: str) -> None:
    click(driver, f"#nav a[data-section={section}]")


def click(driver: WebDriver, selector: str, by: str = By.CSS_SELECTOR) -> None:
    """Click what `selector` finds, again if a re-render replaced it between the find and
    the click (the console re-renders polled lists and pages; a stale element was not
    clicked, so clicking the new one is the same user action)."""

    def attempt(d: WebDriver) -> bool:
        d.find_element(by, selector).click()
        return True

    wait_for(driver, attempt)


def assert_labelled(driver: WebDriver) -> None:
    """Every form control on the page has a label (or an aria-label)."""
    unlabelled = driver.execute_script(
        "return [...document.querySelectorAll('input, select, textarea')]"
        ".filter(e => e.offsetParent !== null && !e.labels.length"
        " && !e.getAttribute('aria-label')).map(e => e.outerHTML)"
    )
    assert unlabelled == [], unlabelled


def text_of(driver: WebDriver, selector: str) -> str:
    elements = driver.find_elements(By.CSS_SELECTOR, selector)
    return elements[0].text if elements else ""


def test_delete_subscribe_retry_and_audit_from_the_page(
    console_service: ConsoleService, browser: WebDriver, receiver: Receiver
) -> None:
    """Sign in; subscribe a receiver; dry run then delete; see deliveries, retry one;
    verify the chain; open a deleted contact's preserved timeline."""
    service, driver = console_service, browser
    key = service.key(*ALL_SCOPES)
    emails = ["ada@example.com", "alan@example.com"]
    ids = []
    for email in emails:
        status, contact = service.call(key, "POST", "/v1/contacts", {"email": email})
        assert status == 201, contact
        ids.append(contact["data"]["id"])
    status, _ = service.call(
        key, "POST", f"/v1/contacts/{ids[0]}/notes", {"body": "met at the conference"}
    )
    assert status == 201
    status, member = service.call(
        key, "POST", "/v1/contacts", {"email": "grace@example.com", "member_role": "member"}
    )
    assert status == 201

    assert sign_in(driver, service, key) == ["Deletions", "Webhooks", "Audit"]

    # Subscribe the receiver; the secret is shown once, and the receiver verifies with it.
    go(driver, "webhooks")
    wait_for(driver, lambda d: d.find_element(By.ID, "ep-url")).send_keys(receiver.url)
    click(driver, "input[name=new-event][value='contact.deleted']")
    click(driver, "#endpoint-form button[type=submit]")
    receiver.secret = wait_for(driver, lambda d: d.find_element(By.ID, "endpoint-secret")).text
    assert receiver.secret.startswith("whsec_")
    wait_for(driver, lambda d: receiver.url in text_of(d, "table"))
    shot(driver, "webhooks")

    # A dry run first: the member is a blocker; nothing changes.
    go(driver, "deletions")
    wait_for(driver, lambda d: d.find_element(By.ID, "delete-form"))
    click(driver, "input[name=selector-kind][value=emails]")
    listing = css(driver, "#del-list")
    listing.send_keys("\n".join([*emails, "grace@example.com", "nobody@example.com"]))
    click(driver, "#dry-run")
    wait_for(driver, lambda d: text_of(d, "#would-delete") == "2")
    outcome = css(driver, "#dry-run-outcome").text
    assert "CANNOT_DELETE_SITE_MEMBERS" in outcome
    assert "activities 0 · notes 1 · tasks 0" in outcome  # Ada's note would be orphaned
    # The API names it "emails[3]" (it keeps no address it did not delete); the page, which
    # has the list it sent, shows the address.
    assert "1 (nobody@example.com)" in outcome
    assert member["data"]["id"] in outcome
    assert_labelled(driver)
    shot(driver, "deletions-dry-run")
    status, still = service.call(key, "GET", f"/v1/contacts/{ids[0]}")
    assert status == 200, still

    # Editing the list drops the preview; a new one, then the real deletion.
    listing.clear()
    listing.send_keys("\n".join([*emails, "nobody@example.com"]))
    assert not driver.find_elements(By.ID, "would-delete")
    click(driver, "#dry-run")
    wait_for(driver, lambda d: text_of(d, "#would-delete") == "2")
    assert "nothing blocks" in css(driver, "#dry-run-outcome").text
    click(driver, "#confirm-delete")
    wait_for(driver, lambda d: "#/jobs/" in d.current_url)
    wait_for(driver, lambda d: text_of(d, "#job-status") == "completed", timeout=60)
    assert "2 deleted · 1 not found · 0 failed" in css(driver, "main").text
    assert "done" in css(driver, ".phase").text
    shot(driver, "job")
    for contact_id in ids:
        assert service.call(key, "GET", f"/v1/contacts/{contact_id}")[0] == 404
    go(driver, "deletions")
    wait_for(driver, lambda d: "completed" in text_of(d, "#jobs-h + div table"))
    shot(driver, "deletions")

    # The delivery log: one delivery failed (503) and waits an hour; retry it from the page.
    go(driver, "webhooks")
    click(driver, "Open", by=By.LINK_TEXT)
    wait_for(driver, lambda d: d.find_element(By.ID, "delivery-status"))

    def both_tried(d: WebDriver) -> list[tuple[str, str]]:
        """(status, link) of each delivery once there are two, each tried once."""
        rows = []
        for row in d.find_elements(By.CSS_SELECTOR, "table tbody tr"):
            cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
            link = row.find_element(By.LINK_TEXT, "Attempts").get_attribute("href") or ""
            rows.append((cells[2], cells[3], link.split("#", 1)[1]))
        if len(rows) == 2 and all(tries == "1" for _, tries, _ in rows):
            return [(status, link) for status, _, link in rows]
        return []

    deliveries = sorted(wait_for(driver, both_tried, timeout=60))
    # Tried, failed, a retry scheduled: "failing".
    assert [status for status, _ in deliveries] == ["failing", "succeeded"]
    assert_labelled(driver)
    shot(driver, "endpoint")
    click(driver, f"a[href='#{deliveries[0][1]}']")
    wait_for(driver, lambda d: "503" in text_of(d, "table tbody"))
    click(driver, "#retry-delivery")
    wait_for(driver, lambda d: text_of(d, "#delivery-status-now") == "succeeded", timeout=30)
    wait_for(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "table tbody tr")) == 2)
    assert "200" in text_of(driver, "table tbody")
    shot(driver, "delivery")
    assert receiver.rejected == []
    assert receiver.answered == [503, 200, 200]
    # Three signed requests: both contacts, one of them twice (the 503, then the retry).
    sent = Counter(p["data"]["contact_id"] for p in receiver.verified)
    assert set(sent) == set(ids) and sorted(sent.values()) == [1, 2]

    # The audit trail: the chain verifies, with its head hash shown; the deletion events
    # lead to the preserved timeline.
    go(driver, "audit")
    click(driver, "verify", by=By.ID)
    head = wait_for(driver, lambda d: d.find_element(By.ID, "head-hash")).text
    status, verdict = service.call(key, "GET", "/v1/audit/verify")
    assert verdict["data"]["ok"] is True
    assert head == verdict["data"]["head_hash"]
    Select(css(driver, "#f-action")).select_by_value("contact.deleted")
    click(driver, "#events-form button[type=submit]")
    link = f"a[href='#/audit/contacts/{ids[0]}']"
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, link))
    assert_labelled(driver)
    shot(driver, "audit")
    click(driver, link)
    wait_for(driver, lambda d: d.find_element(By.ID, "timeline-deleted"))
    assert "met at the conference" in css(driver, "main").text
    shot(driver, "timeline")


def test_look_up_a_deleted_address_and_open_its_timeline(
    console_service: ConsoleService,
) -> None:
    """The address goes in a POST body (never a URL); the answer links to the timeline."""
    service = console_service
    key = service.key(*ALL_SCOPES)
    status, contact = service.call(key, "POST", "/v1/contacts", {"email": "lin@example.com"})
    assert status == 201
    contact_id = contact["data"]["id"]
    service.call(key, "POST", f"/v1/contacts/{contact_id}/notes", {"body": "renewal call"})
    status, job = service.call(
        key, "POST", "/v1/contacts/bulk-delete", {"contact_ids": [contact_id]}, Prefer="wait=30"
    )
    assert status == 200 and job["data"]["status"] == "completed", job
    driver = new_driver()
    try:
        sign_in(driver, service, key)
        go(driver, "audit")
        wait_for(driver, lambda d: d.find_element(By.ID, "lookup-email")).send_keys(
            "Lin@Example.com"
        )
        click(driver, "#lookup-form button[type=submit]")
        # Whatever the answer (or error), it shows at once; then it must be "deleted".
        wait_for(driver, lambda d: text_of(d, "#lookup-result") or text_of(d, ".status.bad"))
        assert "Yes: deleted" in text_of(driver, "#lookup-result"), text_of(driver, ".status")
        assert "example.com" not in driver.current_url.lower()
        click(driver, f"#lookup-result a[href='#/audit/contacts/{contact_id}']")
        wait_for(driver, lambda d: d.find_element(By.ID, "timeline-deleted"))
        assert "renewal call" in css(driver, "main").text
        assert_no_console_errors(driver)
    finally:
        driver.quit()


def test_a_key_without_audit_read_sees_no_audit_section_and_sign_out_forgets_it(
    console_service: ConsoleService, browser: WebDriver
) -> None:
    service, driver = console_service, browser
    key = service.key("contacts:read", "contacts:write", "webhooks:manage")
    assert sign_in(driver, service, key) == ["Deletions", "Webhooks"]
    driver.get(service.base + "/console#/audit")
    wait_for(driver, lambda d: d.current_url.endswith("#/deletions"))
    wait_for(driver, lambda d: d.find_element(By.ID, "delete-form"))
    # It landed elsewhere silently: the status line says why.
    assert text_of(driver, "#status").startswith("Audit needs a key with audit:read; this key has ")
    assert "Showing Deletions instead." in text_of(driver, "#status")
    assert "Audit" not in css(driver, "header").text
    assert not driver.find_elements(By.ID, "verify")
    # The keyboard reaches the sections: focus a nav link, press Enter.
    nav = css(driver, "#nav a[data-section=webhooks]")
    driver.execute_script("arguments[0].focus()", nav)
    driver.switch_to.active_element.send_keys(Keys.ENTER)
    wait_for(driver, lambda d: d.find_element(By.ID, "endpoint-form"))
    assert_labelled(driver)
    click(driver, "#sign-out")
    wait_for(driver, lambda d: d.find_element(By.ID, "api-key").is_displayed())
    assert driver.execute_script("return sessionStorage.length") == 0
    assert not css(driver, "#nav").is_displayed()  # no section links left behind
    driver.refresh()
    wait_for(driver, lambda d: d.find_element(By.ID, "api-key").is_displayed())
    assert not css(driver, "#nav").is_displayed()


def test_a_link_to_a_section_the_key_may_not_open_says_why_it_shows_another(
    console_service: ConsoleService, browser: WebDriver
) -> None:
    """A key without contacts:read opening #/deletions landed on Audit silently; so did a
    link to no page at all."""
    service, driver = console_service, browser
    assert sign_in(driver, service, service.key("audit:read")) == ["Audit"]
    set_hash(driver, "#/deletions")
    wait_for(driver, lambda d: d.current_url.endswith("#/audit"))
    said = wait_for(driver, lambda d: status_line(d))
    assert said == (
        "Deletions needs a key with contacts:read or contacts:write; this key has audit:read."
        " Showing Audit instead."
    ), said
    set_hash(driver, "#/nowhere/at-all")
    wait_for(driver, lambda d: "no page #/nowhere/at-all" in status_line(d))
    assert driver.current_url.endswith("#/audit")
    assert_no_console_errors(driver)


def test_a_view_that_finishes_loading_never_takes_the_focus_the_user_moved(
    console_service: ConsoleService, browser: WebDriver
) -> None:
    """Navigating puts the focus on the new view's heading, unless the user moved it while
    the view loaded: a keyboard user who tabbed to a link meanwhile keeps it (it was
    taken, and their next Enter went to the heading)."""
    service, driver = console_service, browser
    key = service.key("contacts:read", "contacts:write", "webhooks:manage")
    sign_in(driver, service, key)
    wait_for(driver, lambda d: d.find_element(By.ID, "delete-form"))
    # Go to the webhooks view and, once its route ran but before its data came back, move
    # the focus to a nav link, as a Tab would.
    driver.execute_async_script(
        """const done = arguments[arguments.length - 1];
        location.hash = "#/webhooks";
        setTimeout(() => {
          document.querySelector("#nav a[data-section=deletions]").focus();
          done();
        }, 0);"""
    )
    wait_for(driver, lambda d: d.find_element(By.ID, "endpoint-form"))
    # A theft would come when the view's data lands: watch the focus for a second more.
    watch_until = time.monotonic() + 1.0
    while time.monotonic() < watch_until:
        assert driver.switch_to.active_element.get_attribute("data-section") == "deletions"
        time.sleep(0.05)
    # Left alone, a navigation focuses the new view's heading.
    driver.execute_script("location.hash = '#/deletions'")
    wait_for(
        driver,
        lambda d: (
            d.switch_to.active_element.tag_name == "h2" and d.find_element(By.ID, "delete-form")
        ),
    )
    assert_no_console_errors(driver)


def test_the_endpoint_list_pages_newest_first(
    console_service: ConsoleService, browser: WebDriver
) -> None:
    """The API gives endpoints 50 a page: the console shows the first page and appends
    the older ones on demand, each once."""
    service, driver = console_service, browser
    key = service.key("webhooks:manage")
    urls = [f"https://crm.example.com/hooks/contact-deletions/{n}" for n in range(52)]
    for url in urls:
        types = ["contact.deleted", "deletion_job.completed"] if url.endswith("0") else []
        body = {"url": url, "event_types": types}
        assert service.call(key, "POST", "/v1/webhooks/endpoints", body)[0] == 201
    sign_in(driver, service, key)
    driver.get(f"{service.base}/console#/webhooks")

    def shown(d: WebDriver) -> list[str]:
        return [c.text for c in d.find_elements(By.CSS_SELECTOR, "main table tbody tr td code")]

    wait_for(driver, lambda d: len(shown(d)) == 50)
    assert shown(driver) == urls[::-1][:50]
    click(driver, "#endpoints-more")
    wait_for(driver, lambda d: len(shown(d)) == 52)
    assert shown(driver) == urls[::-1]
    assert not driver.find_element(By.ID, "endpoints-more").is_displayed()
    shot(driver, "endpoints-paged")
    assert_no_console_errors(driver)


def test_a_refused_preview_names_the_bad_entry_and_says_what_the_console_cannot_do(
    console_service: ConsoleService, browser: WebDriver
) -> None:
    """The API names the bad field ("emails.1"); the page showed only "the request body is
    invalid". It now shows each detail, counted from 1. A filter selecting everything is
    refused with the API's way out (match_all), which the page does not offer: it says so."""
    service, driver = console_service, browser
    key = service.key("contacts:read", "contacts:write")
    assert service.call(key, "POST", "/v1/contacts", {"email": "kj@example.com"})[0] == 201
    sign_in(driver, service, key)
    wait_for(driver, lambda d: d.find_element(By.ID, "delete-form"))
    click(driver, "input[name=selector-kind][value=emails]")
    css(driver, "#del-list").send_keys("kj@example.com, not-an-address")
    click(driver, "#dry-run")
    shown = wait_for(driver, lambda d: text_of(d, ".status.bad"))
    assert "emails #2" in shown and "not a valid email address" in shown, shown

    click(driver, "input[name=selector-kind][value=filter]")
    css(driver, "#del-filter").send_keys("{}")
    click(driver, "#dry-run")
    wait_for(driver, lambda d: "match_all" in text_of(d, ".status.bad"))
    assert "through the API only" in text_of(driver, ".status.bad")
    assert service.call(key, "GET", "/v1/bulk-jobs")[1]["data"] == []
    # The browser logs the two refused requests themselves, and nothing else (no script error).
    errors = console_errors(driver)
    assert len(errors) == 2 and all("bulk-delete" in e["message"] for e in errors), errors


def test_a_failed_job_says_why_on_its_page(
    console_service: ConsoleService, browser: WebDriver
) -> None:
    """A job that could not run shows its reason (the API's `failure`) on its page."""
    service, driver = console_service, browser
    key = service.key(*ALL_SCOPES)
    status, body = service.call(
        key,
        "POST",
        "/v1/contacts/bulk-delete",
        {"contact_ids": [str(uuid.uuid4())]},
        Prefer="wait=30",
    )
    assert status == 200, body
    job_id = body["data"]["job_id"]
    message = "the job's contacts could not be selected: the selection binds too much"

    async def fail_it() -> None:
        # The state a job the worker could not expand ends in (finish_job with a failure).
        db = Database(service.env["DATABASE_URL"])
        try:
            async with db.begin() as conn:
                await conn.execute(
                    deletion_jobs.update()
                    .where(deletion_jobs.c.id == uuid.UUID(job_id))
                    .values(
                        status="failed",
                        failure_code="FAILED_DELETE_CONTACT",
                        failure_message=message,
                    )
                )
        finally:
            await db.dispose()

    asyncio.run(fail_it())
    assert service.call(key, "GET", f"/v1/bulk-jobs/{job_id}")[1]["data"]["failure"] == {
        "code": "FAILED_DELETE_CONTACT",
        "message": message,
    }
    sign_in(driver, service, key)
    driver.get(f"{service.base}/console#/jobs/{job_id}")
    wait_for(driver, lambda d: text_of(d, "#job-status") == "failed")
    assert text_of(driver, "#job-failure") == f"FAILED_DELETE_CONTACT: {message}"
    shot(driver, "job-failed")


def test_a_narrow_screen_gets_the_same_console(console_service: ConsoleService) -> None:
    """At 390 px wide nothing overflows sideways and the delete form is usable."""
    service = console_service
    driver = new_driver(390, 844)
    try:
        sign_in(driver, service, service.key(*ALL_SCOPES))
        wait_for(driver, lambda d: d.find_element(By.ID, "delete-form"))
        width = driver.execute_script("return document.documentElement.scrollWidth")
        inner = driver.execute_script("return window.innerWidth")
        assert width <= inner, f"the page is {width} px wide in a {inner} px window"
        shot(driver, "narrow-deletions")
        assert_no_console_errors(driver)
    finally:
        driver.quit()


def test_docs_renders_the_openapi_document_from_local_assets(
    console_service: ConsoleService, browser: WebDriver
) -> None:
    service, driver = console_service, browser
    driver.get(service.base + "/docs")
    title = wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, ".swagger-ui .info .title"))
    assert "Contact deletion service" in title[0].text
    wait_for(driver, lambda d: "/v1/contacts/bulk-delete" in css(d, "#swagger-ui").text)
    resources = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    assert resources, "no resource was loaded"
    assert all(url.startswith(service.base + "/") for url in resources), resources
    shot(driver, "docs")


def test_manage_an_endpoint_and_export_the_trail_from_the_page(
    console_service: ConsoleService, browser: WebDriver, receiver: Receiver, tmp_path: Path
) -> None:
    """Edit, rotate (new secret shown once), send a test event, delete; export the trail."""
    service, driver = console_service, browser
    key = service.key(*ALL_SCOPES)
    status, created = service.call(key, "POST", "/v1/webhooks/endpoints", {"url": receiver.url})
    assert status == 201
    endpoint_id, first_secret = created["data"]["id"], created["data"]["secret"]
    receiver.fail_first = 0
    sign_in(driver, service, key)
    driver.get(f"{service.base}/console#/endpoints/{endpoint_id}")
    description = wait_for(driver, lambda d: d.find_element(By.ID, "edit-description"))
    description.send_keys("CRM sync")
    click(driver, "#edit-form button[type=submit]")
    wait_for(driver, lambda d: "CRM sync" in text_of(d, ".kv"))

    # Rotating asks first, as deleting does; keeping the secret changes nothing.
    click(driver, "#rotate")
    assert "24 hours" in wait_for(driver, lambda d: text_of(d, "#confirm-question"))
    click(driver, "#keep-rotate")
    wait_for(driver, lambda d: d.find_element(By.ID, "rotate"))
    assert not driver.find_elements(By.ID, "endpoint-secret")
    click(driver, "#rotate")
    click(driver, "#really-rotate")
    new_secret = wait_for(driver, lambda d: d.find_element(By.ID, "endpoint-secret")).text
    assert new_secret.startswith("whsec_") and new_secret != first_secret
    assert "24 hours" in text_of(driver, ".secret")
    receiver.secret = new_secret

    click(driver, "#send-test")
    wait_for(driver, lambda d: "webhook.test" in text_of(d, "table tbody"), timeout=30)
    wait_for(driver, lambda d: "succeeded" in text_of(d, "table tbody"), timeout=30)
    assert [p["type"] for p in receiver.verified] == ["webhook.test"]

    click(driver, "#delete-endpoint")
    click(driver, "#really-delete-endpoint")
    wait_for(driver, lambda d: d.current_url.endswith("#/webhooks"))
    wait_for(driver, lambda d: "No endpoints yet." in text_of(d, "main"))
    assert service.call(key, "GET", f"/v1/webhooks/endpoints/{endpoint_id}")[0] == 404

    # The export arrives as a file whose events are this workspace's chain.
    driver.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(tmp_path)}
    )
    go(driver, "audit")
    click(driver, "export", by=By.ID)
    exported = tmp_path / "audit-from-1.ndjson"
    wait_for(driver, lambda d: exported.exists() and exported.stat().st_size > 0)
    actions = [json.loads(line)["action"] for line in exported.read_text().splitlines()]
    assert actions == [
        "api_key.created",
        "webhook.endpoint.created",
        "webhook.endpoint.updated",
        "webhook.endpoint.secret_rotated",
        "webhook.endpoint.deleted",
    ]


def test_a_page_offers_only_what_the_api_takes_and_shows_what_holds_deliveries_back(
    console_service: ConsoleService, browser: WebDriver, receiver: Receiver
) -> None:
    """A delivery whose endpoint was deleted offered "Retry now" (then 409
    endpoint_deleted), and a disabled endpoint's page Send test and Recover (409
    endpoint_disabled): an action the API refuses for a known state is not offered, and
    the page says why. A succeeded delivery is offered "Send again", saying that the
    receiver gets it twice. The endpoint page shows max_in_flight and rate_limit_per_s (a
    backlog sat "pending" with nothing said why), and deleting it says what becomes of its
    deliveries as the API does: they fail, they are not "dropped"."""
    service, driver = console_service, browser
    key = service.key(*ALL_SCOPES)
    body = {"url": receiver.url, "max_in_flight": 2, "rate_limit_per_s": 5}
    status, created = service.call(key, "POST", "/v1/webhooks/endpoints", body)
    assert status == 201, created
    endpoint_id = created["data"]["id"]
    receiver.secret = created["data"]["secret"]
    base = f"/v1/webhooks/endpoints/{endpoint_id}"

    def deliveries(status: str) -> list[str]:
        listed = service.call(key, "GET", f"{base}/deliveries?status={status}")[1]["data"]
        return [d["id"] for d in listed]

    def one(status: str) -> str:
        deadline = time.monotonic() + 30
        while not (found := deliveries(status)):
            assert time.monotonic() < deadline, f"no {status} delivery"
            time.sleep(0.2)
        return found[0]

    # The receiver answers 503 first (a retry an hour later: failing), then 200.
    assert service.call(key, "POST", f"{base}/test")[0] == 202
    failing = one("failing")
    assert service.call(key, "POST", f"{base}/test")[0] == 202
    succeeded = one("succeeded")

    sign_in(driver, service, key)
    set_hash(driver, f"#/endpoints/{endpoint_id}")
    assert wait_for(driver, lambda d: text_of(d, "#endpoint-max-in-flight")) == "2"
    assert text_of(driver, "#endpoint-rate-limit") == "5 requests per second"
    pace = text_of(driver, "#endpoint-pace")
    assert "at most 2 requests at a time and 5 per second" in pace and "pending" in pace, pace

    set_hash(driver, f"#/deliveries/{succeeded}")
    again = wait_for(driver, lambda d: d.find_element(By.ID, "retry-delivery"))
    assert again.text == "Send again"
    assert "a second time, with the same webhook-id" in text_of(driver, "#retry-note")
    set_hash(driver, f"#/deliveries/{failing}")
    assert wait_for(driver, lambda d: d.find_element(By.ID, "retry-delivery")).text == "Retry now"

    set_hash(driver, f"#/endpoints/{endpoint_id}")
    click(driver, "#delete-endpoint")
    question = wait_for(driver, lambda d: text_of(d, "#confirm-question"))
    assert "become failed and are not sent" in question and "dropped" not in question, question
    click(driver, "#really-delete-endpoint")
    wait_for(driver, lambda d: d.current_url.endswith("#/webhooks"))
    assert "are now failed and will not be sent" in status_line(driver)
    assert (
        service.call(key, "GET", f"/v1/webhooks/deliveries/{failing}")[1]["data"]["status"]
        == "failed"
    )

    # The deleted endpoint's delivery: no Retry (409 endpoint_deleted), and why.
    set_hash(driver, f"#/deliveries/{failing}")
    note = wait_for(driver, lambda d: text_of(d, "#retry-note"))
    assert "endpoint was deleted" in note and "not sent again" in note, note
    assert not driver.find_elements(By.ID, "retry-delivery")
    assert css(driver, "#view a").text == "← All endpoints"  # not to the endpoint's 404
    shot(driver, "delivery-endpoint-deleted")

    # A disabled endpoint (410 Gone): no Send test, no Recover, no Retry; Enable instead.
    gone_id, gone_delivery = disabled_by_gone(service, key, receiver)
    set_hash(driver, f"#/endpoints/{gone_id}")
    wait_for(driver, lambda d: d.find_element(By.ID, "enable"))
    assert not driver.find_elements(By.ID, "send-test")
    assert not css(driver, "#recover-form").is_displayed()
    assert "enable it first" in text_of(driver, "#recover-disabled")
    assert "enable it" in text_of(driver, "#disabled-hint")
    set_hash(driver, f"#/deliveries/{gone_delivery}")
    note = wait_for(driver, lambda d: text_of(d, "#retry-note"))
    assert "endpoint is disabled" in note and "410 Gone" in note, note
    assert not driver.find_elements(By.ID, "retry-delivery")
    only_refused_requests(driver)


# --- what the console shows is the API's latest answer, error or not ---------------------


def status_line(driver: WebDriver) -> str:
    return text_of(driver, "#status")


def set_hash(driver: WebDriver, fragment: str) -> None:
    """Navigate inside the console as a link would (no reload)."""
    driver.execute_script("location.hash = arguments[0]", fragment)


def clear_status(driver: WebDriver) -> None:
    """Empty the status line, so that the next message seen is the next action's."""
    driver.execute_script("document.getElementById('status').textContent = ''")


def only_refused_requests(driver: WebDriver) -> None:
    """The browser logs each refused request (4xx) itself; anything else it logged is a
    script error, which fails the test."""
    errors = console_errors(driver)
    assert all("Failed to load resource" in e["message"] for e in errors), errors


def wait_disabled(service: ConsoleService, key: str, endpoint_id: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        endpoint = service.call(key, "GET", f"/v1/webhooks/endpoints/{endpoint_id}")[1]["data"]
        if endpoint["status"] == "disabled":
            return
        time.sleep(0.2)
    raise AssertionError(f"endpoint {endpoint_id} was not disabled")


def disabled_by_gone(service: ConsoleService, key: str, receiver: Receiver) -> tuple[str, str]:
    """An endpoint the dispatcher disabled (its receiver answered a test event 410 Gone):
    its id and that delivery's."""
    receiver.gone = True
    status, created = service.call(key, "POST", "/v1/webhooks/endpoints", {"url": receiver.url})
    assert status == 201, created
    endpoint_id = created["data"]["id"]
    receiver.secret = created["data"]["secret"]
    assert service.call(key, "POST", f"/v1/webhooks/endpoints/{endpoint_id}/test")[0] == 202
    wait_disabled(service, key, endpoint_id)
    deliveries = service.call(key, "GET", f"/v1/webhooks/endpoints/{endpoint_id}/deliveries")
    return endpoint_id, deliveries[1]["data"][0]["id"]


def local_time_ago(driver: WebDriver, element: WebElement, seconds: int) -> None:
    """Fill a datetime-local input with the browser's local time `seconds` ago."""
    driver.execute_script(
        """const d = new Date(Date.now() - arguments[1] * 1000);
        const p = (n) => String(n).padStart(2, "0");
        arguments[0].value = `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}`
          + `T${p(d.getHours())}:${p(d.getMinutes())}`;""",
        element,
        seconds,
    )


def test_every_error_envelope_is_shown_as_its_message(
    console_service: ConsoleService, browser: WebDriver, receiver: Receiver
) -> None:
    """An error's `details` is a list of {field, message}, an object or null (errors.py):
    every 409 endpoint_disabled (Send test, Recover, Retry now) showed "((intermediate
    value) || []).slice is not a function". Each shape shows its message and details; an
    answer that is not JSON, or no answer at all, a plain sentence."""
    service, driver = console_service, browser
    key = service.key(*ALL_SCOPES)
    other = service.key("webhooks:manage")
    endpoint_id, delivery_id = disabled_by_gone(service, key, receiver)
    disabled = f"webhook endpoint {endpoint_id} is disabled; enable it first"
    details = f"(endpoint_disabled) — endpoint id: {endpoint_id}; disabled reason: gone"

    sign_in(driver, service, key)
    # The page offers none of the three for a disabled endpoint (test_a_page_offers_...);
    # a click that races the endpoint's disabling gets the 409, through the same module.
    set_hash(driver, f"#/endpoints/{endpoint_id}")
    wait_for(driver, lambda d: d.find_element(By.ID, "enable"))

    # Every shape, through the console's own API module: real answers of the service
    # (409 with an object for each refused send, 405, 415, 403 with an object; 200 that is
    # not JSON), and a proxy's HTML page and a dropped connection in place of the network
    # (outside the system, so faked).
    said = driver.execute_async_script(
        """const [other, endpoint, delivery, done] = arguments;
        (async () => {
          const { api, ApiError } = await import("/console/assets/api.js");
          const said = async (call) => {
            try { await call(); return "no error"; } catch (e) { return e.message; }
          };
          const out = {};
          const hooks = `/v1/webhooks/endpoints/${endpoint}`;
          out.test = await said(() => api("POST", `${hooks}/test`));
          out.recover = await said(() => api("POST", `${hooks}/recover`,
            { since: new Date(Date.now() - 3600e3).toISOString() }));
          out.retry = await said(() => api("POST", `/v1/webhooks/deliveries/${delivery}/retry`));
          out.method = await said(() => api("PUT", "/v1/webhooks/endpoints"));
          out.media = await said(() => api("POST", "/v1/webhooks/endpoints",
            { url: "https://crm.example.com/hooks" }, { "Content-Type": "text/plain" }));
          out.scope = await said(() => api("GET", "/v1/audit/verify", undefined,
            { Authorization: `Bearer ${other}` }));
          out.html = await said(() => api("GET", "/console"));
          const real = window.fetch;
          try {
            window.fetch = async () => new Response("<html><h1>502 Bad Gateway</h1></html>",
              { status: 502, headers: { "Content-Type": "text/html" } });
            out.proxy = await said(() => api("GET", "/v1/me"));
            window.fetch = async () => { throw new TypeError("Failed to fetch"); };
            out.network = await said(() => api("GET", "/v1/me"));
          } finally { window.fetch = real; }
          out.none = new ApiError(409,
            { code: "conflict", message: "busy", details: null }).message;
          out.list = new ApiError(400, { code: "validation_error", message: "invalid", details: [
            { field: "emails.1", message: "bad" }, { field: "emails.3", message: "bad" },
            { field: "search", message: "too long" }] }).message;
          return out;
        })().then(done, (e) => done({ thrown: String(e) }));""",
        other,
        endpoint_id,
        delivery_id,
    )
    for refused in ("test", "recover", "retry"):
        assert disabled in said[refused] and details in said[refused], said
    assert said["method"].startswith(
        "method PUT is not allowed here (method_not_allowed) — allowed methods: "
    ), said
    assert "POST" in said["method"], said
    assert said["media"] == (
        "send the body as application/json (unsupported_media_type) — content type: text/plain"
    ), said
    assert said["scope"] == (
        "this key lacks the 'audit:read' scope (insufficient_permissions)"
        " — required scope: audit:read"
    ), said
    assert said["html"].startswith("The service answered HTTP 200 with something other than JSON")
    assert said["proxy"] == (
        "The service answered HTTP 502: the service is not reachable behind its proxy."
    )
    assert said["network"].startswith("The service could not be reached")
    assert said["none"] == "busy (conflict)"
    assert (
        said["list"] == "invalid (validation_error) — emails #2, emails #4: bad; search: too long"
    )
    assert driver.execute_script("return sessionStorage.length") == 1  # a 403 is no sign-out
    only_refused_requests(driver)


def test_a_page_that_cannot_load_shows_only_its_error(
    console_service: ConsoleService, browser: WebDriver
) -> None:
    """A view that fails to load leaves nothing of the previous view on screen (a bad
    contact id under a deleted contact's timeline still showed its deletion; a deleted
    endpoint's URL kept the endpoint list; an unknown delivery got a live Retry button),
    and a view whose subject goes away while open says so and stops refreshing."""
    service, driver = console_service, browser
    key = service.key(*ALL_SCOPES)
    contact_id = service.call(key, "POST", "/v1/contacts", {"email": "gone@example.com"})[1][
        "data"
    ]["id"]
    status, job = service.call(
        key, "POST", "/v1/contacts/bulk-delete", {"contact_ids": [contact_id]}, Prefer="wait=30"
    )
    assert status == 200 and job["data"]["status"] == "completed", job
    endpoints = []
    for n in range(2):
        body = {"url": f"https://crm.example.com/hooks/{n}"}
        endpoints.append(service.call(key, "POST", "/v1/webhooks/endpoints", body)[1]["data"]["id"])
    assert service.call(key, "DELETE", f"/v1/webhooks/endpoints/{endpoints[0]}")[0] == 204

    def failed(about: str) -> str:
        """The view's error, once it is the one about `about`."""
        error = text_of(driver, "#view-error")
        return error if about in error else ""

    sign_in(driver, service, key)
    set_hash(driver, f"#/audit/contacts/{contact_id}")
    wait_for(driver, lambda d: d.find_element(By.ID, "timeline-deleted"))
    set_hash(driver, "#/audit/contacts/not-a-uuid")
    assert "no such contact" in wait_for(driver, lambda d: failed("contact"))
    assert contact_id not in css(driver, "main").text
    assert not driver.find_elements(By.ID, "timeline-deleted")

    set_hash(driver, "#/webhooks")
    wait_for(driver, lambda d: d.find_element(By.ID, "endpoint-form"))
    set_hash(driver, f"#/endpoints/{endpoints[0]}")
    wait_for(driver, lambda d: failed("endpoint"))
    assert not driver.find_elements(By.ID, "endpoint-form")
    assert "crm.example.com" not in css(driver, "main").text

    set_hash(driver, f"#/jobs/{uuid.uuid4()}")
    wait_for(driver, lambda d: failed("job"))
    assert not driver.find_elements(By.ID, "job-status")
    set_hash(driver, f"#/deliveries/{uuid.uuid4()}")
    wait_for(driver, lambda d: failed("delivery"))
    assert not driver.find_elements(By.ID, "retry-delivery")
    shot(driver, "page-not-found")

    # Deleted elsewhere while its page is open: the next refresh shows the error, the
    # page's buttons go, and the refreshing stops.
    set_hash(driver, f"#/endpoints/{endpoints[1]}")
    wait_for(driver, lambda d: d.find_element(By.ID, "send-test"))
    assert service.call(key, "DELETE", f"/v1/webhooks/endpoints/{endpoints[1]}")[0] == 204
    wait_for(driver, lambda d: failed("endpoint"), timeout=10)
    assert not driver.find_elements(By.ID, "send-test")
    count = (
        "return performance.getEntriesByType('resource')"
        ".filter(e => e.name.includes('/v1/')).length"
    )
    before = driver.execute_script(count)
    time.sleep(2.5)  # longer than the endpoint page's refresh period
    assert driver.execute_script(count) == before
    only_refused_requests(driver)


def test_the_endpoint_page_and_the_status_line_follow_the_latest_state(
    console_service: ConsoleService, browser: WebDriver, receiver: Receiver
) -> None:
    """The endpoint page re-reads the endpoint (a 410 disables it while the page is open:
    it kept saying "enabled", with no Enable button), and each action's outcome replaces
    the previous one: no error left under a success, no old answer under a new error, no
    message wiped by the page switch that follows it."""
    service, driver = console_service, browser
    key = service.key(*ALL_SCOPES)
    receiver.gone = True
    status, created = service.call(key, "POST", "/v1/webhooks/endpoints", {"url": receiver.url})
    assert status == 201, created
    endpoint_id = created["data"]["id"]
    receiver.secret = created["data"]["secret"]
    sign_in(driver, service, key)
    set_hash(driver, f"#/endpoints/{endpoint_id}")
    wait_for(driver, lambda d: "enabled" in text_of(d, ".kv"))
    assert not driver.find_elements(By.ID, "enable")

    click(driver, "#send-test")  # the receiver answers 410 Gone: the endpoint is disabled
    wait_for(driver, lambda d: "410 Gone" in text_of(d, ".kv"), timeout=30)
    wait_for(driver, lambda d: d.find_element(By.ID, "enable"))
    assert not driver.find_elements(By.ID, "send-test")  # the API would refuse it (409)
    edit_url = css(driver, "#edit-url")
    edit_url.clear()
    # The API's advice reaches the page (a type=url field stopped it with the browser's
    # "Please enter a URL").
    edit_url.send_keys("127.0.0.1:9/hook")
    click(driver, "#edit-form button[type=submit]")
    wait_for(
        driver, lambda d: "missing scheme: use http://127.0.0.1:9/…" in text_of(d, ".status.bad")
    )
    click(driver, "#rotate")
    click(driver, "#really-rotate")
    wait_for(driver, lambda d: d.find_element(By.ID, "endpoint-secret"))
    wait_for(driver, lambda d: "missing scheme" not in status_line(d))
    click(driver, "#enable")
    wait_for(driver, lambda d: status_line(d) == "Endpoint enabled.")
    wait_for(driver, lambda d: not d.find_elements(By.ID, "enable"))
    local_time_ago(driver, css(driver, "#recover-since"), 3600)
    click(driver, "#recover-form button[type=submit]")
    wait_for(driver, lambda d: status_line(d) == "1 delivery queued again.")
    # Sent again, 410 again: disabled again, seen without a reload.
    wait_for(driver, lambda d: d.find_element(By.ID, "enable"), timeout=30)
    assert receiver.answered == [410, 410]
    click(driver, "#delete-endpoint")
    click(driver, "#really-delete-endpoint")
    wait_for(driver, lambda d: d.current_url.endswith("#/webhooks"))
    wait_for(driver, lambda d: d.find_element(By.ID, "endpoint-form"))
    assert status_line(driver).startswith("Endpoint deleted")

    go(driver, "audit")
    email = wait_for(driver, lambda d: d.find_element(By.ID, "lookup-email"))
    email.send_keys("nobody@example.com")
    click(driver, "#lookup-form button[type=submit]")
    wait_for(driver, lambda d: "No event mentions" in text_of(d, "#lookup-result"))
    email.clear()
    email.send_keys("not an address")
    click(driver, "#lookup-form button[type=submit]")
    wait_for(driver, lambda d: text_of(d, ".status.bad"))
    assert text_of(driver, "#lookup-result") == ""
    # Since after Until: refused, and the results of the earlier filters go.
    wait_for(driver, lambda d: "webhook.endpoint.created" in text_of(d, "main table"))
    local_time_ago(driver, css(driver, "#f-since"), 60)
    local_time_ago(driver, css(driver, "#f-until"), 3600)
    click(driver, "#events-form button[type=submit]")
    wait_for(driver, lambda d: "must be later than since" in text_of(d, ".status.bad"))
    assert text_of(driver, "main table") == ""
    driver.execute_script("document.getElementById('f-until').value = ''")
    click(driver, "#events-form button[type=submit]")
    wait_for(driver, lambda d: "webhook.endpoint.created" in text_of(d, "main table"))
    assert status_line(driver) == ""
    only_refused_requests(driver)


def test_sign_in_refusals_selector_details_and_audit_wording(
    console_service: ConsoleService, browser: WebDriver
) -> None:
    """A blank key is refused with a reason; a key revoked mid-session signs out and says
    why; a detail given for four fields is said once; the audit page says its order and
    that its times are local; a live contact's timeline is not called deleted."""
    service, driver = console_service, browser
    key, key_id = service.key_and_id(*ALL_SCOPES)
    status, contact = service.call(key, "POST", "/v1/contacts", {"email": "live@example.com"})
    assert status == 201, contact
    contact_id = contact["data"]["id"]
    driver.get(service.base + "/console")
    wait_for(driver, lambda d: d.find_element(By.ID, "api-key")).send_keys("   " + Keys.ENTER)
    wait_for(driver, lambda d: "empty" in text_of(d, "#sign-in-error"))

    sign_in(driver, service, key)
    wait_for(driver, lambda d: d.find_element(By.ID, "delete-form"))
    click(driver, "input[name=selector-kind][value=filter]")
    click(driver, "#dry-run")
    shown = wait_for(driver, lambda d: text_of(d, ".status.bad"))
    assert shown.count("give exactly one selector") == 1, shown

    go(driver, "audit")
    assert "oldest first" in wait_for(driver, lambda d: text_of(d, "#events-order")).lower()
    assert "local time" in text_of(driver, "label[for=f-until]")
    set_hash(driver, f"#/audit/contacts/{contact_id}")
    wait_for(driver, lambda d: text_of(d, "#view h2") == "Contact not deleted")
    page = css(driver, "main").text
    assert f"GET /v1/contacts/{contact_id}/timeline" in page
    assert "Deleted contact" not in page and "no deletion recorded" not in page

    set_hash(driver, "#/audit")
    wait_for(driver, lambda d: d.find_element(By.ID, "verify"))
    service.revoke(key_id)
    click(driver, "#verify")
    wait_for(driver, lambda d: d.find_element(By.ID, "api-key").is_displayed())
    assert "refused" in text_of(driver, "#sign-in-error")
    assert driver.execute_script("return sessionStorage.length") == 0
    assert not css(driver, "#nav").is_displayed()
    only_refused_requests(driver)
