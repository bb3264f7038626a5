"""The same person's record looked up again and again by one member of staff.

PPC viewpoint 5 (同一人物の繰り返し参照). Counter work opens one resident's
record a few times while serving them (search, view, view again after an
update: typically 3-5 look-ups in a visit); a member of staff who keeps
coming back to one record far more often than that is either fixated on a
person (an acquaintance, a celebrity) or running a script.

Reasons, each one finding per (user, subject, tumbling window of the fire):

``same_subject``
    ``threshold`` successful look-ups (``search``/``view``) of the same
    ``subject`` token within a sliding ``window`` (default 12 within 1 h:
    above the 10 or 11 look-ups that one long, complex case at the counter
    can reach).
``repeated_failures``
    ``failure_threshold`` failed or denied look-ups of the same subject
    within ``failure_window`` (default 3 within 1 h): someone trying to open a
    record they have no rights to.

``mynumber_ref`` is not required: the subject token already identifies the
resident, and looking at their record repeatedly is the concern even on
screens that do not show the number. Look-ups without a subject are ignored.

Each finding's key is the subject token (pseudonymous, never a number) and its
window is the local-time-aligned tumbling window of ``window`` size holding
the look-up that crossed the threshold, so ids do not depend on arrival order.

State per user: the recent look-up times per subject, for at most
``max_subjects`` subjects (least recently looked up evicted first), pruned on
every sweep. Successful look-ups are the most common event of all, so their
times are kept as sorted 64-bit integers in an ``array`` per subject,
appended in place (compact: the garbage collector has no items to visit),
and a look-up of the same subject as the user's previous one (the common
case: search, view, view again) needs no dictionary work at all. While the
subjects' order is also the order of their newest look-ups (the usual case),
those newest times are kept sorted in one small list as well, so a sweep
finds the subjects to forget without visiting each one's times. The same
sliding rule as :class:`~detectors.windows.SlidingWindow` applies (a look-up
at ``t`` fires when ``(t - window, t]`` holds ``threshold`` look-ups).
Failures, which are rare, use :class:`~detectors.windows.SlidingWindow` itself.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from itertools import islice, pairwise
from typing import Any, Final

from detectors.base import DAY_MS, HOUR_MS, NEVER, Detector, Emitter, UserState
from detectors.windows import SlidingWindow, tumbling_start
from schemas.event import LOOKUP_ACTIONS, Event

__all__ = ["RepeatedQueriesDetector", "RepeatedQueriesSettings"]

#: Look-up times kept per subject at most (a runaway script cannot grow state without bound).
MAX_TIMES_PER_SUBJECT: Final = 1000
_MS: Final = timedelta(milliseconds=1)
#: 64-bit signed integers: C ``long`` where it has 64 bits (the array converts
#: those without the slower ``long long`` path), else ``long long``.
_TYPECODE: Final = "l" if array("l").itemsize == 8 else "q"
#: Copied for each new subject (copying is faster than building an array).
_ONE: Final = array(_TYPECODE, [0])
#: ``_Lookups.last_times`` of a state with no last subject.
_NONE: Final = array(_TYPECODE)


def _local_offset_ms(tz: tzinfo, ts_ms: int) -> int:
    """The UTC offset of ``tz`` at ``ts_ms``, in milliseconds (for local-aligned windows)."""
    offset = datetime.fromtimestamp(ts_ms // 1000, UTC).astimezone(tz).utcoffset()
    return 0 if offset is None else offset // _MS


@dataclass(frozen=True, slots=True)
class RepeatedQueriesSettings:
    """Parameters of the ``repeated_queries`` rule."""

    #: Successful look-ups of one subject within ``window`` that raise ``same_subject``.
    threshold: int = 12
    window_ms: int = HOUR_MS
    #: Failed/denied look-ups of one subject within ``failure_window`` that raise ``repeated_failures``.
    failure_threshold: int = 3
    failure_window_ms: int = HOUR_MS
    #: Subjects tracked per user at most; the least recently looked up is forgotten first.
    max_subjects: int = 256


class _Lookups:
    """One user's recent look-ups: subject -> sorted times (ok) / sliding window (failed)."""

    __slots__ = ("bad", "due", "last", "last_time", "last_times", "ok", "ordered", "tail")

    def __init__(self) -> None:
        #: Subject -> look-up times, least recently looked up first.
        self.ok: dict[str, array[int]] = {}
        #: The last subject in ``ok`` (the most recently looked up), its times and
        #: its newest time, or ``None``: a look-up of the same subject again needs
        #: no reordering. Derived, never dumped.
        self.last: str | None = None
        self.last_times = _NONE
        self.last_time = 0
        self.bad: dict[str, SlidingWindow] = {}
        #: ``ok`` is also in order of the subjects' newest look-up times (so the
        #: first subject is the one to expire first); derived, never dumped.
        self.ordered = True
        #: While ``ordered``: the newest look-up times of the subjects in ``ok``
        #: other than ``last``, ascending (so, in the order of ``ok``). Expiry
        #: reads these instead of each subject's times. Derived, never dumped.
        self.tail: list[int] = []
        #: Nothing expires before this watermark (0: look at the next sweep); derived, never dumped.
        self.due = 0


class RepeatedQueriesDetector(Detector[_Lookups, RepeatedQueriesSettings]):
    """Alerts when one user looks the same subject up again and again."""

    name = "repeated_queries"
    actions = LOOKUP_ACTIONS
    tracks_due = True
    settings_type = RepeatedQueriesSettings

    __slots__ = ("_max_subjects", "_threshold", "_window_ms")

    def check_settings(self) -> None:
        """Thresholds of at least 2 (one look-up is not "repeated"), windows up to 31 days."""
        s = self.settings
        if not 2 <= s.threshold <= MAX_TIMES_PER_SUBJECT:
            raise self.error("threshold", f"must be between 2 and {MAX_TIMES_PER_SUBJECT}")
        if not 2 <= s.failure_threshold <= MAX_TIMES_PER_SUBJECT:
            raise self.error("failure_threshold", f"must be between 2 and {MAX_TIMES_PER_SUBJECT}")
        if s.window_ms > 31 * DAY_MS:
            raise self.error("window", "must be at most 31d")
        if s.failure_window_ms > 31 * DAY_MS:
            raise self.error("failure_window", "must be at most 31d")
        if not 1 <= s.max_subjects <= 100_000:
            raise self.error("max_subjects", "must be between 1 and 100000")
        # Copied into slots: the hot path reads them once per look-up.
        self._max_subjects = s.max_subjects
        self._threshold = s.threshold
        self._window_ms = s.window_ms

    def handler(self, action: str, result: str, mynumber_ref: bool, location: str | None) -> Callable[[Event, UserState, Emitter], None] | None:
        """Successful and failed look-ups have their own paths."""
        if action not in LOOKUP_ACTIONS:
            return None
        return self._lookup if result == "success" else self._failed_lookup

    def process(self, ev: Event, user: UserState, emit: Emitter) -> None:
        """Record one look-up of a subject; alert when it repeats too often."""
        if ev.action in LOOKUP_ACTIONS:
            (self._lookup if ev.result == "success" else self._failed_lookup)(ev, user, emit)

    def _failed_lookup(self, ev: Event, user: UserState, emit: Emitter) -> None:
        subject = ev.subject
        if subject is None:
            return
        state: _Lookups | None = user.slots[self.index]
        if state is None:
            state = user.slots[self.index] = _Lookups()
        self._failure(state, subject, ev, emit)
        if state.due < user.wake:
            user.wake = state.due

    def _lookup(self, ev: Event, user: UserState, emit: Emitter) -> None:
        subject = ev.subject
        if subject is None:
            return
        state: _Lookups | None = user.slots[self.index]
        if state is None:
            state = user.slots[self.index] = _Lookups()
            user.wake = 0
        ts = ev.ts_ms
        # Hot path: most events are successful look-ups of a subject, often
        # of the same one as the user's previous look-up.
        if subject == state.last:
            # Already the last in ``ok``: its newest time only grows, so the order holds.
            times = state.last_times
            newest = state.last_time
        else:
            book = state.ok
            ordered = state.ordered
            if ordered:
                if book and (state.last is None or ts < state.last_time):
                    # Out of order: moved last, the subject may not be the newest any more.
                    state.ordered = ordered = False
                    state.due = user.wake = 0
                elif state.last is not None:
                    state.tail.append(state.last_time)  # the newest of all so far
            found = book.pop(subject, None)
            if found is None:
                if len(book) >= self._max_subjects:
                    del book[next(iter(book))]
                    if ordered:
                        del state.tail[0]
                if not book and ts + self._window_ms < state.due:
                    state.due = ts + self._window_ms  # the first subject is the one to expire first
                    if state.due < user.wake:
                        user.wake = state.due
                times = book[subject] = state.last_times = _ONE.__copy__()
                times[0] = ts
                state.last, state.last_time = subject, ts
                return  # threshold >= 2: a first look-up never fires
            times = book[subject] = found  # re-inserted: dict order is least recently used first
            newest = times[-1]
            if ordered:
                tail = state.tail
                del tail[bisect_left(tail, newest)]
            state.last, state.last_times, state.last_time = subject, times, newest
        if ts >= newest:
            times.append(ts)
            state.last_time = ts
            k = len(times) - self._threshold
            if k < 0:
                return  # fewer than ``threshold`` (so fewer than MAX_TIMES_PER_SUBJECT) times
            if k > MAX_TIMES_PER_SUBJECT - self._threshold:
                del times[0]
                k -= 1
            if times[k] <= ts - self._window_ms:
                return
            candidates = [ts]
        else:
            insort(times, ts)
            if len(times) > MAX_TIMES_PER_SUBJECT:
                del times[0]
            window = self._window_ms
            # A late look-up raises the count of every later look-up within the window.
            candidates = sorted(set(times[bisect_left(times, ts) : bisect_left(times, ts + window)]))
        self._fire_lookups(ev, subject, times, candidates, emit)

    def _fire_lookups(self, ev: Event, subject: str, times: array[int], candidates: list[int], emit: Emitter) -> None:
        s = self.settings
        window, threshold = s.window_ms, s.threshold

        def related(e: Event) -> bool:
            return e.subject == subject and e.result == "success" and e.action in LOOKUP_ACTIONS

        for t in candidates:
            total = bisect_right(times, t) - bisect_right(times, t - window)
            if total >= threshold:
                start = tumbling_start(t, window, _local_offset_ms(self.calendar.tz, t))
                emit(
                    self.rule,
                    "same_subject",
                    ev,
                    start,
                    start + window,
                    total,
                    key=subject,
                    details={"threshold": threshold, "window_minutes": window // 60_000},
                    related=related,
                )

    def _failure(self, state: _Lookups, subject: str, ev: Event, emit: Emitter) -> None:
        s = self.settings
        window, threshold = s.failure_window_ms, s.failure_threshold
        book = state.bad
        sliding = book.pop(subject, None)
        if sliding is None:
            if len(book) >= s.max_subjects:
                del book[next(iter(book))]
            sliding = SlidingWindow()
        book[subject] = sliding
        ts = ev.ts_ms
        if len(sliding) >= MAX_TIMES_PER_SUBJECT:
            sliding.prune(sliding.times[0])
        sliding.add(ts, window, threshold)
        if sliding.times[0] + window < state.due:
            state.due = sliding.times[0] + window
        # Every fired look-up whose count this one raised (new fires included).
        fired = sorted(t for t in sliding.fired if ts <= t < ts + window)
        if not fired:
            return

        def related(e: Event) -> bool:
            return e.subject == subject and e.result != "success" and e.action in LOOKUP_ACTIONS

        for t in fired:
            start = tumbling_start(t, window, _local_offset_ms(self.calendar.tz, t))
            emit(
                self.rule,
                "repeated_failures",
                ev,
                start,
                start + window,
                sliding.total(t - window, t),
                key=subject,
                details={"threshold": threshold, "window_minutes": window // 60_000},
                related=related,
            )

    def dump(self, state: _Lookups) -> Any:
        """``{"ok": [[subject, times]...], "bad": [[subject, window]...]}``, least recent first."""
        return {
            "ok": [[subject, times.tolist()] for subject, times in state.ok.items()],
            "bad": [[subject, sliding.dump()] for subject, sliding in state.bad.items()],
        }

    def load(self, data: Any) -> _Lookups:
        """Inverse of :meth:`dump`."""
        state = _Lookups()
        state.ok = {str(subject): array(_TYPECODE, [int(t) for t in times]) for subject, times in data["ok"]}
        state.bad = {str(subject): SlidingWindow.load(w) for subject, w in data["bad"]}
        state.ordered = False
        return state

    def expire(self, state: _Lookups, watermark_ms: int) -> _Lookups | None:
        """Forget subjects whose look-ups are all older than any open window can need.

        A subject still being looked up keeps its older times (at most
        ``MAX_TIMES_PER_SUBJECT``); they never count in a window that is still open.
        """
        book = state.ok
        window = self._window_ms
        due = NEVER
        if book:
            # Least recently looked up first: the subjects to forget are a prefix.
            before = watermark_ms - window
            if state.ordered:
                # In order of the newest times too: count them without visiting them.
                tail = state.tail
                n = bisect_right(tail, before)
                if n == len(tail) and state.last is not None and state.last_time <= before:
                    n += 1
                if n == len(book):
                    state.ok = book = {}
                    state.last, state.last_times = None, _NONE
                    state.tail = []
                elif n:
                    for subject in list(islice(book, n)):
                        del book[subject]
                    del tail[:n]
                if book:
                    due = (tail[0] if tail else state.last_time) + window
            else:
                newest = [times[-1] for times in book.values()]
                n = 0
                for t in newest:
                    if t > before:
                        break
                    n += 1
                if n == len(book):
                    state.ok = book = {}
                    state.last, state.last_times = None, _NONE
                else:
                    if n:
                        for subject in list(islice(book, n)):
                            del book[subject]
                        del newest[:n]
                    due = min(newest) + window
                    if all(a <= b for a, b in pairwise(newest)):
                        state.ordered = True
                        state.tail = newest if state.last is None else newest[:-1]
        failure_window = self.settings.failure_window_ms
        if state.bad:
            before = watermark_ms - failure_window
            for sliding in state.bad.values():
                sliding.prune(before)
            state.bad = {subject: w for subject, w in state.bad.items() if len(w)}
        if not book and not state.bad:
            return None
        if state.bad:
            due = min(due, min(w.times[0] for w in state.bad.values()) + failure_window)
        state.due = due
        return state
