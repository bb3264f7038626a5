"""Crashes, SMTP outages and storms, with a real worker, broker and SMTP server.

Each test runs its own worker (``leakwatch worker`` in a subprocess) on each
broker (Apache Kafka and tansu), so killing and restarting it affects nobody
else.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

from escalation_kit import MailSink, Received, WorkerProcess, http, make_alert, produce_alerts
from prometheus_client.parser import text_string_to_metric_families

from schemas.alert import Alert
from streams.brokers import BrokerProcess

DOMAIN = "city.example.lg.jp"
HOTLINE = f"hotline@{DOMAIN}"
CPO = f"cpo@{DOMAIN}"
TIER1 = f"tier1@{DOMAIN}"


def deliveries(sink: MailSink) -> Counter[tuple[str, str]]:
    """How often each (Message-ID, recipient) was delivered."""
    return Counter((r.message_id, rcpt) for r in sink.snapshot() for rcpt in r.rcpt_tos)


def first_mail_ids(sink: MailSink) -> Counter[str]:
    """Alert ids of first mails (individual), counted."""
    return Counter(r.alert_id for r in sink.snapshot() if r.message_id.endswith(f".alert@{DOMAIN}>"))


async def counter(worker: WorkerProcess, name: str) -> float:
    status, text = await http("GET", f"{worker.base_url}/metrics")
    assert status == 200, text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                return float(s.value)
    raise AssertionError(f"{name} not exposed")


class TestRestart:
    """A crash (SIGKILL) loses no mail, duplicates none, and keeps the timers."""

    async def test_crash_and_restart(self, broker: BrokerProcess, sink: MailSink, tmp_path: Path) -> None:
        """Mails sent before the crash are not resent; new ones, updates and due tier steps follow once."""
        worker = WorkerProcess(
            tmp_path,
            broker.bootstrap,
            sink,
            {"hotline": [HOTLINE], "executives": [CPO], "tiers": [{"after": "6s", "to": [TIER1]}], "digest_threshold": 0},
            core={"checkpoint_interval": 60},  # no offset commit before the crash: everything is read again
        )
        before = [make_alert(f"restart-{i}", severity="critical" if i < 2 else "high") for i in range(6)]
        after = [make_alert(f"restart-new-{i}") for i in range(4)]
        grown = make_alert("restart-2", count=10, revision=2)
        try:
            await worker.start()
            await produce_alerts(broker.bootstrap, worker.escalations, before)
            await sink.wait_for(lambda _: len(first_mail_ids(sink)) == 6, 60, "six first mails")
            await asyncio.sleep(1.0)  # let the state records land (the documented crash window is ms)
            worker.kill()
            assert not [r for r in sink.snapshot() if ".step" in r.message_id], "tier fired before the crash"
            # The detection republishes after its own restart: same (alert_id, revision) again.
            await produce_alerts(broker.bootstrap, worker.escalations, [*before, grown, *after])
            await worker.start()
            everyone = [*before, *after]

            def done(_: list[Received]) -> bool:
                steps = {r.alert_id for r in sink.snapshot() if r.message_id.endswith(f".step1@{DOMAIN}>")}
                updates = [r for r in sink.snapshot() if r.message_id == f"<{grown.alert_id}.update-r2@{DOMAIN}>"]
                return len(first_mail_ids(sink)) == 10 and steps >= {a.alert_id for a in everyone} and bool(updates)

            await sink.wait_for(done, 120, "first mails, the update and tier-1 steps after the restart")
            await asyncio.sleep(2.0)
        finally:
            worker.stop()
        assert first_mail_ids(sink) == Counter({a.alert_id: 1 for a in everyone})
        twice = {k: n for k, n in deliveries(sink).items() if n > 1}
        assert not twice, f"delivered more than once: {twice}"
        steps = [r for r in sink.snapshot() if r.message_id.endswith(f".step1@{DOMAIN}>")]
        assert sorted(r.alert_id for r in steps) == sorted(a.alert_id for a in everyone)
        assert all(sorted(r.rcpt_tos) == sorted([TIER1, HOTLINE]) for r in steps)
        roots = {r.alert_id: r.message_id for r in sink.snapshot() if r.message_id.endswith(f".alert@{DOMAIN}>")}
        assert all(r.msg["In-Reply-To"] == roots[r.alert_id] for r in steps)


class TestSmtpOutage:
    """SMTP down: backoff and retry, the backlog stays in Kafka, nothing lost or doubled."""

    async def test_outage_with_a_restart_in_between(self, broker: BrokerProcess, sink: MailSink, tmp_path: Path) -> None:
        """Alerts produced while the relay is down, the worker restarted meanwhile: each mailed once when it is back."""
        worker = WorkerProcess(tmp_path, broker.bootstrap, sink, {"hotline": [HOTLINE], "executives": [CPO], "digest_threshold": 0})
        alerts: list[Alert] = [make_alert(f"outage-{i}", severity="critical" if i == 0 else "high") for i in range(5)]
        try:
            await worker.start()
            sink.stop()
            await produce_alerts(broker.bootstrap, worker.escalations, alerts)
            deadline = asyncio.get_running_loop().time() + 30
            while await counter(worker, "leakwatch_mails_retried_total") < 3:
                assert asyncio.get_running_loop().time() < deadline, "no SMTP retries counted"
                await asyncio.sleep(0.2)
            assert await counter(worker, "leakwatch_mails_sent_total") == 0
            await asyncio.sleep(1.5)  # several offset-commit intervals pass while nothing is sent
            worker.stop()  # graceful: commits what is done, which is nothing
            await worker.start()
            await asyncio.sleep(2.0)
            sink.start()
            await sink.wait_for(lambda _: len(first_mail_ids(sink)) == 5, 60, "the five mails after the outage")
            await asyncio.sleep(2.0)
        finally:
            worker.stop()
        assert first_mail_ids(sink) == Counter({a.alert_id: 1 for a in alerts})
        assert not {k: n for k, n in deliveries(sink).items() if n > 1}
        (critical,) = [r for r in sink.snapshot() if r.alert_id == alerts[0].alert_id]
        assert sorted(critical.rcpt_tos) == sorted([HOTLINE, CPO])


class TestStorm:
    """Hundreds of alerts in seconds: a few mails and a digest; critical ones one by one."""

    async def test_storm_becomes_a_digest(self, broker: BrokerProcess, sink: MailSink, tmp_path: Path) -> None:
        """200 high + 3 critical alerts: at most 5 single high mails, digests for the rest, criticals alone."""
        worker = WorkerProcess(
            tmp_path,
            broker.bootstrap,
            sink,
            {"hotline": [HOTLINE], "executives": [CPO], "digest_threshold": 5, "digest_window": "3s"},
        )
        storm = [make_alert(f"storm-{i:03d}") for i in range(200)]
        critical = [make_alert(f"storm-critical-{i}", severity="critical") for i in range(3)]
        mixed = storm[:50] + critical[:1] + storm[50:100] + critical[1:2] + storm[100:150] + critical[2:] + storm[150:]
        try:
            await worker.start()
            await produce_alerts(broker.bootstrap, worker.escalations, mixed)

            def covered(mails: list[Received]) -> bool:
                return {aid for r in mails for aid in r.alert_ids()} >= {a.alert_id for a in mixed}

            await sink.wait_for(covered, 120, "every storm alert in some mail")
            await asyncio.sleep(4.0)  # a further digest window: nothing more may come
        finally:
            worker.stop()
        mails = sink.snapshot()
        digests = [r for r in mails if r.is_digest]
        singles = [r for r in mails if not r.is_digest]
        assert digests, "no digest"
        assert len(mails) <= 5 + 3 + 3, f"{len(mails)} mails for a storm"
        assert len([r for r in singles if r.msg["X-Leakwatch-Severity"] == "high"]) <= 5
        crit_ids = {a.alert_id for a in critical}
        assert {r.alert_id for r in singles if r.msg["X-Leakwatch-Severity"] == "critical"} == crit_ids
        assert all(not (r.alert_ids() & crit_ids) for r in digests), "a critical alert was bundled"
        seen = Counter(aid for r in mails for aid in r.alert_ids())
        assert seen == Counter({a.alert_id: 1 for a in mixed})
        for d in digests:
            assert d.subject.startswith("【リスク事案・まとめ】") and f"{len(d.alert_ids())}件" in d.subject
            assert d.rcpt_tos == [HOTLINE]
