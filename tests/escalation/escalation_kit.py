"""Test helpers for the escalation tests: a real SMTP server, a real worker, alerts.

* :class:`MailSink`, :data:`ALL_RECEIVED`, :func:`leaks`, :func:`mail_texts`,
  :func:`free_port` -- from ``tests/support.py`` (shared with the console tests).
* :class:`WorkerProcess` -- ``python -m leakwatch worker`` (``create_app``,
  with ``streams.escalation`` registered by it) in a subprocess, configured by
  a YAML file with a ``mail:`` section; killable with SIGKILL.
* :func:`make_alert`, :func:`produce_alerts`, :func:`read_topic`.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from support import (
    ALL_RECEIVED,
    REPO_ROOT,
    MailSink,
    Received,
    WorkerHarness,
    free_port,
    leaks,
    mail_texts,
    produce,
    read_records,
)

from schemas.alert import Alert, alert_id_for
from streams.audit import topic_partitions

__all__ = [
    "ALL_RECEIVED",
    "MailSink",
    "Received",
    "WorkerProcess",
    "ack_link",
    "free_port",
    "http",
    "latest_by_key",
    "leaks",
    "mail_texts",
    "make_alert",
    "produce_alerts",
    "read_topic",
]


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
    day: str = "2024-05-04",
    window_start_ms: int | None = None,
    terminals: Sequence[str] = ("10.1.2.3",),
    event_ids: Sequence[str] = ("ev-1", "ev-2", "ev-3"),
    subjects: Sequence[str] = ("mn_00aa11bb22cc33dd44ee",),
    devices: Sequence[str] = (),
    details: dict[str, Any] | None = None,
) -> Alert:
    """An alert as the detection publishes it (its window: the Tokyo ``day``, by default Saturday 2024-05-04)."""
    start = datetime.fromisoformat(f"{day}T00:00:00+09:00")
    if window_start_ms is None:
        window_start_ms = int(start.timestamp() * 1000)
    return Alert(
        alert_id=alert_id_for(rule_id, reason, user, window_start_ms),
        rule_id=rule_id,
        reason=reason,
        title=title,
        title_en=title_en,
        severity=severity,
        viewpoint="unnatural_time",
        user=user,
        first_ts=f"{day}T10:15:00+09:00",
        last_ts=f"{day}T11:40:12+09:00",
        window_start=start.isoformat(),
        window_end=(start + timedelta(days=1)).isoformat(),
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
    await produce(bootstrap, topic, ((a.alert_id.encode(), a.to_json(), [("revision", str(a.revision).encode())]) for a in alerts))


async def read_topic(bootstrap: str, topic: str, timeout: float = 30.0) -> list[tuple[bytes | None, Any]]:
    """Every record now on a topic: (key, JSON-decoded value), in partition order."""
    return await read_records(bootstrap, topic, timeout)


async def latest_by_key(bootstrap: str, topic: str, timeout: float = 30.0) -> dict[str, Any]:
    """What compaction keeps of a topic: per key, the newest value (JSON-decoded; ``None`` for a tombstone)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    parts = (await topic_partitions({"bootstrap_servers": bootstrap}, [topic]))[topic]
    out: dict[str, Any] = {}
    if not parts:
        return out
    tps = [TopicPartition(topic, p) for p in parts]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(tps)
        first = await consumer.beginning_offsets(tps)
        for tp in tps:
            consumer.seek(tp, first[tp])
        end = await consumer.end_offsets(tps)
        deadline = time.monotonic() + timeout
        while any([await consumer.position(tp) < end[tp] for tp in tps]):
            assert time.monotonic() < deadline, f"could not read {topic} to its end"
            for tp, msgs in (await consumer.getmany(timeout_ms=300)).items():
                for m in msgs:
                    if m.offset < end[tp] and m.key is not None:
                        out[m.key.decode()] = None if m.value is None else orjson.loads(m.value)
    finally:
        await consumer.stop()
    return out


# --------------------------------------------------------------------------- the worker


class WorkerProcess(WorkerHarness):
    """``python -m leakwatch worker`` with a generated config file and a ``mail:`` section."""

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
        super().__init__(tmp, bootstrap, pseudonym_key="test-pseudonym-key-0123456789", tag=tag)
        t = self.tag
        self.mail_topics = {"topic_dlq": f"mail-dlq-{t}", "topic_state": f"escalation-state-{t}"}
        self.config.update(core or {})
        self.config["mail"] = {
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
        }
        self.write_config()

    @property
    def escalations(self) -> str:
        return self.topics["topic_escalations"]

    async def start(self, timeout: float = 120.0) -> None:
        """Start the worker and wait until the escalation service answers on /ack."""
        self.spawn()
        deadline = time.monotonic() + timeout
        while True:
            status, _ = await http("GET", f"{self.base_url}/ack/not-a-token")
            if status == 403:  # the escalation service is up and verifying tokens
                return
            self.check_starting(deadline, timeout)
            await asyncio.sleep(0.2)

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
