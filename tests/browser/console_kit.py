"""Helpers of the console tests: a real worker, a real SMTP sink, events in, pages out.

* :class:`MailSink` -- from ``tests/support.py`` (shared with the escalation tests).
* :class:`ConsoleWorker` -- ``python -m leakwatch worker`` (``create_app`` with
  its ``EXTENSIONS``: escalation and console) in a subprocess, configured by a
  YAML file with ``mail:`` and ``console:`` sections and topics unique to it.
* :func:`produce_events` -- events keyed by user on the access topic, as a
  log shipper sends them.
* :func:`http` -- one HTTP request with the standard library.
* :func:`weekend_events` / :func:`off_hours_id` -- a scenario and the id of its alert;
  :func:`new_context`, :func:`sign_in`, :func:`row` -- browser steps.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from playwright.sync_api import Browser, BrowserContext, Page, expect
from support import (
    REPO_ROOT,
    MailSink,
    Received,
    WorkerHarness,
    free_port,
    produce,
    read_records,
    run_async,
)

from detectors.testing import event
from schemas.alert import alert_id_for
from schemas.event import Event, EventCodec
from schemas.mynumber import Pseudonymizer
from streams.console import hash_password

__all__ = [
    "ACK_SECRET",
    "HOTLINE",
    "OPERATORS",
    "SCREENSHOTS",
    "TIER1",
    "ConsoleWorker",
    "MailSink",
    "Received",
    "ack_links",
    "ensure_topics",
    "free_port",
    "http",
    "new_context",
    "off_hours_id",
    "produce_events",
    "read_topic",
    "row",
    "run_async",
    "sign_in",
    "weekend_events",
]

SCREENSHOTS = REPO_ROOT / "artifacts" / "screenshots"
PSEUDONYM_KEY = "console-test-pseudonym-key-0001"
ACK_SECRET = "console-test-ack-secret-0123456789"
SESSION_SECRET = "console-test-session-secret-0123456789"
#: Operator accounts of the test worker: name -> password.
OPERATORS = {"sato": "correct horse battery staple", "suzuki": "another long passphrase 42"}
HOTLINE = "risk-hotline@city.example.lg.jp"
TIER1 = "cpo@city.example.lg.jp"

_HASHES = {name: hash_password(pw) for name, pw in OPERATORS.items()}


def ack_links(mail: Received) -> list[str]:
    """The ack links in a mail's text."""
    return re.findall(r"https?://\S+/ack/[A-Za-z0-9._\-]+", mail.text())


# --------------------------------------------------------------------------- HTTP


def http(method: str, url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one request; no redirects followed."""

    class _NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(_NoRedirect)
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with opener.open(req, timeout=10) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0, {}, b""


# --------------------------------------------------------------------------- the worker


class ConsoleWorker(WorkerHarness):
    """``python -m leakwatch worker`` with escalation mail and the console configured."""

    def __init__(
        self,
        tmp: Path,
        bootstrap: str,
        sink: MailSink,
        *,
        tiers: list[dict[str, Any]] | None = None,
        console: dict[str, Any] | None = None,
        mail: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(tmp, bootstrap, pseudonym_key=PSEUDONYM_KEY)
        t = self.tag
        self.config["public_url"] = self.base_url
        self.config["mail"] = {
            "smtp_host": "127.0.0.1",
            "smtp_port": sink.port,
            "from_address": "leakwatch@city.example.lg.jp",
            "hotline": [HOTLINE],
            "ack_secret": ACK_SECRET,
            "tick_interval": "200ms",
            "retry_initial": "200ms",
            "retry_max": "1s",
            "tiers": tiers if tiers is not None else [],
            "topic_dlq": f"mail-dlq-{t}",
            "topic_state": f"escalation-state-{t}",
            **(mail or {}),
        }
        self.config["console"] = {
            "users": dict(_HASHES),
            "session_secret": SESSION_SECRET,
            "topic_states": f"alert-states-{t}",
            "health_interval": "1s",
            **(console or {}),
        }
        self.write_config()

    def start(self, timeout: float = 120.0) -> ConsoleWorker:
        """Start the worker; return once the console and the ack page answer."""
        self.spawn()
        deadline = time.monotonic() + timeout
        while True:
            login, _, _ = http("GET", f"{self.base_url}/console/login")
            ack, _, _ = http("GET", f"{self.base_url}/ack/not-a-token")
            if login == 200 and ack == 403:  # console up, escalation service verifying tokens
                return self
            self.check_starting(deadline, timeout)
            time.sleep(0.2)

    def produce(self, events: Iterable[Event]) -> None:
        """Ship events to the access topic, keyed by user (blocking)."""
        events = list(events)
        run_async(lambda: produce_events(self.bootstrap, self.topics["topic_access"], events))

    def produce_raw(self, topic: str, key: bytes, value: bytes) -> None:
        """One raw record on one of the worker's topics (blocking)."""
        run_async(lambda: produce(self.bootstrap, topic, [(key, value, ())]))

    def read(self, topic: str) -> list[dict[str, Any]]:
        """Every record now on one of the worker's topics, JSON-decoded."""
        return run_async(lambda: read_topic(self.bootstrap, topic))

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``python -m leakwatch ARGS`` against this worker's config (blocking)."""
        return subprocess.run(
            [sys.executable, "-m", "leakwatch", *args],
            cwd=REPO_ROOT,
            env=self.cli_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


async def read_topic(bootstrap: str, topic: str, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Every record now on a topic, JSON-decoded, in partition order."""
    return [value for _, value in await read_records(bootstrap, topic, timeout)]


async def produce_events(bootstrap: str, topic: str, events: Iterable[Event]) -> None:
    """Events as a log shipper sends them: one JSON event per message, key = user."""
    codec = EventCodec(Pseudonymizer(PSEUDONYM_KEY.encode()))
    await produce(bootstrap, topic, ((ev.user.encode(), codec.encode(ev), ()) for ev in events))


def ensure_topics(worker: ConsoleWorker) -> None:
    """Create the worker's topics before anything looks them up (tansu auto-creates on lookup)."""
    from streams.config import Settings, load_settings
    from streams.worker import ensure_topics as _ensure

    core = {k: v for k, v in worker.config.items() if not isinstance(v, dict)}
    settings = load_settings(Settings, env={}, overrides=core)
    run_async(lambda: _ensure(settings))


# --------------------------------------------------------------------------- scenario and browser helpers


def weekend_events(user: str, department: str, day: str = "2024-05-11", n: int = 4) -> list[Any]:
    """A few weekday lookups (the user's normal activity), then ``n`` Saturday lookups (off_hours)."""
    normal = [
        event(f"2024-05-10T{9 + i:02d}:30:00+09:00", user=user, department=department, subject=f"mn_00aa11bb-22cc33{i:02x}")
        for i in range(4)
    ]
    weekend = [
        event(f"{day}T10:{10 + i:02d}:00+09:00", user=user, department=department, subject=f"mn_44dd55ee-66ff77{i:02x}")
        for i in range(n)
    ]
    return normal + weekend


def off_hours_id(user: str, day: str = "2024-05-11", reason: str = "weekend") -> str:
    """The alert id the off_hours rule gives a user's Saturday (window = the Tokyo day)."""
    start = datetime.fromisoformat(f"{day}T00:00:00+09:00")
    return alert_id_for("off_hours", reason, user, int(start.timestamp() * 1000))


def new_context(browser: Browser) -> BrowserContext:
    """A fresh browser profile: Japanese locale, laptop screen."""
    return browser.new_context(locale="ja-JP", timezone_id="Asia/Tokyo", viewport={"width": 1366, "height": 768})


def sign_in(page: Page, base: str, user: str = "sato", target: str = "/console") -> None:
    """Open a console page, get sent to the sign-in form, sign in, land on the page."""
    page.goto(base + target)
    expect(page).to_have_url(re.compile(r"/console/login\?next="))
    page.fill("input[name=user]", user)
    page.fill("input[name=password]", OPERATORS[user])
    page.click("button[type=submit]")
    expect(page).to_have_url(re.compile(re.escape(target) + r"$"))
    expect(page.locator("#operator")).to_contain_text(user)


def row(page: Page, alert_id: str) -> Any:
    """The list's row of one alert."""
    return page.locator(f'#alerts tbody tr[data-id="{alert_id}"]')
