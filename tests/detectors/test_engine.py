"""The engine: dispatch, alert identity and revisions, lateness, snapshots."""

from __future__ import annotations

import functools
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from detectors.base import DAY_MS
from detectors.engine import Engine, EngineSettings
from detectors.rules import Rule, load_rules
from detectors.testing import event, final_alerts, rule
from schemas.alert import alert_id_for
from schemas.event import Event, parse_ts

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
        """Users idle longer than the TTL (by two other users' clocks) are forgotten and marked dirty."""
        eng = engine(idle_ttl_ms=24 * 3_600_000, lateness_ms=0)
        eng.process(event(NIGHT.format(1), user="old"))
        eng.clear_dirty()
        eng.process(event("2019-02-10T10:00:00+09:00", user="new", mynumber_ref=False))
        assert "old" in eng.users, "one user's clock alone must not expire the others"
        eng.process(event("2019-02-10T10:05:00+09:00", user="newer", mynumber_ref=False))
        eng.process(event("2019-02-10T11:00:00+09:00", user="new", mynumber_ref=False))  # the next hourly sweep
        assert "old" not in eng.users and "old" in eng.dirty

    def test_one_wrong_clock_does_not_wipe_the_partition(self) -> None:
        """An event years ahead (a PC's wrong clock, a forged line) keeps other users' windows: their look-ups still add up."""
        eng = Engine(load_rules())
        base = parse_ts("2024-11-18T10:00:00+09:00")
        look = [Event(f"a{i}", base + i * 60_000, "alice", "t1", "search", "success", True, subject="r1") for i in range(14)]
        eng.process_all(look[:5])
        eng.process(Event("x", parse_ts("2031-01-01T10:00:00+09:00"), "bob", "t9", "search", "success", True, subject="r2"))
        assert "alice" in eng.users
        alerts = eng.process_all(look[5:])
        assert [a.rule_id for a in alerts if a.user == "alice"] == ["repeated_queries"]


class TestOwnHours:
    """Each user's own clock closes its findings and trims its state, whatever other clocks say."""

    def _night_then_morning(self, ahead: tuple[str, ...]) -> tuple[list[int], Engine]:
        """Alice looks up three records at night, then works on in the morning beside Bob; ``ahead`` share a PC two days ahead."""
        eng = engine(lateness_ms=0)
        events = [event(NIGHT.format(m), user="alice", event_id=f"n{m}") for m in range(3)]
        for k, who in enumerate(ahead):
            events.insert(1 + k, event("2019-02-07T09:00:00+09:00", user=who, mynumber_ref=False))
        for hour in range(9, 13):
            for who in ("alice", "bob"):
                events.append(event(f"2019-02-05T{hour:02d}:10:00+09:00", user=who, mynumber_ref=False))
        counts = [a.count for ev in events for a in eng.process_all([ev]) if a.user == "alice"]
        return counts, eng

    def test_finding_closes_on_time_beside_clocks_ahead(self) -> None:
        """Alice's last count is published in the morning, with one or several users' clocks two days ahead."""
        plain, _ = self._night_then_morning(())
        assert plain == [1, 2, 3], "counts 1 and 2 as they come, 3 when the window has closed"
        for ahead in (("carol",), ("carol", "dave", "erin")):
            counts, eng = self._night_then_morning(ahead)
            assert counts == plain, ahead
            assert eng.max_ts == parse_ts("2019-02-07T09:00:00+09:00"), "the clock ahead is still the newest event"

    def test_state_trimmed_by_own_clock(self) -> None:
        """A user's expired window state goes at that user's next hour, though the partition's sweeps are held back."""
        eng = Engine([rule("repeated_queries")], EngineSettings(lateness_ms=0))
        base = parse_ts("2024-11-18T10:00:00+09:00")
        eng.process(Event("x", base + 7 * DAY_MS, "carol", "t9", "search", "success", True, subject="r9"))
        eng.process_all(Event(f"a{i}", base + i * 60_000, "alice", "t1", "search", "success", True, subject=f"r{i}") for i in range(5))
        assert eng.users["alice"].slots[0] is not None
        eng.process(Event("b", base + 3 * DAY_MS, "alice", "t1", "view", "success", False))
        assert eng.users["alice"].slots[0] is None, "three days on, alice's look-up window is long gone"

    def test_restored_user_keeps_its_hour(self) -> None:
        """A restored user's next own hour follows its restored clock, as without the restart."""
        eng = engine(lateness_ms=0)
        eng.process_all([event(NIGHT.format(m), user="alice", event_id=f"n{m}") for m in range(3)])
        again = engine(lateness_ms=0)
        again.load_user("alice", eng.dump_user("alice"))
        assert again.users["alice"].next_hour == eng.users["alice"].next_hour


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


_KINDS = [
    ("search", "success"), ("search", "success"), ("view", "success"), ("view", "success"),
    ("search", "failure"), ("view", "denied"), ("export", "success"), ("print", "success"),
    ("print_screen", "success"), ("usb_write", "success"), ("login", "success"),
]
_step = st.tuples(
    st.integers(0, 1),  # user
    st.integers(-30, 240),  # minutes after the user's previous event (negative: out of order)
    st.sampled_from(["10.0.0.1", "10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.3"]),
    st.sampled_from(_KINDS),
    st.booleans(),  # mynumber_ref (mostly true, see below)
    st.integers(0, 3),  # subject
    st.sampled_from([None, None, None, "telework"]),
    st.integers(0, 9),  # 0: checkpoint after this event
)


@functools.cache
def _rule_sets() -> dict[tuple[bool, bool], list[Rule]]:
    """(low thresholds, unusual_terminal allowlisted) -> rules; loaded once."""
    out = {}
    for low in (False, True):
        rules = _low_threshold_rules() if low else load_rules()
        out[low, False] = rules
        out[low, True] = [
            rule(r.id, {"params": dict(r.params), "allowlist": {"users": ["u1"]}}) if r.id == "unusual_terminal" else r for r in rules
        ]
    return out


def _low_threshold_rules() -> list[Rule]:
    """Every bundled rule, with thresholds low enough for a short random stream to cross them."""
    low = {
        "bulk_export": {"min_lookups": 3, "spike_factor": 1.5, "baseline_days": 2, "min_baseline_days": 1, "max_records": 40},
        "unusual_terminal": {"warmup": "1d", "min_events": 3, "terminals_per_day": 2},
        "usb_writes": {"warmup": "1d"},
        "repeated_queries": {"threshold": 3},
    }
    return [rule(r.id, {"params": low[r.id]}) if r.id in low else r for r in load_rules()]


class TestRepeatSkipping:
    """Skipping a user's repeat events (``EngineSettings.skip_repeats``) changes speed only."""

    @settings(max_examples=150, deadline=None)
    @given(st.lists(_step, min_size=1, max_size=120), st.booleans(), st.booleans())
    def test_same_alerts_snapshots_and_dirty_sets(self, steps: list[tuple[Any, ...]], low: bool, allowlisted: bool) -> None:
        """Alerts, checkpointed users and their snapshots are identical with and without skipping, whatever the stream."""
        rules = _rule_sets()[low, allowlisted]  # a detector behind an allowlist takes no part in skipping
        start = parse_ts("2019-02-04T08:30:00+09:00")  # a Monday, before business hours
        clock = [start, start]
        events: list[tuple[Event, bool]] = []
        for n, (who, minutes, terminal, (action, result), ref, subject, location, cut) in enumerate(steps):
            clock[who] = max(start, clock[who] + minutes * 60_000)
            events.append(
                (
                    Event(
                        f"e{n}", clock[who], f"u{who}", terminal, action, result, ref or action in ("search", "view"),
                        subject=f"r{subject}", records=10 if action in ("export", "print", "usb_write") else None,
                        device="USB-1" if action == "usb_write" else None, location=location,
                    ),
                    cut == 0,
                )
            )

        def run(skip: bool) -> tuple[list[dict[str, Any]], list[tuple[str, bytes | None]], bytes]:
            eng = Engine(rules, EngineSettings(skip_repeats=skip))
            alerts: list[dict[str, Any]] = []
            checkpoints: list[tuple[str, bytes | None]] = []
            for ev, cut in events:
                eng.process(ev)
                alerts += [a.to_dict() for a in eng.drain()]
                if cut:
                    checkpoints += [(u, eng.dump_user(u)) for u in sorted(eng.clear_dirty())]
            eng.sweep(eng.max_ts + 2 * DAY_MS)
            alerts += [a.to_dict() for a in eng.drain()]
            return alerts, checkpoints, eng.snapshot()

        assert run(True) == run(False)

    def test_repeats_are_skipped(self) -> None:
        """A morning of look-ups from one terminal runs as one streak: counted in bulk when the user's state is next read."""
        base = parse_ts("2019-02-04T09:00:00+09:00")
        events = [Event(f"e{i}", base + i * 60_000, "u0", "10.0.0.1", "search", "success", True, subject=f"r{i % 7}") for i in range(200)]
        eng, plain = Engine(load_rules()), Engine(load_rules(), EngineSettings(skip_repeats=False))
        eng.process_all(events)
        plain.process_all(events)
        user = eng.users["u0"]
        assert user.streak_terminal == "10.0.0.1" and sum(user.streak_counts) > 150, "repeat events were not skipped"
        assert eng.dump_user("u0") == plain.dump_user("u0")
        assert user.streak_terminal is None and sum(user.streak_counts) == 0, "reading the state did not end the streak"

    def test_threshold_crossed_within_a_streak(self) -> None:
        """A look-up spike and repeated look-ups crossed in the middle of a run of repeats fire at the same event as without skipping."""
        rules = _rule_sets()[True, False]
        events = []
        for day, n in ((4, 5), (5, 5), (6, 5), (7, 60)):  # Mon-Wed ordinary, Thursday a spike
            base = parse_ts(f"2019-02-{day:02d}T09:00:00+09:00")
            events += [Event(f"d{day}-{i}", base + i * 60_000, "u0", "10.0.0.1", "view", "success", True, subject=f"r{i % 9}") for i in range(n)]
        fast, plain = Engine(rules), Engine(rules, EngineSettings(skip_repeats=False))
        got = [a.to_dict() for a in fast.process_all(events)]
        assert got == [a.to_dict() for a in plain.process_all(events)]
        assert {"lookup_spike", "same_subject"} <= {a["reason"] for a in got}
        assert fast.snapshot() == plain.snapshot()
