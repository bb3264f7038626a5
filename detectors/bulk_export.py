"""Bulk write-out of records and sudden increases in look-ups.

Inspection finding (大量書き出し・照会件数の急増): a member of staff who writes
thousands of records out in one sitting, or who suddenly looks up many times
more records than they usually do, is where large leaks start.

Reasons:

``records_exported`` (high)
    Records written out (``export``, ``print``, ``file_copy`` and
    ``usb_write`` with a ``records`` count; an ``export`` without ``records``
    counts as one record, other actions without it as none; failed ones not
    at all) summed over a sliding ``window`` reach ``max_records`` (default
    5000 within 1 h). Ordinary work exports a case file, a weekly list of a
    few hundred lines, or a department's monthly extract of up to a few
    thousand records; 5000 within an hour is more than such routine output.
    Staff who do not export at all are the ``unusual_operation`` rule's
    ``first_export`` concern from ``min_records`` records in a day (default 10).
``records_exported_massive`` (critical)
    The same sum reaches ``massive_factor`` (default 4) times ``max_records``:
    20 000 records, the scale of the lost USB sticks in the PPC's reports.
``lookup_spike`` (high)
    A user's successful look-ups (``search``/``view``) in one local day exceed
    ``max(min_lookups, spike_factor * baseline)`` (default ``max(200, 5 x)``),
    where the baseline is the mean of the user's look-ups per active workday
    over their last ``baseline_days`` (default 20) completed such days. No spike
    is judged before ``min_baseline_days`` (default 5) days are known: the
    baseline is learned from the stream, or from history via ``Engine.seed``.

Findings are one per user, local day and reason (the day of the write-out
that reached the threshold, or of the look-ups); ``count`` is the largest
sliding-window sum of records, or the day's look-ups.

Order: the sliding sums are exact for any order within the engine's lateness
(a late write-out re-evaluates the later ones it adds to). Look-ups are
counted per local day in a small dict, so a late look-up lands on its own day;
every earlier day is part of a day's baseline, and is folded into the ring
once the watermark has passed its end. The threshold of a day uses the days
before it as known when a look-up arrives;
a look-up of the previous day arriving after the new day's count has already
crossed the threshold can no longer lower that finding.

State per user: the current day's count, the few unfolded days, a ring of at
most ``baseline_days`` counts, and the recent write-outs within ``window``
(at most 10 000).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from detectors.base import DAY_MS, HOUR_MS, MINUTE_MS, NEVER, Detector, Emitter, UserState
from detectors.calendar import DAY_WORKDAY
from detectors.windows import SlidingWindow
from schemas.event import EXPORT_ACTIONS, LOOKUP_ACTIONS, Event

__all__ = ["MAX_WINDOW_EVENTS", "BulkExportDetector", "BulkExportSettings", "BulkExportState", "affected_totals", "insert"]

#: Write-out actions whose ``records`` are summed.
WRITE_OUT_ACTIONS: Final = EXPORT_ACTIONS | {"usb_write"}
#: Write-outs kept per sliding window at most (a runaway script cannot grow state without bound).
MAX_WINDOW_EVENTS: Final = 10_000
#: No threshold yet (baseline still warming up).
_NO_LIMIT: Final = 1 << 62
#: ``day`` of a state with no current day (the fast path never matches it).
_NO_DAY: Final = -DAY_MS


@dataclass(frozen=True, slots=True)
class BulkExportSettings:
    """Parameters of the ``bulk_export`` rule."""

    #: Records written out within ``window`` that raise ``records_exported``.
    max_records: int = 5000
    window_ms: int = HOUR_MS
    #: ``records_exported_massive`` at this multiple of ``max_records``.
    massive_factor: int = 4
    #: A day's look-ups never count as a spike at or below this.
    min_lookups: int = 200
    #: A day's look-ups above this multiple of the baseline are a spike.
    spike_factor: float = 5.0
    #: Completed active workdays the baseline averages over (the ring size).
    baseline_days: int = 20
    #: Days of baseline needed before spikes are judged (warm-up).
    min_baseline_days: int = 5


class BulkExportState:
    """One user's look-up counts, baseline ring and recent write-outs."""

    __slots__ = ("count", "day", "days", "due", "end", "limit", "mean", "ring", "settled", "used", "window")

    def __init__(self) -> None:
        #: Start (epoch ms of local midnight) of the newest day with look-ups.
        self.day = _NO_DAY
        #: ``day + DAY_MS`` (kept for the fast path); derived, never dumped.
        self.end = _NO_DAY + DAY_MS
        #: Successful look-ups on ``day``.
        self.count = 0
        #: Older days not yet folded into the baseline: day start -> look-ups.
        self.days: dict[int, int] = {}
        #: Look-ups of the last completed active workdays, oldest first.
        self.ring: list[int] = []
        #: End of the newest day folded into ``ring``: look-ups before it are ignored.
        self.settled = 0
        #: Records written out, by time.
        self.window: SlidingWindow | None = None
        #: Cached threshold of ``day`` (-1: not computed); derived, never dumped.
        self.limit = -1
        #: Cached baseline mean of ``day`` and the days it averages; derived, never dumped.
        self.mean = 0.0
        self.used = 0
        #: Nothing expires before this watermark (0: look at the next sweep); derived, never dumped.
        self.due = 0


def _is_lookup(ev: Event) -> bool:
    return ev.action in LOOKUP_ACTIONS and ev.result == "success"


def _is_write_out(ev: Event) -> bool:
    return ev.action in WRITE_OUT_ACTIONS and ev.result == "success" and (ev.records is not None or ev.action == "export")


def insert(window: SlidingWindow, ts_ms: int, weight: int) -> bool:
    """Insert a weighted time into ``window``; ``True`` if it is the newest.

    At most :data:`MAX_WINDOW_EVENTS` are kept: a flood beyond that is summed
    over its newest events only (by then any sensible threshold was reached).
    """
    times = window.times
    if not times or ts_ms >= times[-1]:
        times.append(ts_ms)
        window.weights.append(weight)
        newest = True
    else:
        idx = bisect_right(times, ts_ms)
        times.insert(idx, ts_ms)
        window.weights.insert(idx, weight)
        newest = False
    if len(times) > MAX_WINDOW_EVENTS:
        del times[0], window.weights[0]
    return newest


def affected_totals(window: SlidingWindow, ts_ms: int, size_ms: int, newest: bool) -> list[tuple[int, int]]:
    """``(t, sum over (t - size, t])`` for every distinct time a new event at ``ts_ms`` adds to."""
    if newest:
        return [(ts_ms, window.total(ts_ms - size_ms, ts_ms))]
    times = window.times
    later = sorted(set(times[bisect_left(times, ts_ms) : bisect_left(times, ts_ms + size_ms)]))
    return [(t, window.total(t - size_ms, t)) for t in later]


class BulkExportDetector(Detector[BulkExportState, BulkExportSettings]):
    """Alerts on bulk write-outs and on look-up counts far above a user's own baseline."""

    name = "bulk_export"
    actions = LOOKUP_ACTIONS | WRITE_OUT_ACTIONS
    results = frozenset({"success"})
    tracks_due = True
    settings_type = BulkExportSettings

    __slots__ = ()

    def check_settings(self) -> None:
        """Thresholds positive, window at most a day, warm-up within the ring."""
        s = self.settings
        if s.max_records < 1:
            raise self.error("max_records", "must be at least 1")
        if s.window_ms > DAY_MS:
            raise self.error("window", "must be at most 1d")
        if s.massive_factor < 2:
            raise self.error("massive_factor", "must be at least 2")
        if s.min_lookups < 1:
            raise self.error("min_lookups", "must be at least 1")
        if s.spike_factor <= 1.0:
            raise self.error("spike_factor", "must be greater than 1")
        if not 1 <= s.baseline_days <= 366:
            raise self.error("baseline_days", "must be between 1 and 366")
        if not 1 <= s.min_baseline_days <= s.baseline_days:
            raise self.error("min_baseline_days", "must be between 1 and baseline_days")

    def day_start(self, ts_ms: int) -> int:
        """Epoch ms of the local midnight starting the day of ``ts_ms``."""
        return ts_ms - (self.calendar.local_minute(ts_ms) * MINUTE_MS + ts_ms % MINUTE_MS)

    # -- processing ---------------------------------------------------------

    def handler(self, action: str, result: str, mynumber_ref: bool, location: str | None) -> Callable[[Event, UserState, Emitter], int | None] | None:
        """Successful look-ups and successful write-outs have their own paths."""
        if result != "success":
            return None
        if action in LOOKUP_ACTIONS:
            return self._lookup
        return self._write_out_event if action in WRITE_OUT_ACTIONS else None

    def process(self, ev: Event, user: UserState, emit: Emitter) -> None:
        """Count a look-up of the day, or add a write-out to the sliding sum (successful ones only)."""
        handler = self.handler(ev.action, ev.result, ev.mynumber_ref, None)
        if handler is not None:
            handler(ev, user, emit)

    def _state(self, user: UserState) -> BulkExportState:
        st: BulkExportState | None = user.slots[self.index]
        if st is None:
            st = user.slots[self.index] = BulkExportState()
            user.wake = 0
        return st

    def repeats(self, action: str, result: str) -> bool:
        """Look-ups take part in skipping repeats (write-outs do not)."""
        return result != "success" or action not in WRITE_OUT_ACTIONS

    def repeat(self, state: BulkExportState, count: int, last_ts: int) -> None:
        """Count the skipped look-ups of the day (fewer than would reach the threshold)."""
        state.count += count

    def _lookup(self, ev: Event, user: UserState, emit: Emitter) -> int | None:
        """Count a look-up of the day; the look-ups left below the day's threshold, if any (:meth:`repeats`)."""
        st: BulkExportState | None = user.slots[self.index]
        if st is not None and st.day <= ev.ts_ms < st.end:
            n = st.count = st.count + 1
            limit = st.limit
            if n > limit:
                self._check_today(st, ev, n, emit)
                limit = st.limit
                if n > limit:
                    return None
            return limit - n or None
        st = self._state(user)
        self._lookup_other_day(st, ev, emit)
        if st.due < user.wake:
            user.wake = st.due
        if st.day <= ev.ts_ms < st.end and st.count < st.limit:
            return st.limit - st.count  # a look-up of the current day, below its threshold
        return None

    def _write_out_event(self, ev: Event, user: UserState, emit: Emitter) -> None:
        st = self._state(user)
        self._write_out(st, ev, emit)
        if st.due < user.wake:
            user.wake = st.due

    def _lookup_other_day(self, st: BulkExportState, ev: Event, emit: Emitter) -> None:
        ts = ev.ts_ms
        if ts < st.settled:
            return  # that day is already part of the baseline
        start = self.day_start(ts)
        if start + DAY_MS < st.due:
            st.due = start + DAY_MS
        if start > st.day:
            if st.count:
                st.days[st.day] = st.count
            st.day, st.end, st.count, st.limit = start, start + DAY_MS, 1, -1
            self._check_today(st, ev, 1, emit)
            return
        n = st.days[start] = st.days.get(start, 0) + 1
        st.limit = -1  # the current day's baseline includes this day
        limit, mean, used = self._threshold(st, start)
        if n > limit:
            self._emit_spike(ev, start, n, limit, mean, used, emit)

    def _check_today(self, st: BulkExportState, ev: Event, n: int, emit: Emitter) -> None:
        if st.limit < 0:
            st.limit, st.mean, st.used = self._threshold(st, st.day)
        if n > st.limit:
            self._emit_spike(ev, st.day, n, st.limit, st.mean, st.used, emit)

    def _workday(self, day_start: int) -> bool:
        return self.calendar.classify(day_start)[0] == DAY_WORKDAY

    def _threshold(self, st: BulkExportState, start: int) -> tuple[int, float, int]:
        """(look-ups above which ``start``'s day is a spike, baseline mean, days used)."""
        s = self.settings
        values = st.ring + [c for d, c in sorted(st.days.items()) if d < start and self._workday(d)]
        values = values[-s.baseline_days :]
        if len(values) < s.min_baseline_days:
            return _NO_LIMIT, 0.0, len(values)
        mean = sum(values) / len(values)
        return max(s.min_lookups, int(s.spike_factor * mean)), mean, len(values)

    def _emit_spike(self, ev: Event, start: int, n: int, limit: int, mean: float, used: int, emit: Emitter) -> None:
        emit(
            self.rule,
            "lookup_spike",
            ev,
            start,
            start + DAY_MS,
            n,
            details={"baseline": round(mean, 1), "baseline_days": used, "threshold": limit},
            related=_is_lookup,
        )

    def _write_out(self, st: BulkExportState, ev: Event, emit: Emitter) -> None:
        records = ev.records
        if records is None:
            if ev.action != "export":
                return
            records = 1
        if records <= 0:
            return
        window = st.window
        if window is None:
            window = st.window = SlidingWindow()
        s = self.settings
        newest = insert(window, ev.ts_ms, records)
        if window.times[0] + s.window_ms < st.due:
            st.due = window.times[0] + s.window_ms
        threshold = s.max_records
        best: dict[int, int] = {}
        for t, total in affected_totals(window, ev.ts_ms, s.window_ms, newest):
            if total >= threshold:
                day = self.day_start(t)
                if total > best.get(day, 0):
                    best[day] = total
        massive = threshold * s.massive_factor
        minutes = s.window_ms // MINUTE_MS
        for day, total in best.items():
            emit(
                self.rule,
                "records_exported",
                ev,
                day,
                day + DAY_MS,
                total,
                details={"threshold": threshold, "window_minutes": minutes},
                related=_is_write_out,
            )
            if total >= massive:
                emit(
                    self.rule,
                    "records_exported_massive",
                    ev,
                    day,
                    day + DAY_MS,
                    total,
                    details={"threshold": massive, "window_minutes": minutes},
                    related=_is_write_out,
                )

    # -- state --------------------------------------------------------------

    def expire(self, state: BulkExportState, watermark_ms: int) -> BulkExportState | None:
        """Prune write-outs outside any open window; fold finished days into the baseline."""
        window = state.window
        if window is not None:
            window.prune(watermark_ms - self.settings.window_ms)
            if not window.times:
                state.window = None
        if state.days:
            for day in sorted(d for d in state.days if d + DAY_MS <= watermark_ms):
                self._fold(state, day, state.days.pop(day))
        if state.day != _NO_DAY and state.day + DAY_MS <= watermark_ms:
            self._fold(state, state.day, state.count)
            state.day, state.end, state.count = _NO_DAY, _NO_DAY + DAY_MS, 0
        if not state.ring and not state.days and not state.count and state.window is None:
            return None
        due = NEVER
        if state.window is not None:
            due = state.window.times[0] + self.settings.window_ms
        if state.days:
            due = min(due, min(state.days) + DAY_MS)
        if state.day != _NO_DAY:
            due = min(due, state.day + DAY_MS)
        state.due = due
        return state

    def _fold(self, state: BulkExportState, day: int, count: int) -> None:
        if count and self._workday(day):
            state.ring.append(count)
            del state.ring[: -self.settings.baseline_days]
        if day + DAY_MS > state.settled:
            state.settled = day + DAY_MS
        state.limit = -1

    def dump(self, state: BulkExportState) -> Any:
        """``[day, count, [[day, count], ...], ring, settled, window]``."""
        window = state.window.dump() if state.window is not None else None
        return [state.day, state.count, sorted([d, c] for d, c in state.days.items()), list(state.ring), state.settled, window]

    def load(self, data: Any) -> BulkExportState:
        """Inverse of :meth:`dump`."""
        state = BulkExportState()
        state.day, state.count = int(data[0]), int(data[1])
        state.end = state.day + DAY_MS
        state.days = {int(d): int(c) for d, c in data[2]}
        state.ring = [int(c) for c in data[3]]
        state.settled = int(data[4])
        state.window = SlidingWindow.load(data[5]) if data[5] is not None else None
        return state
