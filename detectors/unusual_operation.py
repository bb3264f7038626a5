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
    Successful ``export``/``file_copy``/``print`` operations of personal data
    that write out at least ``min_records`` records in one local day (default
    10; an operation that does not say how many records it wrote counts as
    ``min_records``), by a user who does not export: the user has been
    observed for at least ``warmup`` (default 14 days: two working weeks
    cover the weekly routine; from the user's first event, seen live or
    seeded from history) and has no such export day on record, or none for
    ``forget_after`` (default 90 days: a quarter, so quarterly routines keep
    a user an exporter). After it the user *is* an exporter; further exports
    that day are added to the finding, whose count is the day's write-outs.

    Days below ``min_records`` neither alert nor make the user an exporter:
    counter staff print single certificates with the personal number on them
    (one record each, at most five a day per person in the synthetic
    evaluation, where the smallest routine extract of a designated exporter
    holds 20 records), and such prints must not hide a later bulk write-out.
    The records are summed over the day, so splitting a write-out into small
    pieces does not slip under the threshold.
``telework``
    Any event referencing personal data from a location listed in
    ``telework_locations`` (default ``telework``).

Failed or denied attempts at these operations are left to the
``unauthorized_attempts`` rule (``denied_high_risk``), which alerts on every
one of them; they neither alert here nor make the user an exporter.

State per user is a compact baseline kept for as long as the engine keeps the
user (last export; when the user was first seen is the engine's
:attr:`~detectors.base.UserState.first_ts`) plus per-day counts of open
findings and per-day totals of write-outs still below ``min_records``, both
dropped when the day closes. Only events that can matter
reach the detector: successful write-outs and print screens of personal
data, and personal-data references from a telework location.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from detectors.base import DAY_MS, MINUTE_MS, NEVER, Detector, Emitter, UserState
from schemas.event import EXPORT_ACTIONS, Event

__all__ = ["MAX_MIN_RECORDS", "UnusualOperationDetector", "UnusualOperationSettings"]

_WATCHED: Final = EXPORT_ACTIONS | {"print_screen"}
#: Largest accepted ``min_records``: beyond it a first write-out is the ``bulk_export`` rule's alone.
MAX_MIN_RECORDS: Final = 100_000


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
    #: Records a non-exporter must write out in one local day before it is a first export.
    min_records: int = 10


class _Baseline:
    """One user's last export, the per-day counts of open findings and the day's small write-outs."""

    __slots__ = ("days", "due", "last_export", "small")

    def __init__(self) -> None:
        #: Newest successful export of personal data (of a day reaching ``min_records``); 0 when none (or forgotten).
        self.last_export = 0
        #: (reason, local day start) -> count, for findings still open.
        self.days: dict[tuple[str, int], int] = {}
        #: Local day start -> (write-outs, records, newest time) of a day still below ``min_records``.
        self.small: dict[int, tuple[int, int, int]] = {}
        #: Nothing expires before this watermark (0: look at the next sweep); derived, never dumped.
        self.due = 0


class UnusualOperationDetector(Detector[_Baseline, UnusualOperationSettings]):
    """Alerts on print screen of personal data, first-time exports and telework access."""

    name = "unusual_operation"
    actions = None  # see wants()
    needs_mynumber_ref = True
    uses_first_ts = True
    tracks_due = True
    settings_type = UnusualOperationSettings

    __slots__ = ()

    def wants(self, action: str, result: str, mynumber_ref: bool, location: str | None) -> bool:
        """Personal-data events that are watched operations, or from a telework location."""
        if not mynumber_ref:
            return False
        return (action in _WATCHED and result == "success") or (location is not None and location in self.settings.telework_locations)

    def locations(self) -> frozenset[str]:
        """The telework locations."""
        return frozenset(self.settings.telework_locations)

    def check_settings(self) -> None:
        """Warm-up up to a year; forgetting after at least a day and at most ten years; a sane ``min_records``."""
        s = self.settings
        if s.warmup_ms > 365 * DAY_MS:
            raise self.error("warmup", "must be at most 365d")
        if not DAY_MS <= s.forget_after_ms <= 3650 * DAY_MS:
            raise self.error("forget_after", "must be between 1d and 3650d")
        if not 0 <= s.min_records <= MAX_MIN_RECORDS:
            raise self.error("min_records", f"must be between 0 and {MAX_MIN_RECORDS}")

    def process(self, ev: Event, user: UserState, emit: Emitter) -> None:
        """Alert on unusual operations on personal data; note exports in the baseline."""
        state: _Baseline | None = user.slots[self.index]
        if state is None:
            state = user.slots[self.index] = _Baseline()
        location = ev.location
        if location is not None and location in self.settings.telework_locations:
            self._telework(state, ev, location, emit)
        if ev.action in _WATCHED and ev.result == "success":
            if ev.action == "print_screen":
                self._count(state, ev, "print_screen", emit, _is_print_screen)
            else:
                self._export(state, ev, user, emit)
        if state.due < user.wake:
            user.wake = state.due

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
        add: int = 1,
    ) -> None:
        day = self._day(ev.ts_ms)
        key = (reason, day)
        count = state.days[key] = state.days.get(key, 0) + add
        if day + DAY_MS < state.due:
            state.due = day + DAY_MS
        emit(self.rule, reason, ev, day, day + DAY_MS, count, details=details, related=related)

    def _telework(self, state: _Baseline, ev: Event, location: str, emit: Emitter) -> None:
        locations = self.settings.telework_locations

        def related(e: Event) -> bool:
            return e.mynumber_ref and e.location is not None and e.location in locations

        self._count(state, ev, "telework", emit, related, {"location": location})

    def _exported(self, state: _Baseline, ts: int) -> None:
        """Note an export of a day that reached ``min_records`` (the user is an exporter from it)."""
        last = state.last_export
        if ts > last:
            state.last_export = ts
            due = ts + self.settings.forget_after_ms + 1
            if not last and due < state.due:
                state.due = due

    def _export(self, state: _Baseline, ev: Event, user: UserState, emit: Emitter) -> None:
        ts = ev.ts_ms
        s = self.settings
        day = self._day(ts)
        if ("first_export", day) in state.days:
            # Already a first-export day: the day's later (or late) exports join the finding.
            self._exported(state, ts)
            self._count(state, ev, "first_export", emit, _is_export)
            return
        n, records, newest = state.small.pop(day, (0, 0, 0))
        n += 1
        records += s.min_records if ev.records is None else ev.records
        newest = max(newest, ts)
        if records < s.min_records:
            # Too few records so far today: neither unusual nor a sign of an exporter.
            state.small[day] = (n, records, newest)
            if day + DAY_MS < state.due:
                state.due = day + DAY_MS
            return
        last = state.last_export
        self._exported(state, newest)
        if last and ts - last <= s.forget_after_ms:
            return  # an exporter (``last`` may even be later than ``ts``)
        first = user.first_ts
        if ts - first < s.warmup_ms:
            return  # not observed long enough to know what is normal
        details = {
            "days_observed": (ts - first) // DAY_MS,
            "days_since_last_export": (ts - last) // DAY_MS if last else None,
        }
        # The finding counts every write-out of the day, the small ones before this too.
        self._count(state, ev, "first_export", emit, _is_export, details, add=n)

    def dump(self, state: _Baseline) -> Any:
        """``[last_export, [[reason, day_start, count]...]]``, then ``[[day_start, write_outs, records, newest]...]`` if any day is below ``min_records``."""
        out: list[Any] = [state.last_export, [[reason, day, n] for (reason, day), n in state.days.items()]]
        if state.small:
            out.append([[day, n, records, newest] for day, (n, records, newest) in state.small.items()])
        return out

    @staticmethod
    def _legacy(data: Any) -> bool:
        """Whether ``data`` is the older layout ``[first_seen, last_export, days]``."""
        return len(data) == 3 and not isinstance(data[1], list)

    def load(self, data: Any) -> _Baseline:
        """Inverse of :meth:`dump` (also reads the older layout that began with the observation start)."""
        if self._legacy(data):
            data = data[1:]
        state = _Baseline()
        state.last_export = int(data[0])
        state.days = {(str(reason), int(day)): int(n) for reason, day, n in data[1]}
        if len(data) > 2:
            state.small = {int(day): (int(n), int(records), int(newest)) for day, n, records, newest in data[2]}
        return state

    def legacy_first_ts(self, data: Any) -> int | None:
        """The observation start of the older layout."""
        return int(data[0]) if self._legacy(data) else None

    def expire(self, state: _Baseline, watermark_ms: int) -> _Baseline | None:
        """Drop closed days (findings and small write-outs) and a last export too old to matter; ``None`` once nothing is left."""
        if state.days:
            state.days = {k: n for k, n in state.days.items() if k[1] + DAY_MS > watermark_ms}
        if state.small:
            state.small = {day: v for day, v in state.small.items() if day + DAY_MS > watermark_ms}
        forget = self.settings.forget_after_ms
        if state.last_export and state.last_export + forget < watermark_ms:
            state.last_export = 0
        if not state.days and not state.small and not state.last_export:
            return None
        due = state.last_export + forget + 1 if state.last_export else NEVER
        if state.days:
            due = min(due, min(day for _, day in state.days) + DAY_MS)
        if state.small:
            due = min(due, min(state.small) + DAY_MS)
        state.due = due
        return state
