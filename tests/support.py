"""What the escalation and the console tests share: a real SMTP sink, a real worker, Kafka I/O.

* :class:`MailSink` -- an aiosmtpd server on a free loopback port that keeps
  every mail it accepts (parsed with ``email.policy.default``), can refuse
  chosen recipients with a 5xx, and can be stopped and started again on the
  same port (an SMTP outage). Every mail any sink receives is also appended
  to :data:`ALL_RECEIVED`, which the session-level check in ``tests/conftest.py``
  scans for personal numbers (:func:`leaks` over :func:`mail_texts`).
* :class:`WorkerHarness` -- ``python -m leakwatch worker`` in a subprocess,
  configured by a YAML file with topics and a group unique to it.
* :func:`produce`, :func:`read_records`, :func:`run_async`, :func:`free_port`.
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
import uuid
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

import orjson
import yaml
from aiosmtpd.controller import Controller

__all__ = [
    "ALL_RECEIVED",
    "REPO_ROOT",
    "MailSink",
    "Received",
    "WorkerHarness",
    "free_port",
    "leaks",
    "mail_texts",
    "produce",
    "read_records",
    "run_async",
]

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parents[1]

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


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run_async(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion in a thread of its own.

    Playwright's sync API keeps an event loop running in this thread (in a
    greenlet), so ``asyncio.run`` cannot be called there directly.
    """
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result(timeout=120)


# --------------------------------------------------------------------------- SMTP


@dataclass
class Received:
    """One SMTP transaction a sink accepted (``at``: ``time.monotonic()``)."""

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
        assert body is not None, f"no text/plain part in {self.subject!r}"
        return str(body.get_content())

    def html(self) -> str:
        body = self.msg.get_body(("html",))
        assert body is not None, f"no text/html part in {self.subject!r}"
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
        self.port = free_port()
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

    def __enter__(self) -> MailSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._controller is not None

    def snapshot(self) -> list[Received]:
        with self.lock:
            return list(self.received)

    def to(self, address: str) -> list[Received]:
        """Mails delivered to ``address``."""
        return [r for r in self.snapshot() if address in r.rcpt_tos]

    def about(self, alert_id: str, to: str | None = None) -> list[Received]:
        """Mails about one alert (individual ones and digests listing it), to one recipient if given."""
        return [r for r in self.snapshot() if alert_id in r.alert_ids() and (to is None or to in r.rcpt_tos)]

    def _poll(self, predicate: Callable[[list[Received]], bool], deadline: float, timeout: float, what: str) -> list[Received] | None:
        """The mails if ``predicate`` holds now; ``None`` to poll again; fail past the deadline."""
        mails = self.snapshot()
        if predicate(mails):
            return mails
        if time.monotonic() > deadline:
            got = [(r.subject, r.rcpt_tos) for r in mails][-20:]
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last mails: {got}")
        return None

    async def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float, what: str = "mail") -> list[Received]:
        """Poll until ``predicate(mails)`` holds; fail with what arrived otherwise."""
        deadline = time.monotonic() + timeout
        while (mails := self._poll(predicate, deadline, timeout, what)) is None:
            await asyncio.sleep(0.05)
        return mails

    def wait_for_blocking(self, predicate: Callable[[list[Received]], bool], timeout: float, what: str = "mail") -> list[Received]:
        """:meth:`wait_for` for synchronous callers (Playwright's thread)."""
        deadline = time.monotonic() + timeout
        while (mails := self._poll(predicate, deadline, timeout, what)) is None:
            time.sleep(0.1)
        return mails


# --------------------------------------------------------------------------- Kafka


async def produce(bootstrap: str, topic: str, records: Iterable[tuple[bytes | None, bytes, Sequence[tuple[str, bytes]]]]) -> None:
    """Publish ``(key, value, headers)`` records and wait until all are acknowledged."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, value=value, key=key, headers=list(headers)) for key, value, headers in records]
        for fut in futures:
            await fut
    finally:
        await producer.stop()


async def read_records(bootstrap: str, topic: str, timeout: float = 30.0) -> list[tuple[bytes | None, Any]]:
    """Every record now on a topic: (key, JSON-decoded value), in partition order."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    # Partitions from the metadata of all topics (naming the topic would create it on tansu).
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = [t for t in await admin.describe_topics() if t["topic"] == topic]
    finally:
        await admin.close()
    out: list[tuple[bytes | None, Any]] = []
    if not described or not described[0]["partitions"]:
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
                out.extend((m.key, orjson.loads(m.value)) for m in msgs if m.offset < end[tp] and m.value is not None)
    finally:
        await consumer.stop()
    return out


# --------------------------------------------------------------------------- the worker


class WorkerHarness:
    """``python -m leakwatch worker`` in a subprocess, with a generated config file.

    Subclasses add their sections to :attr:`config` (before :meth:`write_config`)
    and say when the worker is ready.
    """

    def __init__(self, tmp: Path, bootstrap: str, *, pseudonym_key: str, tag: str | None = None) -> None:
        self.tmp = tmp
        self.tag = t = tag or uuid.uuid4().hex[:8]
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
        self.config: dict[str, Any] = {
            "brokers": bootstrap,
            "group_id": f"lw-{t}",
            **self.topics,
            "partitions": 2,
            "web_host": "127.0.0.1",
            "web_port": self.web_port,
            "data_dir": str(tmp / f"data-{t}"),
            "log_level": "info",
            "log_format": "json",
            "pseudonym_key": pseudonym_key,
            "checkpoint_interval": 0.5,
        }
        self.config_path = tmp / f"leakwatch-{t}.yml"
        self.log_path = tmp / f"worker-{t}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config, allow_unicode=True), encoding="utf-8")

    def cli_env(self) -> dict[str, str]:
        """Environment for the worker and ``leakwatch`` subprocesses of this config (no stray LEAKWATCH_*)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("LEAKWATCH_")}
        return {**env, "LEAKWATCH_CONFIG": str(self.config_path), "PYTHONUNBUFFERED": "1"}

    def spawn(self) -> None:
        """Start the worker process (output appended to :attr:`log_path`)."""
        self.runs += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== run {self.runs} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "leakwatch", "worker"],
                cwd=REPO_ROOT,
                env=self.cli_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def check_starting(self, deadline: float, timeout: float) -> None:
        """Fail if the worker exited, or is still not ready past ``deadline``."""
        assert self.proc is not None, "worker not spawned"
        if self.proc.poll() is not None:
            raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"worker not ready after {timeout:.0f}s:\n{self.log_tail()}")

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

    def log_text(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text("utf-8", "replace")
        return ""

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])
