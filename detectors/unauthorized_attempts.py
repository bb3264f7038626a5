"""Attempts to obtain personal data through operations without the rights.

PPC viewpoint 3 (権限のない操作の試行): operations on personal-number data
(``mynumber_ref`` true) that failed or were denied. The PPC's sample log has
a failed write-out at 08:30 and failed searches at 09:15, 10:04 and 13:05 on
one day; both must be flagged.

Reasons:

``denied_high_risk``
    A single failed/denied ``export``, ``print``, ``file_copy``, ``usb_write``
    or ``print_screen`` of personal data: trying to take data *out* without
    the rights is never routine. Alerts at once; one finding per user and
    local day, counting such attempts.
``repeated_denied``
    ``threshold`` failed/denied operations of any kind on personal data within
    a sliding ``window`` (default 3 within 24 h: a single denial is a
    mis-click or a missing role, found and fixed the same day; three in a day
    is probing, as in the PPC's sample log, where three failed searches in one
    morning are a finding. The evaluation suggests 4 would halve the noise on
    ordinary work; an agency can set that in its overrides). The finding's window is the local-midnight-aligned tumbling
    window (for the default 24 h: the local day) holding the attempt that
    crossed the threshold.
``login_failures``
    ``login_threshold`` failed logins within ``login_window`` (default 10
    within 1 h). Logins never reference personal data and people mistype
    passwords, so this is counted separately and with a higher threshold:
    twice the usual account-lockout limit of 5, i.e. someone kept trying after
    being locked out, which is guessing or a script rather than a typo.

Failed operations *without* personal data (``mynumber_ref`` false, other than
logins) are not counted: they cannot obtain personal data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any, Final

from detectors.base import DAY_MS, HOUR_MS, MINUTE_MS, NEVER, Detector, Emitter, UserState
from detectors.windows import SlidingWindow, tumbling_start
from schemas.event import Event

__all__ = ["HIGH_RISK_ACTIONS", "UnauthorizedAttemptsDetector", "UnauthorizedAttemptsSettings"]

#: Operations that take personal data out: one failed/denied attempt is an alert.
HIGH_RISK_ACTIONS: Final = frozenset({"export", "print", "file_copy", "usb_write", "print_screen"})
#: Attempts kept per sliding window at most (a runaway script cannot grow state without bound).
_MAX_TIMES: Final = 1000
_MS: Final = timedelta(milliseconds=1)


def _local_offset_ms(tz: tzinfo, ts_ms: int) -> int:
    """The UTC offset of ``tz`` at ``ts_ms``, in milliseconds (for local-aligned windows)."""
    offset = datetime.fromtimestamp(ts_ms // 1000, UTC).astimezone(tz).utcoffset()
    return 0 if offset is None else offset // _MS


def _is_denied_data_op(e: Event) -> bool:
    return e.result != "success" and e.mynumber_ref and e.action != "login"


def _is_denied_high_risk(e: Event) -> bool:
    return e.result != "success" and e.mynumber_ref and e.action in HIGH_RISK_ACTIONS


def _is_failed_login(e: Event) -> bool:
    return e.action == "login" and e.result != "success"


@dataclass(frozen=True, slots=True)
class UnauthorizedAttemptsSettings:
    """Parameters of the ``unauthorized_attempts`` rule."""

    #: Failed/denied operations on personal data within ``window`` that raise ``repeated_denied``.
    threshold: int = 3
    window_ms: int = DAY_MS
    #: Failed logins within ``login_window`` that raise ``login_failures``.
    login_threshold: int = 10
    login_window_ms: int = HOUR_MS


class _Attempts:
    """One user's recent failures: high-risk counts per local day, two sliding windows."""

    __slots__ = ("days", "denied", "due", "logins")

    def __init__(self) -> None:
        self.days: dict[int, int] = {}
        self.denied: SlidingWindow | None = None
        self.logins: SlidingWindow | None = None
        #: Nothing expires before this watermark (0: look at the next sweep); derived, never dumped.
        self.due = 0


class UnauthorizedAttemptsDetector(Detector[_Attempts, UnauthorizedAttemptsSettings]):
    """Alerts on failed or denied operations on personal data, and on login guessing."""

    name = "unauthorized_attempts"
    actions = None
    results = frozenset({"failure", "denied"})
    tracks_due = True
    settings_type = UnauthorizedAttemptsSettings

    __slots__ = ()

    def wants(self, action: str, result: str, mynumber_ref: bool, location: str | None) -> bool:
        """Failed or denied logins, and failed or denied operations on personal data."""
        return result != "success" and (action == "login" or mynumber_ref)

    def check_settings(self) -> None:
        """Thresholds of at least 1, windows up to 31 days."""
        s = self.settings
        if not 1 <= s.threshold <= _MAX_TIMES:
            raise self.error("threshold", f"must be between 1 and {_MAX_TIMES}")
        if not 1 <= s.login_threshold <= _MAX_TIMES:
            raise self.error("login_threshold", f"must be between 1 and {_MAX_TIMES}")
        if s.window_ms > 31 * DAY_MS:
            raise self.error("window", "must be at most 31d")
        if s.login_window_ms > 31 * DAY_MS:
            raise self.error("login_window", "must be at most 31d")

    def process(self, ev: Event, user: UserState, emit: Emitter) -> None:
        """Count one failed/denied operation."""
        action = ev.action
        if action == "login":
            self._login(ev, user, emit)
            return
        if not ev.mynumber_ref:
            return
        state: _Attempts | None = user.slots[self.index]
        if state is None:
            state = user.slots[self.index] = _Attempts()
            user.wake = 0
        ts = ev.ts_ms
        if action in HIGH_RISK_ACTIONS:
            day = ts - (self.calendar.local_minute(ts) * MINUTE_MS + ts % MINUTE_MS)
            count = state.days[day] = state.days.get(day, 0) + 1
            if day + DAY_MS < state.due:
                state.due = day + DAY_MS
            emit(
                self.rule,
                "denied_high_risk",
                ev,
                day,
                day + DAY_MS,
                count,
                details={"action": action},
                related=_is_denied_high_risk,
            )
        if state.denied is None:
            state.denied = SlidingWindow()
        s = self.settings
        self._slide(state, state.denied, ev, "repeated_denied", s.window_ms, s.threshold, _is_denied_data_op, emit)
        if state.due < user.wake:
            user.wake = state.due

    def _login(self, ev: Event, user: UserState, emit: Emitter) -> None:
        state: _Attempts | None = user.slots[self.index]
        if state is None:
            state = user.slots[self.index] = _Attempts()
            user.wake = 0
        if state.logins is None:
            state.logins = SlidingWindow()
        s = self.settings
        self._slide(state, state.logins, ev, "login_failures", s.login_window_ms, s.login_threshold, _is_failed_login, emit)
        if state.due < user.wake:
            user.wake = state.due

    def _slide(
        self,
        state: _Attempts,
        sliding: SlidingWindow,
        ev: Event,
        reason: str,
        window: int,
        threshold: int,
        related: Callable[[Event], bool],
        emit: Emitter,
    ) -> None:
        ts = ev.ts_ms
        if len(sliding) >= _MAX_TIMES:
            sliding.prune(sliding.times[0])
        sliding.add(ts, window, threshold)
        if sliding.times[0] + window < state.due:
            state.due = sliding.times[0] + window
        # Every fired attempt whose count this one raised (new fires included),
        # so the final counts do not depend on arrival order.
        for t in sorted(t for t in sliding.fired if ts <= t < ts + window):
            start = tumbling_start(t, window, _local_offset_ms(self.calendar.tz, t))
            emit(
                self.rule,
                reason,
                ev,
                start,
                start + window,
                sliding.total(t - window, t),
                details={"threshold": threshold, "window_minutes": window // MINUTE_MS},
                related=related,
            )

    def dump(self, state: _Attempts) -> Any:
        """``{"days": [[day_start, n]...], "denied": window|null, "logins": window|null}``."""
        return {
            "days": [[day, n] for day, n in state.days.items()],
            "denied": None if state.denied is None else state.denied.dump(),
            "logins": None if state.logins is None else state.logins.dump(),
        }

    def load(self, data: Any) -> _Attempts:
        """Inverse of :meth:`dump`."""
        state = _Attempts()
        state.days = {int(day): int(n) for day, n in data["days"]}
        if data["denied"] is not None:
            state.denied = SlidingWindow.load(data["denied"])
        if data["logins"] is not None:
            state.logins = SlidingWindow.load(data["logins"])
        return state

    def expire(self, state: _Attempts, watermark_ms: int) -> _Attempts | None:
        """Forget closed days and attempts older than any open window can need."""
        if state.days:
            state.days = {day: n for day, n in state.days.items() if day + DAY_MS > watermark_ms}
        s = self.settings
        if state.denied is not None:
            state.denied.prune(watermark_ms - s.window_ms)
            if not len(state.denied):
                state.denied = None
        if state.logins is not None:
            state.logins.prune(watermark_ms - s.login_window_ms)
            if not len(state.logins):
                state.logins = None
        if not state.days and state.denied is None and state.logins is None:
            return None
        due = min(state.days) + DAY_MS if state.days else NEVER
        if state.denied is not None:
            due = min(due, state.denied.times[0] + s.window_ms)
        if state.logins is not None:
            due = min(due, state.logins.times[0] + s.login_window_ms)
        state.due = due
        return state
