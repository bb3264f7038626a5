"""Business days and hours in Asia/Tokyo."""

from __future__ import annotations

from datetime import date

import pytest

from detectors.calendar import BusinessCalendar, BusinessHours, parse_hours
from schemas.event import parse_ts


class TestCalendar:
    """Weekends, holidays, the year-end closure and business hours."""

    @pytest.mark.parametrize(
        ("ts", "kind", "in_hours"),
        [
            ("2019-02-04T09:00:00+09:00", "workday", True),
            ("2019-02-04T08:29:59+09:00", "workday", False),
            ("2019-02-04T17:15:00+09:00", "workday", False),
            ("2019-02-02T22:11:03+09:00", "weekend", False),
            ("2019-02-11T10:00:00+09:00", "holiday", False),  # 建国記念の日
            ("2019-12-30T10:00:00+09:00", "year_end", False),
            ("2020-01-03T10:00:00+09:00", "year_end", False),
            ("2020-01-06T10:00:00+09:00", "workday", True),
            ("2019-02-04T00:30:00Z", "workday", True),  # 09:30 in Tokyo
        ],
    )
    def test_classify(self, ts: str, kind: str, in_hours: bool) -> None:
        """Each time lands in the right kind of day and hour."""
        assert BusinessCalendar().classify(parse_ts(ts)) == (kind, in_hours)

    def test_department_hours(self) -> None:
        """A department's own hours apply to its events only."""
        cal = BusinessCalendar(hours={"市民課": BusinessHours(8 * 60, 19 * 60)})
        ts = parse_ts("2019-02-04T18:00:00+09:00")
        assert cal.classify(ts, "市民課") == ("workday", True)
        assert cal.classify(ts, "税務課") == ("workday", False)

    def test_extra_holidays(self) -> None:
        """An agency's own closed days count as holidays."""
        cal = BusinessCalendar(extra_holidays=frozenset({date(2019, 2, 4)}))
        assert cal.classify(parse_ts("2019-02-04T10:00:00+09:00"))[0] == "holiday"

    @pytest.mark.parametrize("text", ["8-17", "17:00-08:00", "25:00-26:00", "08:61-09:00"])
    def test_bad_hours(self, text: str) -> None:
        """Malformed business hours are rejected with the reason."""
        with pytest.raises(ValueError, match="business hours"):
            parse_hours(text)
