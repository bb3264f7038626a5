"""BulkExportDetector: bulk write-out and sudden increases in look-ups."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detectors.base import DAY_MS as DAY
from detectors.base import HOUR_MS as HOUR
from detectors.base import MINUTE_MS as MINUTE
from detectors.bulk_export import MAX_WINDOW_EVENTS, BulkExportState, insert
from detectors.testing import (
    assert_order_invariant,
    assert_resumes,
    assert_state_round_trip,
    event,
    final_alerts,
    lateness_jitter,
    make_engine,
    rule,
    rule_error,
    run_rule,
    sample_alerts,
    summary,
)
from detectors.windows import SlidingWindow
from schemas.alert import Alert
from schemas.event import Event, format_ts, parse_ts

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "bulk_export"
#: Five workdays (Mon 2019-03-04 .. Fri 2019-03-08), then Monday 2019-03-11.
WEEK = ("2019-03-04", "2019-03-05", "2019-03-06", "2019-03-07", "2019-03-08")
MONDAY = "2019-03-11"


def at(base: str, minutes: float = 0) -> str:
    """``base`` (RFC 3339) plus ``minutes``, as RFC 3339 in JST."""
    return format_ts(parse_ts(base) + int(minutes * MINUTE))


def lookups(day: str, n: int, user: str = "u001", result: str = "success", start: str = "08:45") -> list[Event]:
    """``n`` searches spread over the working day ``day``."""
    step = min(30_000, 8 * HOUR // max(n, 1))
    base = parse_ts(f"{day}T{start}:00+09:00")
    return [event(format_ts(base + i * step), user=user, result=result, subject=f"r-{i % 97}") for i in range(n)]


def baseline(per_day: int = 50, days: Sequence[str] = WEEK, user: str = "u001") -> list[Event]:
    """Ordinary look-ups on each of ``days``."""
    return [e for d in days for e in lookups(d, per_day, user)]


def export(ts: str, records: int | None, action: str = "export", **kw: Any) -> Event:
    """One write-out of ``records`` records."""
    return event(ts, action=action, records=records, **kw)


def by_reason(alerts: Iterable[Alert]) -> dict[str, Alert]:
    """Final alerts keyed by reason (tests use one finding per reason)."""
    return {a.reason: a for a in final_alerts(alerts).values()}


class TestRecordsExported:
    """Records written out are summed over a sliding window."""

    @pytest.mark.parametrize(
        ("records", "gap_minutes", "expected"),
        [
            ((4999,), 0, None),
            ((5000,), 0, 5000),
            ((3000, 1999), 30, None),
            ((3000, 2000), 30, 5000),
            ((3000, 2000), 59.99, 5000),  # just inside the hour
            ((3000, 2000), 60, None),  # the first one has left the window (t - 1h, t]
            ((1500, 1500, 1500, 1500), 10, 6000),
        ],
    )
    def test_threshold_and_window_edges(self, records: tuple[int, ...], gap_minutes: float, expected: int | None) -> None:
        """An alert exactly when some one-hour window holds 5000 records or more."""
        events = [export(at("2019-03-04T10:00:00+09:00", i * gap_minutes), r) for i, r in enumerate(records)]
        found = by_reason(run_rule("bulk_export", events))
        if expected is None:
            assert found == {}
        else:
            assert found["records_exported"].count == expected
            assert found["records_exported"].severity == "high"

    @pytest.mark.parametrize(
        ("action", "records", "counts"),
        [
            ("export", 5000, True),
            ("print", 5000, True),
            ("file_copy", 5000, True),
            ("usb_write", 5000, True),
            ("print_screen", 5000, False),
            ("update", 5000, False),
        ],
    )
    def test_which_actions_count(self, action: str, records: int, counts: bool) -> None:
        """Export, print, file copy and USB write are write-outs; print screen and update are not."""
        alerts = run_rule("bulk_export", [export("2019-03-04T10:00:00+09:00", records, action=action)])
        assert bool(alerts) is counts

    def test_export_without_records_counts_one(self) -> None:
        """An export that does not say how many records it held counts as one."""
        events = [export(at("2019-03-04T10:00:00+09:00", i), None) for i in range(3)]
        found = by_reason(run_rule("bulk_export", events, {"params": {"max_records": 3}}))
        assert found["records_exported"].count == 3

    def test_print_without_records_counts_nothing(self) -> None:
        """Only exports count without a records field."""
        events = [export(at("2019-03-04T10:00:00+09:00", i), None, action="print") for i in range(3)]
        assert run_rule("bulk_export", events, {"params": {"max_records": 1}}) == []

    def test_failed_write_outs_do_not_count(self) -> None:
        """A failed export wrote nothing."""
        assert run_rule("bulk_export", [export("2019-03-04T10:00:00+09:00", 5000, result="failure")]) == []

    def test_massive_is_critical(self) -> None:
        """Four times the threshold (20 000 records) adds a critical finding beside the high one."""
        events = [export("2019-03-04T10:00:00+09:00", 12_000), export("2019-03-04T10:20:00+09:00", 8000)]
        found = by_reason(run_rule("bulk_export", events))
        assert found["records_exported"].severity == "high" and found["records_exported"].count == 20_000
        assert found["records_exported_massive"].severity == "critical"
        assert found["records_exported_massive"].count == 20_000
        assert found["records_exported_massive"].details["threshold"] == 20_000
        assert "records_exported_massive" not in by_reason(run_rule("bulk_export", [*events[:1], export("2019-03-04T10:20:00+09:00", 7999)]))

    def test_one_finding_per_day_with_largest_sum(self) -> None:
        """Several bursts in a day are one finding counting the largest window sum."""
        events = [
            export("2019-03-04T09:00:00+09:00", 5500),
            export("2019-03-04T13:00:00+09:00", 4000),
            export("2019-03-04T13:30:00+09:00", 4000),
        ]
        alerts = final_alerts(run_rule("bulk_export", events))
        (alert,) = alerts.values()
        assert alert.count == 8000 and alert.window_start == "2019-03-04T00:00:00+09:00"
        assert len(alert.event_ids) == 3

    def test_days_are_separate_findings(self) -> None:
        """A burst on another day is another finding."""
        events = [export("2019-03-04T10:00:00+09:00", 5000), export("2019-03-05T10:00:00+09:00", 5000)]
        assert len(final_alerts(run_rule("bulk_export", events))) == 2

    @pytest.mark.parametrize(
        ("params", "records", "fires"),
        [
            ({"max_records": 100}, 100, True),
            ({"max_records": 100}, 99, False),
            ({"max_records": 10_000}, 9999, False),
            ({"max_records": 10_000}, 10_000, True),
        ],
    )
    def test_param_overrides(self, params: dict[str, Any], records: int, fires: bool) -> None:
        """An agency's max_records changes the threshold."""
        alerts = run_rule("bulk_export", [export("2019-03-04T10:00:00+09:00", records)], {"params": params})
        assert bool(alerts) is fires

    def test_window_override(self) -> None:
        """A 10-minute window no longer joins write-outs 30 minutes apart."""
        events = [export("2019-03-04T10:00:00+09:00", 3000), export("2019-03-04T10:30:00+09:00", 3000)]
        assert run_rule("bulk_export", events)
        assert run_rule("bulk_export", events, {"params": {"window": "10m"}}) == []

    @pytest.mark.parametrize(
        "allowlist",
        [{"users": ["u001"]}, {"terminals": ["10.0.0.1"]}, {"departments": ["税務課"]}],
    )
    def test_allowlist_suppresses(self, allowlist: dict[str, list[str]]) -> None:
        """An allowlisted user, terminal or department raises nothing."""
        events = [export("2019-03-04T10:00:00+09:00", 5000, department="税務課")]
        assert run_rule("bulk_export", events)
        assert run_rule("bulk_export", events, {"allowlist": allowlist}) == []


class TestLookupSpike:
    """A day's look-ups far above the user's own baseline."""

    @pytest.mark.parametrize(
        ("per_day", "today", "fires"),
        [
            (50, 250, False),  # 5 x 50 = 250: not above
            (50, 251, True),
            (10, 200, False),  # 5 x 10 = 50, but never at or below min_lookups
            (10, 201, True),
            (100, 500, False),
            (100, 501, True),
        ],
    )
    def test_threshold(self, per_day: int, today: int, fires: bool) -> None:
        """Fires when today's count exceeds max(min_lookups, factor x baseline)."""
        alerts = run_rule("bulk_export", baseline(per_day) + lookups(MONDAY, today))
        found = by_reason(alerts)
        assert ("lookup_spike" in found) is fires
        if fires:
            spike = found["lookup_spike"]
            assert spike.count == today and spike.severity == "high"
            assert (spike.details["baseline"], spike.details["baseline_days"], spike.details["threshold"]) == (per_day, 5, max(200, 5 * per_day))
            assert spike.window_start == f"{MONDAY}T00:00:00+09:00"

    def test_warm_up(self) -> None:
        """Four baseline days are not enough; five are."""
        assert run_rule("bulk_export", baseline(50, WEEK[1:]) + lookups(MONDAY, 1000)) == []
        assert by_reason(run_rule("bulk_export", baseline(50) + lookups(MONDAY, 1000)))["lookup_spike"].count == 1000

    def test_seeded_history(self) -> None:
        """A baseline seeded from history (no alerts from it) is used on live events."""
        assert run_rule("bulk_export", lookups(MONDAY, 300)) == []
        found = by_reason(run_rule("bulk_export", lookups(MONDAY, 300), history=baseline(50)))
        assert found["lookup_spike"].count == 300

    def test_history_alone_raises_nothing(self) -> None:
        """A spike inside the seeded history is learned, not alerted."""
        assert run_rule("bulk_export", [], history=baseline(50) + lookups(MONDAY, 1000)) == []

    def test_weekends_not_in_baseline(self) -> None:
        """A busy Saturday does not raise the workday baseline."""
        events = baseline(50) + lookups("2019-03-09", 1000) + lookups(MONDAY, 300)
        found = final_alerts(run_rule("bulk_export", events))
        spikes = {a.window_start[:10]: a.count for a in found.values() if a.reason == "lookup_spike"}
        assert spikes == {"2019-03-09": 1000, MONDAY: 300}

    def test_failed_lookups_not_counted(self) -> None:
        """Failed searches are the unauthorized_attempts rule's concern."""
        assert run_rule("bulk_export", baseline(50) + lookups(MONDAY, 400, result="failure")) == []

    def test_baseline_ring_is_bounded(self) -> None:
        """Only the last baseline_days workdays are averaged, and kept."""
        days = [format_ts(parse_ts("2019-04-01T00:00:00+09:00") + i * DAY)[:10] for i in range(28)]
        early = [e for d in days[:14] for e in lookups(d, 500)]
        late = [e for d in days[14:] for e in lookups(d, 50)]
        engine = make_engine([rule("bulk_export", {"params": {"baseline_days": 5}})])
        alerts = engine.process_all(early + late + lookups("2019-05-07", 300))
        assert {a.reason for a in alerts} == {"lookup_spike"}
        state: BulkExportState = engine.users["u001"].slots[0]
        assert state.ring == [50] * 5

    @pytest.mark.parametrize(
        ("params", "today", "fires"),
        [
            ({"spike_factor": 2.0, "min_lookups": 50}, 101, True),
            ({"spike_factor": 2.0, "min_lookups": 50}, 100, False),
            ({"min_lookups": 1000}, 999, False),
            ({"min_baseline_days": 6}, 1000, False),
        ],
    )
    def test_param_overrides(self, params: dict[str, Any], today: int, fires: bool) -> None:
        """spike_factor, min_lookups and min_baseline_days move the threshold."""
        alerts = run_rule("bulk_export", baseline(50) + lookups(MONDAY, today), {"params": params})
        assert ("lookup_spike" in by_reason(alerts)) is fires

    def test_late_lookup_of_previous_day(self) -> None:
        """A look-up of yesterday arriving after today's first ones is counted on yesterday."""
        today = lookups(MONDAY, 10, start="00:05")
        late = event("2019-03-10T23:50:00+09:00", subject="r-late")
        engine = make_engine([rule("bulk_export")])
        engine.process_all(baseline(50) + today[:5] + [late] + today[5:])
        assert engine.drain_late() == []
        state: BulkExportState = engine.users["u001"].slots[0]
        assert state.count == 10 and state.days[parse_ts("2019-03-10T00:00:00+09:00")] == 1


class TestOrder:
    """Out-of-order arrival within the lateness gives the same final alerts."""

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        n_lookups=st.integers(min_value=180, max_value=320),
        exports=st.lists(st.tuples(st.integers(0, 150), st.integers(1, 3500)), max_size=12),
        jitter=st.lists(lateness_jitter(), min_size=400, max_size=400),
    )
    def test_permutation_within_lateness(self, n_lookups: int, exports: list[tuple[int, int]], jitter: list[int]) -> None:
        """Any arrival order within the lateness yields the same ids, counts and severities."""
        live = lookups(MONDAY, n_lookups) + [export(at(f"{MONDAY}T09:00:00+09:00", m), r) for m, r in exports]
        assert_order_invariant("bulk_export", live, jitter, history=baseline(50))

    def test_late_export_raises_later_sum(self) -> None:
        """A write-out arriving late adds to the sums of the later ones it precedes."""
        a, b, c = (export(at("2019-03-04T10:00:00+09:00", m), 2000) for m in (0, 10, 20))
        assert summary(run_rule("bulk_export", [b, c, a])) == summary(run_rule("bulk_export", [a, b, c]))
        (alert,) = final_alerts(run_rule("bulk_export", [b, c, a])).values()
        assert alert.count == 6000


class TestSnapshot:
    """Per-user state round-trips exactly and resumes the same findings."""

    @pytest.mark.parametrize("k", [0, 120, 251, 299])
    def test_resume_mid_stream(self, k: int) -> None:
        """Restoring a checkpoint mid-day gives the same later alerts."""
        events = lookups(MONDAY, 300) + [export(at(f"{MONDAY}T12:00:00+09:00", m), 1500) for m in range(5)]
        events.sort(key=lambda e: e.ts_ms)
        assert assert_resumes("bulk_export", events, k, history=baseline(50))

    def test_dump_load_round_trip(self) -> None:
        """dump(load(dump)) is identical, for a state with days, ring and window."""
        engine = make_engine([rule("bulk_export")])
        engine.process_all(baseline(50) + lookups(MONDAY, 20) + [export(f"{MONDAY}T12:00:00+09:00", 10)])
        data = assert_state_round_trip(engine)
        assert data[3] and data[5] is not None

    def test_expire_drops_empty_state(self) -> None:
        """Once the window has passed and no baseline exists, the state is dropped."""
        engine = make_engine([rule("bulk_export")])
        engine.process_all([export("2019-03-04T10:00:00+09:00", 10)])
        detector = engine.detectors[0]
        state = engine.users["u001"].slots[0]
        assert detector.expire(state, parse_ts("2019-03-04T10:30:00+09:00")) is state
        assert detector.expire(state, parse_ts("2019-03-05T12:00:00+09:00")) is None

    def test_window_is_bounded(self) -> None:
        """A flood of write-outs keeps only the newest MAX_WINDOW_EVENTS."""
        window = SlidingWindow()
        for i in range(MAX_WINDOW_EVENTS + 50):
            insert(window, 1_000 + i, 1)
        insert(window, 500, 1)  # a late one is inserted, the oldest dropped
        assert len(window.times) == MAX_WINDOW_EVENTS and window.times[-1] == 1_000 + MAX_WINDOW_EVENTS + 49
        assert window.times == sorted(window.times) and len(window.weights) == MAX_WINDOW_EVENTS

    def test_baseline_survives_expiry(self) -> None:
        """Finished days fold into the ring, which persists until the user goes idle."""
        engine = make_engine([rule("bulk_export")])
        engine.process_all(baseline(50))
        engine.sweep(parse_ts("2019-03-20T00:00:00+09:00"))
        state: BulkExportState = engine.users["u001"].slots[0]
        assert state.ring == [50] * 5 and state.days == {} and state.count == 0


class TestSettings:
    """Bad parameters are RuleErrors naming the parameter."""

    @pytest.mark.parametrize(
        ("params", "key"),
        [
            ({"max_records": 0}, "params.max_records"),
            ({"window": "2d"}, "params.window"),
            ({"window": "soon"}, "params.window"),
            ({"massive_factor": 1}, "params.massive_factor"),
            ({"min_lookups": 0}, "params.min_lookups"),
            ({"spike_factor": 1}, "params.spike_factor"),
            ({"baseline_days": 0}, "params.baseline_days"),
            ({"min_baseline_days": 30}, "params.min_baseline_days"),
            ({"max_record": 10}, "params.max_record"),
            ({"max_records": "many"}, "params.max_records"),
        ],
    )
    def test_invalid(self, params: dict[str, Any], key: str) -> None:
        """Each invalid value is reported against its own key."""
        assert rule_error("bulk_export", params).key == key


class TestSamples:
    """The bundled samples behave as labelled."""

    def test_positive(self) -> None:
        """The positive samples raise both a bulk write-out and a look-up spike."""
        alerts = sample_alerts("bulk_export", SAMPLES / "positive.jsonl")
        assert {a.reason for a in alerts.values()} >= {"records_exported", "lookup_spike"}
        assert all(a.rule_id == "bulk_export" for a in alerts.values())

    def test_negative(self) -> None:
        """No negative sample raises anything."""
        assert sample_alerts("bulk_export", SAMPLES / "negative.jsonl") == {}
