"""Rule files: Sigma-like metadata plus the parameters of one detector.

Each detector ships one YAML rule file in ``detectors/rules/``::

    id: off_hours                 # stable id, also the alert's rule_id
    detector: off_hours           # which detector runs it
    title: 時間外の個人番号参照
    title_en: Personal data referenced outside business hours
    description: ...              # English; description_ja: 日本語の説明
    viewpoint: unnatural_time     # the PPC log-analysis viewpoint
    level: high                   # default severity
    tags: [ppc.viewpoint.1]
    falsepositives: [...]
    reasons:                      # sub-findings, each with its own title/level
      night: {title: 夜間の個人番号参照, title_en: ..., level: medium}
    params: {...}                 # checked against the detector's Settings
    allowlist: {users: [], terminals: [], departments: []}

An agency overrides rules in a file of its own, never editing ours::

    overrides:
      off_hours:
        enabled: true
        level: critical
        reasons: {night: {level: high}}
        params: {business_hours: {default: "08:00-20:00"}}
        allowlist: {users: [batch-operator]}

Every problem is reported as :class:`RuleError` naming the file and the key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Final

import yaml

from schemas.alert import SEVERITIES

__all__ = [
    "DEFAULT_RULES_DIR",
    "VIEWPOINTS",
    "Allowlist",
    "Reason",
    "Rule",
    "RuleError",
    "apply_overrides",
    "load_overrides",
    "load_rule_file",
    "load_rules",
]

DEFAULT_RULES_DIR: Final = Path(str(resources.files("detectors").joinpath("rules")))

#: The PPC log-analysis viewpoints (and inspection findings) alerts are filed under.
VIEWPOINTS: Final = {
    "unnatural_time": ("不自然な曜日・時間帯の参照", "Access at unnatural days or hours"),
    "unusual_terminal": ("普段と異なる端末からの操作", "Terminal other than the usual one"),
    "unauthorized_attempt": ("権限のない操作の試行", "Attempts without the rights"),
    "unusual_operation": ("通常行わない操作（画面印刷・書き出し）", "Operations not normally performed"),
    "repeated_reference": ("同一人物の繰り返し参照", "Same person's record referenced repeatedly"),
    "bulk_export": ("大量書き出し・照会件数の急増", "Bulk write-out and lookup spikes"),
    "removable_media": ("USBメモリ等の電子媒体への書き込み", "Writes to removable media"),
}

_RULE_KEYS: Final = frozenset(
    {
        "id",
        "detector",
        "title",
        "title_en",
        "description",
        "description_ja",
        "viewpoint",
        "level",
        "tags",
        "falsepositives",
        "reasons",
        "params",
        "allowlist",
        "enabled",
        "references",
        "author",
    }
)
_OVERRIDE_KEYS: Final = frozenset({"enabled", "level", "reasons", "params", "allowlist"})
_ALLOW_KEYS: Final = frozenset({"users", "terminals", "departments", "devices"})


class RuleError(ValueError):
    """A rule or override file is not valid: where, and why."""

    def __init__(self, source: str, key: str, reason: str) -> None:
        super().__init__(f"{source}: {key}: {reason}")
        self.source = source
        self.key = key
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Reason:
    """One kind of finding a rule can raise, with its own title and severity."""

    name: str
    title: str
    title_en: str
    level: str


@dataclass(frozen=True, slots=True)
class Allowlist:
    """Users, terminals, departments and devices a rule never alerts on."""

    users: frozenset[str] = frozenset()
    terminals: frozenset[str] = frozenset()
    departments: frozenset[str] = frozenset()
    devices: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.users or self.terminals or self.departments or self.devices)

    def merged(self, other: Allowlist) -> Allowlist:
        """Both lists together (an override extends, never shrinks, ours)."""
        return Allowlist(
            self.users | other.users,
            self.terminals | other.terminals,
            self.departments | other.departments,
            self.devices | other.devices,
        )


@dataclass(frozen=True, slots=True)
class Rule:
    """A loaded, validated rule."""

    id: str
    detector: str
    title: str
    title_en: str
    description: str
    viewpoint: str
    level: str
    tags: tuple[str, ...]
    falsepositives: tuple[str, ...]
    reasons: Mapping[str, Reason]
    params: Mapping[str, Any]
    allowlist: Allowlist = field(default_factory=Allowlist)
    enabled: bool = True
    source: str = "<memory>"
    #: The description in Japanese, for mail, reports and the console (日本語).
    description_ja: str = ""

    def describe(self, lang: str = "ja") -> str:
        """The plain-language description in ``lang`` (ja falls back to English), one line."""
        text = self.description_ja if lang == "ja" and self.description_ja else self.description
        return " ".join(text.split())

    def reason(self, name: str) -> Reason:
        """The named reason, or one built from the rule's own title and level."""
        found = self.reasons.get(name)
        if found is not None:
            return found
        return Reason(name, self.title, self.title_en, self.level)


def _str(source: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RuleError(source, key, "must be a non-empty string")
    return value


def _str_list(source: str, key: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str | int) for v in value):
        raise RuleError(source, key, "must be a list of strings")
    return tuple(str(v) for v in value)


def _level(source: str, key: str, value: Any) -> str:
    if value not in SEVERITIES:
        raise RuleError(source, key, f"must be one of {', '.join(SEVERITIES)}; got {value!r}")
    return str(value)


def _allowlist(source: str, key: str, value: Any) -> Allowlist:
    if value is None:
        return Allowlist()
    if not isinstance(value, dict):
        raise RuleError(source, key, "must be a mapping of users/terminals/departments/devices")
    unknown = set(value) - _ALLOW_KEYS
    if unknown:
        raise RuleError(source, f"{key}.{sorted(unknown)[0]}", f"unknown list (allowed: {', '.join(sorted(_ALLOW_KEYS))})")
    return Allowlist(
        **{name: frozenset(_str_list(source, f"{key}.{name}", value.get(name))) for name in _ALLOW_KEYS}
    )


def _reasons(source: str, key: str, value: Any, default_level: str) -> dict[str, Reason]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RuleError(source, key, "must be a mapping of reason name to {title, title_en, level}")
    out: dict[str, Reason] = {}
    for name, spec in value.items():
        where = f"{key}.{name}"
        if not isinstance(spec, dict):
            raise RuleError(source, where, "must be a mapping with title, title_en and level")
        unknown = set(spec) - {"title", "title_en", "level"}
        if unknown:
            raise RuleError(source, f"{where}.{sorted(unknown)[0]}", "unknown key")
        title = _str(source, f"{where}.title", spec.get("title"))
        out[str(name)] = Reason(
            str(name),
            title,
            _str(source, f"{where}.title_en", spec.get("title_en", title)),
            _level(source, f"{where}.level", spec.get("level", default_level)),
        )
    return out


def load_rule_file(path: Path) -> Rule:
    """Read and validate one rule file."""
    source = str(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RuleError(source, "$", f"not valid YAML: {exc}") from None
    except OSError as exc:
        raise RuleError(source, "$", f"cannot read: {exc.strerror}") from None
    return rule_from_dict(doc, source)


def rule_from_dict(doc: Any, source: str = "<memory>") -> Rule:
    """Validate a rule given as a mapping (as read from YAML)."""
    if not isinstance(doc, dict):
        raise RuleError(source, "$", "a rule file must be a YAML mapping")
    unknown = set(doc) - _RULE_KEYS
    if unknown:
        raise RuleError(source, sorted(unknown)[0], "unknown key")
    level = _level(source, "level", doc.get("level"))
    viewpoint = _str(source, "viewpoint", doc.get("viewpoint"))
    if viewpoint not in VIEWPOINTS:
        raise RuleError(source, "viewpoint", f"must be one of {', '.join(VIEWPOINTS)}")
    params = doc.get("params") or {}
    if not isinstance(params, dict):
        raise RuleError(source, "params", "must be a mapping")
    enabled = doc.get("enabled", True)
    if not isinstance(enabled, bool):
        raise RuleError(source, "enabled", "must be true or false")
    title = _str(source, "title", doc.get("title"))
    return Rule(
        id=_str(source, "id", doc.get("id")),
        detector=_str(source, "detector", doc.get("detector")),
        title=title,
        title_en=_str(source, "title_en", doc.get("title_en", title)),
        description=_str(source, "description", doc.get("description")),
        description_ja=_str(source, "description_ja", doc["description_ja"]) if "description_ja" in doc else "",
        viewpoint=viewpoint,
        level=level,
        tags=_str_list(source, "tags", doc.get("tags")),
        falsepositives=_str_list(source, "falsepositives", doc.get("falsepositives")),
        reasons=_reasons(source, "reasons", doc.get("reasons"), level),
        params=dict(params),
        allowlist=_allowlist(source, "allowlist", doc.get("allowlist")),
        enabled=enabled,
        source=source,
    )


def load_rules(directory: Path = DEFAULT_RULES_DIR) -> list[Rule]:
    """All ``*.yml`` rules in a directory, sorted by id; ids must be unique."""
    if not directory.is_dir():
        raise RuleError(str(directory), "$", "rules directory does not exist")
    rules = [load_rule_file(p) for p in sorted(directory.glob("*.yml"))]
    seen: dict[str, str] = {}
    for rule in rules:
        if rule.id in seen:
            raise RuleError(rule.source, "id", f"duplicate rule id {rule.id!r} (also in {seen[rule.id]})")
        seen[rule.id] = rule.source
    return sorted(rules, key=lambda r: r.id)


def load_overrides(path: Path) -> dict[str, dict[str, Any]]:
    """An agency's override file: ``{"overrides": {rule_id: {...}}}``, validated for shape."""
    source = str(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise RuleError(source, "$", f"not valid YAML: {exc}") from None
    except OSError as exc:
        raise RuleError(source, "$", f"cannot read: {exc.strerror}") from None
    if not isinstance(doc, dict) or set(doc) - {"overrides"}:
        raise RuleError(source, "$", "an override file is a mapping with one key, 'overrides'")
    overrides = doc.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise RuleError(source, "overrides", "must be a mapping of rule id to changes")
    for rule_id, change in overrides.items():
        if not isinstance(change, dict):
            raise RuleError(source, f"overrides.{rule_id}", "must be a mapping")
        unknown = set(change) - _OVERRIDE_KEYS
        if unknown:
            raise RuleError(
                source,
                f"overrides.{rule_id}.{sorted(unknown)[0]}",
                f"cannot be overridden (allowed: {', '.join(sorted(_OVERRIDE_KEYS))})",
            )
    return {str(k): dict(v) | {"__source__": source} for k, v in overrides.items()}


def apply_overrides(rules: Iterable[Rule], overrides: Mapping[str, Mapping[str, Any]]) -> list[Rule]:
    """Rules with an agency's overrides applied; unknown rule ids are an error."""
    by_id = {r.id: r for r in rules}
    for rule_id, change in overrides.items():
        source = str(change.get("__source__", "<overrides>"))
        rule = by_id.get(rule_id)
        if rule is None:
            raise RuleError(source, f"overrides.{rule_id}", f"no such rule (known: {', '.join(sorted(by_id))})")
        where = f"overrides.{rule_id}"
        updates: dict[str, Any] = {}
        if "enabled" in change:
            if not isinstance(change["enabled"], bool):
                raise RuleError(source, f"{where}.enabled", "must be true or false")
            updates["enabled"] = change["enabled"]
        if "level" in change:
            updates["level"] = _level(source, f"{where}.level", change["level"])
        if "params" in change:
            params = change["params"]
            if not isinstance(params, dict):
                raise RuleError(source, f"{where}.params", "must be a mapping")
            updates["params"] = {**rule.params, **params}
        if "allowlist" in change:
            updates["allowlist"] = rule.allowlist.merged(_allowlist(source, f"{where}.allowlist", change["allowlist"]))
        if "reasons" in change:
            reasons = dict(rule.reasons)
            value = change["reasons"]
            if not isinstance(value, dict):
                raise RuleError(source, f"{where}.reasons", "must be a mapping")
            for name, spec in value.items():
                if not isinstance(spec, dict):
                    raise RuleError(source, f"{where}.reasons.{name}", "must be a mapping")
                base = rule.reason(str(name))
                if str(name) not in rule.reasons:
                    raise RuleError(source, f"{where}.reasons.{name}", f"rule has no reason {name!r}")
                merged = {"title": base.title, "title_en": base.title_en, "level": base.level, **spec}
                reasons.update(_reasons(source, f"{where}.reasons", {name: merged}, base.level))
            updates["reasons"] = reasons
        by_id[rule_id] = replace(rule, **updates)
    return sorted(by_id.values(), key=lambda r: r.id)
