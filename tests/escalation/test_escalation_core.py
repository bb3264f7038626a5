"""The escalation service's bookkeeping, driven by an injected clock (no Kafka, no SMTP).

Commit positions, the storm limiter, due escalation steps, deduplication by
revision and by what the state topic says was sent, and the gauges.
"""

from __future__ import annotations

import pytest
from escalation_kit import make_alert

from schemas.alert import Alert
from streams.ack import AckRecord
from streams.config import Settings
from streams.escalation import AlertState, CommitTracker, EscalationService, StormLimiter, due_steps
from streams.mail_settings import MailSettings, Tier
from streams.metrics import REGISTRY

HOTLINE = "hotline@city.example.lg.jp"


class FakeClock:
    """Wall-clock seconds under the test's control."""

    def __init__(self, now: float = 1_714_800_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def service(clock: FakeClock, **mail: object) -> EscalationService:
    """A service that is never started: only its in-memory logic is exercised."""
    settings = Settings(brokers="127.0.0.1:1")
    defaults: dict[str, object] = {
        "smtp_host": "127.0.0.1",
        "hotline": (HOTLINE,),
        "tiers": [{"after": "30m", "to": ["cpo@city.example.lg.jp"]}, {"after": "2h", "to": ["exec@city.example.lg.jp"]}],
        "digest_threshold": 3,
        "digest_window": "60s",
    }
    m = MailSettings(**(defaults | mail))  # type: ignore[arg-type]
    m.validate()
    svc = EscalationService(settings, m, clock=clock, rules={})
    svc.assigned = {0, 1}
    return svc


def mailed(svc: EscalationService, alert: Alert, at: float) -> None:
    """Pretend the first mail about ``alert`` went out at ``at`` (as recorded state says)."""
    st = svc.states[alert.alert_id]
    st.first_mailed_at = at
    st.thread = f"<{alert.alert_id}.alert@x>"
    st.revision, st.mailed_count, st.mailed_severity = alert.revision, alert.count, alert.severity
    st.sent[f"{alert.alert_id}/alert"] = [HOTLINE]
    svc.pending.pop(f"{alert.alert_id}/alert", None)


class TestCommitTracker:
    """The commit position never passes a record whose mail is not recorded."""

    def test_position_is_lowest_held_offset(self) -> None:
        """Held offsets pin the position; releasing them lets it advance."""
        t = CommitTracker()
        for off in range(5):
            t.seen(0, off)
        t.hold(0, 1)
        t.hold(0, 3)
        assert t.committable() == {0: 1}
        t.release(0, 1)
        assert t.committable() == {0: 3}
        t.release(0, 3)
        assert t.committable() == {0: 5}

    def test_only_moves_forward(self) -> None:
        """After a commit the same position is not offered again."""
        t = CommitTracker()
        t.seen(1, 9)
        t.committed(t.committable())
        assert t.committable() == {}
        t.seen(1, 10)
        assert t.committable() == {1: 11}

    def test_hold_counts(self) -> None:
        """Two mails owed by one record need two releases."""
        t = CommitTracker()
        t.seen(0, 0)
        t.hold(0, 0)
        t.hold(0, 0)
        t.release(0, 0)
        assert t.position(0) == 0
        t.release(0, 0)
        assert t.position(0) == 1

    def test_forget(self) -> None:
        """A revoked partition is dropped entirely."""
        t = CommitTracker()
        t.seen(2, 4)
        t.hold(2, 4)
        t.forget(2)
        assert t.position(2) is None


class TestStormLimiter:
    """At most N individual mails per sliding window."""

    def test_window(self) -> None:
        """The fourth mail within the window is refused; after the window, allowed again."""
        lim = StormLimiter(3, 60.0)
        assert [lim.allow(t) for t in (0.0, 1.0, 2.0, 3.0)] == [True, True, True, False]
        assert lim.allow(60.5)  # the first one left the window
        assert not lim.allow(60.9)  # 1.0, 2.0 and 60.5 are still in it

    def test_zero_never_bundles(self) -> None:
        """Threshold 0 switches digests off."""
        lim = StormLimiter(0, 60.0)
        assert all(lim.allow(0.0) for _ in range(100))


class TestDueSteps:
    """Which escalation steps are due, with an injected clock."""

    TIERS = (Tier(1, 1800.0, ("cpo@x.jp",)), Tier(2, 7200.0, ("exec@x.jp",)))

    def state(self, first_mailed_at: float | None, steps_done: int = 0, partition: int = 0) -> dict[str, AlertState]:
        alert = make_alert("u1")
        st = AlertState(alert, partition, 0.0)
        st.first_mailed_at = first_mailed_at
        st.steps_done = steps_done
        return {alert.alert_id: st}

    def due(self, states: dict[str, AlertState], now: float, acked: set[str] | None = None, pending: set[str] | None = None) -> list[int]:
        return [t.number for _, t in due_steps(states, self.TIERS, acked or set(), now, lambda p: p == 0, pending or set())]

    def test_tier_after_its_delay(self) -> None:
        """Tier 1 is due 30 min after the first mail, not a second earlier."""
        states = self.state(1000.0)
        assert self.due(states, 1000.0 + 1799) == []
        assert self.due(states, 1000.0 + 1800) == [1]

    def test_next_tier_follows_the_last_one_sent(self) -> None:
        """With tier 1 done, tier 2 is due at 2 h; with both done, nothing."""
        assert self.due(self.state(0.0, steps_done=1), 7199) == []
        assert self.due(self.state(0.0, steps_done=1), 7200) == [2]
        assert self.due(self.state(0.0, steps_done=2), 99999) == []

    def test_ack_stops(self) -> None:
        """An acknowledged alert never escalates."""
        states = self.state(0.0)
        assert self.due(states, 99999, acked=set(states)) == []

    def test_not_before_the_first_mail(self) -> None:
        """Timers start with the first mail, not with the alert."""
        assert self.due(self.state(None), 99999) == []

    def test_only_owned_partitions_and_not_twice(self) -> None:
        """Another worker's alerts and steps already pending are skipped."""
        assert self.due(self.state(0.0, partition=1), 99999) == []
        states = self.state(0.0)
        (aid,) = states
        assert self.due(states, 99999, pending={f"{aid}/step/1"}) == []


class TestServiceBookkeeping:
    """EscalationService.accept/tick with a fake clock: what gets owed, bundled, escalated."""

    def test_duplicate_revision_owes_nothing(self) -> None:
        """The same (alert_id, revision) twice owes one mail; its offsets are both held."""
        clock = FakeClock()
        svc = service(clock)
        alert = make_alert("u1")
        svc.accept(alert, 0, 10)
        svc.accept(make_alert("u1"), 0, 11)
        assert list(svc.pending) == [f"{alert.alert_id}/alert"]
        assert len(svc.ready) == 1 and svc.pending[f"{alert.alert_id}/alert"].offsets == [10]

    def test_new_revision_before_sending_is_merged(self) -> None:
        """A newer revision while the first mail waits updates that mail instead of adding one."""
        svc = service(FakeClock())
        svc.accept(make_alert("u1", count=3), 0, 10)
        svc.accept(make_alert("u1", count=6, revision=2), 0, 12)
        (entry,) = svc.pending.values()
        assert entry.alert.count == 6 and entry.offsets == [10, 12]
        assert svc.tracker.position(0) == 10

    def test_update_after_first_mail(self) -> None:
        """A grown count after the first mail owes an update; an equal count does not."""
        svc = service(FakeClock())
        alert = make_alert("u1", count=3)
        svc.accept(alert, 0, 1)
        mailed(svc, alert, svc.clock())
        svc.accept(make_alert("u1", count=3, revision=2), 0, 2)
        assert not svc.pending
        svc.accept(make_alert("u1", count=6, revision=3), 0, 3)
        assert list(svc.pending) == [f"{alert.alert_id}/update/r3"]

    def test_state_from_before_a_restart_prevents_resending(self) -> None:
        """Recorded recipients are not mailed again when the record is read again."""
        svc = service(FakeClock())
        alert = make_alert("u1")
        st = AlertState(alert, 0, 0.0)
        st.sent[f"{alert.alert_id}/alert"] = [HOTLINE]
        svc.states[alert.alert_id] = st  # as read back from the state topic
        svc.accept(alert, 0, 5)
        assert not svc.pending and not svc.ready
        assert svc.tracker.position(0) is None or svc.tracker.committable() == {}

    def test_storm_goes_to_a_digest_and_critical_does_not(self) -> None:
        """Beyond the threshold non-critical mails are collected; critical ones go out at once."""
        clock = FakeClock()
        svc = service(clock)
        for i in range(10):
            svc.accept(make_alert(f"u{i}"), 0, i)
        svc.accept(make_alert("boss", severity="critical"), 0, 10)
        assert len(svc.ready) == 4  # 3 within the threshold + the critical one
        assert any(o.entries[0].alert.severity == "critical" for o in svc.ready)
        ((collected_at, bundled),) = svc.digests.values()
        assert collected_at == clock()
        assert len(bundled) == 7
        clock.advance(59)
        svc.tick()
        assert len(svc.ready) == 4
        clock.advance(1)
        svc.tick()
        digest = svc.ready[-1]
        assert digest.digest and len(digest.entries) == 7 and digest.recipients == [HOTLINE]
        assert svc.tracker.position(0) == 0  # nothing committable until they are sent

    def test_timed_steps_and_ack(self) -> None:
        """Unacked: tier 1 after 30 min to the CPO and the hotline; acked: nothing more."""
        clock = FakeClock()
        svc = service(clock)
        a, b = make_alert("u1"), make_alert("u2")
        for i, alert in enumerate((a, b)):
            svc.accept(alert, 0, i)
            mailed(svc, alert, clock())
        svc.acks[b.alert_id] = AckRecord(b.alert_id, "山田", "2024-05-04T10:31:00+09:00", "cli")
        svc.ready.clear()
        clock.advance(1799)
        svc.tick()
        assert not svc.ready
        clock.advance(1)
        svc.tick()
        (out,) = svc.ready
        (entry,) = out.entries
        assert (entry.alert_id, entry.kind, entry.number) == (a.alert_id, "step", 1)
        assert out.recipients == ["cpo@city.example.lg.jp", HOTLINE]

    def test_gauges(self) -> None:
        """Unacknowledged count and oldest age per severity, owned alerts only."""
        clock = FakeClock()
        svc = service(clock, digest_threshold=0)
        svc.accept(make_alert("u1"), 0, 0)
        clock.advance(100)
        svc.accept(make_alert("u2"), 1, 0)
        svc.accept(make_alert("u3", severity="critical"), 0, 1)
        svc.accept(make_alert("u4"), 7, 0)  # a partition this worker does not own
        acked = make_alert("u3", severity="critical").alert_id
        clock.advance(20)
        svc.update_gauges(clock())

        def sample(name: str, severity: str) -> float | None:
            return REGISTRY.get_sample_value(name, {"severity": severity})

        assert sample("leakwatch_alerts_unacknowledged", "high") == 2
        assert sample("leakwatch_oldest_unacknowledged_age_seconds", "high") == pytest.approx(120)
        assert sample("leakwatch_alerts_unacknowledged", "critical") == 1
        svc.acks[acked] = AckRecord(acked, "山田", "2024-05-04T10:31:00+09:00", "link")
        svc.update_gauges(clock())
        assert sample("leakwatch_alerts_unacknowledged", "critical") == 0
        assert sample("leakwatch_oldest_unacknowledged_age_seconds", "critical") == 0


class TestAlertState:
    """The compacted state record."""

    def test_round_trip(self) -> None:
        """Everything needed after a restart survives to_json/from_json."""
        alert = make_alert("u1", count=7, revision=2, department="税務課")
        st = AlertState(alert, 3, 100.0)
        st.first_mailed_at, st.thread, st.revision, st.mailed_count = 101.5, "<x@y>", 2, 7
        st.mailed_severity, st.steps_done, st.seq = "high", 1, 4
        st.sent = {f"{alert.alert_id}/alert": [HOTLINE]}
        st.acked = {"by": "山田", "at": "2024-05-04T10:31:00+09:00", "via": "link", "comment": ""}
        again = AlertState.from_json(st.to_json())
        assert again.alert.to_dict() == alert.to_dict()
        fields = ("partition", "first_seen_at", "first_mailed_at", "thread", "revision", "mailed_count", "mailed_severity", "steps_done", "sent", "seq", "acked")
        assert all(getattr(again, f) == getattr(st, f) for f in fields)
        assert again.seen_revision == 2

    def test_ack_in_state_counts_after_the_acks_topic_expired(self) -> None:
        """A state record carrying an ack makes the alert acknowledged, with no acks record at all."""
        clock = FakeClock()
        svc = service(clock)
        alert = make_alert("u1")
        st = AlertState(alert, 0, 0.0)
        st.first_mailed_at, st.seq = 0.0, 3
        st.acked = {"by": "山田", "at": "2024-05-04T10:31:00+09:00", "via": "cli", "comment": ""}
        svc._apply_state(AlertState.from_json(st.to_json()))
        ack = svc.ack_of(alert.alert_id)
        assert ack is not None and ack.by == "山田"
        clock.advance(99999)
        svc.tick()
        assert not svc.ready
