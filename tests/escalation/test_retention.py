"""Bounded escalation state: which alerts are forgotten, and how tombstones on the state topic are read.

No Kafka here: :func:`expired_alerts` is pure, and the reader's handling of
state records and tombstones is driven with real aiokafka ``ConsumerRecord``
values, as the reader loop receives them. Writing the tombstones is tested
with a real worker and broker in ``test_worker_retention.py``; the one race
a broker cannot replay on demand (the reader reading a tombstone back before
the sweep has awaited its send) is driven here by a producer that hands each
tombstone to the reader as it is sent.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import pytest
from aiokafka.structs import ConsumerRecord, TopicPartition
from escalation_kit import make_alert

from schemas.alert import Alert
from streams.ack import AckRecord
from streams.config import Settings
from streams.escalation import AlertState, EscalationService, event_end, expired_alerts
from streams.mail_settings import MailSettings

DAY = 86_400.0
STATE_TOPIC = "escalation-state"
NOW = datetime.fromisoformat("2024-07-01T12:00:00+09:00").timestamp()


def state(alert: Alert, partition: int = 0, seq: int = 1) -> AlertState:
    st = AlertState(alert, partition, 0.0)
    st.seq = seq
    return st


def states_of(*alerts: Alert, partition: int = 0) -> dict[str, AlertState]:
    return {a.alert_id: state(a, partition) for a in alerts}


def expired(
    states: dict[str, AlertState],
    acked: set[str],
    *,
    busy: set[str] | None = None,
    now: float = NOW,
    retention_days: float = 30,
    max_alerts: int = 1000,
    owned: tuple[int, ...] = (0,),
) -> list[str]:
    return expired_alerts(states, acked, busy or set(), lambda p: p in owned, now, retention_days * DAY, max_alerts)


class TestEventEnd:
    """An alert's events end at its last event or its window's end, whichever is later."""

    def test_window_end_counts(self) -> None:
        """A day window ends at midnight after the last event."""
        alert = make_alert("u1", day="2024-05-04")
        assert event_end(alert) == datetime.fromisoformat("2024-05-05T00:00:00+09:00").timestamp()


class TestExpiredAlerts:
    """Acknowledged, owned, idle alerts older than the retention (or beyond the cap) are forgotten."""

    def test_old_acknowledged_alert_expires(self) -> None:
        """Ended 31 days before the newest event and acknowledged: forgotten; 29 days: kept."""
        old, young, newest = make_alert("old", day="2024-05-01"), make_alert("young", day="2024-05-03"), make_alert("new", day="2024-06-01")
        states = states_of(old, young, newest)
        assert expired(states, {old.alert_id, young.alert_id}) == [old.alert_id]

    def test_unacknowledged_never_expire(self) -> None:
        """However old, an alert nobody acknowledged is kept (it may still owe escalation steps)."""
        old, newest = make_alert("old", day="2024-01-01"), make_alert("new", day="2024-06-01")
        assert expired(states_of(old, newest), set()) == []

    def test_busy_and_foreign_alerts_kept(self) -> None:
        """An alert that still owes a mail, or lives on a partition another worker owns, is kept."""
        busy, foreign, newest = make_alert("busy", day="2024-01-01"), make_alert("foreign", day="2024-01-02"), make_alert("new", day="2024-06-01")
        states = states_of(busy, newest) | states_of(foreign, partition=1)
        assert expired(states, {busy.alert_id, foreign.alert_id}, busy={busy.alert_id}) == []

    def test_event_time_not_wall_clock(self) -> None:
        """Replayed history: alerts a year old by the wall clock but recent by event time are kept."""
        a, b = make_alert("a", day="2023-05-01"), make_alert("b", day="2023-05-20")
        assert expired(states_of(a, b), {a.alert_id, b.alert_id}, now=NOW) == []

    def test_future_event_time_capped_by_the_clock(self) -> None:
        """An alert stamped years ahead does not make everything else look old."""
        recent, bogus = make_alert("recent", day="2024-06-25"), make_alert("bogus", day="2030-01-01")
        assert expired(states_of(recent, bogus), {recent.alert_id}) == []

    def test_cap_forgets_oldest_acknowledged_first(self) -> None:
        """Beyond max_alerts, the oldest acknowledged alerts go, even young ones; unacknowledged ones stay."""
        alerts = [make_alert(f"u{i}", day=f"2024-06-{10 + i:02d}") for i in range(6)]
        states = states_of(*alerts)
        acked = {a.alert_id for a in alerts[1:]}  # u0 (the oldest) is not acknowledged
        assert expired(states, acked, max_alerts=4) == [alerts[1].alert_id, alerts[2].alert_id]

    def test_retention_and_cap_together(self) -> None:
        """The expired ones count towards the cap: only the rest beyond it go too."""
        alerts = [make_alert("old", day="2024-01-01"), *(make_alert(f"u{i}", day=f"2024-06-{10 + i:02d}") for i in range(4))]
        states = states_of(*alerts)
        acked = {a.alert_id for a in alerts}
        assert expired(states, acked, max_alerts=3) == [alerts[0].alert_id, alerts[1].alert_id]


def service() -> EscalationService:
    """A service that is never started: only its reader-side logic is exercised."""
    mail = MailSettings(smtp_host="127.0.0.1", hotline=("hotline@city.example.lg.jp",), topic_state=STATE_TOPIC)
    mail.validate()
    svc = EscalationService(Settings(brokers="127.0.0.1:1"), mail, clock=lambda: NOW, rules={})
    svc.assigned = {0}
    return svc


def record(aid: str, value: bytes | None, offset: int = 0) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(STATE_TOPIC, 0, offset, 0, 0, aid.encode(), value, None, len(aid), len(value or b""), [])


def read(svc: EscalationService, *records: ConsumerRecord[bytes, bytes]) -> None:
    svc._apply_reader_batch({TopicPartition(STATE_TOPIC, 0): list(records)})


def acked_state(alert: Alert, seq: int) -> AlertState:
    st = state(alert, seq=seq)
    st.first_mailed_at = NOW - 100 * DAY
    st.acked = {"by": "山田", "at": "2024-05-04T10:31:00+09:00", "via": "cli", "comment": ""}
    return st


class TestTombstones:
    """What the reader does with tombstones on the state topic."""

    def test_another_workers_tombstone_forgets(self) -> None:
        """A state record then its tombstone (as on the topic before compaction): alert and ack are gone."""
        svc = service()
        alert = make_alert("u1")
        read(svc, record(alert.alert_id, acked_state(alert, 3).to_json()), record(alert.alert_id, None, 1))
        assert alert.alert_id not in svc.states
        assert svc.ack_of(alert.alert_id) is None

    def test_own_tombstone_keeps_a_newer_state(self) -> None:
        """Forgotten here, then a late revision took the alert up again: reading our tombstone back keeps it."""
        svc = service()
        alert = make_alert("u1")
        svc._tombstoned[alert.alert_id] = 5
        svc.accept(make_alert("u1", count=9, revision=7), 0, 40)
        read(svc, record(alert.alert_id, None))
        assert svc.states[alert.alert_id].alert.revision == 7
        assert svc._tombstoned == {}

    def test_older_record_does_not_resurrect(self) -> None:
        """Until our tombstone is read back, records not newer than the forgotten state are ignored."""
        svc = service()
        alert = make_alert("u1")
        svc._tombstoned[alert.alert_id] = 5
        read(svc, record(alert.alert_id, acked_state(alert, 5).to_json()))
        assert alert.alert_id not in svc.states
        read(svc, record(alert.alert_id, None, 1), record(alert.alert_id, acked_state(alert, 1).to_json(), 2))
        assert svc.states[alert.alert_id].seq == 1, "a record written after the tombstone counts again"

    def test_unpersisted_state_survives_a_tombstone(self) -> None:
        """A state taken up here and not yet mailed (seq 0) is newer than any tombstone."""
        svc = service()
        alert = make_alert("u1")
        svc.accept(alert, 0, 1)
        read(svc, record(alert.alert_id, None))
        assert alert.alert_id in svc.states


class TestSweepInMemory:
    """The sweep's memory side with nothing to tombstone (no Kafka needed)."""

    async def test_old_acks_of_unknown_alerts_dropped(self) -> None:
        """An ack older than the retention for an alert nobody remembers leaves memory; a recent one stays."""
        svc = service()
        old = make_alert("old").alert_id
        recent = make_alert("recent").alert_id
        svc.acks[old] = AckRecord(old, "山田", "2024-05-04T10:31:00+09:00", "cli")
        svc.acks[recent] = AckRecord(recent, "山田", "2024-06-30T10:31:00+09:00", "cli")
        assert await svc.sweep() == []
        assert set(svc.acks) == {recent}

    async def test_unpersisted_expired_alert_forgotten_without_kafka(self) -> None:
        """An expired alert that was never written to the state topic needs no tombstone."""
        svc = service()
        old, newest = make_alert("old", day="2024-01-01"), make_alert("new", day="2024-06-30")
        svc.states = {old.alert_id: state(old, seq=0), newest.alert_id: state(newest, seq=0)}
        svc.acks[old.alert_id] = AckRecord(old.alert_id, "山田", "2024-06-30T10:31:00+09:00", "cli")
        assert await svc.sweep() == [old.alert_id]
        assert set(svc.states) == {newest.alert_id} and old.alert_id not in svc.acks
        assert svc._tombstoned == {}


class TestRetentionSettings:
    """The retention settings of the ``mail:`` section are validated."""

    @pytest.mark.parametrize(("name", "value"), [("state_max_alerts", 0), ("state_sweep_interval", "0s"), ("state_retention", "soon")])
    def test_invalid(self, name: str, value: object) -> None:
        """Each bad value is refused naming the setting."""
        from streams.config import ConfigError

        with pytest.raises(ConfigError, match=rf"mail\.{name}"):
            MailSettings(smtp_host="x", hotline=("h@x.jp",), **{name: value}).validate()  # type: ignore[arg-type]

    def test_defaults(self) -> None:
        """Thirty days of event time, 100 000 alerts, swept every minute."""
        m = MailSettings()
        assert (m.state_retention_s, m.state_max_alerts, m.state_sweep_interval_s) == (30 * DAY, 100_000, 60.0)


class ReadBackProducer:
    """Sends go straight to the service's reader, before the sweep awaits them: the fastest read-back there is."""

    def __init__(self, svc: EscalationService, on_send: Any = None) -> None:
        self.svc = svc
        self.on_send = on_send
        self.sent: list[tuple[str, bytes | None]] = []

    async def send(self, topic: str, value: bytes | None, key: bytes) -> asyncio.Future[None]:
        self.sent.append((key.decode(), value))
        if self.on_send is not None:
            self.on_send(key.decode())
        read(self.svc, record(key.decode(), value, len(self.sent)))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


class TestSweepReadBackRace:
    """The reader may apply our tombstone while the sweep still awaits its send."""

    def expired_acked(self, svc: EscalationService) -> tuple[Alert, Alert]:
        old, newest = make_alert("old", day="2024-01-01"), make_alert("new", day="2024-06-30")
        svc.states = {old.alert_id: acked_state(old, 3), newest.alert_id: state(newest, seq=1)}
        svc.acks[old.alert_id] = AckRecord(old.alert_id, "山田", "2024-06-30T10:31:00+09:00", "cli")
        return old, newest

    async def test_early_read_back_still_counts_as_forgotten_by_the_sweep(self) -> None:
        """The sweep reports (and logs) the alert it forgot, however early its tombstone came back."""
        svc = service()
        old, newest = self.expired_acked(svc)
        svc._producer = producer = ReadBackProducer(svc)
        assert await svc.sweep() == [old.alert_id]
        assert producer.sent == [(old.alert_id, None)]
        assert set(svc.states) == {newest.alert_id} and old.alert_id not in svc.acks
        assert svc._tombstoned == {}, "the tombstone was read back: nothing left to guard"

    async def test_alert_turning_busy_during_the_send_is_kept(self) -> None:
        """A late revision owes mail while the tombstone is in flight: reading it back must not drop the alert."""
        svc = service()
        old, _ = self.expired_acked(svc)

        def late_revision(aid: str) -> None:
            svc.accept(make_alert("old", day="2024-01-01", count=9, revision=2), 0, 50)

        svc._producer = ReadBackProducer(svc, on_send=late_revision)
        assert await svc.sweep() == []
        assert svc.states[old.alert_id].alert.revision == 2, "mail is owed for it: it stays until mailed"
