"""Test helpers shipped with leakwatch: build events, run one rule, compare alerts.

Used by leakwatch's own tests and by agencies testing their overrides::

    from detectors.testing import event, run_rule
    alerts = run_rule("off_hours", [event("2019-02-02T22:11:03+09:00", action="search")])
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson

from detectors.engine import Engine, EngineSettings
from detectors.rules import DEFAULT_RULES_DIR, Rule, apply_overrides, load_rule_file, load_rules
from schemas.alert import Alert
from schemas.event import Event, parse_ts

__all__ = ["event", "final_alerts", "load_samples", "make_engine", "rule", "run_rule"]

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


def _dumps(alerts: Iterable[Alert]) -> bytes:  # pragma: no cover - debugging aid
    return b"\n".join(orjson.dumps(a.to_dict()) for a in alerts)
