"""No personal number in any mail: checked per test here, and for the whole session in tests/conftest.py.

``conftest.no_personal_number_in_any_mail`` scans every mail every
:class:`MailSink` (escalation and console tests alike) received during the session (headers and decoded text
parts) when the session ends, and fails the run on any 12-digit run. The
tests below push alerts whose every field holds valid personal numbers
through composition and a real SMTP server, and make sure the check itself
recognises what it must.
"""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from escalation_kit import ALL_RECEIVED, MailSink, leaks, mail_texts, make_alert

from detectors.rules import load_rules
from schemas.alert import Alert
from schemas.mynumber import check_digit, is_valid_mynumber
from streams.mail_settings import MailSettings
from streams.mailer import (
    MailContext,
    MailItem,
    SmtpSender,
    compose_alert_mail,
    compose_digest,
    digest_id_for,
)

TOKYO = ZoneInfo("Asia/Tokyo")
HOTLINE = "hotline@city.example.lg.jp"


def my_number(body: str) -> str:
    number = body + str(check_digit(body))
    assert is_valid_mynumber(number)
    return number


NUMBERS = [my_number(f"{d}0000000{d}{d}{d}") for d in range(1, 8)]


def grouped(n: str, sep: str) -> str:
    return sep.join((n[:4], n[4:8], n[8:]))


def riddled(i: int, severity: str = "high") -> Alert:
    """An alert with personal numbers in every free-text field, plain, grouped and full-width."""
    n = NUMBERS[i % len(NUMBERS)]
    wide = n.translate(str.maketrans("0123456789", "０１２３４５６７８９"))
    return make_alert(
        f"staff{n}-{i}",
        severity=severity,
        title=f"休日の個人番号参照 {grouped(n, '-')}",
        title_en=f"Weekend lookup {grouped(n, ' ')}",
        department=f"税務課{wide}",
        terminals=(f"PC-{n}", grouped(n, " ")),
        devices=(f"USB{n}",),
        event_ids=(f"{n}", f"{n}-{i}", f"evt{grouped(n, '-')}"),
        subjects=("mn_0123456789abcdef0123",),
        details={"note": f"照会番号 {n}"},
    )


class TestNoPersonalNumberInMail:
    """Mails built from number-riddled alerts, sent through a real SMTP server, hold none."""

    @pytest.mark.parametrize("language", ["ja", "en"])
    async def test_single_and_digest(self, sink: MailSink, language: str) -> None:
        """Every header and decoded part of every received mail is free of 12-digit runs."""
        mail = MailSettings(smtp_host="127.0.0.1", smtp_port=sink.port, hotline=(HOTLINE,), language=language, from_address="lw@city.example.lg.jp")
        base = MailContext.from_settings(mail, TOKYO, datetime(2024, 5, 4, 10, 20, tzinfo=TOKYO))
        rules = {r.id: r for r in load_rules()}
        sender = SmtpSender(mail)
        alerts = [riddled(i, "critical" if i == 0 else "high") for i in range(7)]
        for a in alerts[:2]:
            item = MailItem(a, alert_url=f"https://lw.example.jp/alerts/{a.alert_id}", ack_url=f"https://lw.example.jp/ack/{a.alert_id}.1.x")
            for kind, number in (("alert", 0), ("step", 1), ("update", 2)):
                msg = compose_alert_mail(MailItem(item.alert, kind, number, item.alert_url, item.ack_url, 1, 60.0), [HOTLINE], base, rules.get(a.rule_id))
                result = await sender.send(msg, [HOTLINE])
                assert result.accepted == [HOTLINE]
        items = [MailItem(a, alert_url=f"https://lw.example.jp/alerts/{a.alert_id}") for a in alerts]
        digest = compose_digest(items, [HOTLINE], base, digest_id_for([a.alert_id for a in alerts]), rules)
        assert (await sender.send(digest, [HOTLINE])).accepted == [HOTLINE]
        received = sink.snapshot()
        assert len(received) == 7
        for rec in received:
            assert rec in ALL_RECEIVED  # the session-level check sees these too
            for text in mail_texts(rec.msg):
                assert not leaks(text), (rec.subject, leaks(text))
            raw = rec.raw.decode("ascii", "replace")
            assert not any(n in raw for n in NUMBERS)


class TestTheCheckItself:
    """The leak check finds what it must and ignores pseudonyms."""

    @pytest.mark.parametrize(
        "text",
        [NUMBERS[0], grouped(NUMBERS[0], "-"), grouped(NUMBERS[0], " "), "x" + NUMBERS[0] + "9", "１２３４５６７８９０１２", "boundary=\"===============6191292996158567877==\""],
    )
    def test_flags(self, text: str) -> None:
        """Plain, grouped, embedded, full-width and MIME-boundary digit runs are flagged."""
        assert leaks(text)

    def test_ignores_pseudonyms_and_dates(self) -> None:
        """Pseudonym tokens, dates, times and IPs are not personal numbers."""
        assert not leaks("mn_01234567890123456789 2024-05-04 10:15:00 10.1.2.3 lw-0a1b2c3d-4e5f6071-8293a4b5")
