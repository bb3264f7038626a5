"""OffHoursDetector: personal data on unnatural days and hours (PPC viewpoint 1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from detectors.rules import RuleError
from detectors.testing import event, final_alerts, load_samples, run_rule, sample_alerts

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "off_hours"


class TestOffHours:
    """Which references count as off hours, and how they are grouped."""

    @pytest.mark.parametrize(
        ("ts", "department", "reason"),
        [
            ("2019-02-02T22:11:03+09:00", None, "weekend"),
            ("2019-02-03T10:00:00+09:00", None, "weekend"),
            ("2019-02-11T10:00:00+09:00", None, "holiday"),
            ("2019-12-29T10:00:00+09:00", None, "year_end"),
            ("2020-01-02T10:00:00+09:00", None, "year_end"),
            ("2019-02-04T06:59:00+09:00", None, "night"),
            ("2019-02-04T18:01:00+09:00", None, "night"),  # after 17:15 + 45 min grace
            ("2019-02-04T20:00:00+09:00", "市民課", "night"),
        ],
    )
    def test_fires(self, ts: str, department: str | None, reason: str) -> None:
        """A personal-data reference at this time raises the named reason."""
        (alert,) = run_rule("off_hours", [event(ts, department=department)])
        assert alert.reason == reason and alert.rule_id == "off_hours"

    @pytest.mark.parametrize(
        "ts",
        [
            "2019-02-04T08:30:00+09:00",
            "2019-02-04T12:00:00+09:00",
            "2019-02-04T17:14:59+09:00",
            "2019-02-04T17:59:00+09:00",  # within the 45-minute grace
        ],
    )
    def test_quiet_in_business_hours(self, ts: str) -> None:
        """Business hours (and the overtime grace) raise nothing."""
        assert run_rule("off_hours", [event(ts)]) == []

    def test_severity_by_reason(self) -> None:
        """Weekends and holidays are high; workday nights medium."""
        alerts = run_rule("off_hours", [event("2019-02-02T22:11:03+09:00"), event("2019-02-04T23:00:00+09:00")])
        assert {a.reason: a.severity for a in alerts} == {"weekend": "high", "night": "medium"}

    def test_one_alert_per_day(self) -> None:
        """Many references in one night are one finding with a count."""
        events = [event(f"2019-02-04T23:{m:02d}:00+09:00", subject=f"r-{m}") for m in range(12)]
        final = final_alerts(run_rule("off_hours", events))
        (alert,) = final.values()
        assert alert.count == 12 and len(alert.event_ids) == 12

    def test_department_hours_override(self) -> None:
        """A department with longer hours is quiet at 19:00."""
        overrides = {"params": {"business_hours": {"default": "08:30-17:15", "市民課": "08:00-20:00"}}}
        assert run_rule("off_hours", [event("2019-02-04T19:00:00+09:00", department="市民課")], overrides) == []

    def test_bad_hours_name_the_param(self) -> None:
        """A malformed hours string is a RuleError on that param."""
        with pytest.raises(RuleError, match=r"params\.business_hours"):
            run_rule("off_hours", [], {"params": {"business_hours": {"default": "9-5"}}})


class TestOffHoursSamples:
    """The bundled samples behave as labelled."""

    def test_positive(self) -> None:
        """Every positive sample event raises an alert."""
        events = load_samples(SAMPLES / "positive.jsonl")
        alerts = final_alerts(run_rule("off_hours", events))
        assert {i for a in alerts.values() for i in a.event_ids} == {e.event_id for e in events}

    def test_negative(self) -> None:
        """No negative sample raises anything."""
        assert sample_alerts("off_hours", SAMPLES / "negative.jsonl") == {}
