"""Test helpers for the escalation tests: a real SMTP server, a real worker, alerts.

* :class:`MailSink` -- an aiosmtpd server on a free loopback port that keeps
  every mail it accepts (parsed with ``email.policy.default``), can refuse
  chosen recipients with a 5xx, and can be stopped and started again on the
  same port (an SMTP outage). Every mail any sink receives is also appended
  to :data:`ALL_RECEIVED`, which the session-level check scans for personal
  numbers.
* :class:`WorkerProcess` -- ``python -m leakwatch worker`` (``create_app``,
  with ``streams.escalation`` registered by it) in a subprocess, configured by
  a YAML file with a ``mail:`` section; killable with SIGKILL.
* :func:`make_alert`, :func:`produce_alerts`, :func:`read_topic`.
"""

from __future__ import annotations

import asyncio
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
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import orjson
import yaml
from aiosmtpd.controller import Controller

from schemas.alert import Alert, alert_id_for
from streams.audit import topic_partitions

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Any run of 12 digits (ASCII or not), and the 4-4-4 grouped forms.
TWELVE = re.compile(r"\d{12}")
GROUPED = re.compile(r"\d{4}[- ]\d{4}[- ]\d{4}")
#: Pseudonyms are 20 hex digits, so they may hold digit runs that are not personal numbers.
HASH_IDS = re.compile(r"mn_[0-9a-f]{20}")


def leaks(text: str) -> list[str]:
    """Every personal-number-like digit run in ``text`` (alert ids and pseudonyms excepted)."""
    text = HASH_IDS.sub("", text)
    return TWELVE.findall(text) + GROUPED.findall(text)


def mail_texts(msg: EmailMessage) -> list[str]:
    """Every header value (decoded) and every decoded text part of a mail."""
    out = [f"{k}: {v}" for k, v in msg.items()]
    for part in msg.walk():
        if part.get_content_maintype() == "text":
            out.append(part.get_content())
    return out


# --------------------------------------------------------------------------- SMTP


@dataclass
class Received:
    """One SMTP transaction the sink accepted."""

    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    msg: EmailMessage
    at: float = field(default_factory=time.monotonic)

    @property
    def alert_id(self) -> str:
        return str(self.msg.get("X-Leakwatch-Alert-Id", ""))

    @property
    def message_id(self) -> str:
        return str(self.msg["Message-ID"])

    @property
    def subject(self) -> str:
        return str(self.msg["Subject"])

    @property
    def is_digest(self) -> bool:
        return self.msg.get("X-Leakwatch-Digest") is not None

    def text(self) -> str:
        body = self.msg.get_body(("plain",))
        assert body is not None
        return str(body.get_content())

    def html(self) -> str:
        body = self.msg.get_body(("html",))
        assert body is not None
        return str(body.get_content())

    def alert_ids(self) -> set[str]:
        """The alerts this mail is about (one, or every alert of a digest)."""
        if self.is_digest:
            return set(re.findall(r"lw-[0-9a-f]{8}-[0-9a-f]{8}-[0-9a-f]{8}", self.text()))
        return {self.alert_id}


#: Everything every sink received in this test session.
ALL_RECEIVED: list[Received] = []
_ALL_LOCK = threading.Lock()


class _Handler:
    def __init__(self, sink: MailSink) -> None:
        self.sink = sink

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any) -> str:
        refusal = self.sink.refuse.get(address)
        if refusal:
            return refusal
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.sink.data_reply:
            return self.sink.data_reply
        raw = envelope.original_content or envelope.content
        msg = message_from_bytes(raw, policy=policy.default)
        assert isinstance(msg, EmailMessage)
        rec = Received(envelope.mail_from, list(envelope.rcpt_tos), raw, msg)
        with self.sink.lock:
            self.sink.received.append(rec)
        with _ALL_LOCK:
            ALL_RECEIVED.append(rec)
        return "250 Message accepted for delivery"


class MailSink:
    """A real SMTP server on loopback that keeps what it accepts."""

    def __init__(self, refuse: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        #: recipient -> SMTP reply to RCPT TO (e.g. "550 5.1.1 no such user").
        self.refuse: dict[str, str] = dict(refuse or {})
        #: Reply to DATA instead of accepting (e.g. "554 5.6.0 rejected").
        self.data_reply: str | None = None
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

    @property
    def running(self) -> bool:
        return self._controller is not None

    def snapshot(self) -> list[Received]:
        with self.lock:
            return list(self.received)

    def to(self, address: str) -> list[Received]:
        """Mails delivered to ``address``."""
        return [r for r in self.snapshot() if address in r.rcpt_tos]

    def about(self, alert_id: str) -> list[Received]:
        """Mails about one alert (individual ones and digests listing it)."""
        return [r for r in self.snapshot() if alert_id in r.alert_ids()]

    async def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float, what: str = "mail") -> list[Received]:
        """Poll until ``predicate(mails)`` holds; fail with what arrived otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            mails = self.snapshot()
            if predicate(mails):
                return mails
            if time.monotonic() > deadline:
                got = [(r.subject, r.rcpt_tos) for r in mails][-20:]
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last mails: {got}")
            await asyncio.sleep(0.05)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def free_port() -> int:
    """A TCP port free on loopback right now."""
    return _free_port()


# --------------------------------------------------------------------------- alerts


def make_alert(
    user: str,
    *,
    severity: str = "high",
    rule_id: str = "off_hours",
    reason: str = "weekend",
    title: str = "休日の個人番号参照",
    title_en: str = "Personal data referenced on a weekend",
    department: str | None = None,
    count: int = 3,
    revision: int = 1,
    window_start_ms: int = 1714748400000,
    terminals: Sequence[str] = ("10.1.2.3",),
    event_ids: Sequence[str] = ("ev-1", "ev-2", "ev-3"),
    subjects: Sequence[str] = ("mn_00aa11bb22cc33dd44ee",),
    devices: Sequence[str] = (),
    details: dict[str, Any] | None = None,
) -> Alert:
    """An alert as the detection publishes it (Saturday 2024-05-04, Tokyo)."""
    return Alert(
        alert_id=alert_id_for(rule_id, reason, user, window_start_ms),
        rule_id=rule_id,
        reason=reason,
        title=title,
        title_en=title_en,
        severity=severity,
        viewpoint="unnatural_time",
        user=user,
        first_ts="2024-05-04T10:15:00+09:00",
        last_ts="2024-05-04T11:40:12+09:00",
        window_start="2024-05-04T00:00:00+09:00",
        window_end="2024-05-05T00:00:00+09:00",
        count=count,
        revision=revision,
        department=department,
        event_ids=tuple(event_ids),
        terminals=tuple(terminals),
        devices=tuple(devices),
        subjects=tuple(subjects),
        details=dict(details or {}),
    )


async def produce_alerts(bootstrap: str, topic: str, alerts: Iterable[Alert]) -> None:
    """Publish alerts as streams.detection does: key alert_id, value JSON, header revision."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [
            await producer.send(
                topic,
                value=a.to_json(),
                key=a.alert_id.encode(),
                headers=[("revision", str(a.revision).encode())],
            )
            for a in alerts
        ]
        for fut in futures:
            await fut
    finally:
        await producer.stop()


async def read_topic(bootstrap: str, topic: str, timeout: float = 30.0) -> list[tuple[bytes | None, Any]]:
    """Every record now on a topic: (key, JSON-decoded value), in partition order."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    out: list[tuple[bytes | None, Any]] = []
    parts = (await topic_partitions({"bootstrap_servers": bootstrap}, [topic]))[topic]
    if not parts:
        return out
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        first = await consumer.beginning_offsets(tps)
        for tp in tps:
            consumer.seek(tp, first[tp])
        end = await consumer.end_offsets(tps)
        deadline = time.monotonic() + timeout
        while any([await consumer.position(tp) < end[tp] for tp in tps]):
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read {topic} to its end")
            batch = await consumer.getmany(timeout_ms=300)
            for tp, msgs in batch.items():
                out.extend((m.key, orjson.loads(m.value)) for m in msgs if m.offset < end[tp] and m.value is not None)
    finally:
        await consumer.stop()
    return out


# --------------------------------------------------------------------------- the worker


class WorkerProcess:
    """``python -m leakwatch worker`` with a generated config file."""

    def __init__(
        self,
        tmp: Path,
        bootstrap: str,
        sink: MailSink,
        mail: dict[str, Any],
        *,
        core: dict[str, Any] | None = None,
        tag: str | None = None,
    ) -> None:
        self.tmp = tmp
        self.tag = tag or uuid.uuid4().hex[:8]
        self.web_port = free_port()
        self.bootstrap = bootstrap
        t = self.tag
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
        self.mail_topics = {"topic_dlq": f"mail-dlq-{t}", "topic_state": f"escalation-state-{t}"}
        self.config = {
            "brokers": bootstrap,
            "group_id": f"lw-{t}",
            **self.topics,
            "partitions": 2,
            "web_host": "127.0.0.1",
            "web_port": self.web_port,
            "data_dir": str(tmp / f"data-{t}"),
            "log_level": "info",
            "log_format": "json",
            "pseudonym_key": "test-pseudonym-key-0123456789",
            "checkpoint_interval": 0.5,
            **(core or {}),
            "mail": {
                "smtp_host": "127.0.0.1",
                "smtp_port": sink.port,
                "from_address": "leakwatch@city.example.lg.jp",
                "ack_secret": "test-ack-secret-0123456789abcdef",
                "public_url": f"http://127.0.0.1:{self.web_port}",
                "tick_interval": "100ms",
                "retry_initial": "200ms",
                "retry_max": "1s",
                **self.mail_topics,
                **mail,
            },
        }
        self.config_path = tmp / f"leakwatch-{t}.yml"
        self.config_path.write_text(yaml.safe_dump(self.config, allow_unicode=True), encoding="utf-8")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = tmp / f"worker-{t}.log"
        self.runs = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def escalations(self) -> str:
        return self.topics["topic_escalations"]

    def cli_env(self) -> dict[str, str]:
        """Environment for ``leakwatch ack``/``audit`` subprocesses of this worker's config."""
        return {**os.environ, "LEAKWATCH_CONFIG": str(self.config_path), "PYTHONUNBUFFERED": "1"}

    async def start(self, timeout: float = 120.0) -> None:
        """Start the worker and wait until the escalation service answers on /ack."""
        self.runs += 1
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        log.write(f"\n===== run {self.runs} =====\n".encode())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "leakwatch", "worker"],
            cwd=REPO_ROOT,
            env=self.cli_env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")
            status, _ = await http("GET", f"{self.base_url}/ack/not-a-token")
            if status == 403:  # the escalation service is up and verifying tokens
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"worker not ready after {timeout:.0f}s:\n{self.log_tail()}")
            await asyncio.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL: a crash, no graceful commit."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self.proc = None

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

    def log_tail(self, lines: int = 60) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text("utf-8", "replace").splitlines()[-lines:])
        return ""

    def log_text(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text("utf-8", "replace")
        return ""

    async def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``python -m leakwatch ARGS`` against this worker's config."""

        def run() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "leakwatch", *args],
                cwd=REPO_ROOT,
                env=self.cli_env(),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )

        return await asyncio.to_thread(run)


async def http(method: str, url: str, form: dict[str, str] | None = None) -> tuple[int, str]:
    """One HTTP request: (status, body text); (0, error) when nothing answers."""

    def call() -> tuple[int, str]:
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        req = urllib.request.Request(url, data=data, method=method)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode("utf-8", "replace")
        except (urllib.error.URLError, OSError) as exc:
            return 0, str(exc)

    return await asyncio.to_thread(call)


def ack_link(mail: Received) -> str:
    """The signed ack link of an individual mail."""
    match = re.search(r"(https?://\S+/ack/[A-Za-z0-9._\-]+)", mail.text())
    assert match, "no ack link in the mail"
    return match.group(1)
