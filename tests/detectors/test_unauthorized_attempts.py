"""UnauthorizedAttemptsDetector: attempts to obtain personal data without the rights (PPC viewpoint 3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detectors.calendar import BusinessCalendar
from detectors.engine import Engine
from detectors.testing import (
    assert_order_invariant,
    assert_resumes,
    assert_state_round_trip,
    event,
    final_alerts,
    reason_counts,
    rule,
    rule_error,
    run_rule,
    sample_alerts,
)
from schemas.event import Event, format_ts, parse_ts

NAME = "unauthorized_attempts"
SAMPLES = Path(__file__).resolve().parents[1] / "samples" / NAME
T0 = parse_ts("2019-02-04T08:00:00+09:00")
HOUR = 3600


def at(seconds: float) -> str:
    """RFC 3339 time ``seconds`` after 2019-02-04 08:00 JST."""
    return format_ts(T0 + int(seconds * 1000))


def failed(seconds: float, action: str = "search", **fields: Any) -> Event:
    """A failed operation on personal data (unless told otherwise)."""
    fields.setdefault("result", "failure")
    return event(at(seconds), action=action, **fields)


class TestDeniedHighRisk:
    """A single failed/denied write-out of personal data alerts at once."""

    @pytest.mark.parametrize("action", ["export", "print", "file_copy", "usb_write", "print_screen"])
    @pytest.mark.parametrize("result", ["failure", "denied"])
    def test_fires_once(self, action: str, result: str) -> None:
        """One attempt is one high-severity finding for the local day."""
        alerts = run_rule(NAME, [failed(0, action, result=result)])
        (alert,) = alerts
        assert (alert.reason, alert.count, alert.severity) == ("denied_high_risk", 1, "high")
        assert alert.window_start == "2019-02-04T00:00:00+09:00"
        assert alert.details["action"] == action

    @pytest.mark.parametrize(
        "ev",
        [
            event("2019-02-04T08:30:18+09:00", action="export"),  # success
            event("2019-02-04T08:30:18+09:00", action="export", result="denied", mynumber_ref=False),
            event("2019-02-04T08:30:18+09:00", action="update", result="denied"),  # not a write-out; one only
            event("2019-02-04T08:30:18+09:00", action="logout", result="failure", mynumber_ref=False),
        ],
    )
    def test_quiet(self, ev: Event) -> None:
        """Successes, attempts without personal data and single other failures raise nothing."""
        assert run_rule(NAME, [ev]) == []

    def test_one_finding_per_day(self) -> None:
        """Attempts on one day add up; the next day is a new finding."""
        events = [failed(0, "export"), failed(600, "print"), failed(24 * HOUR, "export")]
        got = reason_counts(run_rule(NAME, events, {"params": {"threshold": 10}}))
        assert got == [("denied_high_risk", 1), ("denied_high_risk", 2)]


#: The PPC sample's day (2019-02-04, from 08:00): its failed write-out, then its three failed searches.
PPC_FAILED_EXPORT = 30 * 60 + 18
PPC_FAILED_SEARCHES = (75 * 60 + 45, 2 * HOUR + 4 * 60 + 25, 5 * HOUR + 5 * 60 + 41)


class TestRepeatedDenied:
    """Repeated failed or denied operations on personal data within 24 hours."""

    @pytest.mark.parametrize(
        ("offsets", "count"),
        [
            ([0, 3600], None),  # two in a day: a mis-click and a missing role
            ([0, 3600, 7200], 3),
            ([0, 3600, 7200, 10800], 4),
            ([0, 12 * HOUR, 24 * HOUR], None),  # exactly 24 h apart: (t - 24h, t] holds two
            ([0, 12 * HOUR, 24 * HOUR - 1], 3),
            ([0, 600, 1200, 1800, 2400, 3000], 6),
        ],
    )
    def test_threshold_and_window(self, offsets: list[float], count: int | None) -> None:
        """Three failures within 24 h are a finding counting the failures in the window."""
        got = reason_counts(run_rule(NAME, [failed(s) for s in offsets]))
        assert got == ([] if count is None else [("repeated_denied", count)])

    def test_ppc_sample_day(self) -> None:
        """The PPC sample's failed write-out at 08:30 and failed searches at 09:15, 10:04 and 13:05 are flagged together."""
        events = [failed(PPC_FAILED_EXPORT, "export")] + [failed(s) for s in PPC_FAILED_SEARCHES]
        final = {a.reason: a for a in final_alerts(run_rule(NAME, events)).values()}
        assert sorted(final) == ["denied_high_risk", "repeated_denied"]
        alert = final["repeated_denied"]
        assert (alert.count, alert.severity) == (4, "medium")
        assert alert.window_start == "2019-02-04T00:00:00+09:00"
        assert set(alert.event_ids) == {e.event_id for e in events}

    def test_ppc_sample_searches_alone(self) -> None:
        """Even without the failed write-out, the sample's three failed searches are a finding (PPC's example)."""
        assert reason_counts(run_rule(NAME, [failed(s) for s in PPC_FAILED_SEARCHES])) == [("repeated_denied", 3)]
        assert run_rule(NAME, [failed(s) for s in PPC_FAILED_SEARCHES], {"params": {"threshold": 4}}) == []

    def test_failures_without_personal_data_do_not_count(self) -> None:
        """Failed operations that show no personal number cannot obtain personal data."""
        assert run_rule(NAME, [failed(s, mynumber_ref=False) for s in (0, 60, 120, 180)]) == []

    def test_high_risk_attempts_count_too(self) -> None:
        """A denied export is also one of the repeated failures."""
        got = reason_counts(run_rule(NAME, [failed(0, "export"), failed(60), failed(120), failed(180)]))
        assert got == [("denied_high_risk", 1), ("repeated_denied", 4)]

    def test_users_are_counted_apart(self) -> None:
        """Failures of different users do not add up."""
        events = [failed(i * 60, user="ab"[i % 2]) for i in range(4)]
        assert run_rule(NAME, events) == []

    def test_day_window_follows_the_calendar_time_zone(self) -> None:
        """The 24-hour finding is the local day of the calendar's time zone."""
        eng = Engine([rule(NAME)], calendar=BusinessCalendar(tz=ZoneInfo("Europe/London")))
        base = parse_ts("2019-07-04T10:00:00+01:00")
        events = [event(format_ts(base + i * 600_000), result="denied") for i in range(4)]
        (alert,) = final_alerts(eng.process_all(events) + eng.flush()).values()
        assert alert.window_start == "2019-07-04T00:00:00+01:00"


class TestLoginFailures:
    """Password guessing: many failed logins within an hour."""

    @pytest.mark.parametrize(
        ("n", "spacing", "count"),
        [
            (4, 60, None),  # a forgotten password
            (9, 60, None),
            (10, 60, 10),
            (10, 400, None),  # spread over exactly one hour
            (12, 30, 12),
        ],
    )
    def test_threshold_and_window(self, n: int, spacing: int, count: int | None) -> None:
        """Ten failed logins within one hour are a finding."""
        events = [failed(i * spacing, "login", mynumber_ref=False) for i in range(n)]
        got = reason_counts(run_rule(NAME, events))
        assert got == ([] if count is None else [("login_failures", count)])

    def test_login_failures_are_not_data_attempts(self) -> None:
        """Failed logins never count towards repeated_denied."""
        events = [failed(i * 60, "login", mynumber_ref=False) for i in range(4)]
        assert run_rule(NAME, events) == []


class TestOrderAndState:
    """Arrival order within lateness, snapshots and state expiry."""

    @settings(max_examples=60, deadline=None)
    @given(
        st.lists(
            st.tuples(st.integers(0, 300), st.sampled_from(["search", "export", "login", "view"]), st.integers(0, 59)),
            min_size=1,
            max_size=40,
        )
    )
    def test_order_within_lateness_does_not_matter(self, spec: list[tuple[int, str, int]]) -> None:
        """Events shuffled by less than the lateness give the same final alerts and counts."""
        overrides = {"params": {"threshold": 3, "window": "2h", "login_threshold": 3, "login_window": "30m"}}
        events = [
            failed(minute * 60 + i, action, mynumber_ref=action != "login", event_id=f"h{i}")
            for i, (minute, action, _) in enumerate(spec)
        ]
        assert_order_invariant(NAME, events, [delay * 60_000 for _, _, delay in spec], overrides)

    def test_snapshot_restore_mid_stream(self) -> None:
        """Restoring a user's state mid-stream gives the same later alerts as never stopping."""
        events = [failed(i * 1800, "search" if i % 4 else "export") for i in range(12)]
        events += [failed(i * 100 + 5, "login", mynumber_ref=False) for i in range(14)]
        events.sort(key=lambda e: e.ts_ms)
        expected = assert_resumes(NAME, events, 10, ordered=False)
        assert {a.reason for a in expected} == {"denied_high_risk", "repeated_denied", "login_failures"}

    def test_dump_load_round_trip(self) -> None:
        """dump(load(x)) == x with day counts and both windows."""
        eng = Engine([rule(NAME)])
        eng.process_all([failed(0, "export"), failed(60), failed(120, "login", mynumber_ref=False)])
        data = assert_state_round_trip(eng)
        assert data["days"] and data["denied"] and data["logins"]

    def test_state_expires(self) -> None:
        """Past the windows and the day, the user's state is dropped."""
        eng = Engine([rule(NAME)])
        eng.process_all([failed(0), failed(60, "login", mynumber_ref=False)])
        assert eng.dump_user("u001") is not None
        eng.sweep(T0 + 2 * 24 * HOUR * 1000)
        assert eng.dump_user("u001") is None

    def test_successes_keep_no_state(self) -> None:
        """Users who never fail cost this detector nothing."""
        eng = Engine([rule(NAME)])
        eng.process_all([event(at(i), action="export") for i in range(5)])
        assert eng.users["u001"].slots == [None]


class TestConfiguration:
    """Overrides, allowlists and parameter validation."""

    def test_threshold_override(self) -> None:
        """A threshold of 2 fires on the second failure."""
        events = [failed(0), failed(60)]
        assert run_rule(NAME, events) == []
        assert reason_counts(run_rule(NAME, events, {"params": {"threshold": 2}})) == [("repeated_denied", 2)]

    @pytest.mark.parametrize("allow", [{"users": ["u001"]}, {"terminals": ["10.0.0.1"]}])
    def test_allowlist_suppresses(self, allow: dict[str, list[str]]) -> None:
        """Allowlisted users and terminals raise nothing."""
        events = [failed(0, "export"), failed(60), failed(120), failed(180)]
        assert run_rule(NAME, events)
        assert run_rule(NAME, events, {"allowlist": allow}) == []

    @pytest.mark.parametrize(
        ("params", "key"),
        [
            ({"threshold": "x"}, "params.threshold"),
            ({"threshold": 0}, "params.threshold"),
            ({"login_threshold": 1.5}, "params.login_threshold"),
            ({"window": "1 day"}, "params.window"),
            ({"login_window": "90d"}, "params.login_window"),
            ({"bogus": 1}, "params.bogus"),
        ],
    )
    def test_bad_params_name_the_param(self, params: dict[str, Any], key: str) -> None:
        """Invalid params are a RuleError naming the param."""
        assert rule_error(NAME, params).key == key


class TestSamples:
    """The bundled samples behave as labelled."""

    def test_positive(self) -> None:
        """The PPC sample's failed write-out and failed searches, and a password guesser, are flagged."""
        final = sample_alerts(NAME, SAMPLES / "positive.jsonl")
        got = {(a.reason, a.user): a for a in final.values()}
        assert sorted(got) == [("denied_high_risk", "osamu"), ("login_failures", "staff-0255"), ("repeated_denied", "osamu")]
        assert got[("denied_high_risk", "osamu")].event_ids == ("ppc-005",)
        assert set(got[("repeated_denied", "osamu")].event_ids) == {"ppc-005", "ppc-008", "ppc-009", "ppc-010"}
        assert got[("repeated_denied", "osamu")].count == 4
        assert got[("login_failures", "staff-0255")].count == 11

    def test_negative(self) -> None:
        """Single denials, spread-out failures and a forgotten password raise nothing."""
        assert sample_alerts(NAME, SAMPLES / "negative.jsonl") == {}

    def test_negative_near_miss(self) -> None:
        """Two failures in one day are a near miss: with the threshold at 2 they alert."""
        final = sample_alerts(NAME, SAMPLES / "negative.jsonl", {"params": {"threshold": 2}})
        assert ("repeated_denied", "staff-0901", 2) in {(a.reason, a.user, a.count) for a in final.values()}
