"""Helpers of the console tests: a real worker, a real SMTP sink, events in, pages out.

* :class:`MailSink` -- an aiosmtpd server on a free loopback port keeping every mail.
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

import asyncio
import concurrent.futures
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

import orjson
import yaml
from aiosmtpd.controller import Controller
from playwright.sync_api import Browser, BrowserContext, Page, expect

from detectors.testing import event
from schemas.alert import alert_id_for
from schemas.event import Event, EventCodec
from schemas.mynumber import Pseudonymizer
from streams.console import hash_password

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO_ROOT / "artifacts" / "screenshots"
PSEUDONYM_KEY = "console-test-pseudonym-key-0001"
ACK_SECRET = "console-test-ack-secret-0123456789"
SESSION_SECRET = "console-test-session-secret-0123456789"
#: Operator accounts of the test worker: name -> password.
OPERATORS = {"sato": "correct horse battery staple", "suzuki": "another long passphrase 42"}
HOTLINE = "risk-hotline@city.example.lg.jp"
TIER1 = "cpo@city.example.lg.jp"

_HASHES = {name: hash_password(pw) for name, pw in OPERATORS.items()}


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --------------------------------------------------------------------------- SMTP


@dataclass
class Received:
    """One mail the sink accepted."""

    rcpt_tos: list[str]
    msg: EmailMessage
    at: float = field(default_factory=time.time)

    @property
    def alert_id(self) -> str:
        return str(self.msg.get("X-Leakwatch-Alert-Id", ""))

    def text(self) -> str:
        body = self.msg.get_body(("plain",))
        return str(body.get_content()) if body is not None else ""


class _Handler:
    def __init__(self, sink: MailSink) -> None:
        self.sink = sink

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        msg = message_from_bytes(envelope.original_content or envelope.content, policy=policy.default)
        assert isinstance(msg, EmailMessage)
        with self.sink.lock:
            self.sink.received.append(Received(list(envelope.rcpt_tos), msg))
        return "250 Message accepted for delivery"


class MailSink:
    """A real SMTP server on loopback that keeps what it accepts."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[Received] = []
        self.lock = threading.Lock()
        self._controller: Controller | None = None

    def start(self) -> MailSink:
        self._controller = Controller(_Handler(self), hostname="127.0.0.1", port=self.port, ready_timeout=10.0)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def snapshot(self) -> list[Received]:
        with self.lock:
            return list(self.received)

    def about(self, alert_id: str, to: str | None = None) -> list[Received]:
        """Mails about one alert (to one recipient, if given)."""
        return [
            r for r in self.snapshot() if (r.alert_id == alert_id or alert_id in r.text()) and (to is None or to in r.rcpt_tos)
        ]

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float, what: str) -> list[Received]:
        """Poll until ``predicate(mails)`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            mails = self.snapshot()
            if predicate(mails):
                return mails
            if time.monotonic() > deadline:
                got = [(str(r.msg["Subject"]), r.rcpt_tos) for r in mails][-10:]
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; mails: {got}")
            time.sleep(0.1)


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


class ConsoleWorker:
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
        t = uuid.uuid4().hex[:8]
        self.tag = t
        self.tmp = tmp
        self.web_port = free_port()
        self.bootstrap = bootstrap
        self.topics = {
            "topic_access": f"access-{t}",
            "topic_operation": f"operation-{t}",
            "topic_dlq": f"events-dlq-{t}",
            "topic_alerts": f"alerts-{t}",
            "topic_escalations": f"escalations-{t}",
            "topic_acks": f"acks-{t}",
            "topic_audit": f"audit-{t}",
            "topic_checkpoints": f"checkpoints-{t}",
        }
        self.config = {
            "brokers": bootstrap,
            "group_id": f"lw-{t}",
            **self.topics,
            "partitions": 2,
            "web_host": "127.0.0.1",
            "web_port": self.web_port,
            "public_url": f"http://127.0.0.1:{self.web_port}",
            "data_dir": str(tmp / f"data-{t}"),
            "log_level": "info",
            "log_format": "json",
            "pseudonym_key": PSEUDONYM_KEY,
            "checkpoint_interval": 0.5,
            "mail": {
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
            },
            "console": {
                "users": dict(_HASHES),
                "session_secret": SESSION_SECRET,
                "topic_states": f"alert-states-{t}",
                "health_interval": "1s",
                **(console or {}),
            },
        }
        self.config_path = tmp / f"leakwatch-{t}.yml"
        self.config_path.write_text(yaml.safe_dump(self.config, allow_unicode=True), encoding="utf-8")
        self.log_path = tmp / f"worker-{t}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def start(self, timeout: float = 120.0) -> ConsoleWorker:
        """Start the worker; return once the console and the ack page answer."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "leakwatch", "worker"],
                cwd=REPO_ROOT,
                env={**{k: v for k, v in os.environ.items() if not k.startswith("LEAKWATCH_")},
                     "LEAKWATCH_CONFIG": str(self.config_path), "PYTHONUNBUFFERED": "1"},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")
            login, _, _ = http("GET", f"{self.base_url}/console/login")
            ack, _, _ = http("GET", f"{self.base_url}/ack/not-a-token")
            if login == 200 and ack == 403:  # console up, escalation service verifying tokens
                return self
            if time.monotonic() > deadline:
                raise AssertionError(f"worker not ready after {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 30 s."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self.proc = None

    def log_tail(self, lines: int = 80) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text("utf-8", "replace").splitlines()[-lines:])
        return ""

    def produce(self, events: Iterable[Event]) -> None:
        """Ship events to the access topic, keyed by user (blocking)."""
        events = list(events)
        run_async(lambda: produce_events(self.bootstrap, self.topics["topic_access"], events))

    def produce_raw(self, topic: str, key: bytes, value: bytes) -> None:
        """One raw record on one of the worker's topics (blocking)."""
        run_async(lambda: _send_raw(self.bootstrap, topic, key, value))

    def read(self, topic: str) -> list[dict[str, Any]]:
        """Every record now on one of the worker's topics, JSON-decoded."""
        return run_async(lambda: read_topic(self.bootstrap, topic))


def run_async(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion in a thread of its own.

    Playwright's sync API keeps an event loop running in this thread (in a
    greenlet), so ``asyncio.run`` cannot be called here directly.
    """
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result(timeout=120)


async def _send_raw(bootstrap: str, topic: str, key: bytes, value: bytes) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, value=value, key=key)
    finally:
        await producer.stop()


async def read_topic(bootstrap: str, topic: str, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Every record now on a topic, JSON-decoded, in partition order."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    # Partitions from the metadata of all topics (naming the topic would create it on tansu).
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = [t for t in await admin.describe_topics() if t["topic"] == topic]
    finally:
        await admin.close()
    out: list[dict[str, Any]] = []
    if not described:
        return out
    tps = [TopicPartition(topic, p["partition"]) for p in described[0]["partitions"]]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        deadline = time.monotonic() + timeout
        while any([await consumer.position(tp) < end[tp] for tp in tps]):
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read {topic} to its end")
            batch = await consumer.getmany(timeout_ms=300)
            for tp, msgs in batch.items():
                out.extend(orjson.loads(m.value) for m in msgs if m.offset < end[tp] and m.value is not None)
    finally:
        await consumer.stop()
    return out


async def produce_events(bootstrap: str, topic: str, events: Iterable[Event]) -> None:
    """Events as a log shipper sends them: one JSON event per message, key = user."""
    from aiokafka import AIOKafkaProducer

    codec = EventCodec(Pseudonymizer(PSEUDONYM_KEY.encode()))
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, value=codec.encode(ev), key=ev.user.encode()) for ev in events]
        for fut in futures:
            await fut
    finally:
        await producer.stop()


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
