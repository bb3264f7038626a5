"""Operations from a terminal other than the one the person normally uses.

PPC viewpoint 2 (普段と異なる端末からの操作). Staff work at their own desk
terminal; personal data referenced from somebody else's terminal, or one
account hopping across many terminals in a day, is how borrowed or shared
credentials and sessions left logged in on counter terminals show up.

Reasons:

``new_terminal`` (medium)
    A personal-number reference (``mynumber_ref``, any action or result) from
    a terminal the user has not used on any day within ``recent`` (default
    30 d) before the current local day. Judged only once the user has been
    observed for ``warmup`` (default 7 d) with at least ``min_events``
    (default 20) events on earlier days, from the stream or seeded history.
    One finding per user, day and terminal (the key); count = such references.
``many_terminals`` (medium)
    At least ``terminals_per_day`` (default 4) distinct terminals used by one
    user (any event) in one local day; count = distinct terminals. The PPC's
    sample user uses five on 2019-02-04. A desk terminal plus a counter
    terminal plus a meeting-room PC is three.

Telework is the ``unusual_operation`` rule's concern, not this one. Shared
counter terminals (窓口端末) used by everybody belong in the allowlist.

Order: the usual terminals of a day are those of the days before it, so
events within one local day may arrive in any order within the lateness.
A late event of the previous day still counts towards that day's
``many_terminals`` and makes its terminal usual for the current day, but a
reference of the current day already raised as ``new_terminal`` is not
withdrawn, and a late reference of the previous day is not judged.

State per user: observation start and event counts (the warm-up), the
terminals used within ``recent`` with the day each was last used (at most
``max_terminals``, least recently used forgotten first), the usual set of the
current day, and the terminals of the current and previous day (at most 256
each). Dropped once the user has used no terminal for ``recent``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from detectors.base import DAY_MS, MINUTE_MS, NEVER, Detector, Emitter, UserState
from schemas.event import Event

__all__ = ["UnusualTerminalDetector", "UnusualTerminalSettings", "UnusualTerminalState"]

#: Distinct terminals remembered per day at most.
MAX_TERMINALS_PER_DAY: Final = 256
#: ``day`` of a state with no current day (the fast path never matches it).
_NO_DAY: Final = -DAY_MS


@dataclass(frozen=True, slots=True)
class UnusualTerminalSettings:
    """Parameters of the ``unusual_terminal`` rule."""

    #: Terminals used within this period before the current day are the usual ones.
    recent_ms: int = 30 * DAY_MS
    #: Observation needed before ``new_terminal`` is judged.
    warmup_ms: int = 7 * DAY_MS
    #: Events on earlier days needed before ``new_terminal`` is judged.
    min_events: int = 20
    #: Distinct terminals in one local day that raise ``many_terminals``.
    terminals_per_day: int = 4
    #: Usual terminals remembered per user at most.
    max_terminals: int = 32


class UnusualTerminalState:
    """One user's usual terminals and today's terminals."""

    __slots__ = ("day", "due", "end", "fast", "first", "flagged", "known", "n_before", "n_today", "prev", "prev_day", "seen", "today")

    def __init__(self, first: int) -> None:
        #: Earliest event time seen (observation start).
        self.first = first
        #: Events on days before the current one, and on it.
        self.n_before = 0
        self.n_today = 0
        #: Start (epoch ms of local midnight) of the current day.
        self.day = _NO_DAY
        #: ``day + DAY_MS`` (kept for the fast path); derived, never dumped.
        self.end = _NO_DAY + DAY_MS
        #: Distinct terminals of the current day.
        self.today: set[str] = set()
        #: The previous current day and its terminals (for late events).
        self.prev_day = _NO_DAY
        self.prev: set[str] = set()
        #: Terminals used within ``recent`` before the current day (the usual ones).
        self.known: set[str] = set()
        #: Terminal -> start of the day it was last used.
        self.seen: dict[str, int] = {}
        #: New terminals of the current day -> personal-data references from them.
        self.flagged: dict[str, int] = {}
        #: Terminals of the current day whose events need no further look than
        #: counting: the usual ones (``today & known``) and, while no reference
        #: can be judged for the rest of the day (warm-up), the others too.
        #: Derived, never dumped.
        self.fast: set[str] = set()
        #: Nothing expires before this watermark (0: look at the next sweep); derived, never dumped.
        self.due = 0


def _any(ev: Event) -> bool:
    return True


class UnusualTerminalDetector(Detector[UnusualTerminalState, UnusualTerminalSettings]):
    """Alerts on references from unfamiliar terminals and on terminal hopping."""

    name = "unusual_terminal"
    actions = None
    tracks_due = True
    settings_type = UnusualTerminalSettings

    __slots__ = ()

    def check_settings(self) -> None:
        """Counts and caps within sensible bounds."""
        s = self.settings
        if s.min_events < 0:
            raise self.error("min_events", "must not be negative")
        if not 2 <= s.terminals_per_day <= MAX_TERMINALS_PER_DAY:
            raise self.error("terminals_per_day", f"must be between 2 and {MAX_TERMINALS_PER_DAY}")
        if not 1 <= s.max_terminals <= 1024:
            raise self.error("max_terminals", "must be between 1 and 1024")
        if s.recent_ms < DAY_MS:
            raise self.error("recent", "must be at least 1d")

    def day_start(self, ts_ms: int) -> int:
        """Epoch ms of the local midnight starting the day of ``ts_ms``."""
        return ts_ms - (self.calendar.local_minute(ts_ms) * MINUTE_MS + ts_ms % MINUTE_MS)

    # -- processing ---------------------------------------------------------

    def process(self, ev: Event, user: UserState, emit: Emitter) -> int | None:
        """Note the terminal; judge it if it is not one of today's usual ones.

        Returns ``NEVER`` (repeats may be skipped without limit) when it is (:meth:`repeats`).
        """
        st: UnusualTerminalState | None = user.slots[self.index]
        if st is not None and st.day <= ev.ts_ms < st.end and ev.terminal in st.fast:
            st.n_today += 1
            return NEVER
        self._slow(st, ev, user, emit)
        after: UnusualTerminalState = user.slots[self.index]
        if after.due < user.wake:
            user.wake = after.due
        # Now a usual terminal of the day (the next such event takes the fast path)?
        return NEVER if after.day <= ev.ts_ms < after.end and ev.terminal in after.fast else None

    def repeats(self, action: str, result: str) -> bool:
        """Every kind of event takes part in skipping repeats: a usual terminal of the day is only counted."""
        return True

    def repeat(self, state: UnusualTerminalState, count: int, last_ts: int) -> None:
        """Count the skipped events of the day."""
        state.n_today += count

    def _slow(self, st: UnusualTerminalState | None, ev: Event, user: UserState, emit: Emitter) -> None:
        ts = ev.ts_ms
        if st is None:
            st = user.slots[self.index] = UnusualTerminalState(ts)
        elif ts < st.first:
            st.first = ts
            st.fast = st.today & st.known  # the warm-up may now end earlier
        if ts >= st.end:
            self._roll(st, self.day_start(ts))
        elif ts < st.day:
            self._late(st, ev, emit)
            return
        st.n_today += 1
        terminal = ev.terminal
        day = st.day
        if terminal not in st.today and len(st.today) < MAX_TERMINALS_PER_DAY:
            st.today.add(terminal)
            self._saw(st, terminal, day)
            if terminal in st.known:
                st.fast.add(terminal)
            if len(st.today) >= self.settings.terminals_per_day:
                self._emit_many(st.today, ev, day, emit)
        if terminal in st.known or not ev.mynumber_ref:
            return
        s = self.settings
        if st.first > ts - s.warmup_ms or st.n_before < s.min_events:
            if terminal in st.today and (st.n_before < s.min_events or st.first + s.warmup_ms >= st.end):
                st.fast.add(terminal)  # not judged before the day ends: its events are only counted
            return
        if terminal not in st.flagged and len(st.flagged) >= MAX_TERMINALS_PER_DAY:
            return
        count = st.flagged[terminal] = st.flagged.get(terminal, 0) + 1
        seen = st.seen
        usual = sorted(st.known, key=lambda t: (-seen.get(t, 0), t))[:8]
        emit(
            self.rule,
            "new_terminal",
            ev,
            day,
            day + DAY_MS,
            count,
            key=terminal,
            details={"usual_terminals": usual},
            related=lambda e: e.terminal == terminal,
        )

    def _roll(self, st: UnusualTerminalState, start: int) -> None:
        """Start a new current day: everything seen so far is before it."""
        cut = start - self.settings.recent_ms
        st.prev_day, st.prev = st.day, st.today
        st.n_before += st.n_today
        st.n_today = 0
        st.day, st.end = start, start + DAY_MS
        st.today = set()
        st.fast = set()
        st.flagged = {}
        st.known = {t for t, d in st.seen.items() if d >= cut}
        if st.prev and st.prev_day + DAY_MS < st.due:
            st.due = st.prev_day + DAY_MS

    def _late(self, st: UnusualTerminalState, ev: Event, emit: Emitter) -> None:
        """An event of an earlier day: its terminal is usual for today; it may add to yesterday."""
        st.n_before += 1
        st.fast = st.today & st.known  # the warm-up may now end earlier
        terminal = ev.terminal
        day = self.day_start(ev.ts_ms)
        if day >= st.day - self.settings.recent_ms:
            st.known.add(terminal)
            if terminal in st.today:
                st.fast.add(terminal)
        self._saw(st, terminal, day)
        if day == st.prev_day and terminal not in st.prev and len(st.prev) < MAX_TERMINALS_PER_DAY:
            st.prev.add(terminal)
            if day + DAY_MS < st.due:
                st.due = day + DAY_MS
            if len(st.prev) >= self.settings.terminals_per_day:
                self._emit_many(st.prev, ev, day, emit)

    def _saw(self, st: UnusualTerminalState, terminal: str, day: int) -> None:
        seen = st.seen
        last = seen.get(terminal)
        if last is None:
            if len(seen) >= self.settings.max_terminals:
                del seen[min(seen.items(), key=lambda item: (item[1], item[0]))[0]]
            seen[terminal] = day
            due = day + DAY_MS + self.settings.recent_ms
            if due < st.due:
                st.due = due
        elif day > last:
            seen[terminal] = day

    def _emit_many(self, terminals: set[str], ev: Event, day: int, emit: Emitter) -> None:
        emit(
            self.rule,
            "many_terminals",
            ev,
            day,
            day + DAY_MS,
            len(terminals),
            details={"threshold": self.settings.terminals_per_day},
            related=_any,
        )

    # -- state --------------------------------------------------------------

    def expire(self, state: UnusualTerminalState, watermark_ms: int) -> UnusualTerminalState | None:
        """Forget terminals unused for ``recent`` and a closed previous day; ``None`` once nothing is recent."""
        cut = watermark_ms - self.settings.recent_ms
        seen = state.seen
        if seen and min(seen.values()) + DAY_MS <= cut:
            state.seen = seen = {t: d for t, d in seen.items() if d + DAY_MS > cut}
        if not seen:
            return None
        if state.prev and state.prev_day + DAY_MS <= watermark_ms:
            state.prev = set()
        due = min(seen.values()) + DAY_MS + self.settings.recent_ms
        if state.prev:
            due = min(due, state.prev_day + DAY_MS)
        state.due = due
        return state

    def dump(self, state: UnusualTerminalState) -> Any:
        """``[first, n_before, n_today, day, today, prev_day, prev, known, [[terminal, day]], [[terminal, n]]]``."""
        return [
            state.first,
            state.n_before,
            state.n_today,
            state.day,
            sorted(state.today),
            state.prev_day,
            sorted(state.prev),
            sorted(state.known),
            sorted([t, d] for t, d in state.seen.items()),
            sorted([t, n] for t, n in state.flagged.items()),
        ]

    def load(self, data: Any) -> UnusualTerminalState:
        """Inverse of :meth:`dump`."""
        state = UnusualTerminalState(int(data[0]))
        state.n_before, state.n_today, state.day = int(data[1]), int(data[2]), int(data[3])
        state.end = state.day + DAY_MS
        state.today = {str(t) for t in data[4]}
        state.prev_day = int(data[5])
        state.prev = {str(t) for t in data[6]}
        state.known = {str(t) for t in data[7]}
        state.seen = {str(t): int(d) for t, d in data[8]}
        state.flagged = {str(t): int(n) for t, n in data[9]}
        state.fast = state.today & state.known
        return state
