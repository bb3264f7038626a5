"""The alert contract: what detectors publish to ``leak-alerts``.

An alert is one finding of one rule about one user in one window. Its
``alert_id`` is derived from (rule, reason, user, window, key) only, so
reprocessing the same events, after a restart or a rebalance, yields the same
id; later versions of the same finding carry a higher ``revision``.

Alerts never carry a personal number or a resident's name: records are
referred to by the pseudonymous ``subject`` tokens of the events.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

__all__ = [
    "ALERT_SCHEMA_VERSION",
    "SEVERITIES",
    "SEVERITY_RANK",
    "Alert",
    "alert_id_for",
    "grouped_hex",
]

ALERT_SCHEMA_VERSION: Final = 1
SEVERITIES: Final = ("low", "medium", "high", "critical")
SEVERITY_RANK: Final = {name: rank for rank, name in enumerate(SEVERITIES)}


def alert_id_for(rule_id: str, reason: str, user: str, window_start_ms: int, key: str = "") -> str:
    """The deterministic id of a finding: same inputs, same id, everywhere."""
    material = "\x1f".join((rule_id, reason, user, str(window_start_ms), key))
    digest = hashlib.sha256(material.encode("utf-8")).hexdigest()
    return "lw-" + grouped_hex(digest[:24])


def grouped_hex(digits: str) -> str:
    """Hex digits in dash-separated groups of 8.

    A run of 12 decimal digits (which every leak check rightly flags) can
    never appear by chance in an id written this way: plain hex of 16 or more
    digits has one now and then (``secrets.token_hex(8)`` about 2 % of the time).
    """
    return "-".join(digits[i : i + 8] for i in range(0, len(digits), 8))


@dataclass(slots=True)
class Alert:
    """One finding; ``to_dict`` is the JSON published on ``leak-alerts``."""

    alert_id: str
    rule_id: str
    reason: str
    title: str
    title_en: str
    severity: str
    viewpoint: str
    user: str
    first_ts: str
    last_ts: str
    window_start: str
    window_end: str
    count: int
    revision: int
    department: str | None = None
    tags: tuple[str, ...] = ()
    event_ids: tuple[str, ...] = ()
    terminals: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    subjects: tuple[str, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)
    #: Epoch ms of the newest event in the alert (for latency metrics; not published).
    last_ts_ms: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The published JSON object."""
        return {
            "schema_version": ALERT_SCHEMA_VERSION,
            "alert_id": self.alert_id,
            "rule_id": self.rule_id,
            "reason": self.reason,
            "title": self.title,
            "title_en": self.title_en,
            "severity": self.severity,
            "viewpoint": self.viewpoint,
            "user": self.user,
            "department": self.department,
            "first_ts": self.first_ts,
            "last_ts": self.last_ts,
            "window": {"start": self.window_start, "end": self.window_end},
            "count": self.count,
            "revision": self.revision,
            "tags": list(self.tags),
            "evidence": {
                "event_ids": list(self.event_ids),
                "terminals": list(self.terminals),
                "devices": list(self.devices),
                "subjects": list(self.subjects),
                **self.details,
            },
        }

    def to_json(self) -> bytes:
        """The published JSON bytes (keys sorted, so equal alerts are equal bytes)."""
        return orjson.dumps(self.to_dict(), option=orjson.OPT_SORT_KEYS)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Alert:
        """Read back a published alert (consumers: mail, console, audit)."""
        evidence = dict(doc.get("evidence") or {})

        def take(name: str) -> tuple[str, ...]:
            return tuple(str(v) for v in evidence.pop(name, ()))

        return cls(
            alert_id=doc["alert_id"],
            rule_id=doc["rule_id"],
            reason=doc.get("reason", ""),
            title=doc["title"],
            title_en=doc.get("title_en", doc["title"]),
            severity=doc["severity"],
            viewpoint=doc.get("viewpoint", ""),
            user=doc["user"],
            department=doc.get("department"),
            first_ts=doc["first_ts"],
            last_ts=doc["last_ts"],
            window_start=doc["window"]["start"],
            window_end=doc["window"]["end"],
            count=doc["count"],
            revision=doc["revision"],
            tags=tuple(doc.get("tags", ())),
            event_ids=take("event_ids"),
            terminals=take("terminals"),
            devices=take("devices"),
            subjects=take("subjects"),
            details=evidence,
        )
