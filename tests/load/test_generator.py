"""The synthetic municipality: determinism, shape, calendar, scenarios, and a small evaluation."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import date, datetime
from io import BytesIO

import pytest

from detectors.calendar import DAY_HOLIDAY, DAY_WORKDAY, DAY_YEAR_END, BusinessCalendar
from load_tests.evaluate import Evaluation, evaluate
from load_tests.generator import (
    SCENARIOS,
    TZ,
    Profile,
    ScenarioTruth,
    SyntheticLog,
    generate,
    to_jsonl,
)
from schemas.event import LOOKUP_ACTIONS, Event, parse_ts
from schemas.mynumber import contains_twelve_digits

HOUR_MS = 3_600_000
START = date(2024, 11, 11)  # a Monday; 60 days cover 11/23 (a holiday) and the year-end closure
CAL = BusinessCalendar()


def local(ts_ms: int) -> datetime:
    """Epoch ms as an aware local datetime."""
    return datetime.fromtimestamp(ts_ms / 1000, TZ)


class Town:
    """One generated log with every scenario, kept for the module's tests."""

    def __init__(self) -> None:
        self.log: SyntheticLog = generate(seed=11, start=START, days=60, staff=40, scenarios="all", scenario_start=date(2024, 11, 18), events_per_day=40)
        self.events: list[Event] = list(self.log)
        self.truth: dict[str, ScenarioTruth] = {t.name: t for t in self.log.scenario_truth}
        self.by_user: dict[str, list[Event]] = defaultdict(list)
        for ev in self.events:
            self.by_user[ev.user].append(ev)

    def injected(self, name: str) -> list[Event]:
        """The events a scenario added (its ids start with ``x<index>-``)."""
        index = list(SCENARIOS).index(name)
        return [e for e in self.events if e.event_id.startswith(f"x{index:x}-")]


@pytest.fixture(scope="module")
def town() -> Town:
    return Town()


class TestDeterminism:
    """Same seed, same events; another seed, other events."""

    def test_same_seed_same_events(self) -> None:
        """Two runs with one seed give equal events and equal ground truth."""
        a = generate(seed=3, start=START, days=6, staff=25, scenarios=["night_lookup", "denied_export"])
        b = generate(seed=3, start=START, days=6, staff=25, scenarios=["night_lookup", "denied_export"])
        assert list(a) == list(b)
        assert a.scenario_truth == b.scenario_truth

    def test_other_seed_other_events(self) -> None:
        """A different seed gives a different log."""
        a = [e.to_dict() for e in generate(seed=3, start=START, days=3, staff=25)]
        b = [e.to_dict() for e in generate(seed=4, start=START, days=3, staff=25)]
        assert a != b

    def test_scenarios_leave_ordinary_work_alone(self) -> None:
        """Injecting a scenario that does not keep anyone home adds events and changes none."""
        plain = generate(seed=5, start=START, days=5, staff=25)
        spiced = generate(seed=5, start=START, days=5, staff=25, scenarios=["night_lookup"])
        ordinary = [e for e in spiced if not e.event_id.startswith("x")]
        assert ordinary == list(plain)


class TestShape:
    """Events are ordered, aware, pseudonymous and plausible."""

    def test_time_ordered(self, town: Town) -> None:
        """Events come in non-decreasing event time."""
        times = [e.ts_ms for e in town.events]
        assert times == sorted(times)

    def test_timestamps_are_aware_local_time(self, town: Town) -> None:
        """Every encoded timestamp carries the +09:00 offset and parses back to the same instant."""
        for ev in town.events[:: max(1, len(town.events) // 2000)]:
            ts = ev.to_dict()["ts"]
            assert ts.endswith("+09:00")
            assert parse_ts(ts) == ev.ts_ms

    def test_no_twelve_digit_runs(self, town: Town) -> None:
        """No field of any event, encoded as JSON, holds a run of 12 digits (plain or grouped)."""
        buf = BytesIO()
        count = to_jsonl(town.events, buf)
        raw = buf.getvalue()
        assert count == len(town.events)
        assert re.search(rb"[0-9]{12}", raw) is None
        assert not contains_twelve_digits(raw)

    def test_unique_event_ids(self, town: Town) -> None:
        """Event ids are unique."""
        ids = [e.event_id for e in town.events]
        assert len(ids) == len(set(ids))

    def test_subjects_are_tokens(self, town: Town) -> None:
        """Residents appear only as ``r-<hex>`` tokens."""
        subjects = {e.subject for e in town.events if e.subject is not None}
        assert subjects
        assert all(re.fullmatch(r"r-[0-9a-f]{10}", s) for s in subjects)

    def test_daily_volume_near_target(self) -> None:
        """The mean events per working staff-day is near ``events_per_day``."""
        log = generate(seed=2, start=START, days=5, staff=60, events_per_day=100)
        events = list(log)
        staff_days = len({(e.user, local(e.ts_ms).date()) for e in events})
        assert 70 <= len(events) / staff_days <= 130

    def test_work_hours(self, town: Town) -> None:
        """Ordinary personal-data work happens between 08:10 and 18:00, apart from the benign spans listed."""
        benign = defaultdict(list)
        for span in town.log.benign:
            benign[span.user].append(span)
        for ev in town.events:
            if ev.event_id.startswith("x") or not ev.mynumber_ref:
                continue
            t = local(ev.ts_ms)
            minute = t.hour * 60 + t.minute
            if 8 * 60 + 30 <= minute < 18 * 60:
                continue
            assert any(s.start_ms - 60_000 <= ev.ts_ms <= s.end_ms + 60_000 for s in benign[ev.user]), ev

    def test_exporters_export_and_others_do_not(self, town: Town) -> None:
        """Only designated exporters write out records in ordinary work."""
        exporters = {s.user for s in town.log.town.staff if s.exporter}
        writers = {e.user for e in town.events if e.action == "export" and not e.event_id.startswith("x")}
        assert writers
        assert writers <= exporters


class TestCalendar:
    """Nobody works on weekends, holidays or the year-end closure unless on duty or in a scenario."""

    def test_no_ordinary_activity_off_days(self, town: Town) -> None:
        """Every ordinary event falls on a working day."""
        for ev in town.events:
            if not ev.event_id.startswith("x"):
                assert CAL.day_kind(local(ev.ts_ms).date()) == DAY_WORKDAY, ev

    def test_range_has_off_days(self, town: Town) -> None:
        """The test range does contain weekends, a holiday and the closure (so the check above means something)."""
        kinds = Counter(town.log.kinds)
        assert kinds["weekend"] and kinds[DAY_HOLIDAY] and kinds[DAY_YEAR_END]

    def test_duty_roster(self) -> None:
        """With a duty roster, counter staff work weekend mornings, listed as benign duty."""
        log = generate(seed=1, start=START, days=7, staff=40, profile=Profile(duty_roster=2))
        weekend = [e for e in log if CAL.day_kind(local(e.ts_ms).date()) == "weekend"]
        assert weekend
        assert {e.user for e in weekend} == {s.user for s in log.benign if s.kind == "duty_roster"}
        minutes = [local(e.ts_ms).hour * 60 + local(e.ts_ms).minute for e in weekend]
        assert min(minutes) >= 8 * 60 + 30 and max(minutes) <= 12 * 60 + 30


def _lookups_per_day(events: list[Event]) -> Counter[date]:
    return Counter(local(e.ts_ms).date() for e in events if e.action in LOOKUP_ACTIONS and e.result == "success")


#: Scenario -> a check of its ground truth against the generated log.
CHECKS: dict[str, Callable[[Town, ScenarioTruth, list[Event]], None]] = {}


def check(name: str) -> Callable[[Callable[[Town, ScenarioTruth, list[Event]], None]], Callable[[Town, ScenarioTruth, list[Event]], None]]:
    def register(fn: Callable[[Town, ScenarioTruth, list[Event]], None]) -> Callable[[Town, ScenarioTruth, list[Event]], None]:
        CHECKS[name] = fn
        return fn

    return register


@check("night_lookup")
def _night(town: Town, t: ScenarioTruth, evs: list[Event]) -> None:
    assert CAL.day_kind(t.day) == DAY_WORKDAY
    assert all(local(e.ts_ms).hour >= 23 for e in evs)
    assert sum(e.mynumber_ref for e in evs) >= 5


@check("holiday_lookup")
def _holiday(town: Town, t: ScenarioTruth, evs: list[Event]) -> None:
    assert CAL.day_kind(t.day) == DAY_HOLIDAY


@check("year_end_lookup")
def _year_end(town: Town, t: ScenarioTruth, evs: list[Event]) -> None:
    assert (t.day.month, t.day.day) >= (12, 29) or (t.day.month == 1 and t.day.day <= 3)


@check("repeated_subject")
def _repeated(town: Town, t: ScenarioTruth, evs: list[Event]) -> None:
    subjects = Counter(e.subject for e in evs)
    assert len(subjects) == 1 and next(iter(subjects.values())) == 30
    assert t.end_ms - t.start_ms < HOUR_MS


@check("bulk_export")
def _bulk(town: Town, t: ScenarioTruth, evs: list[Event]) -> None:
    assert max(e.records or 0 for e in evs if e.action == "export") >= 20_000
    assert town.log.town.by_user[t.user].exporter


@check("lookup_spike")
def _spike(town: Town, t: ScenarioTruth, evs: list[Event]) -> None:
    per_day = _lookups_per_day(town.by_user[t.user])
    others = [n for d, n in per_day.items() if d != t.day]
    assert per_day[t.day] >= 7 * (sum(others) / len(others))


@check("usb_write_unapproved_device")
def _usb_unapproved(town: Town, t: ScenarioTruth, evs: list[Event]) -> None:
    devices = {e.device for e in evs if e.action == "usb_write"}
    assert devices and not devices & set(town.log.town.approved_devices.values())


@check("usb_first_use")
def _usb_first(town: Town, t: ScenarioTruth, evs: list[Event]) -> None:
    media = [e for e in town.by_user[t.user] if e.action in ("usb_connect", "usb_write")]
    assert media and min(e.ts_ms for e in media) == t.start_ms
    assert {e.device for e in media} <= set(town.log.town.approved_devices.values())


@check("unusual_terminal")
def _terminal(town: Town, t: ScenarioTruth, evs: list[Event]) -> None:
    usual = {e.terminal for e in town.by_user[t.user] if not e.event_id.startswith("x")}
    assert {e.terminal for e in evs}.isdisjoint(usual)


@check("many_terminals")
def _many(town: Town, t: ScenarioTruth, evs: list[Event]) -> None:
    assert len({e.terminal for e in evs}) >= 5
    assert t.end_ms - t.start_ms <= HOUR_MS


@check("denied_attempts")
def _denied(town: Town, t: ScenarioTruth, evs: list[Event]) -> None:
    assert sum(e.result == "denied" and e.mynumber_ref for e in evs) >= 10


@check("denied_export")
def _denied_export(town: Town, t: ScenarioTruth, evs: list[Event]) -> None:
    assert all(e.action == "export" and e.result == "denied" for e in evs)


@check("print_screen")
def _print_screen(town: Town, t: ScenarioTruth, evs: list[Event]) -> None:
    assert any(e.action == "print_screen" and e.mynumber_ref for e in evs)


@check("first_export")
def _first_export(town: Town, t: ScenarioTruth, evs: list[Event]) -> None:
    exports = [e for e in town.by_user[t.user] if e.action in ("export", "file_copy", "print") and e.mynumber_ref]
    assert min(e.ts_ms for e in exports) == t.start_ms
    assert t.start_ms - town.by_user[t.user][0].ts_ms >= 14 * 24 * HOUR_MS


@check("telework_access")
def _telework(town: Town, t: ScenarioTruth, evs: list[Event]) -> None:
    assert all(e.location == "telework" for e in evs)
    assert all(e.location == "telework" for e in town.by_user[t.user] if local(e.ts_ms).date() == t.day)


@check("transferred_staff")
def _transferred(town: Town, t: ScenarioTruth, evs: list[Event]) -> None:
    before = [e.ts_ms for e in town.by_user[t.user] if e.ts_ms < t.start_ms]
    assert before, "the account had an owner before"
    assert t.start_ms - max(before) >= 21 * 24 * HOUR_MS
    usual = {e.terminal for e in town.by_user[t.user] if e.ts_ms < t.start_ms}
    assert {e.terminal for e in evs}.isdisjoint(usual)


class TestScenarios:
    """Each scenario adds the events its ground truth describes."""

    def test_every_scenario_is_checked(self) -> None:
        """This module has a check for every scenario the generator knows."""
        assert set(CHECKS) == set(SCENARIOS)

    @pytest.mark.parametrize("name", list(SCENARIOS))
    def test_ground_truth(self, town: Town, name: str) -> None:
        """The scenario was placed, its events span its truth, and they show what it claims."""
        assert name not in town.log.skipped, town.log.skipped.get(name)
        t = town.truth[name]
        evs = town.injected(name)
        assert evs and {e.user for e in evs} == {t.user}
        assert min(e.ts_ms for e in evs) == t.start_ms and max(e.ts_ms for e in evs) == t.end_ms
        assert local(t.start_ms).date() == t.day >= date(2024, 11, 18)
        assert t.expected
        CHECKS[name](town, t, evs)

    def test_one_user_per_scenario(self, town: Town) -> None:
        """No two scenarios share a user (so attribution is unambiguous)."""
        users = [t.user for t in town.log.scenario_truth]
        assert len(users) == len(set(users))

    def test_unplaceable_scenario_is_skipped(self) -> None:
        """A range without a holiday skips holiday_lookup and says why."""
        log = generate(seed=1, start=date(2024, 12, 2), days=5, staff=20, scenarios=["holiday_lookup"])
        assert not log.scenario_truth
        assert "holiday" in log.skipped["holiday_lookup"]

    @pytest.mark.timeout(30)
    @pytest.mark.parametrize("staff", [7, 12, 30])
    def test_small_towns(self, staff: int) -> None:
        """Even a tiny town places or skips (with a reason) every scenario, and the log ends."""
        log = generate(seed=staff, start=START, days=60, staff=staff, scenarios="all", events_per_day=10)
        assert sum(1 for _ in log) > 0
        assert {t.name for t in log.scenario_truth} | set(log.skipped) == set(SCENARIOS)
        assert all(log.skipped.values())

    @pytest.mark.timeout(60)
    @pytest.mark.parametrize(("seed", "days", "staff"), [(3, 4, 24), (5, 6, 30)])
    def test_many_terminals_in_a_small_department(self, seed: int, days: int, staff: int) -> None:
        """Regression: fewer than 5 colleague terminals in the department no longer hangs
        ``many_terminals``; it borrows other departments' terminals (or is skipped with a reason)."""
        log = generate(seed=seed, days=days, staff=staff, scenarios=["many_terminals"])
        events = list(log)
        if "many_terminals" in log.skipped:
            assert log.skipped["many_terminals"]
            return
        (truth,) = log.scenario_truth
        st = log.town.by_user[truth.user]
        colleagues = {s.terminal for s in log.town.staff if s.dept.name == st.dept.name and s.user != st.user}
        assert len(colleagues) < 5  # the case that used to loop forever
        used = {e.terminal for e in events if e.event_id.startswith("x0-")}
        assert len(used) == 5 and st.terminal not in used and not used <= colleagues

    def test_unknown_scenario(self) -> None:
        """An unknown scenario name is an error naming it."""
        with pytest.raises(ValueError, match="nope"):
            generate(seed=1, days=2, staff=20, scenarios=["nope"])


@pytest.fixture(scope="module")
def small_evaluation() -> Evaluation:
    return evaluate(seed=2, staff=40, days=50, warmup_days=21, start=date(2024, 11, 18), events_per_day=40)


class TestSmallEvaluation:
    """The default rules find every injected scenario in a small town (a few seconds)."""

    @pytest.mark.timeout(120)
    @pytest.mark.parametrize("name", list(SCENARIOS))
    def test_scenario_recalled(self, small_evaluation: Evaluation, name: str) -> None:
        """An alert of an expected rule, for the scenario's user, overlaps its span."""
        assert name not in small_evaluation.skipped
        (result,) = [r for r in small_evaluation.results if r.truth.name == name]
        assert result.found, f"{name}: no alert of {result.truth.expected}; side alerts: {[a.rule_id for a in result.side]}"

    def test_noise_is_counted(self, small_evaluation: Evaluation) -> None:
        """Noise is measured per 1,000 staff-days and every noise alert has a cause label."""
        assert small_evaluation.staff_days == 40 * 50
        assert all(cause for _, cause in small_evaluation.noise)
        assert small_evaluation.noise_per_1000 == pytest.approx(1000 * len(small_evaluation.noise) / 2000)
