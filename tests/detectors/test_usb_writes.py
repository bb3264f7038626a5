"""UsbWritesDetector: writes to USB memory and other removable media."""

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
    make_engine,
    rule,
    rule_error,
    run_rule,
    sample_alerts,
)
from detectors.usb_writes import MAX_PENDING_WRITES, Patterns, UsbWritesState
from schemas.alert import Alert
from schemas.event import Event, format_ts, parse_ts

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "usb_writes"
DESK = "172.16.11.5"
OTHER = "10.9.9.9"
T0 = "2019-03-04T10:00:00+09:00"


def at(base: str, minutes: float = 0) -> str:
    """``base`` plus ``minutes``, as RFC 3339 in JST."""
    return format_ts(parse_ts(base) + int(minutes * MINUTE))


def ref(ts: str, terminal: str = DESK, **kw: Any) -> Event:
    """A personal-number search on ``terminal``."""
    return event(ts, terminal=terminal, **kw)


def write(ts: str, terminal: str = DESK, device: str | None = "USB-A", **kw: Any) -> Event:
    """A USB write (no personal-number reference of its own)."""
    return event(ts, terminal=terminal, action="usb_write", mynumber_ref=False, device=device, **kw)


def observed(days: int = 20, user: str = "u001", end: str = T0) -> list[Event]:
    """One login a day for ``days`` days before ``end`` (history without media)."""
    stop = parse_ts(end)
    return [event(format_ts(stop - (days - i) * DAY), user=user, terminal=OTHER, action="login", mynumber_ref=False) for i in range(days)]


def reasons(alerts: Iterable[Alert]) -> dict[str, Alert]:
    """Final alerts by ``reason`` or ``reason/key``."""
    out: dict[str, Alert] = {}
    for a in final_alerts(alerts).values():
        out[a.reason] = a
        for d in a.devices:
            out.setdefault(f"{a.reason}/{d}", a)
    return out


class TestSensitiveTerminal:
    """Media writes from terminals that handle personal data."""

    @pytest.mark.parametrize(
        ("patterns", "terminal", "fires"),
        [
            (["172.16.*"], "172.16.11.5", True),
            (["172.16.*"], "172.17.0.1", False),
            (["172.16.11.5"], "172.16.11.5", True),
            (["172.16.11.5"], "172.16.11.50", False),
            (["*"], "anything", True),
            ([], "172.16.11.5", False),
        ],
    )
    def test_configured_patterns(self, patterns: list[str], terminal: str, fires: bool) -> None:
        """Listed terminals (exact or prefix) are sensitive without any learning."""
        overrides = {"params": {"sensitive_terminals": patterns, "learn_sensitive": False}}
        found = reasons(run_rule("usb_writes", [write(T0, terminal)], overrides))
        assert ("write_from_sensitive_terminal" in found) is fires
        if fires:
            assert found["write_from_sensitive_terminal"].severity == "high"

    def test_learned_from_references(self) -> None:
        """A terminal the user referenced personal data on is sensitive; another is not."""
        alerts = run_rule("usb_writes", [ref(T0), write(at(T0, 5)), write(at(T0, 6), OTHER, device="USB-B")])
        (alert,) = [a for a in final_alerts(alerts).values() if a.reason == "write_from_sensitive_terminal"]
        assert alert.count == 1 and alert.terminals == (DESK,)

    @pytest.mark.parametrize(
        ("ref_at", "fires"),
        [
            ("2019-03-04T09:00:00+09:00", True),  # before the write
            ("2019-03-04T10:30:00+09:00", True),  # later the same day: caught when it arrives
            ("2019-03-04T23:59:59+09:00", True),
            ("2019-03-05T00:00:00+09:00", False),  # the next day
            ("2019-01-01T09:00:00+09:00", True),  # two months before, within 90 days
            ("2018-11-01T09:00:00+09:00", False),  # forgotten after 90 days
        ],
    )
    def test_reference_timing(self, ref_at: str, fires: bool) -> None:
        """A write counts if the terminal had a reference by the end of the write's day (within memory)."""
        events = sorted([ref(ref_at), write(T0)], key=lambda e: e.ts_ms)
        found = reasons(run_rule("usb_writes", events))
        assert ("write_from_sensitive_terminal" in found) is fires

    def test_later_reference_uses_write_as_evidence(self) -> None:
        """The finding raised by a later reference names the write and its time."""
        w = write(T0, event_id="w1")
        alerts = final_alerts(run_rule("usb_writes", [w, ref(at(T0, 30), event_id="r1")]))
        (alert,) = [a for a in alerts.values() if a.reason == "write_from_sensitive_terminal"]
        assert alert.first_ts == T0 and "w1" in alert.event_ids and alert.count == 1

    def test_file_copy_with_device_is_a_media_write(self) -> None:
        """A file copy to a device counts; one without a device is not media."""
        events = [
            ref(T0),
            event(at(T0, 1), terminal=DESK, action="file_copy", mynumber_ref=False, device="USB-A"),
            event(at(T0, 2), terminal=DESK, action="file_copy", mynumber_ref=False),
        ]
        (alert,) = [a for a in final_alerts(run_rule("usb_writes", events)).values() if a.reason == "write_from_sensitive_terminal"]
        assert alert.count == 1

    def test_connect_is_not_a_write(self) -> None:
        """Plugging a stick in is not a write."""
        events = [ref(T0), event(at(T0, 1), terminal=DESK, action="usb_connect", mynumber_ref=False, device="USB-A")]
        assert "write_from_sensitive_terminal" not in reasons(run_rule("usb_writes", events))

    def test_one_finding_per_day(self) -> None:
        """Many writes in a day are one finding with a count; the next day is another."""
        events = [ref(T0)] + [write(at(T0, m)) for m in range(1, 6)] + [write("2019-03-05T10:00:00+09:00")]
        found = [a for a in final_alerts(run_rule("usb_writes", events)).values() if a.reason == "write_from_sensitive_terminal"]
        assert sorted(a.count for a in found) == [1, 5]

    def test_learning_can_be_turned_off(self) -> None:
        """With learn_sensitive false only listed terminals count."""
        events = [ref(T0), write(at(T0, 5))]
        assert "write_from_sensitive_terminal" not in reasons(run_rule("usb_writes", events, {"params": {"learn_sensitive": False}}))


class TestUnapprovedDevice:
    """Media other than the approved ones."""

    @pytest.mark.parametrize(
        ("device", "fires"),
        [("USB-OK-1", False), ("USB-OK-", False), ("USB-BAD", True), ("usb-ok-1", True)],
    )
    def test_approved_patterns(self, device: str, fires: bool) -> None:
        """Devices matching approved_devices are quiet; others are critical."""
        overrides = {"params": {"approved_devices": ["USB-OK-*"]}}
        found = reasons(run_rule("usb_writes", [write(T0, OTHER, device=device)], overrides))
        assert ("unapproved_device" in found) is fires
        if fires:
            assert found["unapproved_device"].severity == "critical"
            assert found["unapproved_device"].devices == (device,)

    def test_key_is_the_device(self) -> None:
        """Two unapproved sticks in a day are two findings; one stick twice is one."""
        overrides = {"params": {"approved_devices": ["USB-OK"]}}
        events = [write(T0, OTHER, device="X"), write(at(T0, 1), OTHER, device="Y"), write(at(T0, 2), OTHER, device="X")]
        found = [a for a in final_alerts(run_rule("usb_writes", events, overrides)).values() if a.reason == "unapproved_device"]
        assert sorted((a.devices, a.count) for a in found) == [(("X",), 2), (("Y",), 1)]

    def test_connect_counts(self) -> None:
        """Connecting an unapproved stick is already a finding."""
        overrides = {"params": {"approved_devices": ["USB-OK"]}}
        events = [event(T0, terminal=OTHER, action="usb_connect", mynumber_ref=False, device="X")]
        assert "unapproved_device" in reasons(run_rule("usb_writes", events, overrides))

    def test_off_without_approved_list(self) -> None:
        """With no approved devices configured the reason is off."""
        assert "unapproved_device" not in reasons(run_rule("usb_writes", [write(T0, OTHER, device="X")]))

    def test_no_device_no_judgement(self) -> None:
        """A write that does not name its device cannot be judged."""
        overrides = {"params": {"approved_devices": ["USB-OK"]}}
        assert "unapproved_device" not in reasons(run_rule("usb_writes", [write(T0, OTHER, device=None)], overrides))

    def test_allowlisted_device(self) -> None:
        """An allowlisted device silences the rule."""
        overrides = {"params": {"approved_devices": ["USB-OK"]}, "allowlist": {"devices": ["X"]}}
        assert run_rule("usb_writes", [ref(T0), write(at(T0, 1), device="X")], overrides) == []


class TestVolume:
    """Bytes or records written to media within a sliding window."""

    @pytest.mark.parametrize(
        ("sizes", "gap_minutes", "key", "expected"),
        [
            ((99_999_999,), 0, "bytes", None),
            ((100_000_000,), 0, "bytes", 100_000_000),
            ((60_000_000, 40_000_000), 59.99, "bytes", 100_000_000),
            ((60_000_000, 40_000_000), 60, "bytes", None),
            ((4999,), 0, "records", None),
            ((2500, 2500), 30, "records", 5000),
        ],
    )
    def test_threshold_and_window_edges(self, sizes: tuple[int, ...], gap_minutes: float, key: str, expected: int | None) -> None:
        """An alert exactly when some one-hour window holds the limit or more."""
        events = [write(at(T0, i * gap_minutes), OTHER, **{key: n}) for i, n in enumerate(sizes)]
        found = [a for a in final_alerts(run_rule("usb_writes", events)).values() if a.reason == "volume"]
        if expected is None:
            assert found == []
        else:
            (alert,) = found
            assert alert.count == expected and alert.details["measure"] == key and alert.severity == "high"

    def test_failed_writes_do_not_count(self) -> None:
        """A failed write wrote nothing."""
        events = [write(T0, OTHER, bytes=500_000_000, result="failure")]
        assert "volume" not in reasons(run_rule("usb_writes", events))

    def test_bytes_and_records_are_separate_findings(self) -> None:
        """Each measure has its own finding (the key)."""
        events = [write(T0, OTHER, bytes=200_000_000, records=5000)]
        found = [a for a in final_alerts(run_rule("usb_writes", events)).values() if a.reason == "volume"]
        assert sorted((a.details["measure"], a.count) for a in found) == [("bytes", 200_000_000), ("records", 5000)]

    def test_param_override(self) -> None:
        """A lower max_bytes fires on smaller writes."""
        events = [write(T0, OTHER, bytes=5_000_000)]
        assert "volume" not in reasons(run_rule("usb_writes", events))
        assert "volume" in reasons(run_rule("usb_writes", events, {"params": {"max_bytes": 5_000_000}}))


class TestFirstMediaUse:
    """The first removable-media use after the warm-up."""

    @pytest.mark.parametrize(("days", "fires"), [(0, False), (13, False), (14, True), (40, True)])
    def test_warm_up(self, days: int, fires: bool) -> None:
        """Only users observed for 14 days or more get a first-use finding."""
        found = reasons(run_rule("usb_writes", [*observed(days), write(T0, OTHER)]))
        assert ("first_media_use" in found) is fires
        if fires:
            assert found["first_media_use"].severity == "medium"

    def test_seeded_history(self) -> None:
        """History seeded through Engine.seed counts as observation, and raises nothing itself."""
        assert "first_media_use" in reasons(run_rule("usb_writes", [write(T0, OTHER)], history=observed(20)))
        assert run_rule("usb_writes", [], history=[*observed(20), write(T0, OTHER)]) == []

    def test_only_the_first_day(self) -> None:
        """Uses on the first day are counted; later days are not first uses."""
        connect = event(T0, terminal=OTHER, action="usb_connect", mynumber_ref=False, device="USB-A")
        events = [*observed(20), connect, write(at(T0, 1), OTHER), write("2019-03-05T10:00:00+09:00", OTHER)]
        found = [a for a in final_alerts(run_rule("usb_writes", events)).values() if a.reason == "first_media_use"]
        assert [(a.window_start, a.count) for a in found] == [("2019-03-04T00:00:00+09:00", 2)]

    def test_media_in_history_is_not_first(self) -> None:
        """A user who used media in the seeded history gets no first-use finding."""
        history = sorted([*observed(20), write("2019-02-20T10:00:00+09:00", OTHER)], key=lambda e: e.ts_ms)
        assert "first_media_use" not in reasons(run_rule("usb_writes", [write(T0, OTHER)], history=history))

    def test_warmup_override(self) -> None:
        """A shorter warm-up reports first uses sooner."""
        events = [*observed(3), write(T0, OTHER)]
        assert "first_media_use" in reasons(run_rule("usb_writes", events, {"params": {"warmup": "2d"}}))


def day_events(ops: list[tuple[int, int, int, int]]) -> list[Event]:
    """(minute, kind, terminal, size) tuples to a day of references and media operations."""
    terminals = ("172.16.11.5", "172.16.11.6", "172.16.20.1")
    out: list[Event] = []
    for minute, kind, term, size in ops:
        ts = at("2019-03-04T09:00:00+09:00", minute)
        terminal = terminals[term]
        if kind == 0:
            out.append(ref(ts, terminal))
        elif kind == 1:
            out.append(write(ts, terminal, device=f"USB-{size % 3}", bytes=size * 1_000_000, records=size * 10))
        else:
            out.append(event(ts, terminal=terminal, action="usb_connect", mynumber_ref=False, device=f"USB-{size % 3}"))
    return sorted(out, key=lambda e: e.ts_ms)


OVERRIDES = {"params": {"approved_devices": ["USB-0"], "sensitive_terminals": ["172.16.20.*"]}}


class TestOrder:
    """Out-of-order arrival within the lateness gives the same final alerts."""

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        ops=st.lists(
            st.tuples(st.integers(0, 90), st.integers(0, 2), st.integers(0, 2), st.integers(1, 60)),
            min_size=1,
            max_size=30,
        ),
        jitter=st.lists(lateness_jitter(), min_size=30, max_size=30),
    )
    def test_permutation_within_lateness(self, ops: list[tuple[int, int, int, int]], jitter: list[int]) -> None:
        """Any arrival order within the lateness yields the same ids, counts and severities."""
        assert_order_invariant("usb_writes", day_events(ops), jitter, OVERRIDES, history=observed(20))


class TestSnapshot:
    """Per-user state round-trips exactly and resumes the same findings."""

    EVENTS = day_events([(0, 1, 0, 30), (5, 0, 0, 1), (10, 1, 1, 40), (20, 2, 2, 1), (30, 1, 2, 50), (50, 0, 1, 1), (70, 1, 0, 45)])

    @pytest.mark.parametrize("k", [0, 1, 2, 4, 6])
    def test_resume_mid_stream(self, k: int) -> None:
        """Restoring a checkpoint mid-day gives the same later alerts."""
        assert_resumes("usb_writes", self.EVENTS, k, OVERRIDES, history=observed(20))

    def test_dump_load_round_trip(self) -> None:
        """dump(load(dump)) is identical, for a state with every part filled."""
        engine = make_engine([rule("usb_writes", OVERRIDES)])
        engine.seed(observed(20))
        engine.process_all(self.EVENTS[:3])
        data = assert_state_round_trip(engine)
        assert data[1] and data[2] and data[3] and data[4] is not None and data[5] is not None


class TestState:
    """Per-user state stays bounded and expires."""

    def test_learned_terminals_capped(self) -> None:
        """At most max_terminals are learned; the least recently used goes first."""
        events = [ref(at(T0, i), f"10.1.0.{i}") for i in range(10)] + [ref(at(T0, 11), "10.1.0.0")] + [ref(at(T0, 12), "10.1.0.99")]
        engine = make_engine([rule("usb_writes", {"params": {"max_terminals": 10}})])
        engine.process_all(events)
        state: UsbWritesState = engine.users["u001"].slots[0]
        assert len(state.refs) == 10 and "10.1.0.1" not in state.refs and {"10.1.0.0", "10.1.0.99"} <= state.refs.keys()

    def test_pending_writes_capped(self) -> None:
        """Writes waiting for a later reference are bounded."""
        engine = make_engine([rule("usb_writes")])
        engine.process_all([write(at(T0, i / 10), OTHER, device=None) for i in range(200)])
        state: UsbWritesState = engine.users["u001"].slots[0]
        assert len(state.writes) == MAX_PENDING_WRITES

    def test_expire_forgets_closed_days(self) -> None:
        """After the day closes only the baseline remains; stale terminals go after 90 days."""
        engine = make_engine([rule("usb_writes")])
        engine.process_all([ref(T0), write(at(T0, 1), OTHER, bytes=10, records=1)])
        detector = engine.detectors[0]
        state: UsbWritesState = engine.users["u001"].slots[0]
        kept = detector.expire(state, parse_ts("2019-03-06T00:00:00+09:00"))
        assert kept is state and not state.counts and not state.writes
        assert state.bytes_window is None and state.records_window is None and DESK in state.refs
        detector.expire(state, parse_ts("2019-06-10T00:00:00+09:00"))
        assert state.refs == {} and state.media_day == parse_ts("2019-03-04T00:00:00+09:00")


class TestPatterns:
    """Exact names and prefix patterns."""

    def test_match(self) -> None:
        """Exact names match themselves; a trailing '*' matches the prefix."""
        p = Patterns(("a", "b.*"))
        assert "a" in p and "b.1" in p and "b." in p and "ab" not in p and "b" not in p

    @pytest.mark.parametrize("bad", ["", "a*b", "*x"])
    def test_invalid(self, bad: str) -> None:
        """A '*' anywhere but at the end, or an empty pattern, is rejected."""
        with pytest.raises(ValueError):
            Patterns((bad,))


class TestSettings:
    """Bad parameters are RuleErrors naming the parameter."""

    @pytest.mark.parametrize(
        ("params", "key"),
        [
            ({"sensitive_terminals": ["17*2"]}, "params.sensitive_terminals"),
            ({"sensitive_terminals": "172.16.*"}, "params.sensitive_terminals"),
            ({"approved_devices": [""]}, "params.approved_devices"),
            ({"window": "2d"}, "params.window"),
            ({"max_bytes": 0}, "params.max_bytes"),
            ({"max_records": 0}, "params.max_records"),
            ({"max_terminals": 0}, "params.max_terminals"),
            ({"warmup": "later"}, "params.warmup"),
            ({"learn_sensitive": "yes"}, "params.learn_sensitive"),
            ({"sensitive_memory": 0}, "params.sensitive_memory"),
        ],
    )
    def test_invalid(self, params: dict[str, Any], key: str) -> None:
        """Each invalid value is reported against its own key."""
        assert rule_error("usb_writes", params).key == key


class TestSamples:
    """The bundled samples behave as labelled."""

    def test_positive(self) -> None:
        """The positive samples raise every reason of the rule."""
        alerts = sample_alerts("usb_writes", SAMPLES / "positive.jsonl", {"params": {"approved_devices": ["USB-REG-*"]}})
        assert {a.reason for a in alerts.values()} == {"write_from_sensitive_terminal", "unapproved_device", "volume", "first_media_use"}

    def test_positive_with_defaults(self) -> None:
        """With the bundled defaults the positive samples still raise alerts."""
        assert sample_alerts("usb_writes", SAMPLES / "positive.jsonl")

    def test_negative(self) -> None:
        """No negative sample raises anything."""
        assert sample_alerts("usb_writes", SAMPLES / "negative.jsonl", {"params": {"approved_devices": ["USB-REG-*"]}}) == {}
        assert sample_alerts("usb_writes", SAMPLES / "negative.jsonl") == {}
