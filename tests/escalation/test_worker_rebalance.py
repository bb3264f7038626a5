"""Two escalation workers in one consumer group: partitions move, every mail goes out exactly once.

Two ``leakwatch worker`` processes share the topics and the group (the same
tag, different directories and web ports). Alerts arrive before the second
worker joins, while both run, and after the first one left; the timed
escalation of alerts the first worker mailed falls due after their partition
moved to the second. Every (Message-ID, recipient) must reach the real SMTP
server once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
from escalation_kit import MailSink, Received, WorkerProcess, make_alert, produce_alerts

from schemas.alert import Alert
from streams.brokers import BrokerProcess

DOMAIN = "city.example.lg.jp"
HOTLINE = f"hotline@{DOMAIN}"
TIER1 = f"tier1@{DOMAIN}"
#: Long enough for the second worker to start and take a partition before the first batch's steps are due.
TIER_AFTER_S = 25.0
MAIL = {"hotline": [HOTLINE], "tiers": [{"after": f"{TIER_AFTER_S:.0f}s", "to": [TIER1]}], "digest_threshold": 0}


def worker_in(tmp: Path, name: str, broker: BrokerProcess, sink: MailSink, tag: str) -> WorkerProcess:
    """One member of the group: same topics and group as every worker with ``tag``, its own files and port."""
    (tmp / name).mkdir()
    return WorkerProcess(tmp / name, broker.bootstrap, sink, MAIL, tag=tag)


def log_events(worker: WorkerProcess, event: str) -> list[dict[str, Any]]:
    """The worker's structured log records of one event."""
    out = []
    for line in worker.log_text().splitlines():
        if line.startswith("{") and f'"{event}"' in line:
            with contextlib.suppress(ValueError):
                doc = orjson.loads(line)
                if doc.get("event") == event:
                    out.append(doc)
    return out


def steps_sent_by(worker: WorkerProcess) -> set[str]:
    """Alerts whose escalation step this worker mailed."""
    return {e["alert_id"] for e in log_events(worker, "escalation mail sent") if e.get("kind") == "step"}


class TestRebalance:
    """Partitions move between two workers and back to one: no mail lost, none doubled."""

    async def test_two_workers_exactly_once(self, broker: BrokerProcess, sink: MailSink, tmp_path: Path) -> None:
        """First mails and tier-1 steps of alerts produced before, during and after the moves: each delivered once."""
        tag = uuid.uuid4().hex[:8]
        first, second = worker_in(tmp_path, "a", broker, sink, tag), worker_in(tmp_path, "b", broker, sink, tag)
        batches = [[make_alert(f"rebalance-{b}-{i}") for i in range(6)] for b in range(3)]
        produced: list[Alert] = []

        async def send(batch: list[Alert]) -> None:
            await produce_alerts(broker.bootstrap, first.escalations, batch)
            produced.extend(batch)

        def complete(_: list[Received]) -> bool:
            mails = sink.snapshot()
            firsts = {r.alert_id for r in mails if r.message_id.endswith(f".alert@{DOMAIN}>")}
            steps = {r.alert_id for r in mails if r.message_id.endswith(f".step1@{DOMAIN}>")}
            wanted = {a.alert_id for a in produced}
            return firsts >= wanted and steps >= wanted

        try:
            await first.start()
            await send(batches[0])
            mails = await sink.wait_for(lambda m: len({r.alert_id for r in m}) >= 6, 60, "the first batch's first mails")
            steps_due = min(r.at for r in mails) + TIER_AFTER_S
            await second.start()  # joins the group: one partition moves while the first batch's steps are pending
            while not any(e["partitions"] for e in log_events(second, "escalation partitions assigned")):
                assert time.monotonic() < steps_due - 1.0, "the second worker took no partition before the steps were due"
                await asyncio.sleep(0.1)
            await send(batches[1])
            await sink.wait_for(lambda m: len({r.alert_id for r in m}) >= 12, 60, "the second batch's first mails")
            first.stop()  # leaves the group: the second worker takes every partition and the pending steps
            await send(batches[2])
            await sink.wait_for(complete, 120, "first mails and tier-1 steps of every batch")
            await asyncio.sleep(3.0)  # nothing more may come
        finally:
            first.stop()
            second.stop()
        assert "escalation partitions revoked" in first.log_text()
        assert "escalation partitions assigned" in second.log_text()
        handed_over = steps_sent_by(second) & {a.alert_id for a in batches[0]}
        assert handed_over, "no step of an alert the first worker mailed was sent by the second"
        assert not handed_over & steps_sent_by(first)
        wanted = {a.alert_id for a in produced}
        firsts = Counter(r.alert_id for r in sink.snapshot() if r.message_id.endswith(f".alert@{DOMAIN}>"))
        steps = Counter(r.alert_id for r in sink.snapshot() if r.message_id.endswith(f".step1@{DOMAIN}>"))
        assert firsts == Counter(dict.fromkeys(wanted, 1))
        assert steps == Counter(dict.fromkeys(wanted, 1))
        deliveries = Counter((r.message_id, rcpt) for r in sink.snapshot() for rcpt in r.rcpt_tos)
        assert not {k: n for k, n in deliveries.items() if n > 1}, "delivered more than once"
        assert len(sink.snapshot()) == 2 * len(wanted)
        roots = {r.alert_id: r.message_id for r in sink.snapshot() if r.message_id.endswith(f".alert@{DOMAIN}>")}
        for r in sink.snapshot():
            if ".step1@" in r.message_id:
                assert sorted(r.rcpt_tos) == sorted([TIER1, HOTLINE]) and r.msg["In-Reply-To"] == roots[r.alert_id]
