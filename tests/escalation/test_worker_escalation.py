"""Escalation end to end: a real worker (``leakwatch worker``), a real broker, a real SMTP server.

One worker per broker (Apache Kafka and tansu) serves every test of this
module; each test uses its own alerts. Alerts are produced to the worker's
``escalations`` topic as ``streams.detection`` publishes them; mails are
asserted on as the SMTP server received and parsed them.

Tiers are short (3 s and 5 s) so timed escalation can be watched.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest
from escalation_kit import (
    MailSink,
    Received,
    WorkerProcess,
    ack_link,
    http,
    leaks,
    mail_texts,
    make_alert,
    produce_alerts,
    read_topic,
)
from prometheus_client.parser import text_string_to_metric_families

from leakwatch.cli import main as cli_main
from schemas.alert import Alert
from schemas.mynumber import check_digit
from streams.ack import make_token
from streams.brokers import BrokerProcess

DOMAIN = "city.example.lg.jp"
HOTLINE = f"hotline@{DOMAIN}"
CPO = f"cpo@{DOMAIN}"
MAYOR = f"mayor@{DOMAIN}"
CISO = f"ciso@{DOMAIN}"
ZEIMU = f"zeimu@{DOMAIN}"
GONE = f"gone@{DOMAIN}"
TIER1 = f"tier1@{DOMAIN}"
TIER2 = f"tier2@{DOMAIN}"
TIER1_S, TIER2_S = 3.0, 5.0
SECRET = "test-ack-secret-0123456789abcdef"
PN = "98765432101" + str(check_digit("98765432101"))

MAIL = {
    "hotline": [HOTLINE],
    "executives": [CPO, MAYOR],
    "routes": [
        {"department": ["税務課"], "to": [ZEIMU]},
        {"rule": ["off_hours"], "severity": ["critical"], "to": [CISO]},
        {"department": ["廃止課"], "to": [GONE]},
    ],
    "tiers": [{"after": f"{int(TIER1_S)}s", "to": [TIER1]}, {"after": f"{int(TIER2_S)}s", "to": [TIER2]}],
    "digest_threshold": 0,
    "ack_secret": SECRET,
}


@dataclass
class Stack:
    """The broker, the SMTP server and the worker shared by this module's tests."""

    broker: BrokerProcess
    sink: MailSink
    worker: WorkerProcess
    produced: dict[str, Alert] = field(default_factory=dict)
    acked: set[str] = field(default_factory=set)

    async def send(self, *alerts: Alert) -> None:
        await produce_alerts(self.broker.bootstrap, self.worker.escalations, alerts)
        for a in alerts:
            self.produced[a.alert_id] = a

    def first_mails(self, alert_id: str) -> list[Received]:
        return [r for r in self.sink.snapshot() if r.message_id == f"<{alert_id}.alert@{DOMAIN}>"]

    def step_mails(self, alert_id: str, tier: int | None = None) -> list[Received]:
        number = str(tier) if tier is not None else r"\d+"
        pattern = rf"<{re.escape(alert_id)}\.step{number}@"
        return [r for r in self.sink.snapshot() if re.match(pattern, r.message_id)]

    async def first_mail(self, alert_id: str, timeout: float = 60.0) -> Received:
        await self.sink.wait_for(lambda _: bool(self.first_mails(alert_id)), timeout, f"first mail about {alert_id}")
        (mail,) = self.first_mails(alert_id)
        return mail

    async def ack_cli(self, alert_id: str, by: str, comment: str = "") -> int:
        args = ["ack", alert_id, "--by", by, "--config", str(self.worker.config_path)]
        if comment:
            args += ["--comment", comment]
        code = await asyncio.to_thread(cli_main, args)
        if code == 0:
            self.acked.add(alert_id)
        return code

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, text = await http("GET", f"{self.worker.base_url}/metrics")
        assert status == 200, text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out


@pytest.fixture(scope="module")
def stack(broker: BrokerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A worker with escalation mail to an aiosmtpd server that refuses ``gone@``."""
    tmp: Path = tmp_path_factory.mktemp("escalation")
    sink = MailSink(refuse={GONE: f"550 5.1.1 <{GONE}>: Recipient address rejected: User unknown"}).start()
    worker = WorkerProcess(tmp, broker.bootstrap, sink, MAIL)
    try:
        asyncio.run(worker.start())
        yield Stack(broker, sink, worker)
    finally:
        worker.stop()
        sink.stop()


class TestRouting:
    """Recipients by severity, rule and department; the hotline always."""

    async def test_high_alert_goes_to_the_hotline(self, stack: Stack) -> None:
        """A high alert matching no route is mailed to the hotline only."""
        alert = make_alert("route-high", department="住民課")
        await stack.send(alert)
        mail = await stack.first_mail(alert.alert_id)
        assert mail.rcpt_tos == [HOTLINE]

    async def test_critical_reaches_executives_and_rule_route(self, stack: Stack) -> None:
        """A critical off_hours alert: hotline, both executives and the rule's route."""
        alert = make_alert("route-critical", severity="critical")
        await stack.send(alert)
        mail = await stack.first_mail(alert.alert_id)
        assert sorted(mail.rcpt_tos) == sorted([HOTLINE, CPO, MAYOR, CISO])
        assert mail.msg["Importance"] == "high"

    async def test_department_route(self, stack: Stack) -> None:
        """The tax division's alerts also go to its head."""
        alert = make_alert("route-dept", department="税務課")
        await stack.send(alert)
        mail = await stack.first_mail(alert.alert_id)
        assert sorted(mail.rcpt_tos) == sorted([HOTLINE, ZEIMU])


class TestMailContent:
    """What the hotline reads: Japanese, correct MIME, links, no personal numbers."""

    async def test_japanese_mime_and_links(self, stack: Stack) -> None:
        """Encoded Japanese subject, text+HTML, deterministic Message-ID, alert and ack links."""
        alert = make_alert(
            "user123",
            terminals=("10.20.30.40", f"WS-{PN}"),
            event_ids=("ev-a", f"row-{PN}"),
            details={"note": f"番号 {PN[:4]}-{PN[4:8]}-{PN[8:]}"},
        )
        await stack.send(alert)
        mail = await stack.first_mail(alert.alert_id)
        head = mail.raw.split(b"\r\n\r\n", 1)[0]
        assert re.search(rb"^Subject: =\?utf-8\?", head, re.M | re.I)
        assert mail.subject == "【リスク事案】[高] 休日の個人番号参照 — user123"
        assert mail.msg.get_content_type() == "multipart/alternative"
        assert [p.get_content_type() for p in mail.msg.iter_parts()] == ["text/plain", "text/html"]
        assert mail.message_id == f"<{alert.alert_id}.alert@{DOMAIN}>"
        text = mail.text()
        assert f"{stack.worker.base_url}/alerts/{alert.alert_id}" in text
        assert ack_link(mail).startswith(f"{stack.worker.base_url}/ack/{alert.alert_id}.")
        assert "時間外の個人番号参照" in text and "2024-05-04（土）10:15:00 JST" in text and "10.20.30.40" in text
        assert not [t for t in mail_texts(mail.msg) if leaks(t)]
        assert PN not in mail.raw.decode("ascii", "replace")


class TestTimedEscalation:
    """Nobody acks: the alert climbs the tiers, each step mailed once, in the thread."""

    async def test_unacked_alert_climbs_the_tiers(self, stack: Stack) -> None:
        """Tier 1 after 3 s, tier 2 after 5 s, each to the tier and the hotline, replying to the first mail."""
        alert = make_alert("nobody-acks")
        await stack.send(alert)
        first = await stack.first_mail(alert.alert_id)
        await stack.sink.wait_for(lambda _: len(stack.step_mails(alert.alert_id)) >= 2, 30, "two escalation steps")
        (s1,) = stack.step_mails(alert.alert_id, 1)
        (s2,) = stack.step_mails(alert.alert_id, 2)
        assert sorted(s1.rcpt_tos) == sorted([TIER1, HOTLINE]) and sorted(s2.rcpt_tos) == sorted([TIER2, HOTLINE])
        assert s1.at - first.at >= TIER1_S - 0.2 and s2.at - first.at >= TIER2_S - 0.2
        assert s1.msg["In-Reply-To"] == first.message_id == s2.msg["References"]
        assert "第1段階" in s1.subject and "第2段階" in s2.subject
        await asyncio.sleep(1.0)
        assert len(stack.step_mails(alert.alert_id)) == 2


class TestAckByLink:
    """The signed link in the mail: confirm page, POST with the token, stops the escalation."""

    async def test_link_ack_stops_escalation(self, stack: Stack) -> None:
        """GET confirms, POST records (via link), a second visit says it is done, no tier mail follows."""
        alert = make_alert("acks-by-link")
        await stack.send(alert)
        first = await stack.first_mail(alert.alert_id)
        link = ack_link(first)
        status, page = await http("GET", link)
        assert status == 200 and "受領を記録する" in page and "休日の個人番号参照" in page
        status, page = await http("POST", link, {"by": "山田 太郎"})
        assert status == 400, "a POST without the token in the form must not ack"
        token = link.rsplit("/", 1)[1]
        status, page = await http("POST", link, {"token": token, "by": "山田 太郎", "comment": "本人に確認中"})
        assert status == 200 and "受領を記録しました" in page
        stack.acked.add(alert.alert_id)
        status, page = await http("GET", link)
        assert status == 409 and "受領確認済み" in page and "山田 太郎" in page
        acks = [v for _, v in await read_topic(stack.broker.bootstrap, stack.worker.topics["topic_acks"])]
        (ack,) = [a for a in acks if a["alert_id"] == alert.alert_id]
        assert (ack["by"], ack["via"], ack["comment"]) == ("山田 太郎", "link", "本人に確認中")
        await asyncio.sleep(max(0.0, first.at + TIER2_S + 1.5 - time.monotonic()))
        assert stack.step_mails(alert.alert_id) == []

    async def test_forged_and_expired_links(self, stack: Stack) -> None:
        """A forged token gets 403, an expired one 410 with the CLI fallback; neither acks."""
        alert = make_alert("bad-links")
        await stack.send(alert)
        await stack.first_mail(alert.alert_id)
        forged = make_token(b"some-other-secret-0123456789", alert.alert_id, int(time.time()) + 3600)
        status, page = await http("POST", f"{stack.worker.base_url}/ack/{forged}", {"token": forged, "by": "x"})
        assert status == 403 and "無効なリンク" in page
        expired = make_token(SECRET.encode(), alert.alert_id, int(time.time()) - 10)
        status, page = await http("GET", f"{stack.worker.base_url}/ack/{expired}")
        assert status == 410 and "有効期限" in page and f"leakwatch ack {alert.alert_id}" in page
        acks = [v["alert_id"] for _, v in await read_topic(stack.broker.bootstrap, stack.worker.topics["topic_acks"])]
        assert alert.alert_id not in acks


class TestAckByCli:
    """``leakwatch ack`` records the ack on the topic and stops the escalation."""

    async def test_cli_ack_stops_escalation(self, stack: Stack) -> None:
        """Exit 0, the ack reaches the worker (link page says so), no tier mail follows."""
        alert = make_alert("acks-by-cli")
        await stack.send(alert)
        first = await stack.first_mail(alert.alert_id)
        assert await stack.ack_cli(alert.alert_id, "佐藤", "上長に確認中") == 0
        deadline = time.monotonic() + 10
        while True:
            status, page = await http("GET", ack_link(first))
            if status == 409:
                break
            assert time.monotonic() < deadline, "the worker never saw the CLI ack"
            await asyncio.sleep(0.1)
        assert "佐藤" in page and "コマンド" in page
        await asyncio.sleep(max(0.0, first.at + TIER2_S + 1.5 - time.monotonic()))
        assert stack.step_mails(alert.alert_id) == []


class TestPermanentRefusal:
    """A 5xx for one address: DLQ record, metric, audit; the others still get the mail."""

    async def test_refused_address_goes_to_dlq(self, stack: Stack) -> None:
        """gone@ is refused with 550: mail-dlq names it and the reason; the hotline is mailed."""
        alert = make_alert("dept-closed", department="廃止課")
        await stack.send(alert)
        mail = await stack.first_mail(alert.alert_id)
        assert mail.rcpt_tos == [HOTLINE]
        dlq_topic = stack.worker.mail_topics["topic_dlq"]
        deadline = time.monotonic() + 15
        while True:
            dlq = [v for _, v in await read_topic(stack.broker.bootstrap, dlq_topic) if alert.alert_id in v["alert_ids"]]
            if dlq or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        (rec,) = dlq
        assert rec["recipient"] == GONE and rec["code"] == 550 and "User unknown" in rec["reason"]
        assert rec["message_id"] == mail.message_id

        async def failures() -> list[dict[str, object]]:
            audit = [v for _, v in await read_topic(stack.broker.bootstrap, stack.worker.topics["topic_audit"])]
            return [a for a in audit if a["action"] == "mail.failed" and alert.alert_id in a["alert_ids"]]

        deadline = time.monotonic() + 15
        while not (failed := await failures()) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert [f["detail"]["recipients"] for f in failed] == [[GONE]]  # type: ignore[index]
        metrics = await stack.metrics()
        assert metrics[("leakwatch_mails_failed_total", ())] >= 1


class TestDuplicates:
    """The same (alert_id, revision) twice is mailed once; a grown revision is an update."""

    async def test_revisions(self, stack: Stack) -> None:
        """Duplicate records: one mail; revision 2 with a higher count: one update in the thread."""
        alert = make_alert("dup-user", count=3)
        await stack.send(alert, make_alert("dup-user", count=3))
        first = await stack.first_mail(alert.alert_id)
        bigger = make_alert("dup-user", count=9, revision=2)
        await stack.send(bigger, make_alert("dup-user", count=9, revision=2))

        def updates() -> list[Received]:
            return [r for r in stack.sink.snapshot() if r.message_id == f"<{alert.alert_id}.update-r2@{DOMAIN}>"]

        await stack.sink.wait_for(lambda _: bool(updates()), 30, "the update mail")
        await asyncio.sleep(1.5)
        assert len(stack.first_mails(alert.alert_id)) == 1
        (update,) = updates()
        assert update.msg["In-Reply-To"] == first.message_id
        assert "続報" in update.subject and "3件 → 9件" in update.text()


class TestAuditCommand:
    """``leakwatch audit`` shows いつ・誰が・何を・どのように for mails, steps and acks."""

    async def test_audit_shows_mail_step_and_ack(self, stack: Stack) -> None:
        """After a first mail, a tier-1 step and a CLI ack, all three are listed for the alert."""
        alert = make_alert("audited")
        await stack.send(alert)
        await stack.first_mail(alert.alert_id)
        await stack.sink.wait_for(lambda _: bool(stack.step_mails(alert.alert_id, 1)), 30, "tier 1")
        assert await stack.ack_cli(alert.alert_id, "鈴木", "対応完了") == 0
        proc = await stack.worker.cli("audit", "--alert", alert.alert_id, "--json")
        assert proc.returncode == 0, proc.stderr
        records = [orjson.loads(line) for line in proc.stdout.splitlines()]
        actions = [(r["action"], r["actor"], r["via"]) for r in records]
        assert actions == [
            ("mail.sent", "leakwatch", "smtp"),
            ("escalation.step", "leakwatch", "smtp"),
            ("ack", "鈴木", "cli"),
        ]
        assert records[0]["detail"]["recipients"] == [HOTLINE]
        assert records[1]["detail"]["tier"] == 1 and sorted(records[1]["detail"]["recipients"]) == sorted([TIER1, HOTLINE])
        assert records[2]["detail"]["comment"] == "対応完了"
        table = await stack.worker.cli("audit", "--alert", alert.alert_id)
        assert table.returncode == 0, table.stderr
        header, *rows = table.stdout.splitlines()
        assert header.split() == ["いつ", "誰が", "何を", "どのように"]
        assert len(rows) == 3 and "鈴木" in rows[2] and "受領確認" in rows[2] and "JST" in rows[0]


class TestGauges:
    """ALERTS_UNACKNOWLEDGED and OLDEST_UNACKNOWLEDGED_AGE follow alerts and acks."""

    async def test_unacknowledged_gauges(self, stack: Stack) -> None:
        """Per severity: every produced alert not acked; an ack brings the count down by one."""
        alert = make_alert("gauge-user")
        await stack.send(alert)
        await stack.first_mail(alert.alert_id)

        def expected(severity: str) -> int:
            return sum(1 for aid, a in stack.produced.items() if a.severity == severity and aid not in stack.acked)

        async def gauge(name: str, severity: str) -> float:
            return (await stack.metrics())[(name, (("severity", severity),))]

        deadline = time.monotonic() + 10
        while await gauge("leakwatch_alerts_unacknowledged", "high") != expected("high"):
            assert time.monotonic() < deadline, "gauge never matched the unacknowledged alerts"
            await asyncio.sleep(0.2)
        assert await gauge("leakwatch_alerts_unacknowledged", "critical") == expected("critical")
        assert await gauge("leakwatch_oldest_unacknowledged_age_seconds", "high") > 1.0
        before = expected("high")
        assert await stack.ack_cli(alert.alert_id, "高橋") == 0
        deadline = time.monotonic() + 10
        while await gauge("leakwatch_alerts_unacknowledged", "high") != before - 1:
            assert time.monotonic() < deadline, "the ack did not lower the gauge"
            await asyncio.sleep(0.2)
