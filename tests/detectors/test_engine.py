"""The engine: dispatch, alert identity and revisions, lateness, snapshots."""

from __future__ import annotations

import orjson

from detectors.engine import Engine, EngineSettings
from detectors.testing import event, final_alerts, rule
from schemas.alert import alert_id_for

NIGHT = "2019-02-04T22:{:02d}:00+09:00"


def engine(**settings: object) -> Engine:
    return Engine([rule("off_hours")], EngineSettings(**settings))  # type: ignore[arg-type]


class TestAlerts:
    """One finding, one id, a few revisions."""

    def test_alert_id_is_deterministic(self) -> None:
        """Same events, same ids, in a fresh engine."""
        events = [event(NIGHT.format(m), event_id=f"n{m}") for m in range(3)]
        first = [a.alert_id for a in engine().process_all(events)]
        second = [a.alert_id for a in engine().process_all(events)]
        assert first == second and len(set(first)) == 1
        assert first[0] == alert_id_for("off_hours", "night", "u001", 1549206000000)

    def test_revisions_double(self) -> None:
        """A growing finding republishes at counts 1, 2, 4, 8, ... then once at close."""
        eng = engine()
        alerts = eng.process_all(event(NIGHT.format(m)) for m in range(40))
        assert [a.count for a in alerts] == [1, 2, 4, 8, 16, 32]
        alerts += eng.process_all([event("2019-02-06T10:00:00+09:00", mynumber_ref=False)])
        final = final_alerts(alerts)
        (only,) = final.values()
        assert only.count == 40 and only.revision == 7

    def test_no_personal_data_no_alert(self) -> None:
        """Events without personal-number references are not off-hours findings."""
        assert engine().process_all([event(NIGHT.format(1), mynumber_ref=False)]) == []

    def test_allowlisted_user(self) -> None:
        """An allowlisted user raises nothing."""
        eng = Engine([rule("off_hours", {"allowlist": {"users": ["u001"]}})])
        assert eng.process_all([event(NIGHT.format(1))]) == []

    def test_seeding_raises_nothing(self) -> None:
        """History replayed through seed() learns but never alerts."""
        eng = engine()
        assert eng.seed([event(NIGHT.format(1))]) == 1
        assert eng.drain() == []


class TestLateness:
    """Late events are set aside, never silently lost."""

    def test_late_event_is_kept_aside(self) -> None:
        """An event older than lateness behind its user's newest goes to late."""
        eng = engine(lateness_ms=60_000)
        eng.process(event("2019-02-04T23:00:00+09:00"))
        old = event("2019-02-04T22:00:00+09:00")
        eng.process(old)
        assert eng.drain_late() == [old]

    def test_within_lateness_same_result(self) -> None:
        """Reversed order within lateness gives the same final alerts."""
        events = [event(NIGHT.format(m), event_id=f"n{m}") for m in range(10)]
        eng = engine()
        a = final_alerts(eng.process_all(events) + eng.flush())
        eng = engine()
        b = final_alerts(eng.process_all(reversed(events)) + eng.flush())
        assert {k: v.count for k, v in a.items()} == {k: v.count for k, v in b.items()}


class TestSnapshots:
    """State round-trips byte for byte and resumes exactly."""

    def test_round_trip_bytes(self) -> None:
        """restore(snapshot()) then snapshot() gives identical bytes."""
        eng = engine()
        eng.process_all(event(NIGHT.format(m)) for m in range(5))
        data = eng.snapshot()
        other = engine()
        other.restore(data)
        assert other.snapshot() == data
        assert orjson.loads(data)["users"]["u001"]["s"]["off_hours"]

    def test_resume_from_user_checkpoint(self) -> None:
        """A restored engine continues the same finding, not a second one."""
        events = [event(NIGHT.format(m), event_id=f"n{m}") for m in range(6)]
        whole = final_alerts(engine().process_all(events))
        first = engine()
        part = first.process_all(events[:3])
        second = engine()
        second.load_user("u001", first.dump_user("u001"))
        part += second.process_all(events[3:])
        resumed = final_alerts(part)
        assert resumed.keys() == whole.keys()
        assert [a.count for a in resumed.values()] == [a.count for a in whole.values()]

    def test_idle_users_expire(self) -> None:
        """Users idle longer than the TTL are forgotten and marked dirty."""
        eng = engine(idle_ttl_ms=24 * 3_600_000, lateness_ms=0)
        eng.process(event(NIGHT.format(1), user="old"))
        eng.clear_dirty()
        eng.process(event("2019-02-10T10:00:00+09:00", user="new", mynumber_ref=False))
        assert "old" not in eng.users and "old" in eng.dirty


class TestPerUserWatermark:
    """A lagging shipper's users keep their windows open."""

    def test_lagging_user_windows_survive_sweeps(self) -> None:
        """Sweeps driven by other users' newer events don't close a lagging user's findings."""
        eng = engine(lateness_ms=3_600_000)
        eng.process(event("2019-02-04T22:00:00+09:00", user="slow", event_id="s1"))
        # Another user's events run two days ahead and trigger sweeps.
        eng.process(event("2019-02-06T12:00:00+09:00", user="fast", mynumber_ref=False))
        eng.process(event("2019-02-04T22:30:00+09:00", user="slow", event_id="s2"))
        final = final_alerts(eng.process_all([]) + eng.flush())
        slow = [a for a in final.values() if a.user == "slow"]
        assert len(slow) == 1 and slow[0].count == 2
