"""RepeatedQueriesDetector: the same person's record looked up again and again (PPC viewpoint 5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detectors.calendar import BusinessCalendar
from detectors.engine import Engine, EngineSettings
from detectors.testing import (
    assert_order_invariant,
    assert_resumes,
    assert_state_round_trip,
    event,
    final_alerts,
    rule,
    rule_error,
    run_rule,
    sample_alerts,
)
from schemas.event import Event, format_ts, parse_ts

NAME = "repeated_queries"
SAMPLES = Path(__file__).resolve().parents[1] / "samples" / NAME
T0 = parse_ts("2019-02-04T10:00:00+09:00")
SUBJECT = "mn_3fa2c9e1b7d04a6f5c28"
OTHER = "mn_8e1d7c2b9a4f0e3d6c5b"


def token(n: int) -> str:
    """A pseudonymous subject token (never a run of digits that could pass for a personal number)."""
    return f"mn_subject{n:03d}"


def at(seconds: float) -> str:
    """RFC 3339 time ``seconds`` after 2019-02-04 10:00 JST."""
    return format_ts(T0 + int(seconds * 1000))


def lookups(offsets: list[float], subject: str = SUBJECT, **fields: Any) -> list[Event]:
    """Look-ups of one subject at the given offsets (seconds after T0)."""
    return [event(at(s), action="view" if i % 2 else "search", subject=subject, **fields) for i, s in enumerate(offsets)]


class TestSameSubject:
    """Successful look-ups of one subject against the threshold and the sliding window."""

    @pytest.mark.parametrize(
        ("offsets", "count"),
        [
            ([i * 300 for i in range(11)], None),  # 11 within 50 minutes: a busy case
            ([i * 300 for i in range(12)], 12),  # 12 within 55 minutes
            ([*(i * 300 for i in range(11)), 3600], None),  # 12 spanning exactly 1 h: the first is outside (t - 1h, t]
            ([*(i * 300 for i in range(11)), 3599.99], 12),  # 12 within 59:59.99
            ([i * 60 for i in range(15)], 15),  # a burst keeps counting in one finding
            ([*(i * 60 for i in range(6)), *(7200 + i * 60 for i in range(6))], None),  # two visits two hours apart
        ],
    )
    def test_threshold_and_window(self, offsets: list[float], count: int | None) -> None:
        """Fires exactly when 12 look-ups fall within one hour, with the largest count."""
        final = final_alerts(run_rule(NAME, lookups(offsets)))
        if count is None:
            assert final == {}
        else:
            (alert,) = final.values()
            assert (alert.reason, alert.count, alert.severity) == ("same_subject", count, "medium")
            assert alert.subjects == (SUBJECT,)

    def test_counter_work_is_quiet(self) -> None:
        """Several residents served in turn, each record opened 3-5 times, raise nothing."""
        events: list[Event] = []
        for n in range(12):
            events += lookups([n * 600 + k * 60 for k in range(3 + n % 3)], subject=token(n))
        assert run_rule(NAME, events) == []

    def test_subjects_and_users_are_counted_apart(self) -> None:
        """Alternating subjects or users never add up to one finding."""
        events = []
        for i in range(18):
            events += lookups([i * 120], subject=SUBJECT if i % 2 else OTHER, user="u001" if i % 3 else "u002")
        assert run_rule(NAME, events) == []

    def test_failures_and_subjectless_searches_do_not_count(self) -> None:
        """Only successful look-ups of a subject count towards same_subject."""
        events = lookups([i * 60 for i in range(11)])
        events += [event(at(700 + i), action="search") for i in range(20)]
        events += [event(at(800), action="view", subject=SUBJECT, result="denied")]
        assert run_rule(NAME, events) == []

    def test_one_finding_per_subject(self) -> None:
        """Two subjects each over the threshold are two findings, keyed by subject."""
        events = sorted(lookups([i * 60 for i in range(12)]) + lookups([i * 60 + 5 for i in range(12)], subject=OTHER), key=lambda e: e.ts_ms)
        final = final_alerts(run_rule(NAME, events))
        assert sorted(a.subjects for a in final.values()) == [(SUBJECT,), (OTHER,)]

    def test_evidence_lists_the_lookups(self) -> None:
        """The alert's evidence is the subject's look-ups, not the user's other events."""
        events = lookups([i * 60 for i in range(12)])
        events.insert(5, event(at(301), action="search", subject=OTHER))
        (alert,) = final_alerts(run_rule(NAME, events)).values()
        assert set(alert.event_ids) == {e.event_id for e in events if e.subject == SUBJECT}

    def test_window_is_the_local_hour(self) -> None:
        """The finding's window is the local hour holding the look-up that crossed the threshold."""
        (alert,) = final_alerts(run_rule(NAME, lookups([1800 + i * 60 for i in range(12)]))).values()
        assert (alert.window_start, alert.window_end) == ("2019-02-04T10:00:00+09:00", "2019-02-04T11:00:00+09:00")

    def test_day_window_starts_at_local_midnight(self) -> None:
        """With a one-day window the finding is the local day (Tokyo)."""
        events = lookups([i * 3000 for i in range(12)])
        (alert,) = final_alerts(run_rule(NAME, events, {"params": {"window": "1d"}})).values()
        assert alert.window_start == "2019-02-04T00:00:00+09:00"

    def test_day_window_follows_the_calendar_time_zone(self) -> None:
        """In another time zone (with DST) the day window starts at that zone's midnight."""
        eng = Engine([rule(NAME, {"params": {"window": "1d"}})], calendar=BusinessCalendar(tz=ZoneInfo("America/New_York")))
        base = parse_ts("2019-07-04T09:00:00-04:00")
        events = [event(format_ts(base + i * 600_000), subject=SUBJECT) for i in range(12)]
        (alert,) = final_alerts(eng.process_all(events) + eng.flush()).values()
        assert alert.window_start == "2019-07-04T00:00:00-04:00"


class TestRepeatedFailures:
    """Failed or denied look-ups of one subject."""

    @pytest.mark.parametrize(
        ("offsets", "count"),
        [
            ([0, 300], None),
            ([0, 300, 600], 3),
            ([0, 1800, 3600], None),  # exactly one hour apart: (t - 1h, t] holds two
            ([0, 1800, 3599], 3),
            ([0, 60, 120, 180, 240], 5),
        ],
    )
    def test_threshold_and_window(self, offsets: list[float], count: int | None) -> None:
        """Three failures of one subject within an hour are a high-severity finding."""
        final = final_alerts(run_rule(NAME, lookups(offsets, result="denied")))
        if count is None:
            assert final == {}
        else:
            (alert,) = final.values()
            assert (alert.reason, alert.count, alert.severity) == ("repeated_failures", count, "high")

    def test_failures_of_different_subjects_do_not_add_up(self) -> None:
        """Denials spread over subjects are not repeated failures of one record."""
        events = lookups([0], result="failure") + lookups([60], subject=OTHER, result="failure") + lookups([120], result="failure")
        assert run_rule(NAME, events) == []


class TestOrderAndState:
    """Arrival order within lateness, snapshots and state bounds."""

    @settings(max_examples=60, deadline=None)
    @given(
        st.lists(
            st.tuples(st.integers(0, 90), st.integers(0, 1), st.booleans(), st.integers(0, 59)),
            min_size=1,
            max_size=60,
        )
    )
    def test_order_within_lateness_does_not_matter(self, spec: list[tuple[int, int, bool, int]]) -> None:
        """Events shuffled by less than the lateness give the same final alerts and counts."""
        overrides = {"params": {"threshold": 4, "window": "20m", "failure_threshold": 2, "failure_window": "15m"}}
        events = [
            event(at(minute * 60 + i), subject=token(subject), result="success" if ok else "denied", event_id=f"h{i}")
            for i, (minute, subject, ok, _) in enumerate(spec)
        ]
        assert_order_invariant(NAME, events, [delay * 60_000 for _, _, _, delay in spec], overrides)

    def test_late_lookup_completes_a_burst(self) -> None:
        """A look-up arriving late (within lateness) still makes the burst fire."""
        events = lookups([i * 60 for i in range(12)])
        late = events.pop(3)
        final = final_alerts(run_rule(NAME, [*events, late]))
        assert [a.count for a in final.values()] == [12]

    def test_snapshot_restore_mid_stream(self) -> None:
        """Restoring a user's state mid-stream gives the same later alerts as never stopping."""
        events = lookups([i * 90 for i in range(30)]) + lookups([i * 100 for i in range(4)], result="denied")
        events.sort(key=lambda e: e.ts_ms)
        assert assert_resumes(NAME, events, 12, ordered=False)

    def test_dump_load_round_trip(self) -> None:
        """dump(load(x)) == x for a state with look-ups and failures, order kept."""
        eng = Engine([rule(NAME)])
        eng.process_all(lookups([0, 60, 120]) + lookups([30], subject=OTHER) + lookups([200, 260], result="denied"))
        data = assert_state_round_trip(eng)
        assert [s for s, _ in data["ok"]] == [SUBJECT, OTHER]

    def test_subjects_per_user_are_bounded(self) -> None:
        """At most max_subjects subjects are tracked; the least recently used go first."""
        events = [event(at(i), subject=token(i)) for i in range(40)] + [event(at(41), subject=token(0))]
        eng = Engine([rule(NAME, {"params": {"max_subjects": 8}})])
        eng.process_all(events)
        doc = orjson.loads(eng.dump_user("u001") or b"null")
        tracked = [s for s, _ in doc["s"][NAME]["ok"]]
        assert len(tracked) == 8 and tracked[-1] == token(0) and tracked[0] == token(33)

    def test_state_expires(self) -> None:
        """Once the window has passed, the user's state (and the user) is dropped."""
        eng = Engine([rule(NAME)], EngineSettings())
        eng.process_all(lookups([0, 60]) + lookups([100], result="denied"))
        eng.sweep(T0 + 2 * 3_600_000 + 1)
        assert eng.dump_user("u001") is None

    def test_old_lookups_no_longer_count(self) -> None:
        """After a sweep, a subject's earlier look-ups outside the window are gone for good."""
        eng = Engine([rule(NAME)])
        eng.process_all(lookups([i * 60 for i in range(11)]))
        eng.process_all([event(at(3 * 3600), subject=OTHER)])
        assert eng.process_all(lookups([3 * 3600 + 60])) == []


class TestConfiguration:
    """Overrides, allowlists and parameter validation."""

    def test_threshold_override(self) -> None:
        """A lower threshold fires on fewer look-ups."""
        events = lookups([0, 60, 120, 180, 240])
        assert run_rule(NAME, events) == []
        (alert,) = final_alerts(run_rule(NAME, events, {"params": {"threshold": 5}})).values()
        assert alert.count == 5

    def test_previous_default_threshold(self) -> None:
        """Ten or eleven look-ups in an hour, which the old default of 10 flagged, are quiet now."""
        events = lookups([i * 300 for i in range(11)])
        assert run_rule(NAME, events) == []
        (alert,) = final_alerts(run_rule(NAME, events, {"params": {"threshold": 10}})).values()
        assert alert.count == 11

    @pytest.mark.parametrize("allow", [{"users": ["u001"]}, {"terminals": ["10.0.0.1"]}, {"departments": ["tax"]}])
    def test_allowlist_suppresses(self, allow: dict[str, list[str]]) -> None:
        """Allowlisted users, terminals and departments raise nothing."""
        events = lookups([i * 60 for i in range(12)], department="tax")
        assert run_rule(NAME, events)
        assert run_rule(NAME, events, {"allowlist": allow}) == []

    @pytest.mark.parametrize(
        ("params", "key"),
        [
            ({"threshold": "x"}, "params.threshold"),
            ({"threshold": 1}, "params.threshold"),
            ({"failure_threshold": True}, "params.failure_threshold"),
            ({"window": "soon"}, "params.window"),
            ({"window": "40d"}, "params.window"),
            ({"failure_window": "0m"}, "params.failure_window"),
            ({"max_subjects": 0}, "params.max_subjects"),
            ({"bogus": 1}, "params.bogus"),
        ],
    )
    def test_bad_params_name_the_param(self, params: dict[str, Any], key: str) -> None:
        """Invalid params are a RuleError naming the param."""
        assert rule_error(NAME, params).key == key


class TestSamples:
    """The bundled samples behave as labelled."""

    def test_positive(self) -> None:
        """The positive samples raise one same_subject and one repeated_failures finding."""
        final = sample_alerts(NAME, SAMPLES / "positive.jsonl")
        assert sorted((a.reason, a.user, a.count) for a in final.values()) == [
            ("repeated_failures", "staff-0733", 3),
            ("same_subject", "staff-0412", 12),
        ]

    def test_negative(self) -> None:
        """Ordinary counter work and near misses raise nothing."""
        assert sample_alerts(NAME, SAMPLES / "negative.jsonl") == {}

    def test_negative_near_miss(self) -> None:
        """The busy case (11 look-ups of one record in 50 minutes) is a near miss: with the threshold at 11 it alerts."""
        final = sample_alerts(NAME, SAMPLES / "negative.jsonl", {"params": {"threshold": 11}})
        assert sorted((a.reason, a.user, a.count) for a in final.values()) == [("same_subject", "staff-0733", 11)]
