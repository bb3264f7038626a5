"""The console's in-memory store, PPC deadlines, scrubbing and health series (no broker, no browser)."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest

from detectors.testing import event, run_rule
from streams.ack import AckRecord, ack_audit_record
from streams.console import (
    ACTION_CLOSED,
    ACTION_REOPENED,
    ConsoleSettings,
    ConsoleStore,
    HealthSampler,
    describe_record,
    ppc_deadlines,
    scrub,
    scrub_tree,
)

TZ = ZoneInfo("Asia/Tokyo")


def alert_docs(user: str = "u-tanaka", department: str = "税務課", n: int = 4, day: str = "2024-05-11") -> list[dict[str, Any]]:
    """Every published revision of one off_hours alert (Saturday lookups), as JSON documents."""
    events = [event(f"{day}T10:{10 + i:02d}:00+09:00", user=user, department=department) for i in range(n)]
    return [orjson.loads(a.to_json()) for a in run_rule("off_hours", events)]


def audit(action: str, alert_ids: list[str], at: str, **detail: Any) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "record_id": f"{action}:{','.join(alert_ids)}:{at}",
        "action": action,
        "at": at,
        "actor": "leakwatch",
        "via": "smtp",
        "alert_ids": alert_ids,
        "detail": detail,
    }


def closure(alert_id: str, resolution: str = "false_positive", by: str = "sato", **extra: Any) -> dict[str, Any]:
    return {"alert_id": alert_id, "state": "closed", "resolution": resolution, "by": by, "at": "2024-05-13T09:00:00+09:00",
            "via": "console", "comment": "確認済み"} | extra


def reopening(alert_id: str, version: int, by: str = "suzuki", at: str = "2024-05-14T09:00:00+09:00") -> dict[str, Any]:
    return {"alert_id": alert_id, "state": "open", "version": version, "by": by, "at": at, "via": "console", "comment": "再調査"}


class TestConsoleStoreAlerts:
    """Alert revisions: newest wins, replays and duplicates change nothing."""

    def test_newest_revision_wins(self) -> None:
        """Revisions 1, 2, 3 leave revision 3 with its count."""
        store = ConsoleStore()
        docs = alert_docs()
        for doc in docs:
            store.apply_alert(doc)
        (aid,) = store.alerts
        assert store.summary(aid)["revision"] == 3
        assert store.summary(aid)["count"] == 4

    def test_duplicate_and_older_revisions_ignored(self) -> None:
        """A duplicate (alert_id, revision) or an older revision reports no change."""
        store = ConsoleStore()
        docs = alert_docs()
        assert store.apply_alert(docs[-1]) == [docs[-1]["alert_id"]]
        version = store.version
        assert store.apply_alert(docs[-1]) == []
        assert store.apply_alert(docs[0]) == []
        assert store.version == version
        assert store.summary(docs[-1]["alert_id"])["revision"] == docs[-1]["revision"]

    def test_malformed_records_ignored(self) -> None:
        """Records missing required fields are skipped, not raised."""
        store = ConsoleStore()
        assert store.apply_alert({"alert_id": "lw-x"}) == []
        assert store.apply_audit({"action": "ack"}) == []
        assert store.apply_ack({"alert_id": 5}) == []
        assert store.apply_state({"alert_id": "lw-x", "state": "closed", "resolution": "maybe"}) == []
        assert store.alerts == {} and store.version == 0

    def test_eviction_prefers_closed_then_oldest(self) -> None:
        """Beyond max_alerts, closed alerts go first, then the oldest by last event."""
        store = ConsoleStore(max_alerts=2)
        old = alert_docs("u-old", day="2024-05-04")[-1]
        closed = alert_docs("u-closed", day="2024-05-18")[-1]
        store.apply_alert(old)
        store.apply_alert(closed)
        store.apply_state(closure(closed["alert_id"]))
        new = alert_docs("u-new", day="2024-05-25")[-1]
        store.apply_alert(new)
        assert set(store.alerts) == {old["alert_id"], new["alert_id"]}
        newer = alert_docs("u-newer", day="2024-06-01")[-1]
        store.apply_alert(newer)
        assert set(store.alerts) == {new["alert_id"], newer["alert_id"]}


class TestConsoleStoreStates:
    """new → escalated → acknowledged → closed, from audit, ack and state records."""

    def test_state_progression(self) -> None:
        """Each record moves the alert on; a later ack does not reopen a closed alert."""
        store = ConsoleStore()
        doc = alert_docs()[-1]
        aid = doc["alert_id"]
        store.apply_alert(doc)
        assert store.state_of(aid) == "new"
        store.apply_audit(audit("mail.sent", [aid], "2024-05-11T10:11:00+09:00", kind="alert", recipients=["hotline@x"]))
        assert store.state_of(aid) == "escalated"
        store.apply_audit(audit("escalation.step", [aid], "2024-05-11T10:41:00+09:00", kind="step", tier=1))
        assert store.escalation_tier(aid) == 1
        ack = AckRecord(aid, "sato", "2024-05-11T10:50:00+09:00", "console", "確認中")
        assert store.apply_ack(orjson.loads(ack.to_json())) == [aid]
        assert store.state_of(aid) == "acknowledged"
        assert store.apply_state(closure(aid, "confirmed")) == [aid]
        assert store.state_of(aid) == "closed"
        assert store.summary(aid)["resolution"] == "confirmed"

    def test_first_ack_and_first_closure_count(self) -> None:
        """A second ack or closure of the same alert is ignored."""
        store = ConsoleStore()
        aid = alert_docs()[-1]["alert_id"]
        store.apply_ack({"alert_id": aid, "by": "sato", "at": "2024-05-11T10:50:00+09:00", "via": "link"})
        assert store.apply_ack({"alert_id": aid, "by": "suzuki", "at": "2024-05-11T10:51:00+09:00", "via": "console"}) == []
        assert store.acks[aid]["by"] == "sato"
        store.apply_state(closure(aid, "false_positive", "sato"))
        assert store.apply_state(closure(aid, "confirmed", "suzuki")) == []
        assert store.closures[aid]["resolution"] == "false_positive"

    def test_audit_deduplicated_sorted_and_shared_by_digests(self) -> None:
        """The same record twice counts once; history is time-ordered; a digest lands on each alert."""
        store = ConsoleStore()
        a = alert_docs("u-a")[-1]["alert_id"]
        b = alert_docs("u-b")[-1]["alert_id"]
        later = audit("mail.sent", [a], "2024-05-11T11:00:00+09:00", kind="update")
        earlier = audit("digest.sent", [a, b], "2024-05-11T10:30:00+09:00", kind="digest")
        assert store.apply_audit(later) == [a]
        assert store.apply_audit(later) == []
        assert store.apply_audit(earlier) == [a, b]
        assert [r["action"] for r in store.trail(a)] == ["digest.sent", "mail.sent"]
        assert [r["action"] for r in store.trail(b)] == ["digest.sent"]

    def test_records_about_no_alert_ignored(self) -> None:
        """Sign-in records name no alert: no trail gets them and nothing is kept of them."""
        store = ConsoleStore()
        signin = audit("console.signin", [], "2024-05-11T09:00:00+09:00", method="password") | {"actor": "sato", "via": "console"}
        assert store.apply_audit(signin) == []
        assert store.version == 0 and not store.history and not store._audit_seen

    def test_ack_audit_from_link_is_worded(self) -> None:
        """The audit record of a link ack reads as an acknowledgment via the mail link."""
        store = ConsoleStore()
        aid = alert_docs()[-1]["alert_id"]
        ack = AckRecord(aid, "山田", "2024-05-11T12:00:00+09:00", "link", "対応します")
        store.apply_audit(ack_audit_record(ack).to_dict())
        (row,) = store.trail(aid)
        assert row["actor"] == "山田" and row["via"] == "link"
        assert "受領確認" in row["what"] and "対応します" in row["what"]
        assert "acknowledged" in row["what_en"]

    def test_closure_record_is_worded(self) -> None:
        """A console closure reads as closed with its resolution and comment, in both languages."""
        record = {"action": ACTION_CLOSED, "detail": {"resolution": "confirmed", "comment": "本人が認めた"}}
        ja, en = describe_record(record)
        assert ja == "クローズ（漏えい等事案と確定）「本人が認めた」"
        assert en == 'closed as confirmed incident "本人が認めた"'


class TestConsoleStoreReopen:
    """Reopening: state records carry versions; the newest version decides, replays change nothing."""

    def test_reopen_then_close_again(self) -> None:
        """closed (v1) → open (v2) → closed (v3); the reopened alert is among the open ones meanwhile."""
        store = ConsoleStore()
        doc = alert_docs()[-1]
        aid = doc["alert_id"]
        store.apply_alert(doc)
        store.apply_ack({"alert_id": aid, "by": "sato", "at": "2024-05-13T08:59:00+09:00", "via": "console"})
        assert store.apply_state(closure(aid)) == [aid]
        assert store.apply_state(reopening(aid, 2)) == [aid]
        assert store.state_of(aid) == "acknowledged" and aid not in store.closures
        assert store.reopened[aid]["by"] == "suzuki"
        assert [r["alert_id"] for r in store.query(state=["new", "escalated", "acknowledged"])[1]] == [aid]
        assert store.summary(aid)["resolution"] is None
        assert store.apply_state(closure(aid, "confirmed", version=3)) == [aid]
        assert store.state_of(aid) == "closed" and aid not in store.reopened
        assert store.state_versions[aid] == 3

    def test_replays_and_stale_versions_ignored(self) -> None:
        """Reading the topic again, or a concurrent action that lost, changes nothing."""
        store = ConsoleStore()
        aid = alert_docs()[-1]["alert_id"]
        store.apply_state(closure(aid))
        store.apply_state(reopening(aid, 2))
        version = store.version
        assert store.apply_state(closure(aid)) == []  # v1 again
        assert store.apply_state(reopening(aid, 2, by="other")) == []
        assert store.apply_state({**reopening(aid, 3), "state": "archived"}) == []
        assert store.version == version and store.reopened[aid]["by"] == "suzuki" and aid not in store.closures

    def test_first_confirmation_kept(self) -> None:
        """Confirmed, reopened, confirmed again: the PPC clock's start is the first confirmation."""
        store = ConsoleStore()
        aid = alert_docs()[-1]["alert_id"]
        first = "2024-05-13T09:00:00+09:00"
        store.apply_state(closure(aid, "confirmed", ppc={"known_at": first}))
        store.apply_state(reopening(aid, 2))
        store.apply_state(closure(aid, "confirmed", version=3, at="2024-05-20T09:00:00+09:00"))
        assert store.confirmed_at[aid] == first

    def test_first_confirmation_from_the_audit_trail(self) -> None:
        """With the state topic compacted to its last record, the audit trail still tells the first confirmation."""
        store = ConsoleStore()
        aid = alert_docs()[-1]["alert_id"]
        first = "2024-05-13T09:00:00+09:00"
        store.apply_audit(audit(ACTION_CLOSED, [aid], first, resolution="confirmed", ppc={"known_at": first}))
        store.apply_state(closure(aid, "confirmed", version=3, at="2024-05-20T09:00:00+09:00"))
        assert store.confirmed_at[aid] == first

    def test_reopen_record_is_worded(self) -> None:
        """The trail says who reopened what kind of closure, and why, without repeating the alert id."""
        store = ConsoleStore()
        aid = alert_docs()[-1]["alert_id"]
        rec = audit(ACTION_REOPENED, [aid], "2024-05-14T09:00:00+09:00", comment="再調査", previous_resolution="false_positive")
        store.apply_audit(rec | {"actor": "suzuki", "via": "console"})
        (row,) = store.trail(aid)
        assert row["what"] == "再オープン（誤検知としたクローズを取消） 「再調査」"
        assert row["what_en"] == 'reopened (was closed as false positive) "再調査"'
        assert row["actor"] == "suzuki" and aid not in row["what"]


class TestConsoleStoreQuery:
    """Filters, search, order and facets of the alert list."""

    @pytest.fixture
    def store(self) -> ConsoleStore:
        s = ConsoleStore()
        for user, dept, day in (("u-tanaka", "税務課", "2024-05-11"), ("u-kato", "市民課", "2024-05-18"), ("u-mori", "税務課", "2024-05-25")):
            s.apply_alert(alert_docs(user, dept, day=day)[-1])
        usb = alert_docs("u-usb", "情報政策課", day="2024-06-01")[-1] | {"rule_id": "usb_write", "severity": "critical",
                                                                        "title": "USB書き込み", "alert_id": "lw-00000000-00000000-0000000a"}
        s.apply_alert(usb)
        return s

    def test_newest_first(self, store: ConsoleStore) -> None:
        """Rows come newest last event first."""
        _, rows = store.query()
        assert [r["user"] for r in rows] == ["u-usb", "u-mori", "u-kato", "u-tanaka"]

    def test_filters(self, store: ConsoleStore) -> None:
        """Severity, rule, department, state and search narrow the list; total counts all matches."""
        assert [r["user"] for r in store.query(severity=["critical"])[1]] == ["u-usb"]
        assert [r["user"] for r in store.query(rule="off_hours", department="税務課")[1]] == ["u-mori", "u-tanaka"]
        assert [r["user"] for r in store.query(search="KATO")[1]] == ["u-kato"]
        assert [r["user"] for r in store.query(search="0000000a")[1]] == ["u-usb"]
        aid = store.query(search="tanaka")[1][0]["alert_id"]
        store.apply_state(closure(aid))
        assert [r["user"] for r in store.query(state=["new"])[1]] == ["u-usb", "u-mori", "u-kato"]
        assert [r["user"] for r in store.query(state=["closed"])[1]] == ["u-tanaka"]
        total, rows = store.query(limit=2)
        assert total == 4 and len(rows) == 2

    def test_time_range_overlaps(self, store: ConsoleStore) -> None:
        """since/until keep alerts whose [first, last] overlaps the range."""
        since = datetime(2024, 5, 18, tzinfo=TZ).timestamp()
        until = datetime(2024, 5, 26, tzinfo=TZ).timestamp()
        assert [r["user"] for r in store.query(since=since, until=until)[1]] == ["u-mori", "u-kato"]

    def test_facets(self, store: ConsoleStore) -> None:
        """Rules with titles and departments for the filter menus."""
        f = store.facets()
        assert [r["id"] for r in f["rules"]] == ["off_hours", "usb_write"]
        assert f["departments"] == ["市民課", "情報政策課", "税務課"]


class TestConsoleStoreOverview:
    """Per-day counts, top users and departments."""

    def test_days_by_severity_and_rule(self) -> None:
        """Alerts are counted on the Tokyo day of their first event."""
        store = ConsoleStore()
        store.apply_alert(alert_docs("u-a", "税務課", day="2024-05-11")[-1])
        store.apply_alert(alert_docs("u-b", "税務課", day="2024-05-11")[-1])
        store.apply_alert(alert_docs("u-a", "税務課", day="2024-05-12")[-1])
        ov = store.overview(TZ, date(2024, 5, 12), 3)
        assert ov["days"] == ["2024-05-10", "2024-05-11", "2024-05-12"]
        assert ov["by_severity"]["high"] == [0, 2, 1]
        assert ov["by_rule"] == [{"rule_id": "off_hours", "title": "休日の個人番号参照",
                                  "title_en": "Personal data referenced on a weekend", "counts": [0, 2, 1]}]
        assert ov["top_users"][0] == {"user": "u-a", "department": "税務課", "count": 2, "max_severity": "high"}
        assert ov["top_departments"] == [{"department": "税務課", "count": 3}]
        assert ov["states"]["new"] == 3 and ov["total"] == 3

    def test_old_data_shows_latest_days_with_alerts(self) -> None:
        """When nothing falls in the last days (replayed history), the range ends at the newest alert."""
        store = ConsoleStore()
        store.apply_alert(alert_docs(day="2024-05-11")[-1])
        ov = store.overview(TZ, date(2026, 1, 1), 7)
        assert ov["days"][-1] == "2024-05-11" and ov["total"] == 1


class TestPpcDeadlines:
    """速報 and 確報 deadlines from the confirmation time and the settings."""

    def test_defaults(self) -> None:
        """速報 3-5 days, 確報 30 days after the day of confirmation."""
        d = ppc_deadlines(datetime(2024, 5, 13, 9, 0, tzinfo=TZ), ConsoleSettings(), unauthorised_purpose=False)
        assert (d["prompt_from"], d["prompt_due"], d["final_due"]) == ("2024-05-16", "2024-05-18", "2024-06-12")

    def test_unauthorised_purpose_is_sixty_days(self) -> None:
        """Possible unauthorised purpose: 確報 within 60 days."""
        d = ppc_deadlines(datetime(2024, 5, 13, 23, 59, tzinfo=TZ), ConsoleSettings(), unauthorised_purpose=True)
        assert d["final_due"] == "2024-07-12" and d["final_days"] == "60"

    def test_configurable(self) -> None:
        """Other numbers from the settings are used as given."""
        cs = ConsoleSettings(ppc_prompt_days_min=1, ppc_prompt_days=3, ppc_final_days=20, ppc_final_days_unauthorised=40)
        d = ppc_deadlines(datetime(2024, 5, 13, tzinfo=TZ), cs, unauthorised_purpose=False)
        assert (d["prompt_from"], d["prompt_due"], d["final_due"]) == ("2024-05-14", "2024-05-16", "2024-06-02")


class TestScrub:
    """The last-line mask of personal-number-like digit runs."""

    @pytest.mark.parametrize(
        "text",
        ["123456789018", "1234-5678-9018", "1234 5678 9018", "１２３４５６７８９０１８", "1234　5678　9018", "12345678901234"],
    )
    def test_masks_digit_runs(self, text: str) -> None:
        """Plain, grouped, full-width and longer runs are masked."""
        assert scrub(f"番号 {text} です") == "番号 ［伏字］ です"

    def test_keeps_our_ids_and_short_numbers(self) -> None:
        """Alert ids, pseudonyms, timestamps, IPs and counts are left alone."""
        text = "lw-12345678-12345678-12345678 mn_12345678-90123456 2024-05-11T10:10:00+09:00 10.0.0.1 1234"
        assert scrub(text) == text

    def test_tree(self) -> None:
        """Every string in a JSON-like tree, keys included, is scrubbed; numbers are not touched."""
        doc = {"title": ["x 123456789018"], "123456789018": 1, "n": 123456789018}
        assert scrub_tree(doc) == {"title": ["x ［伏字］"], "［伏字］": 1, "n": 123456789018}


class TestHealthSampler:
    """Counters turned into per-interval rates for the sparklines."""

    def test_rates(self) -> None:
        """DLQ per minute and events per second come from counter differences; lag is the gauge."""
        h = HealthSampler()
        base = {"lag": 5.0, "consumed": 100.0, "invalid": 1.0, "mails_sent": 0.0, "mails_failed": 0.0,
                "mails_retried": 0.0, "unacknowledged": 0.0, "alerts_published": 0.0}
        h.sample(1000.0, base)
        h.sample(1010.0, base | {"lag": 2.0, "consumed": 300.0, "invalid": 3.0, "mails_failed": 1.0})
        (point,) = h.series()
        assert point == {"t": 1010, "lag": 2.0, "dlq_per_min": 12.0, "events_per_s": 20.0, "mails_sent": 0.0, "mails_failed": 1.0}
