"""Browser tests: Debian's headless Chromium, driven by Selenium, against the running service.

The service runs as its own process (`contact-deletion run`, all four components) on the
test's database and the session's real Kafka broker; keys come from the real `keys create`
command. The browser is /usr/bin/chromium through /usr/bin/chromedriver (`make test`
installs both from Debian when missing); nothing downloads a browser, and a missing one
fails the tests. Every test ends by asserting that the page logged no error.

`CONSOLE_SCREENSHOTS=<dir>` makes the tests save screenshots of each page there
(`make screenshots`).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web
from selenium import webdriver
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait
from standardwebhooks.webhooks import Webhook

from tests.components import port_from_log, stop_process, wait_ready

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
T = TypeVar("T")


@dataclass
class ConsoleService:
    """The running service and what a test needs to call it."""

    base: str
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    log: Path

    def exited(self) -> str | None:
        """None while it runs; else its log's tail."""
        return None if self.process.poll() is None else self.log.read_text()[-3000:]

    def key(self, *scopes: str, workspace: str | None = None) -> str:
        """A new key from the real CLI, in a fresh workspace unless one is named."""
        return self.key_and_id(*scopes, workspace=workspace)[0]

    def key_and_id(self, *scopes: str, workspace: str | None = None) -> tuple[str, str]:
        """(key, key id) of a new key from the real CLI (`key` says where)."""
        args = [sys.executable, "-m", "service.cli", "keys", "create", "--json"]
        args += ["--workspace", workspace or f"ws-{uuid.uuid4().hex[:10]}"]
        for scope in scopes:
            args += ["--scope", scope]
        done = subprocess.run(args, env=self.env, capture_output=True, check=True, timeout=60)
        created = json.loads(done.stdout)
        return created["key"], created["key_id"]

    def revoke(self, key_id: str) -> None:
        """Revoke a key with the real CLI (`keys revoke`)."""
        args = [sys.executable, "-m", "service.cli", "keys", "revoke", key_id]
        subprocess.run(args, env=self.env, capture_output=True, check=True, timeout=60)

    def call(
        self, key: str, method: str, path: str, body: Any = None, **headers: str
    ) -> tuple[int, Any]:
        """One API request with `key`; returns (status, parsed JSON body or None)."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(  # noqa: S310 (our own 127.0.0.1 service)
            self.base + path,
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {key}",
                "Content-Type": "application/json",
                **headers,
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            return exc.code, json.loads(raw) if raw else None


@pytest.fixture(scope="module")
def console_service(
    db_url: str, kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ConsoleService]:
    """`contact-deletion run` on this backend; one process for the module's tests."""
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "KAFKA_TOPIC_PREFIX": f"ui{uuid.uuid4().hex[:8]}.",
        "KAFKA_CONSUMER_GROUP_PREFIX": f"ui{uuid.uuid4().hex[:8]}",
        "KAFKA_PARTITIONS": "2",
        "HTTP_PORT": "0",  # the port it binds is read from its api_listening line
        "LOG_FORMAT": "json",
        "WEBHOOK_ALLOW_PRIVATE_NETWORKS": "true",
        # A failed delivery waits an hour: the page's "Retry now" is what sends it again.
        "WEBHOOK_RETRY_SCHEDULE": "0,3600",
        "LOG_LEVEL": "INFO",
    }
    log = tmp_path_factory.mktemp("console") / "service.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "run"],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    service = ConsoleService("", env, process, log)
    try:
        service.base = f"http://127.0.0.1:{asyncio.run(port_from_log(log, service.exited))}"
        asyncio.run(wait_ready(service.base, service.exited))
        yield service
    finally:
        stop_process(process)


def new_driver(width: int = 1280, height: int = 800) -> WebDriver:
    """Headless Debian Chromium at width x height, with its console log kept."""
    for path in (CHROMIUM, CHROMEDRIVER):
        assert path.exists(), (
            f"{path} is missing: `make test` installs chromium and chromium-driver"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",  # we run as root here
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        f"--window-size={width},{height}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    # The window's size includes no browser chrome in headless mode, but pin the viewport
    # itself: the page must work at exactly width x height.
    _viewport(driver, width, height)
    return driver


def _viewport(driver: WebDriver, width: int, height: int) -> None:
    metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    """A fresh browser (so a fresh session storage) per test; no page error allowed."""
    driver = new_driver()
    try:
        yield driver
        assert_no_console_errors(driver)
    finally:
        driver.quit()


def console_errors(driver: WebDriver) -> list[dict[str, Any]]:
    """Everything the page logged at error level since the last call (CSP violations,
    uncaught exceptions, failed requests)."""
    entries: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    return [e for e in entries if e["level"] == "SEVERE"]


def assert_no_console_errors(driver: WebDriver) -> None:
    errors = console_errors(driver)
    assert errors == [], f"the page logged errors: {errors}"


def wait_for(driver: WebDriver, condition: Callable[[WebDriver], T], timeout: float = 20) -> T:
    """The first truthy value of `condition`, polled until `timeout` seconds. The console
    re-renders polled lists, so an element gone stale meanwhile just means "try again"."""
    wait = WebDriverWait(
        driver,
        timeout,
        poll_frequency=0.1,
        ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
    )
    try:
        result: T = wait.until(condition)
    except TimeoutException as exc:
        # What the page showed when the wait gave up: a timeout alone says nothing.
        state = page_state(driver)
        raise TimeoutException(f"the page did not get there in {timeout} s; {state}") from exc
    return result


def page_state(driver: WebDriver) -> str:
    """The URL, the status line and the view's text, for a failure's message."""
    state = driver.execute_script(
        """const text = (id) => (document.getElementById(id) || {}).innerText || "";
        return [location.href, text("status"), text("view").slice(0, 600)];"""
    )
    return f"at {state[0]}, status {state[1]!r}, view {state[2]!r}"


def shot(driver: WebDriver, name: str) -> None:
    """Save a screenshot as <name>.png when CONSOLE_SCREENSHOTS names a directory."""
    directory = os.environ.get("CONSOLE_SCREENSHOTS")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        # The whole page (up to a limit), at the viewport's width.
        width, height = driver.execute_script("return [window.innerWidth, window.innerHeight]")
        full = driver.execute_script("return document.documentElement.scrollHeight")
        _viewport(driver, width, min(max(full, height), 2000))
        time.sleep(0.3)  # let the repaint land
        driver.save_screenshot(str(Path(directory) / f"{name}.png"))
        _viewport(driver, width, height)


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1 (own thread and loop), verifying every request with
    the independent `standardwebhooks` library. It answers 503 to its first
    `fail_first` requests, 200 after; or, when `gone`, 410 Gone to every request (which
    makes the dispatcher disable the endpoint)."""

    fail_first: int = 0
    gone: bool = False
    secret: str | None = None
    verified: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    answered: list[int] = field(default_factory=list)
    url: str = ""
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    async def _hook(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            assert self.secret is not None, "the test has not given the receiver its secret"
            self.verified.append(Webhook(self.secret).verify(raw, dict(request.headers)))
        except Exception as exc:  # any failure to verify is recorded and fails the test
            self.rejected.append(repr(exc))
        status = 503 if len(self.answered) < self.fail_first else 200
        if self.gone:
            status = 410
        self.answered.append(status)
        return web.Response(status=status, text={503: "busy", 410: "gone"}.get(status, "ok"))

    async def _serve(self, started: threading.Event) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()  # the system picks a free port
        port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
        self.url = f"http://127.0.0.1:{port}/hook"
        started.set()
        while not self._stop.is_set():
            await asyncio.sleep(0.05)
        await runner.cleanup()

    def start(self) -> None:
        started = threading.Event()
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._serve(started)), daemon=True
        )
        self._thread.start()
        assert started.wait(10), "the receiver did not start"

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(fail_first=1)
    r.start()
    try:
        yield r
    finally:
        r.stop()
