"""Personal data referenced on unnatural days or at unnatural hours.

PPC viewpoint 1 (不自然な曜日・時間帯): nights, weekends, public holidays and
the year-end closure (12/29-1/3). Business hours are configurable per
department; the time zone defaults to Asia/Tokyo. One finding per user,
local day and kind of day, updated as more such events arrive.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from typing import Any

from detectors.base import DAY_MS, Detector, Emitter, UserState
from detectors.calendar import DAY_WORKDAY, parse_hours
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


class OffHoursDetector(Detector[dict[str, int], OffHoursSettings]):
    """Alerts on personal-number references outside business days and hours."""

    name = "off_hours"
    actions = ACTIONS - {"login", "logout", "usb_connect"}
    settings_type = OffHoursSettings

    __slots__ = ()

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
        if not ev.mynumber_ref:
            return
        cal = self.calendar
        kind, in_hours = cal.classify(ev.ts_ms, ev.department)
        if in_hours:
            return
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
        counts: dict[str, int] | None = user.slots[self.index]
        if counts is None:
            counts = user.slots[self.index] = {}
        key = f"{day_start}:{reason}"
        count = counts[key] = counts.get(key, 0) + 1
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

    def dump(self, state: dict[str, int]) -> Any:
        """Counts per local day and reason."""
        return state

    def load(self, data: Any) -> dict[str, int]:
        """Inverse of :meth:`dump`."""
        return {str(k): int(v) for k, v in data.items()}

    def expire(self, state: dict[str, int], watermark_ms: int) -> dict[str, int] | None:
        """Forget days that ended before the watermark."""
        kept = {k: v for k, v in state.items() if int(k.split(":", 1)[0]) + DAY_MS > watermark_ms}
        return kept or None
