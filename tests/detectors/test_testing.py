"""detectors.testing: the shared checks themselves catch what they are for."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detectors.engine import Engine
from detectors.rules import RuleError
from detectors.testing import (
    arrival_order,
    assert_order_invariant,
    assert_resumes,
    assert_state_round_trip,
    event,
    lateness_jitter,
    reason_counts,
    revisions,
    rule,
    rule_error,
    run_rule,
    summary,
)

NIGHT = "2019-02-04T22:{:02d}:00+09:00"
HOUR_MS = 3_600_000


class TestArrivalOrder:
    """Reordering events by arrival delay."""

    def test_delays_reorder(self) -> None:
        """An event delayed past the next one arrives after it; ties keep time order."""
        a, b, c = (event(NIGHT.format(m), event_id=f"e{m}") for m in (0, 10, 20))
        assert arrival_order([a, b, c], [15 * 60_000, 0, 0]) == [b, a, c]
        assert arrival_order([a, b, c], [10 * 60_000, 0, 0]) == [a, b, c]

    def test_missing_delays_arrive_on_time(self) -> None:
        """Events beyond the delays given are kept, not dropped."""
        events = [event(NIGHT.format(m)) for m in range(5)]
        assert arrival_order(events, [30 * 60_000]) == [*events[1:], events[0]]

    def test_negative_delay_rejected(self) -> None:
        """A negative delay is not an arrival order."""
        with pytest.raises(ValueError, match="negative"):
            arrival_order([event(NIGHT.format(0))], [-1])

    @settings(max_examples=50, deadline=None)
    @given(st.lists(lateness_jitter(), min_size=1, max_size=20))
    def test_jitter_within_lateness(self, delays: list[int]) -> None:
        """The strategy's delays are whole minutes from 0 to the lateness."""
        assert all(0 <= d <= HOUR_MS and d % 60_000 == 0 for d in delays)


class TestChecks:
    """The order, snapshot and rule-error checks pass on good runs and fail on bad ones."""

    def test_order_invariant_passes_and_returns_the_summary(self) -> None:
        """A shuffle within the lateness passes and returns the time-ordered run's summary."""
        events = [event(NIGHT.format(m)) for m in range(6)]
        got = assert_order_invariant("off_hours", events, [30 * 60_000] * 3)
        assert list(got.values()) == [("night", 6, "medium")]

    def test_order_invariant_catches_a_difference(self) -> None:
        """An event delayed beyond the lateness is set aside, and the check says so."""
        events = [event(NIGHT.format(m)) for m in range(3)] + [event("2019-02-05T01:00:00+09:00")]
        with pytest.raises(AssertionError, match="arrival order"):
            assert_order_invariant("off_hours", events, [4 * HOUR_MS])

    def test_resumes_returns_the_later_alerts(self) -> None:
        """A restore mid-stream gives the same revisions, returned for further checks."""
        events = [event(NIGHT.format(m)) for m in range(10)]
        later = assert_resumes("off_hours", events, 4)
        assert revisions(later)[-1][2] == 10 and reason_counts(later) == [("night", 10)]

    def test_state_round_trip_needs_a_state(self) -> None:
        """A user without state for the detector is a failure, not a pass."""
        eng = Engine([rule("unusual_operation")])
        eng.process_all([event(NIGHT.format(0), action="search")])
        with pytest.raises(AssertionError, match="no state"):
            assert_state_round_trip(eng)

    def test_rule_error_returns_the_error(self) -> None:
        """Bad params give the RuleError; accepted params are a failure."""
        assert isinstance(rule_error("off_hours", {"grace_minutes": "x"}), RuleError)
        with pytest.raises(AssertionError, match="accepted"):
            rule_error("off_hours", {"grace_minutes": 10})

    def test_summary_is_of_final_revisions(self) -> None:
        """summary keeps each alert's newest revision."""
        alerts = run_rule("off_hours", [event(NIGHT.format(m)) for m in range(3)])
        assert len(alerts) > 1 and list(summary(alerts).values()) == [("night", 3, "medium")]
