"""UnusualOperationDetector: operations not normally performed (PPC viewpoint 4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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

NAME = "unusual_operation"
SAMPLES = Path(__file__).resolve().parents[1] / "samples" / NAME
T0 = parse_ts("2019-02-04T10:00:00+09:00")
DAY = 86_400_000


def at(seconds: float = 0, days: float = 0) -> str:
    """RFC 3339 time relative to 2019-02-04 10:00 JST."""
    return format_ts(T0 + int(seconds * 1000 + days * DAY))


def history(first_days_before: float, exports_days_before: tuple[float, ...] = (), records: int = 10) -> list[Event]:
    """A user seen since ``first_days_before`` (a search every few days) with the given exports of ``records`` records."""
    events = [event(at(days=-d), action="search", subject="mn_3fa2c9e1b7d04a6f5c28") for d in range(int(first_days_before), 0, -5)]
    events.append(event(at(days=-first_days_before), action="search"))
    events += [event(at(days=-d), action="export", records=records) for d in exports_days_before]
    return sorted(events, key=lambda e: e.ts_ms)


class TestPrintScreen:
    """Print screen while personal numbers are shown."""

    @pytest.mark.parametrize(
        ("fields", "expected"),
        [
            ({}, [("print_screen", 1)]),
            ({"mynumber_ref": False}, []),
            ({"result": "denied"}, []),  # an attempt: unauthorized_attempts raises it
        ],
    )
    def test_fires_with_personal_data(self, fields: dict[str, Any], expected: list[tuple[str, int]]) -> None:
        """Only a successful print screen with personal data on screen alerts."""
        assert reason_counts(run_rule(NAME, [event(at(), action="print_screen", **fields)])) == expected

    def test_one_finding_per_local_day(self) -> None:
        """Print screens add up within the local day; the next day is a new finding."""
        events = [event(at(s), action="print_screen") for s in (0, 60, 120)] + [event(at(days=1), action="print_screen")]
        alerts = run_rule(NAME, events)
        assert reason_counts(alerts) == [("print_screen", 1), ("print_screen", 3)]
        assert {a.window_start for a in alerts} == {"2019-02-04T00:00:00+09:00", "2019-02-05T00:00:00+09:00"}
        assert {a.severity for a in alerts} == {"high"}

    def test_evidence_is_the_print_screens(self) -> None:
        """The evidence lists the day's print screens, not the searches between them."""
        events = [event(at(0), action="print_screen"), event(at(30), action="search"), event(at(60), action="print_screen")]
        (alert,) = final_alerts(run_rule(NAME, events)).values()
        assert set(alert.event_ids) == {events[0].event_id, events[2].event_id}


class TestFirstExport:
    """A write-out of personal data by a user who does not write out."""

    @pytest.mark.parametrize(
        ("first", "exports", "expected"),
        [
            (15, (), [("first_export", 1)]),
            (14, (), [("first_export", 1)]),  # observed exactly the warm-up
            (13.9, (), []),  # not observed long enough
            (100, (30,), []),  # a monthly exporter
            (100, (90,), []),  # still an exporter after 90 days
            (120, (91,), [("first_export", 1)]),  # forgotten: a non-exporter again
        ],
    )
    def test_baseline(self, first: float, exports: tuple[float, ...], expected: list[tuple[str, int]]) -> None:
        """Alerts only when the user was observed long enough and has no recent export."""
        alerts = run_rule(NAME, [event(at(), action="export", records=500)], history=history(first, exports))
        assert reason_counts(alerts) == expected
        assert all(a.severity == "medium" for a in alerts)

    @pytest.mark.parametrize("action", ["export", "file_copy", "print"])
    def test_write_out_actions(self, action: str) -> None:
        """Export, file copy and print all count as write-outs."""
        assert reason_counts(run_rule(NAME, [event(at(), action=action)], history=history(20))) == [("first_export", 1)]

    def test_details(self) -> None:
        """The alert says how long the user was observed and since when they last exported."""
        (alert,) = run_rule(NAME, [event(at(), action="export")], history=history(120, (91,)))
        assert (alert.details["days_observed"], alert.details["days_since_last_export"]) == (120, 91)

    def test_then_an_exporter(self) -> None:
        """Exports later that day join the finding; the next day's export is routine."""
        events = [event(at(s), action="export") for s in (0, 600)] + [event(at(days=1), action="export")]
        assert reason_counts(run_rule(NAME, events, history=history(20))) == [("first_export", 2)]

    @pytest.mark.parametrize("fields", [{"mynumber_ref": False}, {"result": "failure"}, {"result": "denied"}])
    def test_no_personal_data_or_failed(self, fields: dict[str, Any]) -> None:
        """Exports without personal data, and failed ones, neither alert nor make an exporter."""
        events = [event(at(), action="export", **fields), event(at(days=1), action="export")]
        alerts = run_rule(NAME, events, history=history(20))
        assert [(a.reason, a.window_start) for a in alerts] == [("first_export", "2019-02-05T00:00:00+09:00")]

    def test_seen_live_counts_as_observed(self) -> None:
        """The warm-up also runs on live events, not only on seeded history."""
        events = [event(at(days=-15), action="search"), event(at(), action="export")]
        assert reason_counts(run_rule(NAME, events)) == [("first_export", 1)]


class TestMinRecords:
    """A day's write-outs below ``min_records`` (default 10) are not a first export."""

    @pytest.mark.parametrize(
        ("writes", "params", "expected"),
        [
            ([("print", 1)], {}, []),  # a certificate printed at the counter
            ([("export", 9)], {}, []),
            ([("export", 10)], {}, [("first_export", 1)]),
            ([("file_copy", 800)], {}, [("first_export", 1)]),
            ([("export", None)], {}, [("first_export", 1)]),  # an unknown count is not known to be small
            ([("print", 1)] * 9, {}, []),  # nine certificates in a day
            ([("print", 1)] * 10, {}, [("first_export", 10)]),  # ten add up; the finding counts every write-out
            ([("export", 4), ("file_copy", 4), ("print", 2)], {}, [("first_export", 3)]),  # a write-out split up
            ([("print", 1), ("export", 500)], {}, [("first_export", 2)]),  # the small one before is in the count
            ([("export", 0)], {"min_records": 0}, [("first_export", 1)]),  # 0: every write-out
            ([("print", 1)], {"min_records": 1}, [("first_export", 1)]),
            ([("export", 99)], {"min_records": 100}, []),
            ([("export", 60), ("export", 40)], {"min_records": 100}, [("first_export", 2)]),
        ],
    )
    def test_threshold(self, writes: list[tuple[str, int | None]], params: dict[str, Any], expected: list[tuple[str, int]]) -> None:
        """One day's write-outs alert once their records reach min_records, counting them all."""
        events = [event(at(600 * i), action=action, records=records) for i, (action, records) in enumerate(writes)]
        assert reason_counts(run_rule(NAME, events, {"params": params}, history=history(20))) == expected

    def test_summed_per_local_day(self) -> None:
        """Write-outs on two days do not add up, not even across midnight."""
        late = event(format_ts(parse_ts("2019-02-04T23:50:00+09:00")), action="export", records=5)
        early = event(format_ts(parse_ts("2019-02-05T00:10:00+09:00")), action="export", records=5)
        assert run_rule(NAME, [late, early], history=history(20)) == []

    def test_small_write_outs_do_not_make_an_exporter(self) -> None:
        """Certificates printed last month do not hide today's bulk write-out; a 10-record export does."""
        now = [event(at(), action="export", records=500)]
        assert reason_counts(run_rule(NAME, now, history=history(60, (30, 20, 10), records=1))) == [("first_export", 1)]
        assert run_rule(NAME, now, history=history(60, (30,), records=10)) == []

    def test_small_write_outs_join_an_open_finding(self) -> None:
        """After the day's first export, a small write-out that day is added to the finding."""
        events = [event(at(), action="export", records=500), event(at(600), action="print", records=1)]
        assert reason_counts(run_rule(NAME, events, history=history(20))) == [("first_export", 2)]

    def test_evidence_lists_the_days_write_outs(self) -> None:
        """The finding's evidence holds the small write-outs that led up to it."""
        events = [event(at(600 * i), action="file_copy", records=4) for i in range(3)]
        (alert,) = final_alerts(run_rule(NAME, events, history=history(20))).values()
        assert set(alert.event_ids) == {e.event_id for e in events} and alert.count == 3

    def test_small_days_while_warming_up(self) -> None:
        """Small write-outs during the warm-up raise nothing and are forgotten at day close."""
        eng = Engine([rule(NAME)])
        eng.process_all([event(at(days=-3), action="search"), event(at(), action="print", records=2)])
        assert eng.drain() == []
        eng.sweep(T0 + DAY)
        assert NAME not in (orjson.loads(eng.dump_user("u001") or b"null"))["s"]


class TestTelework:
    """Any access to personal data from telework."""

    @pytest.mark.parametrize(
        ("fields", "expected"),
        [
            ({"location": "telework"}, [("telework", 1)]),
            ({"location": "telework", "mynumber_ref": False}, []),
            ({"location": "office"}, []),
            ({}, []),
        ],
    )
    def test_fires(self, fields: dict[str, Any], expected: list[tuple[str, int]]) -> None:
        """Personal data from a telework location alerts (high)."""
        alerts = run_rule(NAME, [event(at(), action="view", **fields)])
        assert reason_counts(alerts) == expected
        assert all(a.severity == "high" and a.details["location"] == "telework" for a in alerts)

    def test_locations_param(self) -> None:
        """Agencies name their own telework locations."""
        events = [event(at(), location="home"), event(at(60), location="satellite"), event(at(90), location="telework")]
        overrides = {"params": {"telework_locations": ["home", "satellite"]}}
        assert reason_counts(run_rule(NAME, events, overrides)) == [("telework", 2)]


class TestOrderAndState:
    """Arrival order within lateness, snapshots and the compact baseline."""

    @settings(max_examples=60, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.integers(0, 8 * 60),
                st.sampled_from(["search", "export", "print_screen", "print"]),
                st.booleans(),
                st.integers(0, 59),
                st.sampled_from([None, 1, 4, 12]),
            ),
            min_size=1,
            max_size=30,
        )
    )
    def test_order_within_lateness_does_not_matter(self, spec: list[tuple[int, str, bool, int, int | None]]) -> None:
        """Events of one working day shuffled by less than the lateness give the same final alerts."""
        events = [
            event(format_ts(parse_ts("2019-02-04T09:00:00+09:00") + minute * 60_000 + i), action=action,
                  location="telework" if tele else None, records=records, event_id=f"h{i}")
            for i, (minute, action, tele, _, records) in enumerate(spec)
        ]
        assert_order_invariant(NAME, events, [delay * 60_000 for _, _, _, delay, _ in spec], history=history(30))

    def test_late_earlier_export_joins_the_finding(self) -> None:
        """An earlier export arriving after a later one still counts in the day's finding."""
        a, b = event(at(0), action="export"), event(at(900), action="export")
        assert reason_counts(run_rule(NAME, [b, a], history=history(20))) == [("first_export", 2)]

    def test_late_small_write_out_completes_the_day(self) -> None:
        """A small write-out arriving late still adds its records to the day."""
        a, b = event(at(0), action="print", records=3), event(at(900), action="export", records=7)
        assert reason_counts(run_rule(NAME, [b, a], history=history(20))) == [("first_export", 2)]

    def test_snapshot_restore_mid_stream(self) -> None:
        """Restoring a user's state mid-stream gives the same later alerts as never stopping."""
        events = [event(at(days=-20), action="search")]
        events += [event(at(i * 600), action=("print_screen", "export", "search")[i % 3], location="telework" if i % 4 == 0 else None) for i in range(20)]
        expected = assert_resumes(NAME, events, 8, ordered=False)
        assert {a.reason for a in expected} == {"print_screen", "first_export", "telework"}

    @pytest.mark.parametrize("k", [1, 2, 3])
    def test_snapshot_restore_with_small_write_outs(self, k: int) -> None:
        """A day's small write-outs survive a restore and still add up to the finding."""
        events = [event(at(days=-20), action="search")] + [event(at(i * 600), action="print", records=3) for i in range(4)]
        expected = assert_resumes(NAME, events, k)
        assert reason_counts(expected) == [("first_export", 4)]

    def test_dump_load_round_trip(self) -> None:
        """dump(load(x)) == x for a baseline with open day counts."""
        eng = Engine([rule(NAME)])
        eng.process_all([*history(20), event(at(), action="export"), event(at(60), action="print_screen", location="telework")])
        data = assert_state_round_trip(eng)
        assert len(data) == 2 and len(data[1]) == 3

    def test_dump_load_round_trip_with_small_write_outs(self) -> None:
        """dump(load(x)) == x for a baseline holding a day below min_records."""
        eng = Engine([rule(NAME)])
        eng.process_all([*history(20), event(at(), action="print", records=2), event(at(60), action="print", records=3)])
        data = assert_state_round_trip(eng)
        assert data[1] == [] and data[2] == [[T0 - 10 * 3_600_000, 2, 5, T0 + 60_000]]

    def test_loads_older_layout(self) -> None:
        """A snapshot written when the detector kept first-seen itself restores it as the user's first_ts."""
        eng = Engine([rule(NAME)])
        old = {"v": 1, "last": T0, "dep": "tax", "s": {NAME: [T0 - 20 * DAY, T0, []]}, "a": []}
        eng.load_user("u001", orjson.dumps(old))
        assert eng.users["u001"].first_ts == T0 - 20 * DAY
        assert orjson.loads(eng.dump_user("u001") or b"null")["s"][NAME] == [T0, []]

    def test_baseline_persists_compactly(self) -> None:
        """Closed days are dropped; first-seen (the engine's) and last export stay, an old export is forgotten."""
        eng = Engine([rule(NAME, {"params": {"forget_after": "7d"}})])
        eng.process_all([event(at(days=-20), action="search"), event(at(), action="export"), event(at(60), action="print_screen")])
        eng.sweep(T0 + 3 * DAY)
        doc = orjson.loads(eng.dump_user("u001") or b"null")
        assert doc["s"][NAME] == [T0, []] and doc["first"] == T0 - 20 * DAY
        eng.sweep(T0 + 10 * DAY)
        doc = orjson.loads(eng.dump_user("u001") or b"null")
        assert NAME not in doc["s"] and doc["first"] == T0 - 20 * DAY


class TestConfiguration:
    """Overrides, allowlists and parameter validation."""

    def test_warmup_override(self) -> None:
        """A shorter warm-up makes a first export unusual sooner."""
        past = history(3)
        assert run_rule(NAME, [event(at(), action="export")], history=past) == []
        assert reason_counts(run_rule(NAME, [event(at(), action="export")], {"params": {"warmup": "2d"}}, history=past)) == [("first_export", 1)]

    def test_forget_after_override(self) -> None:
        """A shorter memory turns a past exporter into a non-exporter sooner."""
        past = history(60, (40,))
        assert run_rule(NAME, [event(at(), action="export")], history=past) == []
        alerts = run_rule(NAME, [event(at(), action="export")], {"params": {"forget_after": "30d"}}, history=past)
        assert reason_counts(alerts) == [("first_export", 1)]

    @pytest.mark.parametrize("allow", [{"users": ["u001"]}, {"terminals": ["10.0.0.1"]}, {"departments": ["tax"]}])
    def test_allowlist_suppresses(self, allow: dict[str, list[str]]) -> None:
        """Allowlisted users, terminals and departments raise nothing."""
        events = [event(at(), action="print_screen", location="telework", department="tax")]
        assert run_rule(NAME, events)
        assert run_rule(NAME, events, {"allowlist": allow}) == []

    @pytest.mark.parametrize(
        ("params", "key"),
        [
            ({"warmup": "x"}, "params.warmup"),
            ({"warmup": "400d"}, "params.warmup"),
            ({"forget_after": "1h"}, "params.forget_after"),
            ({"telework_locations": "telework"}, "params.telework_locations"),
            ({"min_records": -1}, "params.min_records"),
            ({"min_records": 100_001}, "params.min_records"),
            ({"min_records": "10"}, "params.min_records"),
            ({"min_records": True}, "params.min_records"),
            ({"threshold": 3}, "params.threshold"),
        ],
    )
    def test_bad_params_name_the_param(self, params: dict[str, Any], key: str) -> None:
        """Invalid (or unknown) params are a RuleError naming the param."""
        assert rule_error(NAME, params).key == key

    def test_min_records_bounds_accepted(self) -> None:
        """0 and 100 000 are valid min_records."""
        for value in (0, 100_000):
            assert Engine([rule(NAME, {"params": {"min_records": value}})]).detectors[0].settings.min_records == value


class TestSamples:
    """The bundled samples behave as labelled."""

    def test_positive(self) -> None:
        """The PPC sample's print screen, first exports (one split into small pieces) and telework access are flagged."""
        final = sample_alerts(NAME, SAMPLES / "positive.jsonl")
        got = sorted((a.reason, a.user, a.event_ids) for a in final.values())
        assert got == [
            ("first_export", "staff-0588", ("uo-p-010", "uo-p-011", "uo-p-012")),
            ("first_export", "staff-0733", ("uo-p-005",)),
            ("print_screen", "osamu", ("uo-ppc-007",)),
            ("telework", "staff-0255", ("uo-p-006",)),
        ]

    def test_negative(self) -> None:
        """Routine exporters, newcomers, counter certificates, data-free captures and office work raise nothing."""
        assert sample_alerts(NAME, SAMPLES / "negative.jsonl") == {}

    @pytest.mark.parametrize(
        ("min_records", "expected"),
        [
            (5, [("staff-0620", "2019-02-04", 5)]),  # five certificates; an exporter from then on
            (9, [("staff-0620", "2019-02-05", 2)]),  # 4 + 5 records written out
        ],
    )
    def test_negative_near_misses(self, min_records: int, expected: list[tuple[str, str, int]]) -> None:
        """The counter staff's write-outs are near misses: a lower min_records makes them alert."""
        final = sample_alerts(NAME, SAMPLES / "negative.jsonl", {"params": {"min_records": min_records}})
        assert sorted((a.user, a.window_start[:10], a.count) for a in final.values()) == expected
