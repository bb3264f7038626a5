"""Writes to USB memory and other removable media.

Inspection findings of the PPC (USBメモリ等の電子媒体への書き込み): personal data
written to removable media from terminals that handle My Number data, media
other than the approved ones (許可された電子媒体以外), and lost sticks holding
tens of thousands of records.

A *media write* is a ``usb_write``, or a ``file_copy`` that names a
``device``. Reasons, each one finding per user, local day and reason:

``write_from_sensitive_terminal`` (high)
    A media write (any result: a blocked attempt is as telling) from a
    terminal that handles personal data: one matching ``sensitive_terminals``
    (exact names or prefix patterns such as ``"172.16.*"``), or, with
    ``learn_sensitive`` (default on), one on which this user referenced
    personal numbers (``mynumber_ref``) no later than the end of the write's
    day, within the last ``sensitive_memory`` (default 90 d; at most
    ``max_terminals`` such terminals per user, least recently used forgotten).
    A write followed later the same day by a reference on that terminal is
    caught when the reference arrives.
``unapproved_device`` (critical)
    A ``usb_connect`` or media write with a ``device`` that does not match
    ``approved_devices``; the finding's key is the device. Off while
    ``approved_devices`` is empty (register the approved media to turn it on);
    events without a ``device`` cannot be judged and are skipped.
``volume`` (high)
    Successful media writes summing to ``max_bytes`` (default 100 MB) or
    ``max_records`` (default 5000) within a sliding ``window`` (default 1 h);
    the finding's key is the measure (``bytes`` or ``records``) and its count
    the largest sum. 100 MB or 5000 records on a stick is a database
    extract, not a document.
``first_media_use`` (medium)
    The day of the user's first-ever removable-media use (``usb_connect`` or a
    media write), once the user has been observed for ``warmup`` (default
    14 d, from the stream or seeded history); count = media operations that day.

Order: the sliding sums are exact for any order within the engine's lateness;
media writes of the open days are kept (at most 64) so that a terminal learned
as sensitive later the same day still raises the writes made from it. An
earlier first media use on the previous day that arrives after the next day's
has been raised is raised too (the later finding is not withdrawn).

State per user: the first media day, the learned terminals with first/last
reference times, the open days' counts and writes, and the media writes
within ``window`` (at most 10 000 per measure; 1024 open counts). The first
media day is a baseline, kept as long as the engine keeps the user
(``idle_ttl``); when observation started is the engine's
(:attr:`~detectors.base.UserState.first_ts`). Only personal-data references
and removable-media operations reach the detector.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from detectors.base import DAY_MS, HOUR_MS, MINUTE_MS, NEVER, Detector, Emitter, UserState
from detectors.bulk_export import affected_totals, insert
from detectors.windows import SlidingWindow
from schemas.event import MEDIA_ACTIONS, Event

__all__ = ["MAX_OPEN_FINDINGS", "MAX_PENDING_WRITES", "Patterns", "UsbWritesDetector", "UsbWritesSettings", "UsbWritesState"]

#: Actions this detector judges (``file_copy`` only with a device).
_MEDIA: Final = MEDIA_ACTIONS | {"file_copy"}
#: Pending media writes kept per user at most.
MAX_PENDING_WRITES: Final = 64
#: Open finding counts kept per user at most (one per day, reason and device).
MAX_OPEN_FINDINGS: Final = 1024


class Patterns:
    """Exact names plus prefix patterns (``"172.16.*"``; ``"*"`` matches everything)."""

    __slots__ = ("exact", "prefixes")

    def __init__(self, patterns: tuple[str, ...]) -> None:
        exact: set[str] = set()
        prefixes: list[str] = []
        for p in patterns:
            if not p or "*" in p[:-1]:
                raise ValueError(f"{p!r}: use an exact name or a prefix ending in '*'")
            if p.endswith("*"):
                prefixes.append(p[:-1])
            else:
                exact.add(p)
        self.exact = frozenset(exact)
        self.prefixes = tuple(prefixes)

    def __bool__(self) -> bool:
        return bool(self.exact or self.prefixes)

    def __contains__(self, value: str) -> bool:
        return value in self.exact or (bool(self.prefixes) and value.startswith(self.prefixes))


@dataclass(frozen=True, slots=True)
class UsbWritesSettings:
    """Parameters of the ``usb_writes`` rule."""

    #: Terminals that handle personal data: names or prefix patterns (``"172.16.*"``).
    sensitive_terminals: tuple[str, ...] = ()
    #: Also treat terminals on which the user referenced personal numbers as sensitive.
    learn_sensitive: bool = True
    #: How long a learned terminal stays sensitive after its last reference.
    sensitive_memory_ms: int = 90 * DAY_MS
    #: Learned terminals kept per user at most.
    max_terminals: int = 32
    #: Approved media: device ids or prefix patterns; empty turns ``unapproved_device`` off.
    approved_devices: tuple[str, ...] = ()
    #: Sliding window and limits of ``volume``.
    window_ms: int = HOUR_MS
    max_bytes: int = 100_000_000
    max_records: int = 5000
    #: Observation needed before a first media use is reported.
    warmup_ms: int = 14 * DAY_MS


class UsbWritesState:
    """One user's media baseline, learned terminals and open findings."""

    __slots__ = ("bytes_window", "counts", "cur", "cur_terminal", "cur_ts", "due", "media_day", "records_window", "refs", "writes")

    def __init__(self) -> None:
        #: Local day start of the first media use; -1 before any.
        self.media_day = -1
        #: Learned terminal -> [first, last] personal-data reference time.
        self.refs: dict[str, list[int]] = {}
        #: Media writes of open days not (yet) from a sensitive terminal: [ts, day, terminal, event id].
        self.writes: list[list[Any]] = []
        #: ``"day:reason:key"`` -> count of the open finding.
        self.counts: dict[str, int] = {}
        self.bytes_window: SlidingWindow | None = None
        self.records_window: SlidingWindow | None = None
        #: Nothing expires before this watermark (0: look at the next sweep); derived, never dumped.
        self.due = 0
        #: The learned terminal of the last reference, its record in ``refs`` and its
        #: newest reference time, not yet written to the record (``None``: no such
        #: terminal). References from it in time order then touch nothing else;
        #: :meth:`UsbWritesDetector.settle` writes the time back before anything
        #: else reads or changes ``refs``. Derived, never dumped.
        self.cur_terminal: str | None = None
        self.cur: list[int] | None = None
        self.cur_ts = 0


def _is_media(ev: Event) -> bool:
    return ev.action in MEDIA_ACTIONS or (ev.action == "file_copy" and ev.device is not None)


def _is_media_write(ev: Event) -> bool:
    return ev.action == "usb_write" or (ev.action == "file_copy" and ev.device is not None)


class UsbWritesDetector(Detector[UsbWritesState, UsbWritesSettings]):
    """Alerts on media writes from sensitive terminals, unapproved media, volume and first use."""

    name = "usb_writes"
    actions = None  # personal-data references teach which terminals are sensitive; see wants()
    uses_first_ts = True
    tracks_due = True
    settings_type = UsbWritesSettings

    __slots__ = ("approved", "learn", "sensitive")

    approved: Patterns
    learn: bool
    sensitive: Patterns

    def check_settings(self) -> None:
        """Patterns well-formed, limits positive, window at most a day."""
        s = self.settings
        try:
            self.sensitive = Patterns(s.sensitive_terminals)
        except ValueError as exc:
            raise self.error("sensitive_terminals", str(exc)) from None
        try:
            self.approved = Patterns(s.approved_devices)
        except ValueError as exc:
            raise self.error("approved_devices", str(exc)) from None
        self.learn = s.learn_sensitive
        if s.window_ms > DAY_MS:
            raise self.error("window", "must be at most 1d")
        if s.max_bytes < 1:
            raise self.error("max_bytes", "must be at least 1")
        if s.max_records < 1:
            raise self.error("max_records", "must be at least 1")
        if not 1 <= s.max_terminals <= 1024:
            raise self.error("max_terminals", "must be between 1 and 1024")

    def wants(self, action: str, result: str, mynumber_ref: bool, location: str | None) -> bool:
        """Removable-media operations, and personal-data references while learning terminals."""
        return action in _MEDIA or (mynumber_ref and self.learn)

    def handler(self, action: str, result: str, mynumber_ref: bool, location: str | None) -> Callable[[Event, UserState, Emitter], int | None] | None:
        """Other personal-data references only teach the terminal: a path of their own."""
        if action in _MEDIA:
            return self.process
        return self._reference if mynumber_ref and self.learn else None

    def repeats(self, action: str, result: str) -> bool:
        """References that only teach the terminal take part in skipping repeats."""
        return self.learn and action not in _MEDIA

    def repeat(self, state: UsbWritesState, count: int, last_ts: int) -> None:
        """Skipped references from the current terminal: the newest is ``last_ts``."""
        state.cur_ts = last_ts

    def _reference(self, ev: Event, user: UserState, emit: Emitter) -> int | None:
        """A personal-data reference that is not a media operation: learn its terminal.

        Returns ``NEVER`` (repeats may be skipped without limit) when the terminal
        is the current one (:meth:`repeats`).
        """
        st: UsbWritesState | None = user.slots[self.index]
        if st is not None:
            # Hot path: the same terminal as the user's last reference, in time order.
            if ev.terminal == st.cur_terminal and ev.ts_ms >= st.cur_ts:
                st.cur_ts = ev.ts_ms
                return NEVER
            if st.cur is not None:
                self.settle(st)
            rec = st.refs.get(ev.terminal)
            if rec is not None and ev.ts_ms >= rec[1]:
                st.cur_terminal, st.cur, st.cur_ts = ev.terminal, rec, ev.ts_ms
                return NEVER
        else:
            st = user.slots[self.index] = UsbWritesState()
            user.wake = 0
        self._learn_terminal(st, ev, user, emit)
        if st.due < user.wake:
            user.wake = st.due
        rec = st.refs.get(ev.terminal)
        if rec is not None and ev.ts_ms >= rec[1]:
            # Learned: the next reference from it in order takes the hot path.
            st.cur_terminal, st.cur, st.cur_ts = ev.terminal, rec, rec[1]
            return NEVER
        return None

    @staticmethod
    def settle(st: UsbWritesState) -> None:
        """Write the current terminal's newest reference time back to ``refs`` and forget it."""
        rec = st.cur
        if rec is not None:
            rec[1] = st.cur_ts
            st.cur = st.cur_terminal = None

    def day_start(self, ts_ms: int) -> int:
        """Epoch ms of the local midnight starting the day of ``ts_ms``."""
        return ts_ms - (self.calendar.local_minute(ts_ms) * MINUTE_MS + ts_ms % MINUTE_MS)

    # -- processing ---------------------------------------------------------

    def process(self, ev: Event, user: UserState, emit: Emitter) -> None:
        """Learn from personal-data references; judge removable-media operations."""
        st: UsbWritesState | None = user.slots[self.index]
        if st is None:
            st = user.slots[self.index] = UsbWritesState()
            user.wake = 0
        elif st.cur is not None:
            self.settle(st)
        if ev.mynumber_ref and self.learn:
            rec = st.refs.get(ev.terminal)
            if rec is not None and ev.ts_ms >= rec[1]:
                rec[1] = ev.ts_ms
            else:
                self._learn_terminal(st, ev, user, emit)
                if st.due < user.wake:
                    user.wake = st.due
        if ev.action in _MEDIA:
            self._media(st, ev, user, emit)
            if st.due < user.wake:
                user.wake = st.due

    def _learn_terminal(self, st: UsbWritesState, ev: Event, user: UserState, emit: Emitter) -> None:
        terminal, ts = ev.terminal, ev.ts_ms
        refs = st.refs
        rec = refs.get(terminal)
        if rec is None:
            if len(refs) >= self.settings.max_terminals:
                oldest = min(refs.items(), key=lambda item: (item[1][1], item[0]))[0]
                del refs[oldest]
            refs[terminal] = [ts, ts]
            if ts + self.settings.sensitive_memory_ms + 1 < st.due:
                st.due = ts + self.settings.sensitive_memory_ms + 1
        elif ts < rec[0]:
            rec[0] = ts
        else:
            return
        if st.writes:
            self._recheck(st, terminal, ts, ev, user, emit)

    def _recheck(self, st: UsbWritesState, terminal: str, first_ref: int, ev: Event, user: UserState, emit: Emitter) -> None:
        """Raise the pending writes from ``terminal`` that its new first reference makes sensitive."""
        keep: list[list[Any]] = []
        for write in st.writes:
            ts, day, term, event_id = write
            if term != terminal or first_ref >= day + DAY_MS:
                keep.append(write)
                continue
            found = next((e for e in user.recent if e.event_id == event_id and e.ts_ms == ts), ev)
            self._raise(st, "write_from_sensitive_terminal", found, day, "", emit, related=_from_terminal(terminal))
        st.writes = keep

    def _media(self, st: UsbWritesState, ev: Event, user: UserState, emit: Emitter) -> None:
        action, device = ev.action, ev.device
        if action == "file_copy" and device is None:
            return
        ts = ev.ts_ms
        day = self.day_start(ts)
        s = self.settings
        media_day = st.media_day
        if media_day < 0 or day <= media_day:
            st.media_day = day
            if user.first_ts <= ts - s.warmup_ms:
                self._raise(st, "first_media_use", ev, day, "", emit, related=_is_media, details={"warmup_days": s.warmup_ms // DAY_MS})
        if device is not None and self.approved and device not in self.approved:
            self._raise(st, "unapproved_device", ev, day, device, emit, related=_on_device(device))
        if action == "usb_connect":
            return
        terminal = ev.terminal
        if self._is_sensitive(st, terminal, ts, day):
            self._raise(st, "write_from_sensitive_terminal", ev, day, "", emit, related=_from_terminal(terminal))
        elif self.learn:
            st.writes.append([ts, day, terminal, ev.event_id])
            del st.writes[:-MAX_PENDING_WRITES]
            if day + DAY_MS < st.due:
                st.due = day + DAY_MS
        if ev.result == "success":
            if ev.bytes:
                if st.bytes_window is None:
                    st.bytes_window = SlidingWindow()
                self._volume(st, st.bytes_window, "bytes", ev.bytes, s.max_bytes, ev, emit)
            if ev.records:
                if st.records_window is None:
                    st.records_window = SlidingWindow()
                self._volume(st, st.records_window, "records", ev.records, s.max_records, ev, emit)

    def _is_sensitive(self, st: UsbWritesState, terminal: str, ts: int, day: int) -> bool:
        if terminal in self.sensitive:
            return True
        if not self.learn:
            return False
        rec = st.refs.get(terminal)
        if rec is None:
            return False
        if rec[1] < ts - self.settings.sensitive_memory_ms:
            del st.refs[terminal]  # stale: a new reference re-learns it and re-checks this write
            return False
        return rec[0] < day + DAY_MS

    def _volume(self, st: UsbWritesState, window: SlidingWindow, measure: str, weight: int, limit: int, ev: Event, emit: Emitter) -> None:
        size = self.settings.window_ms
        newest = insert(window, ev.ts_ms, weight)
        if window.times[0] + size < st.due:
            st.due = window.times[0] + size
        best: dict[int, int] = {}
        for t, total in affected_totals(window, ev.ts_ms, size, newest):
            if total >= limit:
                day = self.day_start(t)
                if total > best.get(day, 0):
                    best[day] = total
        for day, total in best.items():
            emit(
                self.rule,
                "volume",
                ev,
                day,
                day + DAY_MS,
                total,
                key=measure,
                details={"measure": measure, "threshold": limit, "window_minutes": size // MINUTE_MS},
                related=_is_media_write,
            )

    def _raise(
        self,
        st: UsbWritesState,
        reason: str,
        ev: Event,
        day: int,
        key: str,
        emit: Emitter,
        related: Callable[[Event], bool],
        details: dict[str, Any] | None = None,
    ) -> None:
        ckey = f"{day}:{reason}:{key}"
        counts = st.counts
        count = counts.get(ckey, 0) + 1
        if count > 1 or len(counts) < MAX_OPEN_FINDINGS:
            counts[ckey] = count
            if day + DAY_MS < st.due:
                st.due = day + DAY_MS
        emit(self.rule, reason, ev, day, day + DAY_MS, count, key=key, details=details, related=related)

    # -- state --------------------------------------------------------------

    def expire(self, state: UsbWritesState, watermark_ms: int) -> UsbWritesState | None:
        """Forget closed days, stale learned terminals and writes outside the window.

        The first media day is the user's baseline and is kept for as long as
        the engine keeps the user; a state with nothing else is dropped.
        """
        if state.cur is not None:
            self.settle(state)
        if state.counts:
            state.counts = {k: v for k, v in state.counts.items() if int(k.split(":", 1)[0]) + DAY_MS > watermark_ms}
        if state.writes:
            state.writes = [w for w in state.writes if w[1] + DAY_MS > watermark_ms]
        memory = self.settings.sensitive_memory_ms
        if state.refs:
            cut = watermark_ms - memory
            if any(rec[1] < cut for rec in state.refs.values()):
                state.refs = {t: rec for t, rec in state.refs.items() if rec[1] >= cut}
        size = self.settings.window_ms
        before = watermark_ms - size
        if state.bytes_window is not None:
            state.bytes_window.prune(before)
            if not state.bytes_window.times:
                state.bytes_window = None
        if state.records_window is not None:
            state.records_window.prune(before)
            if not state.records_window.times:
                state.records_window = None
        due = NEVER
        if state.counts:
            due = min(int(k.split(":", 1)[0]) for k in state.counts) + DAY_MS
        if state.writes:
            due = min(due, min(w[1] for w in state.writes) + DAY_MS)
        if state.refs:
            due = min(due, min(rec[1] for rec in state.refs.values()) + memory + 1)
        if state.bytes_window is not None:
            due = min(due, state.bytes_window.times[0] + size)
        if state.records_window is not None:
            due = min(due, state.records_window.times[0] + size)
        if due == NEVER and state.media_day < 0:
            return None  # nothing learned: a new state is the same
        state.due = due
        return state

    def dump(self, state: UsbWritesState) -> Any:
        """``[media_day, [[terminal, first, last]], writes, [[key, count]], bytes, records]``."""
        if state.cur is not None:
            self.settle(state)
        return [
            state.media_day,
            sorted([t, rec[0], rec[1]] for t, rec in state.refs.items()),
            [list(w) for w in state.writes],
            sorted([k, v] for k, v in state.counts.items()),
            state.bytes_window.dump() if state.bytes_window is not None else None,
            state.records_window.dump() if state.records_window is not None else None,
        ]

    def load(self, data: Any) -> UsbWritesState:
        """Inverse of :meth:`dump` (also reads the older layout that began with the observation start)."""
        if len(data) == 7:
            data = data[1:]
        state = UsbWritesState()
        state.media_day = int(data[0])
        state.refs = {str(t): [int(f), int(last)] for t, f, last in data[1]}
        state.writes = [[int(w[0]), int(w[1]), str(w[2]), str(w[3])] for w in data[2]]
        state.counts = {str(k): int(v) for k, v in data[3]}
        state.bytes_window = SlidingWindow.load(data[4]) if data[4] is not None else None
        state.records_window = SlidingWindow.load(data[5]) if data[5] is not None else None
        return state

    def legacy_first_ts(self, data: Any) -> int | None:
        """The observation start of the older layout."""
        return int(data[0]) if len(data) == 7 else None


def _from_terminal(terminal: str) -> Callable[[Event], bool]:
    def related(ev: Event) -> bool:
        return ev.terminal == terminal and _is_media_write(ev)

    return related


def _on_device(device: str) -> Callable[[Event], bool]:
    def related(ev: Event) -> bool:
        return ev.device == device

    return related
