"""Personal data referenced on unnatural days or at unnatural hours.

PPC viewpoint 1 (不自然な曜日・時間帯): nights, weekends, public holidays and
the year-end closure (12/29-1/3). Business hours are configurable per
department; the time zone defaults to Asia/Tokyo. One finding per user,
local day and kind of day, updated as more such events arrive.

Most references are made within business hours: the detector remembers the
business-hours span (epoch ms) of the workday it last classified, per
department, so such an event costs two comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from typing import Any

from detectors.base import DAY_MS, MINUTE_MS, NEVER, Detector, Emitter, UserState
from detectors.calendar import DAY_WORKDAY, BusinessHours, parse_hours
from schemas.event import ACTIONS, Event

__all__ = ["OffHoursDetector", "OffHoursSettings"]

#: Day kind -> finding reason.
_REASON = {"weekend": "weekend", "holiday": "holiday", "year_end": "year_end"}


@dataclass(frozen=True, slots=True)
class OffHoursSettings:
    """Parameters of the ``off_hours`` rule."""

    timezone: str = "Asia/Tokyo"
    #: Department -> "HH:MM-HH:MM"; key ``default`` for everyone else.
    business_hours: dict[str, Any] = field(default_factory=lambda: {"default": "08:30-17:15"})
    year_end_closure: bool = True
    #: Agency-specific closed days, ISO dates.
    extra_holidays: tuple[str, ...] = ()
    #: Minutes of slack after the end of business hours before a reference counts (overtime).
    grace_minutes: int = 0


class OffHoursState:
    """One user's counts per local day and reason (``"day_start:reason"``)."""

    __slots__ = ("counts", "due")

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        #: No count expires before this watermark.
        self.due = NEVER


class OffHoursDetector(Detector[OffHoursState, OffHoursSettings]):
    """Alerts on personal-number references outside business days and hours."""

    name = "off_hours"
    actions = ACTIONS - {"login", "logout", "usb_connect"}
    needs_mynumber_ref = True
    outside_business_hours_only = True
    tracks_due = True
    settings_type = OffHoursSettings

    __slots__ = ("_hi", "_lo", "_spans", "_uniform")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Business-hours span [lo, hi) of the last classified workday (all departments alike).
        self._lo = self._hi = 0
        #: Department -> that span, when departments have their own hours.
        self._spans: dict[str | None, tuple[int, int]] = {}
        self._uniform = not self.calendar.hours

    def check_settings(self) -> None:
        """Business hours must parse; holidays must be ISO dates."""
        for dept, text in self.settings.business_hours.items():
            try:
                parse_hours(str(text))
            except ValueError as exc:
                raise self.error(f"business_hours.{dept}", str(exc)) from None
        for day in self.settings.extra_holidays:
            try:
                date.fromisoformat(day)
            except ValueError:
                raise self.error("extra_holidays", f"not an ISO date: {day!r}") from None
        if not 0 <= self.settings.grace_minutes <= 240:
            raise self.error("grace_minutes", "must be between 0 and 240")

    def process(self, ev: Event, user: UserState, emit: Emitter) -> None:
        """Count the event if it references personal data off hours."""
        ts = ev.ts_ms
        if self._uniform:
            if self._lo <= ts < self._hi:
                return
        else:
            span = self._spans.get(ev.department)
            if span is not None and span[0] <= ts < span[1]:
                return
        cal = self.calendar
        kind, in_hours = cal.classify(ts, ev.department)
        if in_hours:
            self._learn_span(ts, ev.department)
            return
        self._off_hours(ev, user, emit, kind)

    def _hours(self, department: str | None) -> BusinessHours:
        cal = self.calendar
        return cal.hours.get(department, cal.default) if department and cal.hours else cal.default

    def _learn_span(self, ts: int, department: str | None) -> None:
        """Remember the business-hours span holding ``ts`` (if local time runs evenly through it)."""
        cal = self.calendar
        hours = self._hours(department)
        minute_start = ts - ts % MINUTE_MS
        minute = cal.local_minute(ts)
        lo = minute_start - (minute - hours.start) * MINUTE_MS
        hi = minute_start + (hours.end - minute) * MINUTE_MS
        if cal.local_minute(lo) != hours.start or cal.local_minute(hi - 1) != hours.end - 1 or cal.local_day(lo) != cal.local_day(hi - 1):
            return  # a change of UTC offset within the day: classify every event
        if self._uniform:
            self._lo, self._hi = lo, hi
        else:
            self._spans[department] = (lo, hi)

    def _off_hours(self, ev: Event, user: UserState, emit: Emitter, kind: str) -> None:
        cal = self.calendar
        if kind == DAY_WORKDAY:
            grace = self.settings.grace_minutes
            if grace:
                minute = cal.local_minute(ev.ts_ms)
                hours = cal.hours.get(ev.department, cal.default) if ev.department else cal.default
                if hours.end <= minute < hours.end + grace:
                    return
            reason = "night"
        else:
            reason = _REASON[kind]
        ts = ev.ts_ms
        day_start = ts - (cal.local_minute(ts) * 60_000 + ts % 60_000)
        state: OffHoursState | None = user.slots[self.index]
        if state is None:
            state = user.slots[self.index] = OffHoursState()
        counts = state.counts
        key = f"{day_start}:{reason}"
        count = counts[key] = counts.get(key, 0) + 1
        if day_start + DAY_MS < state.due:
            state.due = day_start + DAY_MS
            if state.due < user.wake:
                user.wake = state.due
        emit(
            self.rule,
            reason,
            ev,
            day_start,
            day_start + DAY_MS,
            count,
            details={"day_kind": kind},
            related=lambda e: e.mynumber_ref and not cal.classify(e.ts_ms, e.department)[1],
        )

    def dump(self, state: OffHoursState) -> Any:
        """Counts per local day and reason."""
        return state.counts

    def load(self, data: Any) -> OffHoursState:
        """Inverse of :meth:`dump`."""
        state = OffHoursState()
        state.counts = {str(k): int(v) for k, v in data.items()}
        state.due = 0
        return state

    def expire(self, state: OffHoursState, watermark_ms: int) -> OffHoursState | None:
        """Forget days that ended before the watermark."""
        kept = {k: v for k, v in state.counts.items() if int(k.split(":", 1)[0]) + DAY_MS > watermark_ms}
        if not kept:
            return None
        state.counts = kept
        state.due = min(int(k.split(":", 1)[0]) for k in kept) + DAY_MS
        return state
