"""Audit records (いつ・誰が・何を・どのように) and how ``leakwatch audit`` shows them."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from streams.audit import AuditRecord, describe, format_table, parse_since

TOKYO = ZoneInfo("Asia/Tokyo")
ALERT = "lw-0a1b2c3d-4e5f6071-8293a4b5"


def sent() -> AuditRecord:
    return AuditRecord(
        action="mail.sent",
        at="2024-05-04T01:16:02+00:00",
        actor="leakwatch",
        via="smtp",
        alert_ids=(ALERT,),
        detail={"kind": "alert", "recipients": ["hotline@city.example.lg.jp"], "message_id": f"<{ALERT}.alert@x>"},
        record_id=f"sent:{ALERT}/alert",
    )


class TestAuditRecord:
    """The record itself."""

    def test_json_round_trip(self) -> None:
        """to_json/from_json keep every field."""
        rec = sent()
        assert AuditRecord.from_json(rec.to_json()) == rec

    def test_key_is_the_alert(self) -> None:
        """Records about one alert share its key (one partition, in order); digests use their id."""
        assert sent().key == ALERT.encode()
        digest = AuditRecord("digest.sent", "2024-05-04T10:00:00+09:00", "leakwatch", "smtp", (ALERT, "lw-x"), {}, "sent:<d>")
        assert digest.key == b"sent:<d>"

    @pytest.mark.parametrize(
        "kwargs",
        [{"action": "Mail Opened!"}, {"action": ""}, {"via": "pigeon"}, {"at": "2024-05-04T10:00:00"}],
    )
    def test_invalid(self, kwargs: dict[str, str]) -> None:
        """A malformed action, an unknown channel or a naive time is refused."""
        base = {"action": "ack", "at": "2024-05-04T10:00:00+09:00", "actor": "山田", "via": "cli"}
        with pytest.raises(ValueError):
            AuditRecord(**(base | kwargs))  # type: ignore[arg-type]


class TestDisplay:
    """The table and the words of ``leakwatch audit``."""

    def test_table_has_when_who_what_how(self) -> None:
        """Header いつ/誰が/何を/どのように; time in Tokyo; who; what with recipients; how."""
        ack = AuditRecord("ack", "2024-05-04T10:31:00+09:00", "山田 太郎", "link", (ALERT,), {"comment": "調査開始"})
        table = format_table([sent(), ack], TOKYO).splitlines()
        assert table[0].split() == ["いつ", "誰が", "何を", "どのように"]
        assert table[1].startswith("2024-05-04 10:16:02 JST")
        assert "メール送信（初報）" in table[1] and "hotline@city.example.lg.jp" in table[1]
        assert table[1].endswith("メール (SMTP)") and table[2].endswith("メール内の確認リンク")
        assert "山田 太郎" in table[2] and "受領確認" in table[2] and "「調査開始」" in table[2]

    def test_describe_english_and_steps(self) -> None:
        """English wording, escalation tier and failure reason."""
        step = AuditRecord("escalation.step", "2024-05-04T10:45:00+09:00", "leakwatch", "smtp", (ALERT,), {"tier": 1, "recipients": ["cpo@x.jp"]})
        failed = AuditRecord("mail.failed", "2024-05-04T10:45:00+09:00", "leakwatch", "smtp", (ALERT,), {"kind": "alert", "code": 550, "reason": "user unknown", "recipients": ["gone@x.jp"]})
        assert describe(step, "en") == f"escalated (not acknowledged) tier 1 {ALERT} → cpo@x.jp"
        assert "第1段階" in describe(step)
        assert "[550] user unknown" in describe(failed)

    def test_other_components_actions(self) -> None:
        """The console's alert.closed is worded; an action nobody knows is shown by name."""
        closed = AuditRecord("alert.closed", "2024-05-04T11:00:00+09:00", "山田", "console", (ALERT,), {"resolution": "false_positive", "comment": "承認済み残業"})
        assert describe(closed) == f"クローズ（誤検知） {ALERT} 「承認済み残業」"
        odd = AuditRecord("rule.changed", "2024-05-04T11:00:00+09:00", "admin", "console")
        assert describe(odd) == "rule.changed"

    def test_parse_since(self) -> None:
        """Relative durations and ISO dates (naive ones in the configured zone)."""
        now = datetime(2024, 5, 4, 12, 0, tzinfo=TOKYO)
        assert parse_since("24h", TOKYO, now) == datetime(2024, 5, 3, 12, 0, tzinfo=TOKYO)
        assert parse_since("2w", TOKYO, now) == datetime(2024, 4, 20, 12, 0, tzinfo=TOKYO)
        assert parse_since("2024-05-01", TOKYO, now) == datetime(2024, 5, 1, tzinfo=TOKYO)
        assert parse_since("2024-05-01T09:00+00:00", TOKYO, now).utcoffset().total_seconds() == 0  # type: ignore[union-attr]
        with pytest.raises(ValueError):
            parse_since("yesterday", TOKYO, now)


class TestCommandLine:
    """``leakwatch audit`` argument errors."""

    def test_bad_since_exits_2(self, capsys: pytest.CaptureFixture[str]) -> None:
        """An unreadable --since is reported before Kafka is contacted."""
        from leakwatch.cli import main

        assert main(["audit", "--since", "last tuesday", "--brokers", "127.0.0.1:1"]) == 2
        assert "--since" in capsys.readouterr().err
