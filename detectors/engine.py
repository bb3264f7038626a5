"""The detector engine: per-user state, dispatch by action, alerts, snapshots.

One :class:`Engine` holds the state of the users of one partition (or of one
offline run). ``process`` takes events in roughly event-time order: an event
older than its user's newest event by more than ``lateness`` is *late*; it is
not detected on (its windows may be closed) but kept in :attr:`Engine.late`
for the caller to dead-letter or report. Nothing is dropped silently.

Findings become :class:`~schemas.alert.Alert` objects with deterministic ids.
A finding is published when it opens, again each time its count doubles, and
a final time when its window closes if it changed since; so a burst of a
thousand exports is a handful of revisions of one alert, not a thousand.

Windows close and state expires by each user's own clock, less the lateness:
when that clock enters a new hour, and at the partition's hourly sweeps
(:meth:`Engine.sweep`, which follow the newest event and also forget idle
users). So one source whose clock runs ahead of the others cannot hold
anyone else's findings open.

State is plain data: :meth:`Engine.dump_user` / :meth:`Engine.load_user`
round-trip byte for byte, which is what the streaming layer checkpoints.

Hot path: ``process`` runs for every event, so its common case (a known user,
in order, within business hours) is one test each for catching up, the hours
and the kind, and one more for the user's own hour; expiry is deferred to
a user's next touch (:meth:`Engine.sweep`), dirty tracking costs one test per
event (:meth:`Engine.clear_dirty` starts a new *epoch*), and a user's run of *repeat* events skips the detectors that
only count them (:meth:`~detectors.base.Detector.repeats`) until the run ends.
Nothing of this is visible in alerts or snapshots.
"""

from __future__ import annotations

import importlib
from bisect import insort
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import date, tzinfo
from typing import Any, Final

import orjson

from detectors.base import DAY_MS, HOUR_MS, MINUTE_MS, NEVER, Detector, UserState, parse_duration
from detectors.calendar import BusinessCalendar, BusinessHours, parse_hours
from detectors.rules import Rule, RuleError
from schemas.alert import Alert, alert_id_for
from schemas.event import ACTIONS, RESULTS, Event, format_ts

__all__ = [
    "DETECTORS",
    "Engine",
    "EngineSettings",
    "detector_class",
]

#: Detector name -> "module:Class". One module per detector.
DETECTORS: Final = {
    "repeated_queries": "detectors.repeated_queries:RepeatedQueriesDetector",
    "off_hours": "detectors.off_hours:OffHoursDetector",
    "bulk_export": "detectors.bulk_export:BulkExportDetector",
    "usb_writes": "detectors.usb_writes:UsbWritesDetector",
    "unusual_terminal": "detectors.unusual_terminal:UnusualTerminalDetector",
    "unauthorized_attempts": "detectors.unauthorized_attempts:UnauthorizedAttemptsDetector",
    "unusual_operation": "detectors.unusual_operation:UnusualOperationDetector",
}

_SNAPSHOT_VERSION: Final = 1
#: Repeat events skipped in one run at most (so the counts stay small ints).
_MAX_RUN: Final = 255

_Handler = Callable[[Event, UserState, Any], int | None]
_Handlers = tuple[_Handler, ...]


def detector_class(name: str) -> type[Detector[Any, Any]]:
    """The detector class registered under ``name``."""
    target = DETECTORS.get(name)
    if target is None:
        raise KeyError(name)
    module, cls = target.split(":")
    found: type[Detector[Any, Any]] = getattr(importlib.import_module(module), cls)
    return found


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """How the engine runs, apart from what the rules say."""

    #: Out-of-order events up to this much older than their user's newest are handled exactly.
    lateness_ms: int = HOUR_MS
    #: A user with no events for this long (event time) is forgotten.
    idle_ttl_ms: int = 90 * DAY_MS
    #: Event ids kept as evidence per alert.
    max_evidence: int = 20
    #: Recent events kept per user to fill alert evidence.
    recent_events: int = 16
    #: Alerts are never raised while ``seeding`` (learning baselines from history).
    seeding: bool = False
    #: Let detectors skip a user's *repeat* events (see ``Detector.repeats``).
    #: Only speed depends on it: alerts and snapshots are the same either way,
    #: which the tests check by turning it off.
    skip_repeats: bool = True

    @classmethod
    def from_mapping(cls, doc: Mapping[str, Any], source: str = "<settings>") -> EngineSettings:
        """From a config mapping with durations like ``"1h"``."""
        out: dict[str, Any] = {}
        for key, value in doc.items():
            if key in ("lateness", "idle_ttl"):
                try:
                    out[f"{key}_ms"] = parse_duration(value)
                except ValueError as exc:
                    raise RuleError(source, key, str(exc)) from None
            elif key in ("max_evidence", "recent_events"):
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise RuleError(source, key, "must be a positive integer")
                out[key] = value
            else:
                raise RuleError(source, key, "unknown engine setting")
        return cls(**out)


class _Finding:
    """An open alert being accumulated (engine-internal)."""

    __slots__ = (
        "count",
        "department",
        "details",
        "devices",
        "dirty",
        "emitted_count",
        "evidence",
        "first",
        "last",
        "reason",
        "revision",
        "rule",
        "subjects",
        "terminals",
        "window_end",
        "window_start",
    )

    def __init__(self, rule: Rule, reason: str, window_start: int, window_end: int) -> None:
        self.rule = rule
        self.reason = reason
        self.window_start = window_start
        self.window_end = window_end
        self.first = 0
        self.last = 0
        self.count = 0
        #: Evidence rows ``[ts, event_id, action, result, terminal, subject, records, device]``, oldest first.
        self.evidence: list[list[Any]] = []
        self.terminals: set[str] = set()
        self.devices: set[str] = set()
        self.subjects: set[str] = set()
        self.details: dict[str, Any] = {}
        self.department: str | None = None
        self.revision = 0
        self.emitted_count = 0
        self.dirty = False

    def dump(self) -> list[Any]:
        return [
            self.rule.id,
            self.reason,
            self.window_start,
            self.window_end,
            self.first,
            self.last,
            self.count,
            self.evidence,
            sorted(self.terminals),
            sorted(self.devices),
            sorted(self.subjects),
            self.details,
            self.department,
            self.revision,
            self.emitted_count,
            self.dirty,
        ]

    @classmethod
    def load(cls, data: list[Any], rules: Mapping[str, Rule]) -> _Finding:
        f = cls(rules[data[0]], data[1], data[2], data[3])
        f.first, f.last, f.count = data[4], data[5], data[6]
        f.evidence = [list(row) for row in data[7]]
        f.terminals, f.devices, f.subjects = set(data[8]), set(data[9]), set(data[10])
        f.details, f.department = dict(data[11]), data[12]
        f.revision, f.emitted_count, f.dirty = data[13], data[14], data[15]
        return f


def _chain(handlers: _Handlers) -> _Handler | None:
    """``handlers`` as one callable (``None`` if there are none); what they return is dropped."""
    if not handlers:
        return None
    if len(handlers) == 1:
        return handlers[0]

    def chained(ev: Event, user: UserState, emit: Any) -> None:
        for handler in handlers:
            handler(ev, user, emit)

    return chained


def _row(e: Event) -> list[Any]:
    return [e.ts_ms, e.event_id, e.action, e.result, e.terminal, e.subject, e.records, e.device]


def _row_order(row: list[Any]) -> tuple[int, str]:
    return (row[0], row[1])


_ROW_KEYS: Final = ("ts", "event_id", "action", "result", "terminal", "subject", "records", "device")


def _row_dict(row: list[Any], tz: tzinfo) -> dict[str, Any]:
    """An evidence row as published: pseudonymous references only, never raw values."""
    out = {k: v for k, v in zip(_ROW_KEYS, row, strict=True) if v is not None}
    out["ts"] = format_ts(row[0], tz)
    return out


class Engine:
    """Runs the enabled rules' detectors over events, user by user."""

    __slots__ = (
        "_by_action",
        "_by_location",
        "_due_expirers",
        "_emit",
        "_epoch",
        "_hours_hi",
        "_hours_lo",
        "_in_hours",
        "_keep_users",
        "_lateness",
        "_learn_hours",
        "_locations",
        "_n_classes",
        "_n_streakers",
        "_next_sweep",
        "_other_expirers",
        "_recent",
        "_repeat_classes",
        "_repeats",
        "_streakers",
        "_sweep_wm",
        "_sweeps",
        "calendar",
        "detectors",
        "dirty",
        "late",
        "max_ts",
        "out",
        "rules",
        "settings",
        "tz",
        "users",
    )

    def __init__(
        self,
        rules: Iterable[Rule],
        settings: EngineSettings | None = None,
        calendar: BusinessCalendar | None = None,
    ) -> None:
        self.settings = settings or EngineSettings()
        self.rules = {r.id: r for r in rules}
        enabled = [r for r in self.rules.values() if r.enabled]
        self.calendar = calendar or calendar_from_rules(enabled)
        self.tz: tzinfo = self.calendar.tz
        self.detectors: list[Detector[Any, Any]] = []
        for index, rule in enumerate(enabled):
            try:
                cls = detector_class(rule.detector)
            except KeyError:
                raise RuleError(rule.source, "detector", f"no detector named {rule.detector!r} (known: {', '.join(DETECTORS)})") from None
            self.detectors.append(cls(rule, self.calendar, index))
        #: Dispatch tables: action -> result -> (handlers without, with ``mynumber_ref``);
        #: the second for events within business hours.
        self._by_action: dict[str, dict[str, tuple[_Handlers, _Handlers]]] = {}
        self._in_hours: dict[str, dict[str, tuple[_Handlers, _Handlers]]] = {}
        #: Handlers for events at one of the detectors' special locations, by kind.
        self._by_location: dict[tuple[str, str, bool, bool, str], _Handlers] = {}
        self._locations: frozenset[str] = frozenset().union(*(d.locations() for d in self.detectors))
        #: The business-hours span [lo, hi) (epoch ms) of the last workday seen, when
        #: a detector wants only events outside business hours and every
        #: department keeps the same hours; events within it skip such detectors.
        self._hours_lo = self._hours_hi = 0
        #: Detectors that take part in skipping repeat events (see ``Detector.repeats``),
        #: and how many handlers must allow it to start a run of them (-1: never).
        self._streakers = tuple(
            d for d in self.detectors if not d.rule.allowlist and any(d.repeats(a, r) for a in ACTIONS for r in RESULTS)
        )
        self._n_streakers = (len(self._streakers) or -1) if self.settings.skip_repeats else -1
        self._learn_hours = not self.calendar.hours and (
            any(d.outside_business_hours_only for d in self.detectors) or bool(self._streakers)
        )
        for action in ACTIONS:
            for result in RESULTS:
                self._dispatch(action, result)
        #: action -> result -> (the handlers of a repeat event of that kind, without
        #: the detectors taking part, as one callable or ``None``; its class), or
        #: ``None`` if the kind cannot be one. A class is the set of taking part
        #: detectors with a handler for the kind (they count its skipped events);
        #: :attr:`_repeat_classes` lists, per taking part detector, the classes it counts.
        self._repeats: dict[str, dict[str, tuple[_Handler | None, int] | None]] = {}
        skip = frozenset(d.index for d in self._streakers)
        classes: list[frozenset[int]] = []
        for action in ACTIONS:
            for result in RESULTS:
                entry: tuple[_Handler | None, int] | None = None
                if skip and all(d.repeats(action, result) for d in self._streakers):
                    members = frozenset(d.index for d in self._streakers if d.handler(action, result, True, None) is not None)
                    if members not in classes:
                        classes.append(members)
                    entry = (_chain(self._handlers(action, result, True, True, None, skip)), classes.index(members))
                self._repeats.setdefault(action, {})[result] = entry
        self._n_classes = len(classes)
        self._repeat_classes = tuple(
            (d, tuple(c for c, members in enumerate(classes) if d.index in members)) for d in self._streakers
        )
        #: (slot, expire, takes part in repeats) of the detectors that expire state,
        #: for those whose states have a ``due`` and for the others.
        expirers = [d for d in self.detectors if type(d).expire is not Detector.expire]
        self._due_expirers = tuple((d.index, d.expire, d in self._streakers) for d in expirers if d.tracks_due)
        self._other_expirers = tuple((d.index, d.expire, d in self._streakers) for d in expirers if not d.tracks_due)
        self._keep_users = any(d.uses_first_ts for d in self.detectors)
        self._lateness = self.settings.lateness_ms
        #: Hourly sweeps so far, and the watermark of the latest (see :meth:`sweep`).
        self._sweeps = 0
        self._sweep_wm = -NEVER
        #: Bumped by every deferred sweep and :meth:`clear_dirty`: a user whose
        #: ``epoch`` is current is caught up and already in :attr:`dirty`.
        self._epoch = 0
        self._recent = self.settings.recent_events
        self.users: dict[str, UserState] = {}
        #: Users whose state changed since :meth:`clear_dirty` (take it with that method only).
        self.dirty: set[str] = set()
        #: Alerts produced and not yet taken by :meth:`drain`.
        self.out: list[Alert] = []
        #: Events beyond the allowed lateness, not yet taken by :meth:`drain_late`.
        self.late: list[Event] = []
        self.max_ts = 0
        self._next_sweep = 0
        self._emit = self._emit_finding

    @staticmethod
    def _allowlisted(det: Detector[Any, Any], handler: _Handler) -> _Handler:
        """``handler`` behind the rule's allowlist (as is when the allowlist is empty)."""
        allow = det.rule.allowlist
        if not allow:
            return handler
        users, terminals, departments, devices = allow.users, allow.terminals, allow.departments, allow.devices

        def allowlisted(ev: Event, user: UserState, emit: Any) -> None:
            if (
                ev.user in users
                or ev.terminal in terminals
                or (ev.department is not None and ev.department in departments)
                or (ev.device is not None and ev.device in devices)
            ):
                return
            handler(ev, user, emit)

        return allowlisted

    def _dispatch(self, action: str, result: str) -> tuple[_Handlers, _Handlers]:
        """The handlers for events of ``action`` and ``result`` (without, with ``mynumber_ref``); cached.

        Also fills the table used within business hours (:attr:`_in_hours`).
        """
        for in_hours, table in ((False, self._by_action), (True, self._in_hours)):
            table.setdefault(action, {})[result] = (
                self._handlers(action, result, False, in_hours, None),
                self._handlers(action, result, True, in_hours, None),
            )
        return self._by_action[action][result]

    def _handlers(
        self, action: str, result: str, mynumber_ref: bool, in_hours: bool, location: str | None, skip: frozenset[int] = frozenset()
    ) -> _Handlers:
        found: list[_Handler] = []
        for det in self.detectors:
            if (in_hours and det.outside_business_hours_only) or det.index in skip:
                continue
            handler = det.handler(action, result, mynumber_ref, location)
            if handler is not None:
                found.append(self._allowlisted(det, handler))
        return tuple(found)

    def _at_location(self, ev: Event, in_hours: bool, location: str | None) -> _Handlers:
        """The handlers for an event at one of the special locations; cached."""
        key = (ev.action, ev.result, ev.mynumber_ref, in_hours, location or "")
        found = self._by_location.get(key)
        if found is None:
            found = self._by_location[key] = self._handlers(ev.action, ev.result, ev.mynumber_ref, in_hours, location)
        return found

    def _within_hours(self, ts: int) -> bool:
        """Whether ``ts`` is within business hours (on a miss of the cached span); learns the span."""
        cal = self.calendar
        if not cal.classify(ts)[1]:
            return False
        hours = cal.default
        minute = cal.local_minute(ts)
        minute_start = ts - ts % MINUTE_MS
        lo = minute_start - (minute - hours.start) * MINUTE_MS
        hi = minute_start + (hours.end - minute) * MINUTE_MS
        # Only a span through which local time runs evenly (no change of UTC offset).
        if cal.local_minute(lo) == hours.start and cal.local_minute(hi - 1) == hours.end - 1 and cal.local_day(lo) == cal.local_day(hi - 1):
            self._hours_lo, self._hours_hi = lo, hi
        return True

    # -- processing ---------------------------------------------------------

    def process(self, ev: Event) -> None:
        """Run every interested detector on one event.

        Within the business hours of the last workday seen, a user's *repeat*
        events (see :meth:`Detector.repeats`) skip the detectors taking part,
        which catch up when the run ends (:meth:`_end_streak`); other events
        there go to every interested detector, which may start a run; events
        outside them, or at a special location, end any run.
        """
        ts = ev.ts_ms
        try:
            user = self.users[ev.user]
        except KeyError:
            user = self._new_user(ev)
        # The common case in one test: in order, nothing to catch up on.
        if user.epoch != self._epoch or ts < user.last_ts:
            if self._admit(ev, user) is None:
                return
        else:
            user.last_ts = ts
        department = ev.department
        if department is not None:
            user.department = department
        lo = self._hours_lo
        if lo <= ts < self._hours_hi and ev.location not in self._locations:
            # Within the business hours of the last workday seen, at no special location.
            if ev.terminal == user.streak_terminal and user.streak_lo == lo and ev.mynumber_ref:
                # A repeat event (see ``Detector.repeats``), if its kind can be one and the run may go on.
                try:
                    entry = self._repeats[ev.action][ev.result]
                except KeyError:
                    entry = None
                left = user.streak_left
                if entry is not None and left:
                    user.streak_left = left - 1
                    user.streak_counts[entry[1]] += 1
                    user.recent.append(ev)
                    run = entry[0]
                    if run is not None:
                        run(ev, user, self._emit)
                    if ts >= user.next_hour:
                        self._own_hour(ev.user, user, ts)
                    if ts > self.max_ts:
                        self.max_ts = ts
                        if ts >= self._next_sweep:
                            self.sweep()
                    return
            if user.streak_terminal is not None:
                self._end_streak(user)
            try:
                handlers = self._in_hours[ev.action][ev.result][ev.mynumber_ref]
            except KeyError:
                handlers = self._lookup_handlers(ev)
            user.recent.append(ev)
            emit = self._emit
            consents = 0
            budget = NEVER
            for handler in handlers:
                allowed = handler(ev, user, emit)
                if allowed:
                    consents += 1
                    if allowed < budget:
                        budget = allowed
            if consents == self._n_streakers:
                self._start_streak(ev, user, lo, budget)
        else:
            if user.streak_terminal is not None:
                self._end_streak(user)
            handlers = self._lookup_handlers(ev)
            user.recent.append(ev)
            emit = self._emit
            for handler in handlers:
                handler(ev, user, emit)
        if ts >= user.next_hour:
            self._own_hour(ev.user, user, ts)
        if ts > self.max_ts:
            self.max_ts = ts
            if ts >= self._next_sweep:
                self.sweep()

    def _own_hour(self, name: str, user: UserState, ts: int) -> None:
        """``name``'s own clock entered a new hour: close its findings and expire its states by that clock.

        The partition's hourly sweeps (:meth:`sweep`) do the same for every
        user, bounded by each user's own clock, but they follow the newest
        event of the partition: one source ahead of the others (a PC set to
        the wrong time zone, one source of a replay days ahead) holds them
        back until everyone catches up. Each user's own hours cannot be held
        back by anyone else's clock; forgetting idle users stays with the sweeps.
        """
        user.next_hour = (ts // HOUR_MS + 1) * HOUR_MS
        mark = user.last_ts - self._lateness
        if user.alerts:
            self._close_findings(name, user, mark)
        if user.wake <= mark:
            self._expire(user, mark)

    def _start_streak(self, ev: Event, user: UserState, lo: int, budget: int) -> None:
        """Every detector taking part allowed ``budget`` repeats: the user's next events like ``ev`` are repeats."""
        if ev.mynumber_ref and self._repeats.get(ev.action, {}).get(ev.result) is not None:
            user.streak_terminal = ev.terminal
            user.streak_lo = lo
            user.streak_left = budget if budget < _MAX_RUN else _MAX_RUN
            if not user.streak_counts:
                user.streak_counts = [0] * self._n_classes

    def _end_streak(self, user: UserState) -> None:
        """End ``user``'s run of repeat events: the detectors taking part apply the ones skipped.

        Called before anything else sees their states; the newest event in
        ``user.recent`` is then the last one skipped.
        """
        user.streak_terminal = None
        counts = user.streak_counts
        if any(counts):
            last_ts = user.recent[-1].ts_ms
            slots = user.slots
            for det, classes in self._repeat_classes:
                count = 0
                for c in classes:
                    count += counts[c]
                det.repeat(slots[det.index], count, last_ts)
            for c in range(len(counts)):
                counts[c] = 0

    def _new_user(self, ev: Event) -> UserState:
        """The state of a user first seen with ``ev`` (:meth:`process` then admits the event)."""
        user = self.users[ev.user] = UserState(len(self.detectors), self._recent)
        user.first_ts = user.last_ts = ev.ts_ms
        user.next_hour = (ev.ts_ms // HOUR_MS + 1) * HOUR_MS
        user.synced = self._sweeps
        return user

    def _admit(self, ev: Event, user: UserState) -> UserState | None:
        """:meth:`process` for a user with a sweep or checkpoint since its last event (or new), or out of order.

        Returns ``user``, or ``None`` for a late event (set aside in :attr:`late`).
        """
        ts = ev.ts_ms
        if user.streak_terminal is not None and ts < user.last_ts:
            self._end_streak(user)  # out of order: not a repeat
        if user.synced != self._sweeps:
            self._catch_up(user)
        if ts >= user.last_ts:
            user.last_ts = ts
        elif ts < user.last_ts - self._lateness:
            self.late.append(ev)
            return None
        elif ts < user.first_ts:
            user.first_ts = ts
        if user.epoch != self._epoch:
            user.epoch = self._epoch
            self.dirty.add(ev.user)
        return user

    def _lookup_handlers(self, ev: Event) -> _Handlers:
        """The handlers for ``ev`` off the fast path: outside the cached business-hours span, at a special location, or a new kind."""
        ts = ev.ts_ms
        in_hours = self._hours_lo <= ts < self._hours_hi or (self._learn_hours and self._within_hours(ts))
        table = self._in_hours if in_hours else self._by_action
        try:
            handlers = table[ev.action][ev.result][ev.mynumber_ref]
        except KeyError:
            self._dispatch(ev.action, ev.result)
            handlers = table[ev.action][ev.result][ev.mynumber_ref]
        location = ev.location
        if location in self._locations:
            handlers = self._at_location(ev, in_hours, location)
        return handlers

    def process_all(self, events: Iterable[Event]) -> list[Alert]:
        """Process events and return the alerts they produced."""
        process = self.process
        for ev in events:
            process(ev)
        return self.drain()

    def drain(self) -> list[Alert]:
        """Take the alerts produced so far."""
        out, self.out = self.out, []
        return out

    def drain_late(self) -> list[Event]:
        """Take the late events set aside so far."""
        late, self.late = self.late, []
        return late

    def _emit_finding(
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
        if self.settings.seeding:
            return
        user = self.users[ev.user]
        akey = (rule.id, reason, window_start_ms, key)
        finding = user.alerts.get(akey)
        new = finding is None
        if finding is None:
            finding = user.alerts[akey] = _Finding(rule, reason, window_start_ms, window_end_ms)
            finding.first = ev.ts_ms
        ts = ev.ts_ms
        if ts < finding.first:
            finding.first = ts
        if ts > finding.last:
            finding.last = ts
        if count > finding.count:
            finding.count = count
        if ev.department is not None:
            finding.department = ev.department
        elif finding.department is None:
            finding.department = user.department
        changed = new
        if details:
            for k, v in details.items():
                if finding.details.get(k) != v:
                    finding.details[k] = v
                    changed = True
        evidence = [ev] if related is None else [e for e in user.recent if e is ev or (window_start_ms <= e.ts_ms < window_end_ms and related(e))]
        if not any(e is ev for e in evidence):
            evidence.append(ev)
        limit = self.settings.max_evidence
        # Rows are kept sorted by (ts, event id) and cut to the earliest ``limit``;
        # this runs on every update of an open finding, so skip rows already
        # there (or that would be cut at once) without scanning or re-sorting.
        rows = finding.evidence
        have = {(r[0], r[1]) for r in rows}
        for e in evidence:
            row_key = (e.ts_ms, e.event_id)
            if row_key not in have:
                have.add(row_key)
                if len(rows) != limit or row_key < (rows[-1][0], rows[-1][1]):
                    insort(rows, _row(e), key=_row_order)
                    del rows[limit:]
            if len(finding.terminals) < limit:
                finding.terminals.add(e.terminal)
            if e.device is not None and len(finding.devices) < limit:
                finding.devices.add(e.device)
            if e.subject is not None and len(finding.subjects) < limit:
                finding.subjects.add(e.subject)
        finding.dirty = True
        if changed or finding.count >= 2 * max(finding.emitted_count, 1):
            self._publish(ev.user, akey, finding)

    def _publish(self, user: str, akey: tuple[str, str, int, str], finding: _Finding) -> None:
        rule = finding.rule
        reason = rule.reason(finding.reason)
        finding.revision += 1
        finding.emitted_count = finding.count
        finding.dirty = False
        tz = self.tz
        self.out.append(
            Alert(
                alert_id=alert_id_for(rule.id, finding.reason, user, finding.window_start, akey[3]),
                rule_id=rule.id,
                reason=finding.reason,
                title=reason.title,
                title_en=reason.title_en,
                severity=reason.level,
                viewpoint=rule.viewpoint,
                user=user,
                department=finding.department,
                first_ts=format_ts(finding.first, tz),
                last_ts=format_ts(finding.last, tz),
                window_start=format_ts(finding.window_start, tz),
                window_end=format_ts(finding.window_end, tz),
                count=finding.count,
                revision=finding.revision,
                tags=rule.tags,
                event_ids=tuple(r[1] for r in finding.evidence),
                terminals=tuple(sorted(finding.terminals)),
                devices=tuple(sorted(finding.devices)),
                subjects=tuple(sorted(finding.subjects)),
                details={
                    **finding.details,
                    "events": [_row_dict(r, tz) for r in finding.evidence],
                    "timeline": [_row_dict(_row(e), tz) for e in self.users[user].recent] if user in self.users else [],
                },
                last_ts_ms=finding.last,
            )
        )

    # -- time ---------------------------------------------------------------

    def sweep(self, watermark_ms: int | None = None) -> None:
        """Close finished windows, expire old state and idle users.

        Called by :meth:`process` once per event-time hour; the streaming
        layer may call it with an explicit watermark (e.g. on idle partitions).

        Expiring detector state is deferred where that cannot be told apart:
        an hourly sweep closes findings and forgets idle users at once, but
        leaves a user's detector states as they are until the user is next
        touched (its next event, :meth:`dump_user`, an explicit sweep), which
        then expires them by the mark that sweep would have used. The states
        are touched while hot in the cache instead of all at once, and a user
        with nothing due (``UserState.wake``) costs nothing at all.
        """
        explicit = watermark_ms is not None
        if watermark_ms is None:
            watermark_ms = self.max_ts - self.settings.lateness_ms
        self._next_sweep = (self.max_ts // HOUR_MS + 1) * HOUR_MS
        idle_before = watermark_ms - self.settings.idle_ttl_ms
        lateness = self.settings.lateness_ms
        keep = self._keep_users
        deferred = not explicit and keep
        if deferred:
            self._sweeps += 1
            self._sweep_wm = watermark_ms
            self._epoch += 1
        gone: list[str] = []
        idle: list[str] = []
        # The two newest users' clocks (see below).
        newest = second = -NEVER
        for name, user in self.users.items():
            last = user.last_ts
            if last > second:
                if last > newest:
                    newest, second = last, newest
                else:
                    second = last
            if user.alerts:
                # Lateness is per user (one shipper may lag behind the others), so
                # event-driven sweeps close a user's windows by that user's own
                # watermark; an explicit watermark (time has passed) applies to all.
                user_mark = watermark_ms if explicit or watermark_ms < last - lateness else last - lateness
                self._close_findings(name, user, user_mark)
            if not deferred:
                if user.synced != self._sweeps:
                    self._catch_up(user)
                user_mark = watermark_ms if explicit or watermark_ms < last - lateness else last - lateness
                if user.wake <= user_mark:
                    self._expire(user, user_mark)
            if last < idle_before:
                idle.append(name)
            elif not keep and not user.alerts and last < watermark_ms and all(s is None for s in user.slots):
                gone.append(name)  # nothing left to keep
        if idle and not explicit:
            # Idle users are forgotten only when at least two users' clocks say
            # the time has passed: one event with a wrong clock (a PC set years
            # ahead, a forged log line) moves the watermark, but must not wipe
            # every other user's windows and baselines.
            before = second - lateness - self.settings.idle_ttl_ms
            idle = [name for name in idle if self.users[name].last_ts < before]
        gone += idle
        for name in gone:
            del self.users[name]
            self.dirty.add(name)

    def _catch_up(self, user: UserState) -> None:
        """Expire ``user``'s states as the hourly sweeps since it was last touched would have."""
        user.synced = self._sweeps
        # The user's last event is older than those sweeps: the latest one's mark covers them all.
        mark = min(self._sweep_wm, user.last_ts - self._lateness)
        if user.wake <= mark:
            self._expire(user, mark)

    def _expire(self, user: UserState, mark: int) -> None:
        """Expire the detector states due by ``mark``; note when the next one is (``user.wake``).

        A run of repeat events ends first if the state of a detector taking part is to expire.
        """
        slots = user.slots
        wake = NEVER
        for index, expire, streaker in self._due_expirers:
            state = slots[index]
            if state is not None:
                due = state.due
                if due <= mark:
                    if streaker and user.streak_terminal is not None:
                        self._end_streak(user)
                    state = slots[index] = expire(state, mark)
                    if state is None:
                        continue
                    due = state.due
                if due < wake:
                    wake = due
        for index, expire, streaker in self._other_expirers:
            state = slots[index]
            if state is not None:
                if streaker and user.streak_terminal is not None:
                    self._end_streak(user)
                state = slots[index] = expire(state, mark)
                if state is not None:
                    wake = 0
        user.wake = wake

    def _close_findings(self, name: str, user: UserState, watermark_ms: int) -> None:
        closed = [k for k, f in user.alerts.items() if f.window_end <= watermark_ms]
        for akey in closed:
            finding = user.alerts.pop(akey)
            if finding.dirty and finding.count != finding.emitted_count:
                self._publish(name, akey, finding)
            self.dirty.add(name)

    def flush(self) -> list[Alert]:
        """End of input (offline runs): publish every open finding's last changes."""
        for name, user in self.users.items():
            for akey, finding in user.alerts.items():
                if finding.dirty and finding.count != finding.emitted_count:
                    self._publish(name, akey, finding)
        return self.drain()

    # -- state --------------------------------------------------------------

    def dump_user(self, name: str) -> bytes | None:
        """One user's state as canonical JSON bytes; ``None`` if not tracked."""
        user = self.users.get(name)
        if user is None:
            return None
        if user.streak_terminal is not None:
            self._end_streak(user)
        if user.synced != self._sweeps:
            self._catch_up(user)
        doc = {
            "v": _SNAPSHOT_VERSION,
            "first": user.first_ts,
            "last": user.last_ts,
            "dep": user.department,
            "s": {det.rule.id: det.dump(user.slots[det.index]) for det in self.detectors if user.slots[det.index] is not None},
            "a": [[list(k), f.dump()] for k, f in sorted(user.alerts.items())],
        }
        return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)

    def load_user(self, name: str, data: bytes | None) -> None:
        """Restore one user's state from :meth:`dump_user` (``None`` forgets the user)."""
        if data is None:
            self.users.pop(name, None)
            return
        doc = orjson.loads(data)
        if doc.get("v") != _SNAPSHOT_VERSION:
            raise ValueError(f"unsupported snapshot version {doc.get('v')!r}")
        user = UserState(len(self.detectors), self._recent)
        user.last_ts = doc["last"]
        user.next_hour = (user.last_ts // HOUR_MS + 1) * HOUR_MS
        user.department = doc["dep"]
        states = doc["s"]
        first = doc.get("first")
        for det in self.detectors:
            if det.rule.id in states:
                data_ = states[det.rule.id]
                if first is None:
                    first = det.legacy_first_ts(data_)  # snapshots written before "first" existed
                user.slots[det.index] = det.load(data_)
        user.first_ts = int(first) if first is not None else user.last_ts
        for key, data_ in doc["a"]:
            if key[0] in self.rules:
                user.alerts[(key[0], key[1], int(key[2]), key[3])] = _Finding.load(data_, self.rules)
        user.synced = self._sweeps
        self.users[name] = user
        if user.last_ts > self.max_ts:
            self.max_ts = user.last_ts
            self._next_sweep = (self.max_ts // HOUR_MS + 1) * HOUR_MS

    def snapshot(self) -> bytes:
        """All state as one canonical JSON document."""
        users = {name: orjson.Fragment(self.dump_user(name) or b"null") for name in sorted(self.users)}
        return orjson.dumps({"v": _SNAPSHOT_VERSION, "max_ts": self.max_ts, "users": users}, option=orjson.OPT_SORT_KEYS)

    def restore(self, data: bytes) -> None:
        """Replace all state with a :meth:`snapshot`."""
        doc = orjson.loads(data)
        self.users.clear()
        for name, user_doc in doc["users"].items():
            self.load_user(name, orjson.dumps(user_doc))
        self.max_ts = doc["max_ts"]
        self._next_sweep = (self.max_ts // HOUR_MS + 1) * HOUR_MS

    def clear_dirty(self) -> set[str]:
        """Take the set of users changed since the last call (for checkpoints)."""
        dirty, self.dirty = self.dirty, set()
        self._epoch += 1
        return dirty

    def seed(self, events: Iterable[Event]) -> int:
        """Learn baselines from history without raising alerts; returns the count."""
        saved = self.settings
        self.settings = replace(saved, seeding=True)
        count = 0
        try:
            for ev in events:
                self.process(ev)
                count += 1
        finally:
            self.settings = saved
        self.out.clear()
        return count


def calendar_from_rules(rules: Iterable[Rule]) -> BusinessCalendar:
    """The business calendar configured in the ``off_hours`` rule's params (or defaults)."""
    from zoneinfo import ZoneInfo

    for rule in rules:
        if rule.detector != "off_hours":
            continue
        params = rule.params
        hours_doc = params.get("business_hours") or {}
        try:
            default = parse_hours(str(hours_doc.get("default", "08:30-17:15")))
            hours: dict[str, BusinessHours] = {
                str(k): parse_hours(str(v)) for k, v in hours_doc.items() if k != "default"
            }
            tz = ZoneInfo(str(params.get("timezone", "Asia/Tokyo")))
        except ValueError as exc:
            raise RuleError(rule.source, "params.business_hours", str(exc)) from None
        except Exception as exc:  # zoneinfo raises its own error types
            raise RuleError(rule.source, "params.timezone", f"unknown time zone: {exc}") from None
        extra = frozenset(date.fromisoformat(str(d)) for d in params.get("extra_holidays") or ())
        return BusinessCalendar(tz=tz, default=default, hours=hours, year_end_closure=bool(params.get("year_end_closure", True)), extra_holidays=extra)
    return BusinessCalendar()
