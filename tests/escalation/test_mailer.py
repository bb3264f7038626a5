"""Mail composition (MIME, Japanese, threading, masking) and SMTP sending against aiosmtpd."""

from __future__ import annotations

import re
from datetime import datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from zoneinfo import ZoneInfo

import pytest
from escalation_kit import MailSink, leaks, mail_texts, make_alert

from detectors.rules import load_rules
from schemas.mynumber import check_digit
from streams.mail_settings import MailSettings
from streams.mailer import (
    MailContext,
    MailItem,
    SmtpSender,
    TemporaryFailure,
    compose_alert_mail,
    compose_digest,
    digest_id_for,
    message_id,
    scrub,
)

TOKYO = ZoneInfo("Asia/Tokyo")
NOW = datetime(2024, 5, 4, 10, 20, tzinfo=TOKYO)
RULES = {r.id: r for r in load_rules()}
HOTLINE = "hotline@city.example.lg.jp"


def personal_number(body: str) -> str:
    return body + str(check_digit(body))


PN = personal_number("12345678901")


def ctx(language: str = "ja", next_tier: float | None = 1800.0) -> MailContext:
    mail = MailSettings(from_address="leakwatch@city.example.lg.jp", language=language)
    base = MailContext.from_settings(mail, TOKYO, NOW)
    return MailContext(base.language, base.tz, base.from_address, base.from_name, base.domain, base.now, 20, next_tier)


def reparse(msg: EmailMessage) -> tuple[bytes, EmailMessage]:
    """Serialise like the SMTP client does and parse back like a mail client."""
    raw = msg.as_bytes()
    parsed = message_from_bytes(raw, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    return raw, parsed


def body(msg: EmailMessage, kind: str) -> str:
    part = msg.get_body((kind,))
    assert part is not None
    return str(part.get_content())


class TestComposeAlertMail:
    """One alert, one mail: subject, MIME structure, content, threading."""

    def test_subject_is_japanese_and_encoded(self) -> None:
        """The Japanese subject goes out as RFC 2047 encoded words and decodes exactly."""
        raw, parsed = reparse(compose_alert_mail(MailItem(make_alert("user123")), [HOTLINE], ctx(), RULES["off_hours"]))
        header = raw.split(b"\r\n\r\n", 1)[0]
        assert b"=?utf-8?" in header.lower()
        assert all(b < 0x80 for b in header), "headers must be 7-bit"
        assert parsed["Subject"] == "【リスク事案】[高] 休日の個人番号参照 — user123"

    @pytest.mark.parametrize(("severity", "word"), [("low", "低"), ("medium", "中"), ("high", "高"), ("critical", "重大")])
    def test_severity_words(self, severity: str, word: str) -> None:
        """Each severity has its Japanese word in the subject."""
        _, parsed = reparse(compose_alert_mail(MailItem(make_alert("u1", severity=severity)), [HOTLINE], ctx()))
        assert f"[{word}]" in parsed["Subject"]

    def test_multipart_alternative_text_and_html(self) -> None:
        """text/plain and text/html alternatives, both UTF-8."""
        _, parsed = reparse(compose_alert_mail(MailItem(make_alert("u1")), [HOTLINE], ctx()))
        assert parsed.get_content_type() == "multipart/alternative"
        types = [p.get_content_type() for p in parsed.iter_parts()]
        assert types == ["text/plain", "text/html"]
        assert all(p.get_content_charset() == "utf-8" for p in parsed.iter_parts())

    def test_body_explains_what_when_where_and_next(self) -> None:
        """Rule title and description, Tokyo times, terminals, evidence, next steps, links."""
        alert = make_alert(
            "user123",
            department="税務課",
            terminals=("10.1.2.3", "10.1.2.4"),
            event_ids=("ev-1", "ev-2"),
            count=12,
        )
        item = MailItem(alert, alert_url="https://lw.example.jp/alerts/" + alert.alert_id, ack_url="https://lw.example.jp/ack/TOKEN")
        _, parsed = reparse(compose_alert_mail(item, [HOTLINE], ctx(), RULES["off_hours"]))
        text = body(parsed, "plain")
        assert "時間外の個人番号参照" in text  # rule title
        assert "PPC ログ分析の観点1" in text  # rule description, in Japanese for a Japanese mail
        assert "2024-05-04（土）10:15:00 JST" in text
        assert "10.1.2.3, 10.1.2.4" in text and "税務課" in text
        assert "該当操作: 12件" in text and "ev-1, ev-2" in text
        assert "次にすべきこと" in text and "30分後" in text
        assert "https://lw.example.jp/ack/TOKEN" in text
        assert f"https://lw.example.jp/alerts/{alert.alert_id}" in text
        assert f"leakwatch ack {alert.alert_id} --by" in text
        assert 'href="https://lw.example.jp/ack/TOKEN"' in body(parsed, "html")

    def test_times_converted_to_tokyo(self) -> None:
        """An event time in UTC is shown in Japan time."""
        alert = make_alert("u1")
        alert.first_ts = "2024-05-04T01:15:00+00:00"
        _, parsed = reparse(compose_alert_mail(MailItem(alert), [HOTLINE], ctx()))
        assert "2024-05-04（土）10:15:00 JST" in body(parsed, "plain")

    def test_html_is_escaped(self) -> None:
        """Values are escaped in the HTML part."""
        alert = make_alert("<script>alert(1)</script>")
        _, parsed = reparse(compose_alert_mail(MailItem(alert), [HOTLINE], ctx()))
        html_text = body(parsed, "html")
        assert "<script>" not in html_text and "&lt;script&gt;" in html_text

    def test_english(self) -> None:
        """language: en gives an English subject and body."""
        _, parsed = reparse(compose_alert_mail(MailItem(make_alert("user123")), [HOTLINE], ctx("en"), RULES["off_hours"]))
        # A long ASCII subject is folded right after "Subject:"; unfolded, the value starts with the fold's space.
        assert parsed["Subject"].strip() == "[Risk incident] [High] Personal data referenced on a weekend - user123"
        text = body(parsed, "plain")
        assert "What to do next" in text and "Sat 2024-05-04 10:15:00 JST" in text
        assert not re.search(r"[\u3040-\u30ff]", parsed["Subject"])

    def test_message_id_is_deterministic(self) -> None:
        """Same alert and step: same Message-ID; different steps: different ids."""
        alert = make_alert("u1")
        first = compose_alert_mail(MailItem(alert), [HOTLINE], ctx())
        again = compose_alert_mail(MailItem(alert), ["other@x.example.jp"], ctx())
        step = compose_alert_mail(MailItem(alert, kind="step", number=1), [HOTLINE], ctx())
        assert first["Message-ID"] == again["Message-ID"] == f"<{alert.alert_id}.alert@city.example.lg.jp>"
        assert step["Message-ID"] == message_id(alert.alert_id, "step", 1, "city.example.lg.jp") != first["Message-ID"]

    def test_follow_ups_thread_under_the_first_mail(self) -> None:
        """Steps and updates carry In-Reply-To and References of the first mail."""
        alert = make_alert("u1", count=8, revision=3)
        root = message_id(alert.alert_id, "alert", 0, "city.example.lg.jp")
        for item in (MailItem(alert, kind="step", number=2, waited_s=7200), MailItem(alert, kind="update", number=3, previous_count=4)):
            _, parsed = reparse(compose_alert_mail(item, [HOTLINE], ctx(), thread=root))
            assert parsed["In-Reply-To"] == root and parsed["References"] == root
        _, first = reparse(compose_alert_mail(MailItem(alert), [HOTLINE], ctx()))
        assert first["In-Reply-To"] is None

    def test_step_and_update_wording(self) -> None:
        """Step mails say which tier and how long nobody acked; updates say the new count."""
        alert = make_alert("u1", count=8)
        _, step = reparse(compose_alert_mail(MailItem(alert, kind="step", number=2, waited_s=7200), [HOTLINE], ctx()))
        assert "第2段階" in step["Subject"] and "2時間" in body(step, "plain")
        _, upd = reparse(compose_alert_mail(MailItem(alert, kind="update", number=2, previous_count=4), [HOTLINE], ctx()))
        assert "続報" in upd["Subject"] and "4件 → 8件" in body(upd, "plain")

    def test_personal_numbers_are_masked_everywhere(self) -> None:
        """Numbers smuggled into any field never reach subject, text or HTML."""
        grouped = f"{PN[:4]}-{PN[4:8]}-{PN[8:]}"
        wide = PN.translate(str.maketrans("0123456789", "０１２３４５６７８９"))
        alert = make_alert(
            f"user{PN}",
            department=f"税務課{grouped}",
            terminals=(f"term {PN[:4]} {PN[4:8]} {PN[8:]}",),
            event_ids=(f"{PN}99", wide),
            subjects=("mn_0123456789abcdef0123",),
        )
        _, parsed = reparse(compose_alert_mail(MailItem(alert), [HOTLINE], ctx(), RULES["off_hours"]))
        texts = mail_texts(parsed)
        assert not [t for t in texts if leaks(t)]
        assert "［伏字］" in body(parsed, "plain")
        assert "mn_0123456789abcdef0123" in body(parsed, "plain")  # pseudonyms stay whole


class TestComposeDigest:
    """A storm of non-critical alerts as one mail."""

    def test_digest_lists_every_alert_most_severe_first(self) -> None:
        """Every alert id is listed once, high before medium; subject says how many."""
        alerts = [make_alert(f"u{i}", severity="medium" if i % 2 else "high") for i in range(30)]
        items = [
            MailItem(a, alert_url=f"https://lw.example.jp/alerts/{a.alert_id}", ack_url=f"https://lw.example.jp/ack/{a.alert_id}.1.x")
            for a in alerts
        ]
        did = digest_id_for([f"{a.alert_id}/alert" for a in alerts])
        _, parsed = reparse(compose_digest(items, [HOTLINE], ctx(), did, RULES))
        assert parsed["Subject"] == "【リスク事案・まとめ】30件（高 15 / 中 15）"
        assert parsed["Message-ID"] == f"<digest.{did}@city.example.lg.jp>"
        text = body(parsed, "plain")
        for a in alerts:
            assert text.count(a.alert_id) == 3  # its id line and its two links
        assert text.index("[高]") < text.index("[中]")
        assert parsed.get_content_type() == "multipart/alternative"

    def test_digest_id_is_order_independent(self) -> None:
        """The same set of mails gives the same digest id."""
        ids = ["lw-00000000-00000000-00000001/alert", "lw-00000000-00000000-00000002/alert"]
        assert digest_id_for(ids) == digest_id_for(list(reversed(ids)))
        assert not re.search(r"\d{5}", digest_id_for(ids))


class TestScrub:
    """The last line of defence: personal-number-like digit runs are masked."""

    @pytest.mark.parametrize(
        "text",
        [PN, f"{PN[:4]}-{PN[4:8]}-{PN[8:]}", f"{PN[:4]} {PN[4:8]} {PN[8:]}", PN + "0000", "１２３４５６７８９０１２"],
    )
    def test_masks(self, text: str) -> None:
        """Plain, grouped, longer and full-width runs are masked."""
        assert not leaks(scrub(f"id={text}."))

    def test_keeps_ids_and_ordinary_numbers(self) -> None:
        """Alert ids, pseudonyms, dates, IPs and counts are left alone."""
        text = "lw-12345678-12345678-12345678 mn_01234567890123456789 2024-05-04 10:15:00 10.1.2.3 12件"
        assert scrub(text) == text


class TestSmtpSender:
    """Outcomes per recipient against a real SMTP server (aiosmtpd)."""

    def mail(self, sink: MailSink) -> MailSettings:
        return MailSettings(smtp_host="127.0.0.1", smtp_port=sink.port, hotline=(HOTLINE,), timeout=5.0)

    def message(self) -> EmailMessage:
        return compose_alert_mail(MailItem(make_alert("u1")), [HOTLINE, "gone@city.example.lg.jp"], ctx())

    async def test_accepted(self, sink: MailSink) -> None:
        """Both recipients accepted; the server got one message for both."""
        result = await SmtpSender(self.mail(sink)).send(self.message(), [HOTLINE, "b@city.example.lg.jp"])
        assert result.accepted == [HOTLINE, "b@city.example.lg.jp"] and not result.refused_permanent
        (got,) = sink.snapshot()
        assert got.rcpt_tos == [HOTLINE, "b@city.example.lg.jp"]
        assert got.subject.startswith("【リスク事案】")

    async def test_one_recipient_refused_permanently(self, sink: MailSink) -> None:
        """A 550 for one address is permanent for it; the other still gets the mail."""
        sink.refuse["gone@city.example.lg.jp"] = "550 5.1.1 <gone@city.example.lg.jp>: user unknown"
        result = await SmtpSender(self.mail(sink)).send(self.message(), [HOTLINE, "gone@city.example.lg.jp"])
        assert result.accepted == [HOTLINE]
        assert result.refused_permanent["gone@city.example.lg.jp"][0] == 550
        assert [r.rcpt_tos for r in sink.snapshot()] == [[HOTLINE]]

    async def test_all_refused(self, sink: MailSink) -> None:
        """Every recipient refused: all permanent, nothing delivered, no exception."""
        sink.refuse[HOTLINE] = "550 5.1.1 no"
        result = await SmtpSender(self.mail(sink)).send(self.message(), [HOTLINE])
        assert not result.accepted and HOTLINE in result.refused_permanent
        assert sink.snapshot() == []

    async def test_temporary_refusal_per_recipient(self, sink: MailSink) -> None:
        """A 450 for one address is temporary for it only."""
        sink.refuse["busy@city.example.lg.jp"] = "450 4.2.1 mailbox busy"
        result = await SmtpSender(self.mail(sink)).send(self.message(), [HOTLINE, "busy@city.example.lg.jp"])
        assert result.accepted == [HOTLINE]
        assert result.refused_temporary == {"busy@city.example.lg.jp": (450, "4.2.1 mailbox busy")}

    async def test_data_rejected_permanently(self, sink: MailSink) -> None:
        """A 554 to DATA is permanent for every recipient."""
        sink.data_reply = "554 5.6.0 content rejected"
        result = await SmtpSender(self.mail(sink)).send(self.message(), [HOTLINE, "b@city.example.lg.jp"])
        assert set(result.refused_permanent) == {HOTLINE, "b@city.example.lg.jp"}

    async def test_data_deferred_is_temporary(self, sink: MailSink) -> None:
        """A 451 to DATA means try again later."""
        sink.data_reply = "451 4.3.0 try later"
        with pytest.raises(TemporaryFailure):
            await SmtpSender(self.mail(sink)).send(self.message(), [HOTLINE])

    async def test_relay_down_is_temporary(self, sink: MailSink) -> None:
        """Nobody listening: TemporaryFailure, not an error."""
        sink.stop()
        with pytest.raises(TemporaryFailure):
            await SmtpSender(self.mail(sink)).send(self.message(), [HOTLINE])
