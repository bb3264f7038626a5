"""Working days and hours in event time: weekends, Japanese public holidays,
the year-end closure (12/29-1/3), and business hours per department.

Everything is a pure function of the event's timestamp and the settings:
no wall clock. Look-ups are cached per local hour, so classifying an event
costs a dict hit in the common case.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, tzinfo
from typing import Final
from zoneinfo import ZoneInfo

import holidays as _holidays

__all__ = [
    "DAY_HOLIDAY",
    "DAY_WEEKEND",
    "DAY_WORKDAY",
    "DAY_YEAR_END",
    "BusinessCalendar",
    "BusinessHours",
    "parse_hours",
]

DAY_WORKDAY: Final = "workday"
DAY_WEEKEND: Final = "weekend"
DAY_HOLIDAY: Final = "holiday"
DAY_YEAR_END: Final = "year_end"

_HOUR_MS: Final = 3_600_000
_MINUTE_MS: Final = 60_000


@dataclass(frozen=True, slots=True)
class BusinessHours:
    """Business hours as minutes after local midnight, ``start <= m < end``."""

    start: int
    end: int

    def __contains__(self, minute: int) -> bool:
        return self.start <= minute < self.end


def parse_hours(text: str) -> BusinessHours:
    """``"08:30-17:15"`` to :class:`BusinessHours`; raises ValueError with the reason."""
    try:
        start_s, end_s = text.split("-")
        sh, sm = (int(x) for x in start_s.strip().split(":"))
        eh, em = (int(x) for x in end_s.strip().split(":"))
    except ValueError:
        raise ValueError(f"business hours must look like '08:30-17:15', got {text!r}") from None
    start, end = sh * 60 + sm, eh * 60 + em
    if not (0 <= start < end <= 24 * 60) or not (0 <= sm < 60 and 0 <= em < 60):
        raise ValueError(f"business hours must be a non-empty range within one day, got {text!r}")
    return BusinessHours(start, end)


@dataclass(slots=True)
class BusinessCalendar:
    """Classifies event times into day kinds and business/off hours.

    ``hours`` maps department names to their business hours; ``default`` is
    used for departments not listed (and events without a department).
    ``extra_holidays`` adds agency-specific closed days (ISO dates).
    """

    tz: tzinfo = field(default_factory=lambda: ZoneInfo("Asia/Tokyo"))
    default: BusinessHours = field(default_factory=lambda: BusinessHours(8 * 60 + 30, 17 * 60 + 15))
    hours: dict[str, BusinessHours] = field(default_factory=dict)
    year_end_closure: bool = True
    extra_holidays: frozenset[date] = frozenset()
    _jp: _holidays.HolidayBase = field(init=False, repr=False)
    _cache: dict[int, tuple[str, int, int]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._jp = _holidays.country_holidays("JP")
        self._cache = {}

    def day_kind(self, day: date) -> str:
        """workday, weekend, holiday or year_end for one local date."""
        if self.year_end_closure and ((day.month == 12 and day.day >= 29) or (day.month == 1 and day.day <= 3)):
            return DAY_YEAR_END
        if day in self._jp or day in self.extra_holidays:
            return DAY_HOLIDAY
        if day.weekday() >= 5:
            return DAY_WEEKEND
        return DAY_WORKDAY

    def _hour(self, ts_ms: int) -> tuple[str, int, int]:
        bucket = ts_ms // _HOUR_MS
        hit = self._cache.get(bucket)
        if hit is None:
            local = datetime.fromtimestamp(bucket * 3600, UTC).astimezone(self.tz)
            day = local.date()
            if len(self._cache) > 50_000:
                self._cache.clear()
            hit = (self.day_kind(day), local.hour * 60 + local.minute, day.toordinal())
            self._cache[bucket] = hit
        return hit

    # The three look-ups below are on every event's path: they read the cache
    # inline and call _hour only on a miss.

    def classify(self, ts_ms: int, department: str | None = None) -> tuple[str, bool]:
        """(day kind, within business hours) for an event time and department."""
        hit = self._cache.get(ts_ms // _HOUR_MS) or self._hour(ts_ms)
        kind = hit[0]
        if kind != DAY_WORKDAY:
            return kind, False
        minute = hit[1] + (ts_ms % _HOUR_MS) // _MINUTE_MS
        hours = self.hours.get(department, self.default) if department and self.hours else self.default
        return kind, hours.start <= minute < hours.end

    def local_day(self, ts_ms: int) -> int:
        """The local date's ordinal (for per-day windows aligned to local midnight)."""
        return (self._cache.get(ts_ms // _HOUR_MS) or self._hour(ts_ms))[2]

    def local_minute(self, ts_ms: int) -> int:
        """Minutes after local midnight."""
        return (self._cache.get(ts_ms // _HOUR_MS) or self._hour(ts_ms))[1] + (ts_ms % _HOUR_MS) // _MINUTE_MS
