"""Operations a member of staff does not normally perform on personal data.

PPC viewpoint 4 (通常行わない操作): print screen while personal numbers are
on screen, write-out to files; and, from the inspection findings, any access
to My Number files from telework, which is to be treated as improper use.

Reasons (one finding per user and local day each):

``print_screen``
    A successful ``print_screen`` while personal data is shown
    (``mynumber_ref`` true). Screen captures of My Number data have no place
    in ordinary work.
``first_export``
    A successful ``export``/``file_copy``/``print`` of personal data by a
    user who does not export: the user has been observed for at least
    ``warmup`` (default 14 days: two working weeks cover the weekly routine;
    from the user's first event, seen live or seeded from history) and has no
    such export on record, or none for ``forget_after`` (default 90 days: a
    quarter, so quarterly routines keep a user an exporter). After it the
    user *is* an exporter; further exports that day are added to the finding.
``telework``
    Any event referencing personal data from a location listed in
    ``telework_locations`` (default ``telework``).

Failed or denied attempts at these operations are left to the
``unauthorized_attempts`` rule (``denied_high_risk``), which alerts on every
one of them; they neither alert here nor make the user an exporter.

State per user is a compact baseline kept for as long as the engine keeps the
user (first seen, last export) plus per-day counts of open findings, which
are dropped when the day closes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from detectors.base import DAY_MS, MINUTE_MS, Detector, Emitter, UserState
from schemas.event import EXPORT_ACTIONS, Event

__all__ = ["UnusualOperationDetector", "UnusualOperationSettings"]

_WATCHED: Final = EXPORT_ACTIONS | {"print_screen"}


def _is_print_screen(e: Event) -> bool:
    return e.action == "print_screen" and e.mynumber_ref and e.result == "success"


def _is_export(e: Event) -> bool:
    return e.action in EXPORT_ACTIONS and e.mynumber_ref and e.result == "success"


@dataclass(frozen=True, slots=True)
class UnusualOperationSettings:
    """Parameters of the ``unusual_operation`` rule."""

    #: How long a user must have been observed before a first export is unusual.
    warmup_ms: int = 14 * DAY_MS
    #: An exporter who has not exported for this long is a non-exporter again.
    forget_after_ms: int = 90 * DAY_MS
    #: ``location`` values that mean telework.
    telework_locations: frozenset[str] = frozenset({"telework"})


class _Baseline:
    """One user's baseline and the per-day counts of open findings."""

    __slots__ = ("days", "first", "last_export")

    def __init__(self, first: int) -> None:
        #: Oldest event time seen for the user.
        self.first = first
        #: Newest successful export of personal data; 0 when none (or forgotten).
        self.last_export = 0
        #: (reason, local day start) -> count, for findings still open.
        self.days: dict[tuple[str, int], int] = {}


class UnusualOperationDetector(Detector[_Baseline, UnusualOperationSettings]):
    """Alerts on print screen of personal data, first-time exports and telework access."""

    name = "unusual_operation"
    actions = None  # every event: the baseline needs the user's first-seen time
    settings_type = UnusualOperationSettings

    __slots__ = ()

    def check_settings(self) -> None:
        """Warm-up up to a year; forgetting after at least a day and at most ten years."""
        s = self.settings
        if s.warmup_ms > 365 * DAY_MS:
            raise self.error("warmup", "must be at most 365d")
        if not DAY_MS <= s.forget_after_ms <= 3650 * DAY_MS:
            raise self.error("forget_after", "must be between 1d and 3650d")

    def process(self, ev: Event, user: UserState, emit: Emitter) -> None:
        """Update the baseline; alert on unusual operations on personal data."""
        ts = ev.ts_ms
        state: _Baseline | None = user.slots[self.index]
        if state is None:
            state = user.slots[self.index] = _Baseline(ts)
        elif ts < state.first:
            state.first = ts
        if not ev.mynumber_ref:
            return
        location = ev.location
        if location is not None and location in self.settings.telework_locations:
            self._telework(state, ev, location, emit)
        if ev.action in _WATCHED and ev.result == "success":
            if ev.action == "print_screen":
                self._count(state, ev, "print_screen", emit, _is_print_screen)
            else:
                self._export(state, ev, emit)

    def _day(self, ts: int) -> int:
        return ts - (self.calendar.local_minute(ts) * MINUTE_MS + ts % MINUTE_MS)

    def _count(
        self,
        state: _Baseline,
        ev: Event,
        reason: str,
        emit: Emitter,
        related: Callable[[Event], bool],
        details: dict[str, Any] | None = None,
    ) -> None:
        day = self._day(ev.ts_ms)
        key = (reason, day)
        count = state.days[key] = state.days.get(key, 0) + 1
        emit(self.rule, reason, ev, day, day + DAY_MS, count, details=details, related=related)

    def _telework(self, state: _Baseline, ev: Event, location: str, emit: Emitter) -> None:
        locations = self.settings.telework_locations

        def related(e: Event) -> bool:
            return e.mynumber_ref and e.location is not None and e.location in locations

        self._count(state, ev, "telework", emit, related, {"location": location})

    def _export(self, state: _Baseline, ev: Event, emit: Emitter) -> None:
        ts = ev.ts_ms
        s = self.settings
        last = state.last_export
        if ts > last:
            state.last_export = ts
        if ("first_export", self._day(ts)) in state.days:
            # Already a first-export day: the day's later (or late) exports join the finding.
            self._count(state, ev, "first_export", emit, _is_export)
            return
        if last and ts - last <= s.forget_after_ms:
            return  # an exporter (``last`` may even be later than ``ts``)
        if ts - state.first < s.warmup_ms:
            return  # not observed long enough to know what is normal
        details = {
            "days_observed": (ts - state.first) // DAY_MS,
            "days_since_last_export": (ts - last) // DAY_MS if last else None,
        }
        self._count(state, ev, "first_export", emit, _is_export, details)

    def dump(self, state: _Baseline) -> Any:
        """``[first, last_export, [[reason, day_start, count]...]]``."""
        return [state.first, state.last_export, [[reason, day, n] for (reason, day), n in state.days.items()]]

    def load(self, data: Any) -> _Baseline:
        """Inverse of :meth:`dump`."""
        state = _Baseline(int(data[0]))
        state.last_export = int(data[1])
        state.days = {(str(reason), int(day)): int(n) for reason, day, n in data[2]}
        return state

    def expire(self, state: _Baseline, watermark_ms: int) -> _Baseline:
        """Drop closed days and a last export too old to matter; the baseline stays."""
        if state.days:
            state.days = {k: n for k, n in state.days.items() if k[1] + DAY_MS > watermark_ms}
        if state.last_export and state.last_export + self.settings.forget_after_ms < watermark_ms:
            state.last_export = 0
        return state
