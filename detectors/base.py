"""What every detector is: settings from its rule, per-user state, ``process``.

A detector is pure and deterministic: it sees events (in event time, maybe
slightly out of order), keeps plain per-user state that it can dump to JSON
and load back, and reports findings through :class:`Emitter`. It never reads
the wall clock and never does I/O.

Writing one::

    @dataclass(frozen=True, slots=True)
    class OffHoursSettings:
        min_events: int = 1

    class OffHoursDetector(Detector[OffHoursState, OffHoursSettings]):
        name = "off_hours"
        actions = LOOKUP_ACTIONS | EXPORT_ACTIONS
        settings_type = OffHoursSettings

        def process(self, ev, user, emit): ...

The engine only calls ``process`` with events the detector declared it wants
(:attr:`Detector.actions`, :attr:`Detector.results`,
:attr:`Detector.needs_mynumber_ref`, :attr:`Detector.outside_business_hours_only`,
or an override of :meth:`Detector.wants`), so the common event costs nothing
in detectors it does not concern.

Expiry: :meth:`Detector.expire` runs at the engine's hourly sweeps. A detector
whose states carry a ``due`` attribute (set :attr:`Detector.tracks_due`) is
only asked once the watermark reaches it: ``due`` must never be later than the
earliest watermark at which ``expire`` would change the state (``0`` always
qualifies: "look at the next sweep"), and ``expire`` sets it afresh. Whenever
``process`` creates a state or lowers its ``due``, it lowers
:attr:`UserState.wake` to match: the engine does not visit a user before it.

Repeats: most events are a user's next personal-data reference from the same
terminal on the same workday, which for some detectors only adds to a count.
Such a detector opts in with :meth:`Detector.repeats` and
:meth:`Detector.repeat`; its handler then returns how many such *repeat*
events the engine may skip before calling it again, and the engine hands it
the count of the skipped ones before anything else reads its state. Handlers
of other detectors return ``None``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Final, Generic, Protocol, TypeVar

from detectors.calendar import BusinessCalendar
from detectors.rules import Rule, RuleError
from schemas.event import Event

__all__ = [
    "DAY_MS",
    "HOUR_MS",
    "MINUTE_MS",
    "NEVER",
    "Detector",
    "Emitter",
    "UserState",
    "parse_duration",
    "settings_from_params",
]

MINUTE_MS: Final = 60_000
HOUR_MS: Final = 60 * MINUTE_MS
DAY_MS: Final = 24 * HOUR_MS

#: A ``due`` time that never comes (nothing in the state can expire).
NEVER: Final = 1 << 62

_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d|w)\s*$")
_UNIT_MS: Final = {"ms": 1, "s": 1000, "m": MINUTE_MS, "h": HOUR_MS, "d": DAY_MS, "w": 7 * DAY_MS}

S = TypeVar("S")
C = TypeVar("C")


def parse_duration(value: Any) -> int:
    """``"10m"``, ``"1h"``, ``"30d"`` (or a number of seconds) to milliseconds."""
    if isinstance(value, bool):
        raise ValueError("must be a duration like '10m', '1h' or '7d'")
    if isinstance(value, int):
        return value * 1000
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return int(match.group(1)) * _UNIT_MS[match.group(2)]
    raise ValueError(f"must be a duration like '10m', '1h' or '7d', got {value!r}")


class UserState:
    """Everything leakwatch keeps about one user: one slot per detector."""

    __slots__ = (
        "alerts",
        "department",
        "epoch",
        "first_ts",
        "last_ts",
        "next_hour",
        "recent",
        "slots",
        "streak_counts",
        "streak_left",
        "streak_lo",
        "streak_terminal",
        "synced",
        "wake",
    )

    def __init__(self, n_detectors: int, recent_events: int = 16) -> None:
        #: Per-detector state, ``None`` until that detector first needs it.
        self.slots: list[Any] = [None] * n_detectors
        #: Newest event time seen for this user.
        self.last_ts = 0
        #: Engine-owned: the next hour boundary of this user's own clock (see ``Engine._own_hour``).
        self.next_hour = 0
        #: Oldest event time seen for this user (observation start; snapshotted).
        self.first_ts = 0
        #: Last department seen (events may omit it).
        self.department: str | None = None
        #: The user's most recent events, for alert evidence (not snapshotted).
        self.recent: deque[Event] = deque(maxlen=recent_events)
        #: Open findings, keyed by (rule id, reason, window start, key); engine-owned.
        self.alerts: dict[tuple[str, str, int, str], Any] = {}
        #: No detector state of this user is due before this watermark (0: at
        #: the next sweep). A detector that creates a state or lowers its
        #: ``due`` lowers this too.
        self.wake = 0
        #: Engine-owned: the engine's hourly sweeps this user's states have seen.
        self.synced = 0
        #: Engine-owned: the engine's epoch at this user's last event (see ``Engine.process``).
        self.epoch = -1
        #: Engine-owned: the terminal and business-hours span of the user's current
        #: run of repeat events (``None``: no run), how many more may be skipped,
        #: and how many were skipped so far, by class of kind (see :meth:`Detector.repeats`).
        self.streak_terminal: str | None = None
        self.streak_lo = 0
        self.streak_left = 0
        self.streak_counts: list[int] = []


class Emitter(Protocol):
    """How a detector reports a finding; the engine turns it into an alert."""

    def __call__(
        self,
        rule: Rule,
        reason: str,
        ev: Event,
        window_start_ms: int,
        window_end_ms: int,
        count: int,
        key: str = "",
        details: Mapping[str, Any] | None = None,
        related: Callable[[Event], bool] | None = None,
    ) -> None:
        """Raise or update the finding (rule, reason, user, window, key).

        ``count`` is the detector's measure for the finding (the engine keeps
        the largest reported); ``related`` picks the user's recent events
        that belong in the evidence.
        """


class Detector(ABC, Generic[S, C]):
    """Base class of all detectors. Subclasses set the class attributes."""

    #: Module/rule name, e.g. ``off_hours``.
    name: ClassVar[str]
    #: Actions this detector wants; ``None`` means every event.
    actions: ClassVar[frozenset[str] | None] = None
    #: Results (``success``, ``failure``, ``denied``) this detector wants; ``None`` means all.
    results: ClassVar[frozenset[str] | None] = None
    #: Only events that reference personal numbers (``mynumber_ref``).
    needs_mynumber_ref: ClassVar[bool] = False
    #: Only events outside business hours (the calendar's: a non-working day, or
    #: outside the hours on a working day). The engine may still pass others.
    outside_business_hours_only: ClassVar[bool] = False
    #: The detector reads :attr:`UserState.first_ts` (observation start): the
    #: engine then keeps a user as long as ``idle_ttl``, even with no state.
    uses_first_ts: ClassVar[bool] = False
    #: The detector's states have a ``due`` attribute (see the module docstring).
    tracks_due: ClassVar[bool] = False
    #: The frozen dataclass its rule's ``params`` are read into.
    settings_type: ClassVar[type[Any]]

    __slots__ = ("calendar", "index", "rule", "settings")

    def __init__(self, rule: Rule, calendar: BusinessCalendar, index: int) -> None:
        self.rule = rule
        self.calendar = calendar
        self.index = index
        self.settings: C = settings_from_params(self.settings_type, rule.params, rule.source)
        self.check_settings()

    def check_settings(self) -> None:
        """Cross-field validation; raise :class:`RuleError` naming the param."""

    def error(self, param: str, reason: str) -> RuleError:
        """A RuleError about one of this rule's params."""
        return RuleError(self.rule.source, f"params.{param}", reason)

    def wants(self, action: str, result: str, mynumber_ref: bool, location: str | None) -> bool:
        """Whether events of this kind go to :meth:`process` (asked once per kind, then cached).

        ``location`` is ``None`` unless it is one of :meth:`locations`. The
        default reads :attr:`actions`, :attr:`results` and :attr:`needs_mynumber_ref`.
        """
        return (
            (self.actions is None or action in self.actions)
            and (self.results is None or result in self.results)
            and (mynumber_ref or not self.needs_mynumber_ref)
        )

    def handler(self, action: str, result: str, mynumber_ref: bool, location: str | None) -> Callable[[Event, UserState, Emitter], int | None] | None:
        """What the engine calls for events of this kind: :meth:`process` if :meth:`wants` them, else nothing.

        A detector may return a narrower method that handles exactly this kind
        of event the way :meth:`process` would, saving it the checks.
        """
        return self.process if self.wants(action, result, mynumber_ref, location) else None

    def repeats(self, action: str, result: str) -> bool:
        """Whether this detector takes part in skipping *repeat* events of this kind (default: no).

        A repeat event of a user is an in-order personal-data (``mynumber_ref``)
        event of a kind every taking part detector allows, within the business
        hours of the same workday as the user's previous event, from the same
        terminal, at no special location (:meth:`locations`), after an event for
        which the handler of every detector taking part returned a positive
        number ``n``, and within the smallest such ``n`` of it. A handler returns
        ``n`` to say that, for this user, the next ``n`` repeat events would
        change nothing but what :meth:`repeat` applies, and raise nothing
        (:data:`NEVER`: no limit). The engine then does not call the detector
        for repeat events; before anything else sees the detector's state (the
        user's next other event, :meth:`expire`, :meth:`dump`), it calls
        :meth:`repeat` with how many of the skipped events were of a kind the
        detector has a handler for. Detectors whose rule has an allowlist do
        not take part.
        """
        return False

    def repeat(self, state: S, count: int, last_ts: int) -> None:
        """Apply ``count`` skipped repeat events, the newest at ``last_ts`` (see :meth:`repeats`)."""

    def locations(self) -> frozenset[str]:
        """Event locations that can change the answer of :meth:`wants` (others are passed as ``None``)."""
        return frozenset()

    @abstractmethod
    def process(self, ev: Event, user: UserState, emit: Emitter) -> int | None:
        """Handle one event of ``user`` (state in ``user.slots[self.index]``).

        Returns ``None``, or a positive number to allow skipping that many repeat events at most (see :meth:`repeats`).
        """

    @abstractmethod
    def dump(self, state: S) -> Any:
        """Per-user state to plain JSON-able data."""

    @abstractmethod
    def load(self, data: Any) -> S:
        """Inverse of :meth:`dump`."""

    def expire(self, state: S, watermark_ms: int) -> S | None:
        """Drop what no window can need any more; ``None`` drops the state.

        With :attr:`tracks_due`, also set the state's ``due`` afresh.
        """
        return state

    def legacy_first_ts(self, data: Any) -> int | None:
        """The observation start kept in an older snapshot layout of this detector's state, if any."""
        return None


def _coerce(source: str, key: str, hint: Any, value: Any) -> Any:
    where = f"params.{key}"
    origin = typing.get_origin(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise RuleError(source, where, "must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RuleError(source, where, f"must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RuleError(source, where, f"must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise RuleError(source, where, f"must be a string, got {value!r}")
        return value
    if origin is frozenset or origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str | int) for v in value):
            raise RuleError(source, where, "must be a list of strings")
        return origin(str(v) for v in value)
    if origin is dict or origin is Mapping:
        if not isinstance(value, dict):
            raise RuleError(source, where, "must be a mapping")
        return {str(k): v for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(source, key, args[0], value)
    raise RuleError(source, where, f"unsupported parameter type {hint!r}")  # pragma: no cover


def settings_from_params(settings_type: type[Any], params: Mapping[str, Any], source: str) -> Any:
    """Build a settings dataclass from a rule's params, rejecting unknown keys.

    A field named ``window_ms`` is set from the param ``window`` given as a
    duration (``"10m"``); every other field from the param of its own name.
    """
    hints = typing.get_type_hints(settings_type)
    by_param: dict[str, dataclasses.Field[Any]] = {}
    for f in dataclasses.fields(settings_type):
        by_param[f.name[:-3] if f.name.endswith("_ms") else f.name] = f
    kwargs: dict[str, Any] = {}
    for key, value in params.items():
        found = by_param.get(key)
        if found is None:
            raise RuleError(source, f"params.{key}", f"unknown parameter (known: {', '.join(sorted(by_param))})")
        f = found
        if f.name.endswith("_ms"):
            try:
                kwargs[f.name] = parse_duration(value)
            except ValueError as exc:
                raise RuleError(source, f"params.{key}", str(exc)) from None
            if kwargs[f.name] <= 0:
                raise RuleError(source, f"params.{key}", "must be a positive duration")
        else:
            kwargs[f.name] = _coerce(source, key, hints[f.name], value)
    return settings_type(**kwargs)
