"""Test helpers shipped with leakwatch: build events, run one rule, compare alerts.

Used by leakwatch's own tests and by agencies testing their overrides::

    from detectors.testing import event, run_rule
    alerts = run_rule("off_hours", [event("2019-02-02T22:11:03+09:00", action="search")])

Besides building and running, it holds the checks every detector must pass,
so that each detector's tests keep only their own cases:

* :func:`assert_order_invariant`: events arriving out of order (within the
  engine's lateness) give the same final alerts as in time order;
* :func:`assert_resumes`: a snapshot taken mid-stream and restored into a new
  engine gives the same later alerts as never stopping;
* :func:`assert_state_round_trip`: a detector's state survives JSON and
  ``dump(load(x)) == x``, and its user's snapshot restores byte-identically;
* :func:`rule_error`: the :class:`~detectors.rules.RuleError` that bad params raise;
* :func:`sample_alerts`: the final alerts of one rule over a samples file.

The checks raise :class:`AssertionError` with what differed, so they work
in any test runner.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from detectors.base import MINUTE_MS
from detectors.engine import Engine, EngineSettings
from detectors.rules import (
    DEFAULT_RULES_DIR,
    Rule,
    RuleError,
    apply_overrides,
    load_rule_file,
    load_rules,
)
from schemas.alert import Alert
from schemas.event import Event, parse_ts

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

__all__ = [
    "Revision",
    "Summary",
    "arrival_order",
    "assert_order_invariant",
    "assert_resumes",
    "assert_state_round_trip",
    "event",
    "final_alerts",
    "lateness_jitter",
    "load_samples",
    "make_engine",
    "reason_counts",
    "revisions",
    "rule",
    "rule_error",
    "run_rule",
    "sample_alerts",
    "split_run",
    "summary",
]

#: A final alert in brief: (reason, count, severity).
Summary = tuple[str, int, str]
#: One published alert revision in brief: (alert_id, revision, count).
Revision = tuple[str, int, int]

_ids = itertools.count(1)


def event(
    ts: str,
    *,
    user: str = "u001",
    terminal: str = "10.0.0.1",
    action: str = "search",
    result: str = "success",
    mynumber_ref: bool = True,
    event_id: str | None = None,
    **optional: Any,
) -> Event:
    """An :class:`Event` with sensible defaults; ``ts`` is RFC 3339 with offset."""
    return Event(
        event_id or f"e{next(_ids):06d}",
        parse_ts(ts),
        user,
        terminal,
        action,
        result,
        mynumber_ref,
        **optional,
    )


def rule(name: str, overrides: Mapping[str, Any] | None = None) -> Rule:
    """A bundled rule by id, with optional overrides (``{"params": {...}}`` etc.)."""
    loaded = load_rule_file(DEFAULT_RULES_DIR / f"{name}.yml")
    if overrides:
        (loaded,) = apply_overrides([loaded], {name: dict(overrides)})
    return loaded


def make_engine(rules: Iterable[Rule] | None = None, **settings: Any) -> Engine:
    """An engine over the given rules (default: every bundled rule)."""
    return Engine(list(rules) if rules is not None else load_rules(), EngineSettings(**settings))


def run_rule(
    name: str,
    events: Iterable[Event],
    overrides: Mapping[str, Any] | None = None,
    history: Iterable[Event] = (),
    **settings: Any,
) -> list[Alert]:
    """Run one bundled rule over events (after seeding ``history``); all alerts incl. final ones."""
    engine = make_engine([rule(name, overrides)], **settings)
    engine.seed(history)
    out = engine.process_all(events)
    return out + engine.flush()


def final_alerts(alerts: Iterable[Alert]) -> dict[str, Alert]:
    """The newest revision of each alert, by ``alert_id``."""
    latest: dict[str, Alert] = {}
    for alert in alerts:
        seen = latest.get(alert.alert_id)
        if seen is None or alert.revision > seen.revision:
            latest[alert.alert_id] = alert
    return latest


def load_samples(path: Path) -> list[Event]:
    """Events from a JSONL samples file in canonical form."""
    from schemas.event import EventCodec
    from schemas.mynumber import Pseudonymizer

    codec = EventCodec(Pseudonymizer(b"leakwatch-test-key-0000"))
    events: list[Event] = []
    for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        decoded, errors = codec.decode(line)
        if errors:
            raise ValueError(f"{path}:{lineno}: {errors[0]}")
        events.extend(decoded)
    return events


def sample_alerts(name: str, path: Path, overrides: Mapping[str, Any] | None = None) -> dict[str, Alert]:
    """The final alerts (by ``alert_id``) of one bundled rule over a JSONL samples file."""
    return final_alerts(run_rule(name, load_samples(path), overrides))


# -- comparing alerts -------------------------------------------------------


def summary(alerts: Iterable[Alert]) -> dict[str, Summary]:
    """``alert_id`` -> (reason, count, severity) of each alert's newest revision."""
    return {k: (a.reason, a.count, a.severity) for k, a in final_alerts(alerts).items()}


def reason_counts(alerts: Iterable[Alert]) -> list[tuple[str, int]]:
    """The final alerts as sorted (reason, count) pairs."""
    return sorted((a.reason, a.count) for a in final_alerts(alerts).values())


def revisions(alerts: Iterable[Alert]) -> list[Revision]:
    """(alert_id, revision, count) of every published alert, in publication order."""
    return [(a.alert_id, a.revision, a.count) for a in alerts]


# -- arrival order ----------------------------------------------------------


def arrival_order(events: Sequence[Event], delays_ms: Sequence[int]) -> list[Event]:
    """``events`` in the order they arrive when each is delayed by its entry in ``delays_ms``.

    Events without a delay (``delays_ms`` shorter than ``events``) arrive on
    time; ties go by event time, then ``event_id``. Delays up to the engine's
    lateness reorder events without making any of them late.
    """
    if any(d < 0 for d in delays_ms):
        raise ValueError("delays must not be negative")
    delays = list(delays_ms[: len(events)]) + [0] * (len(events) - len(delays_ms))
    keyed = sorted(zip(events, delays, strict=True), key=lambda p: (p[0].ts_ms + p[1], p[0].ts_ms, p[0].event_id))
    return [e for e, _ in keyed]


def lateness_jitter(lateness_minutes: int = 60) -> SearchStrategy[int]:
    """A hypothesis strategy of arrival delays in ms: whole minutes up to the lateness, often the extremes (so events swap).

    Needs ``hypothesis`` (a development dependency), imported only when called.
    """
    from hypothesis import strategies as st

    minutes = st.sampled_from((0, lateness_minutes)) | st.integers(0, lateness_minutes)
    return minutes.map(lambda m: m * MINUTE_MS)


def assert_order_invariant(
    name: str,
    events: Iterable[Event],
    delays_ms: Sequence[int],
    overrides: Mapping[str, Any] | None = None,
    history: Sequence[Event] = (),
    **settings: Any,
) -> dict[str, Summary]:
    """Check that ``events`` in :func:`arrival_order` give the same final alerts as in time order.

    Both runs seed the same ``history``. Compares :func:`summary` (ids,
    reasons, counts, severities) and returns the time-ordered run's, so the
    caller can check it further.
    """
    in_order = sorted(events, key=lambda e: e.ts_ms)
    shuffled = arrival_order(in_order, delays_ms)
    expected = summary(run_rule(name, in_order, overrides, history, **settings))
    got = summary(run_rule(name, shuffled, overrides, history, **settings))
    if got != expected:
        arrival = [e.event_id for e in shuffled]
        raise AssertionError(f"{name}: arrival order {arrival} gave {got}, time order gave {expected}")
    return expected


# -- snapshots --------------------------------------------------------------


def _fresh(engine: Engine) -> Engine:
    """A new engine over the same rules, settings and calendar."""
    return Engine(engine.rules.values(), engine.settings, engine.calendar)


def split_run(
    name: str,
    events: Sequence[Event],
    k: int,
    overrides: Mapping[str, Any] | None = None,
    history: Iterable[Event] = (),
    **settings: Any,
) -> tuple[list[Alert], list[Alert]]:
    """Alerts after event ``k``: (continuing, resumed after dump/load of every user into a new engine).

    Both engines seed ``history`` and process ``events[:k]``. Raises
    :class:`AssertionError` if a restored user does not dump back byte-identical.
    """
    seeded = list(history)
    whole = make_engine([rule(name, overrides)], **settings)
    whole.seed(seeded)
    whole.process_all(events[:k])
    continued = whole.process_all(events[k:]) + whole.flush()
    first = make_engine([rule(name, overrides)], **settings)
    first.seed(seeded)
    first.process_all(events[:k])
    second = _fresh(first)
    for user in first.users:
        data = first.dump_user(user)
        second.load_user(user, data)
        if second.dump_user(user) != data:
            raise AssertionError(f"{name}: user {user!r} does not restore byte-identically")
    resumed = second.process_all(events[k:]) + second.flush()
    return continued, resumed


def assert_resumes(
    name: str,
    events: Sequence[Event],
    k: int,
    overrides: Mapping[str, Any] | None = None,
    history: Iterable[Event] = (),
    *,
    ordered: bool = True,
    **settings: Any,
) -> list[Alert]:
    """Check that a snapshot after event ``k`` resumes with the same later alerts; return them.

    Compares every published revision (:func:`revisions`), in publication
    order unless ``ordered`` is false (at :meth:`Engine.flush`, findings
    are published in dict order, which a restore may change), and the final
    :func:`summary`. See :func:`split_run`.
    """
    continued, resumed = split_run(name, events, k, overrides, history, **settings)
    want, got = revisions(continued), revisions(resumed)
    if not ordered:
        want, got = sorted(want), sorted(got)
    if got != want:
        raise AssertionError(f"{name}: resumed after event {k}: {got}, never stopped: {want}")
    if summary(resumed) != summary(continued):
        raise AssertionError(f"{name}: resumed after event {k}: {summary(resumed)}, never stopped: {summary(continued)}")
    return continued


def assert_state_round_trip(engine: Engine, user: str = "u001", index: int = 0) -> Any:
    """Check one detector's state of ``user`` round-trips; return it as JSON data.

    The state dumped through JSON loads back and dumps to the same data, and
    the user's whole snapshot restores byte-identically into a new engine
    over the same rules.
    """
    detector = engine.detectors[index]
    state = engine.users[user].slots[index]
    if state is None:
        raise AssertionError(f"{detector.rule.id}: no state for user {user!r}")
    data = orjson.loads(orjson.dumps(detector.dump(state)))
    again = orjson.loads(orjson.dumps(detector.dump(detector.load(data))))
    if again != data:
        raise AssertionError(f"{detector.rule.id}: dump(load(x)) gave {again!r} for {data!r}")
    snapshot = engine.dump_user(user)
    other = _fresh(engine)
    other.load_user(user, snapshot)
    if other.dump_user(user) != snapshot:
        raise AssertionError(f"{detector.rule.id}: user {user!r} does not restore byte-identically")
    return data


# -- rule errors ------------------------------------------------------------


def rule_error(name: str, params: Mapping[str, Any]) -> RuleError:
    """The :class:`RuleError` raised when one bundled rule is built with ``params`` overridden.

    Raises :class:`AssertionError` if the params are accepted.
    """
    try:
        make_engine([rule(name, {"params": dict(params)})])
    except RuleError as exc:
        return exc
    raise AssertionError(f"{name}: params {dict(params)!r} were accepted")


def _dumps(alerts: Iterable[Alert]) -> bytes:  # pragma: no cover - debugging aid
    return b"\n".join(orjson.dumps(a.to_dict()) for a in alerts)
