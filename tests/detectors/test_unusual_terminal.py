"""UnusualTerminalDetector: terminals other than the usual one (PPC viewpoint 2)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detectors.base import DAY_MS as DAY
from detectors.base import MINUTE_MS as MINUTE
from detectors.testing import (
    assert_order_invariant,
    assert_resumes,
    assert_state_round_trip,
    event,
    final_alerts,
    lateness_jitter,
    load_samples,
    make_engine,
    rule,
    rule_error,
    run_rule,
    sample_alerts,
)
from detectors.unusual_terminal import UnusualTerminalState
from schemas.alert import Alert
from schemas.event import Event, format_ts, parse_ts

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "unusual_terminal"
DESK = "172.16.11.5"
T0 = "2019-03-11T10:00:00+09:00"


def at(base: str, minutes: float = 0) -> str:
    """``base`` plus ``minutes``, as RFC 3339 in JST."""
    return format_ts(parse_ts(base) + int(minutes * MINUTE))


def usual(days: int = 10, per_day: int = 3, terminal: str = DESK, end: str = T0, user: str = "u001") -> list[Event]:
    """``per_day`` searches a day from ``terminal`` on each of the ``days`` days before ``end``."""
    stop = parse_ts(end) - days * DAY
    return [
        event(format_ts(stop + d * DAY + i * 10 * MINUTE), user=user, terminal=terminal)
        for d in range(days)
        for i in range(per_day)
    ]


def found(alerts: Iterable[Alert], reason: str) -> list[Alert]:
    """Final alerts of one reason, by window and key order."""
    return sorted((a for a in final_alerts(alerts).values() if a.reason == reason), key=lambda a: (a.window_start, a.terminals))


def ppc_sample() -> list[Event]:
    """The PPC's sample log (staff オサム as ``osamu``), as bundled with the samples."""
    return [e for e in load_samples(SAMPLES / "positive.jsonl") if e.user == "osamu"]


class TestManyTerminals:
    """Distinct terminals used by one user in one local day."""

    @pytest.mark.parametrize(("n", "fires"), [(1, False), (3, False), (4, True), (7, True)])
    def test_threshold(self, n: int, fires: bool) -> None:
        """Four or more distinct terminals in a day raise a finding counting them."""
        events = [event(at(T0, i), terminal=f"10.0.0.{i}", action="login", mynumber_ref=False) for i in range(n)]
        alerts = found(run_rule("unusual_terminal", events), "many_terminals")
        assert [a.count for a in alerts] == ([n] if fires else [])
        if fires:
            assert alerts[0].severity == "medium" and len(alerts[0].terminals) == n

    def test_same_terminal_twice_counts_once(self) -> None:
        """Returning to a terminal does not add to the count."""
        terminals = ["a", "b", "a", "c", "b", "a"]
        events = [event(at(T0, i), terminal=t) for i, t in enumerate(terminals)]
        assert found(run_rule("unusual_terminal", events), "many_terminals") == []

    def test_days_are_separate(self) -> None:
        """Two terminals before midnight and two after are not four in a day."""
        events = [
            event("2019-03-11T23:00:00+09:00", terminal="a"),
            event("2019-03-11T23:30:00+09:00", terminal="b"),
            event("2019-03-12T00:00:00+09:00", terminal="c"),
            event("2019-03-12T00:30:00+09:00", terminal="d"),
        ]
        assert found(run_rule("unusual_terminal", events), "many_terminals") == []

    def test_ppc_sample(self) -> None:
        """オサム uses five terminals on 2019-02-04 in the PPC's sample."""
        (alert,) = found(run_rule("unusual_terminal", ppc_sample()), "many_terminals")
        assert alert.count == 5 and alert.window_start == "2019-02-04T00:00:00+09:00"
        assert alert.terminals == ("172.16.11.xxx", "172.16.13.xxx", "172.16.18.xxx", "172.16.24.xxx", "172.16.31.xxx")

    @pytest.mark.parametrize(("per_day", "fires"), [(5, True), (6, False)])
    def test_param_override(self, per_day: int, fires: bool) -> None:
        """terminals_per_day moves the threshold."""
        alerts = run_rule("unusual_terminal", ppc_sample(), {"params": {"terminals_per_day": per_day}})
        assert bool(found(alerts, "many_terminals")) is fires

    def test_allowlisted_terminals_do_not_count(self) -> None:
        """Shared counter terminals in the allowlist are not counted."""
        events = [event(at(T0, i), terminal=t) for i, t in enumerate(["desk", "counter-1", "counter-2", "counter-3"])]
        assert found(run_rule("unusual_terminal", events), "many_terminals")
        overrides = {"allowlist": {"terminals": ["counter-1", "counter-2"]}}
        assert found(run_rule("unusual_terminal", events, overrides), "many_terminals") == []

    def test_late_event_of_previous_day(self) -> None:
        """A late event of yesterday still completes yesterday's count."""
        events = [event(at("2019-03-11T23:00:00+09:00", i), terminal=t) for i, t in enumerate("abc")]
        events += [event("2019-03-12T00:10:00+09:00", terminal="x"), event("2019-03-11T23:50:00+09:00", terminal="d")]
        (alert,) = found(run_rule("unusual_terminal", events), "many_terminals")
        assert alert.count == 4 and alert.window_start == "2019-03-11T00:00:00+09:00"


class TestNewTerminal:
    """Personal data referenced from a terminal outside the user's recent set."""

    def test_fires_after_warm_up(self) -> None:
        """A reference from a terminal never used before raises a finding keyed by it."""
        alerts = found(run_rule("unusual_terminal", [*usual(), event(T0, terminal="172.16.30.2")]), "new_terminal")
        (alert,) = alerts
        assert alert.terminals == ("172.16.30.2",) and alert.severity == "medium" and alert.count == 1
        assert alert.details["usual_terminals"] == [DESK]

    def test_usual_terminal_is_quiet(self) -> None:
        """References from the usual terminal raise nothing."""
        assert run_rule("unusual_terminal", [*usual(), event(T0, terminal=DESK)]) == []

    def test_login_alone_is_quiet(self) -> None:
        """Logging in somewhere new is not a reference of personal data."""
        assert run_rule("unusual_terminal", [*usual(), event(T0, terminal="x", action="login", mynumber_ref=False)]) == []

    def test_login_does_not_make_terminal_usual(self) -> None:
        """A login on the new terminal just before does not hide the reference."""
        events = [*usual(), event(T0, terminal="x", action="login", mynumber_ref=False), event(at(T0, 1), terminal="x")]
        (alert,) = found(run_rule("unusual_terminal", events), "new_terminal")
        assert alert.count == 1

    def test_one_finding_per_terminal_and_day(self) -> None:
        """Several references from one new terminal are one finding; another terminal another."""
        events = [*usual(), *(event(at(T0, i), terminal="x") for i in range(3)), event(at(T0, 5), terminal="y")]
        assert [(a.terminals, a.count) for a in found(run_rule("unusual_terminal", events), "new_terminal")] == [(("x",), 3), (("y",), 1)]

    def test_new_terminal_becomes_usual_next_day(self) -> None:
        """Yesterday's new terminal is usual today."""
        events = [*usual(), event(T0, terminal="x"), event("2019-03-12T10:00:00+09:00", terminal="x")]
        alerts = found(run_rule("unusual_terminal", events), "new_terminal")
        assert [a.window_start for a in alerts] == ["2019-03-11T00:00:00+09:00"]

    @pytest.mark.parametrize(("gap_days", "fires"), [(29, False), (31, True)])
    def test_recent_period(self, gap_days: int, fires: bool) -> None:
        """A terminal last used more than 30 days ago is no longer usual."""
        old = usual(days=10, terminal="x", end=format_ts(parse_ts(T0) - (gap_days - 1) * DAY))
        events = [*sorted([*old, *usual(days=40)], key=lambda e: e.ts_ms), event(T0, terminal="x")]
        assert bool(found(run_rule("unusual_terminal", events), "new_terminal")) is fires

    @pytest.mark.parametrize(
        ("days", "per_day", "fires"),
        [(6, 10, False), (7, 10, True), (10, 1, False), (10, 2, True)],
    )
    def test_warm_up(self, days: int, per_day: int, fires: bool) -> None:
        """Judged only after 7 days and 20 events of observation."""
        events = [*usual(days=days, per_day=per_day), event(T0, terminal="x")]
        assert bool(found(run_rule("unusual_terminal", events), "new_terminal")) is fires

    def test_seeded_history(self) -> None:
        """Usual terminals learned from seeded history (which raises nothing) count."""
        assert run_rule("unusual_terminal", [event(T0, terminal="x")]) == []
        assert found(run_rule("unusual_terminal", [event(T0, terminal="x")], history=usual()), "new_terminal")
        assert run_rule("unusual_terminal", [], history=[*usual(), event(T0, terminal="x")]) == []

    @pytest.mark.parametrize(
        ("params", "fires"),
        [({}, True), ({"warmup": "20d"}, False), ({"min_events": 100}, False), ({"min_events": 0, "warmup": "1d"}, True)],
    )
    def test_warm_up_overrides(self, params: dict[str, Any], fires: bool) -> None:
        """warmup and min_events change when judging starts."""
        events = [*usual(days=10, per_day=3), event(T0, terminal="x")]
        assert bool(found(run_rule("unusual_terminal", events, {"params": params}), "new_terminal")) is fires

    def test_recent_override(self) -> None:
        """With recent=3d a terminal last used six days ago is new again."""
        old = usual(days=3, terminal="x", end=format_ts(parse_ts(T0) - 5 * DAY))
        events = [*sorted([*old, *usual(days=10)], key=lambda e: e.ts_ms), event(T0, terminal="x")]
        assert found(run_rule("unusual_terminal", events), "new_terminal") == []
        assert found(run_rule("unusual_terminal", events, {"params": {"recent": "3d"}}), "new_terminal")

    @pytest.mark.parametrize("allowlist", [{"terminals": ["x"]}, {"users": ["u001"]}])
    def test_allowlist(self, allowlist: dict[str, list[str]]) -> None:
        """An allowlisted terminal or user raises nothing."""
        events = [*usual(), event(T0, terminal="x")]
        assert run_rule("unusual_terminal", events, {"allowlist": allowlist}) == []


TERMINALS = (DESK, "172.16.11.6", "172.16.20.1", "172.16.20.2", "172.16.30.9")


def day_events(ops: list[tuple[int, int, bool]]) -> list[Event]:
    """(minute, terminal, reference) tuples to one working day's events."""
    out = [
        event(at("2019-03-11T09:00:00+09:00", m), terminal=TERMINALS[t], action="search" if r else "login", mynumber_ref=r)
        for m, t, r in ops
    ]
    return sorted(out, key=lambda e: e.ts_ms)


class TestOrder:
    """Out-of-order arrival within the lateness (within a day) gives the same final alerts."""

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        ops=st.lists(st.tuples(st.integers(0, 90), st.integers(0, 4), st.booleans()), min_size=1, max_size=30),
        jitter=st.lists(lateness_jitter(), min_size=30, max_size=30),
    )
    def test_permutation_within_lateness(self, ops: list[tuple[int, int, bool]], jitter: list[int]) -> None:
        """Any arrival order within the lateness yields the same ids, counts and severities."""
        assert_order_invariant("unusual_terminal", day_events(ops), jitter, history=usual())


class TestSnapshot:
    """Per-user state round-trips exactly and resumes the same findings."""

    EVENTS = day_events([(0, 0, True), (5, 1, False), (10, 1, True), (20, 2, True), (30, 0, True), (50, 3, False), (70, 1, True), (90, 4, True)])

    @pytest.mark.parametrize("k", [0, 1, 3, 5, 7])
    def test_resume_mid_stream(self, k: int) -> None:
        """Restoring a checkpoint mid-day gives the same later alerts."""
        assert_resumes("unusual_terminal", self.EVENTS, k, history=usual())

    def test_dump_load_round_trip(self) -> None:
        """dump(load(dump)) is identical, for a state with every part filled."""
        engine = make_engine([rule("unusual_terminal")])
        engine.seed(usual())
        engine.process_all(self.EVENTS[:4])
        data = assert_state_round_trip(engine)
        assert data[4] and data[7] and data[8] and data[9]
        other = make_engine([rule("unusual_terminal")])
        other.load_user("u001", engine.dump_user("u001"))
        assert other.users["u001"].slots[0].fast == engine.users["u001"].slots[0].fast


class TestState:
    """Per-user state stays bounded and expires."""

    def test_terminals_capped(self) -> None:
        """At most max_terminals are remembered; the least recently used goes first."""
        events = [event(f"2019-03-{d:02d}T10:00:00+09:00", terminal=f"t{d}") for d in range(1, 12)]
        engine = make_engine([rule("unusual_terminal", {"params": {"max_terminals": 5}})])
        engine.process_all(events)
        state: UnusualTerminalState = engine.users["u001"].slots[0]
        assert sorted(state.seen) == ["t10", "t11", "t7", "t8", "t9"]

    def test_expire_keeps_baseline_then_drops(self) -> None:
        """The usual set survives idle days within recent; after 30 idle days the state is gone."""
        engine = make_engine([rule("unusual_terminal")])
        engine.process_all(usual())
        detector = engine.detectors[0]
        state = engine.users["u001"].slots[0]
        assert detector.expire(state, parse_ts("2019-03-20T00:00:00+09:00")) is state
        assert detector.expire(state, parse_ts("2019-04-11T00:00:00+09:00")) is None


class TestSettings:
    """Bad parameters are RuleErrors naming the parameter."""

    @pytest.mark.parametrize(
        ("params", "key"),
        [
            ({"terminals_per_day": 1}, "params.terminals_per_day"),
            ({"terminals_per_day": 1000}, "params.terminals_per_day"),
            ({"min_events": -1}, "params.min_events"),
            ({"max_terminals": 0}, "params.max_terminals"),
            ({"recent": "1h"}, "params.recent"),
            ({"warmup": "a week"}, "params.warmup"),
            ({"terminal_per_day": 3}, "params.terminal_per_day"),
        ],
    )
    def test_invalid(self, params: dict[str, Any], key: str) -> None:
        """Each invalid value is reported against its own key."""
        assert rule_error("unusual_terminal", params).key == key


class TestSamples:
    """The bundled samples behave as labelled."""

    def test_positive(self) -> None:
        """The positive samples raise both reasons, including the PPC sample's five terminals."""
        alerts = sample_alerts("unusual_terminal", SAMPLES / "positive.jsonl")
        got = {(a.user, a.reason, a.count) for a in alerts.values()}
        assert ("osamu", "many_terminals", 5) in got
        assert ("hanako", "new_terminal", 1) in got

    def test_negative(self) -> None:
        """No negative sample raises anything."""
        assert sample_alerts("unusual_terminal", SAMPLES / "negative.jsonl") == {}
