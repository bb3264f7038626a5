"""Settings of the escalation mail to the risk hotline (section ``mail``).

Read with :func:`streams.config.load_settings` like every other section::

    mail = load_settings(MailSettings, section="mail")

so a value comes from the built-in default, the ``mail:`` mapping of the
config file, or ``LEAKWATCH_MAIL_<NAME>`` (in that order of precedence).
Structured values (``routes``, ``tiers``) are written in the config file;
from the environment they are accepted as a JSON or YAML string::

    mail:
      smtp_host: smtp.example.lg.jp
      smtp_port: 587
      tls: starttls
      from_address: leakwatch@example.lg.jp
      hotline: [risk-hotline@example.lg.jp]
      executives: [cpo@example.lg.jp]
      public_url: https://leakwatch.example.lg.jp
      ack_secret: "..."                 # same on every worker
      routes:
        - {department: [税務課], to: [zeimu-kacho@example.lg.jp]}
        - {rule: [usb_write], severity: [high, critical], to: [joho@example.lg.jp]}
      tiers:
        - {after: 30m, to: [cpo@example.lg.jp]}
        - {after: 2h, to: [exec@example.lg.jp]}
      digest_threshold: 20
      digest_window: 60s

Who gets an escalated alert: the hotline always; the executives when the
alert is critical; plus every route whose conditions all match (a route
condition lists the values it accepts). An alert nobody acknowledges within
``tiers[n].after`` of its first mail is mailed to ``tiers[n].to`` (and the
hotline again).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Final

import yaml

from detectors.base import parse_duration
from schemas.alert import SEVERITIES
from streams.config import ConfigError

__all__ = [
    "LANGUAGES",
    "TLS_MODES",
    "MailSettings",
    "Route",
    "Tier",
    "duration_seconds",
]

TLS_MODES: Final = ("none", "starttls", "implicit")
LANGUAGES: Final = ("ja", "en")
_ROUTE_KEYS: Final = frozenset({"severity", "rule", "department", "to"})
_TIER_KEYS: Final = frozenset({"after", "to"})
#: Deliberately loose: one @, no spaces or angle brackets; the SMTP server has the final word.
_ADDRESS = re.compile(r"^[^@\s<>,;]+@[^@\s<>,;]+$")


def _meta(doc: str, secret: bool = False) -> dict[str, Any]:
    return {"doc": doc, "secret": secret}


def duration_seconds(name: str, value: Any) -> float:
    """A duration setting (``"90s"``, ``"30m"``, ``"500ms"`` or a number of seconds) in seconds."""
    if isinstance(value, float) and value >= 0:
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            number = float(text)
        except ValueError:
            pass
        else:
            if number >= 0:
                return number
    try:
        return parse_duration(value) / 1000.0
    except ValueError as exc:
        raise ConfigError(name, str(exc)) from None


@dataclass(frozen=True, slots=True)
class Route:
    """Extra recipients for alerts matching every given condition."""

    to: tuple[str, ...]
    severity: frozenset[str] | None = None
    rule: frozenset[str] | None = None
    department: frozenset[str] | None = None

    def matches(self, severity: str, rule_id: str, department: str | None) -> bool:
        """True when every condition the route sets accepts the alert."""
        if self.severity is not None and severity not in self.severity:
            return False
        if self.rule is not None and rule_id not in self.rule:
            return False
        return self.department is None or (department or "") in self.department


@dataclass(frozen=True, slots=True)
class Tier:
    """One step of the timed escalation: who is mailed, how long after the first mail."""

    number: int
    after_s: float
    to: tuple[str, ...]


def _structured(name: str, value: Any) -> Any:
    if isinstance(value, str):
        try:
            return yaml.safe_load(value) if value.strip() else []
        except yaml.YAMLError as exc:
            raise ConfigError(name, f"not valid JSON/YAML: {exc}") from None
    return value if value is not None else []


def _addresses(name: str, value: Any, *, required: bool = False) -> tuple[str, ...]:
    if value is None:
        items: list[Any] = []
    elif isinstance(value, str):
        items = [v for v in (s.strip() for s in value.split(",")) if v]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise ConfigError(name, "must be a list of mail addresses")
    out = []
    for item in items:
        if not isinstance(item, str) or not _ADDRESS.match(item.strip()):
            raise ConfigError(name, f"not a mail address: {item!r}")
        out.append(item.strip())
    if required and not out:
        raise ConfigError(name, "needs at least one mail address")
    return tuple(dict.fromkeys(out))


def _condition(name: str, value: Any) -> frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not value:
        raise ConfigError(name, "must be a non-empty list of values")
    return frozenset(str(v) for v in value)


@dataclass(frozen=True)
class MailSettings:
    """Escalation mail settings (environment: ``LEAKWATCH_MAIL_<NAME>``)."""

    smtp_host: str = field(default="", metadata=_meta("SMTP relay; empty disables escalation mail"))
    smtp_port: int = field(default=0, metadata=_meta("SMTP port (default: 25, 587 with starttls, 465 with implicit TLS)"))
    tls: str = field(default="none", metadata=_meta("none, starttls or implicit (SMTPS)"))
    tls_verify: bool = field(default=True, metadata=_meta("verify the relay's TLS certificate"))
    tls_cafile: str = field(default="", metadata=_meta("CA bundle for the relay's certificate"))
    username: str = field(default="", metadata=_meta("SMTP AUTH user (empty: no AUTH)"))
    password: str = field(default="", metadata=_meta("SMTP AUTH password", secret=True))
    timeout: float = field(default=30.0, metadata=_meta("seconds before an SMTP operation counts as failed"))
    from_address: str = field(default="leakwatch@localhost", metadata=_meta("sender address of escalation mail"))
    from_name: str = field(default="", metadata=_meta("sender display name (default: by language)"))
    hotline: tuple[str, ...] = field(default=(), metadata=_meta("the risk hotline: gets every escalated alert"))
    executives: tuple[str, ...] = field(default=(), metadata=_meta("also mailed for every critical alert"))
    language: str = field(default="ja", metadata=_meta("language of the mails: ja or en"))
    public_url: str = field(default="", metadata=_meta("base URL of alert and ack links (default: the core public_url)"))
    ack_secret: str = field(default="", metadata=_meta("HMAC key of ack links, same on every worker (>= 16 bytes)", secret=True))
    ack_link_ttl: str = field(default="7d", metadata=_meta("how long an ack link stays valid"))
    routes: list[dict[str, Any]] = field(default_factory=list, metadata=_meta("extra recipients by severity/rule/department"))
    tiers: list[dict[str, Any]] = field(default_factory=list, metadata=_meta("timed escalation: [{after: 30m, to: [...]}, ...]"))
    digest_threshold: int = field(default=20, metadata=_meta("non-critical mails per digest_window before they are bundled"))
    digest_window: str = field(default="60s", metadata=_meta("window of digest_threshold; a digest goes out this long after its first alert"))
    retry_initial: str = field(default="1s", metadata=_meta("first wait after a temporary SMTP failure"))
    retry_max: str = field(default="5m", metadata=_meta("longest wait between SMTP attempts"))
    retry_give_up: str = field(default="24h", metadata=_meta("a recipient refused temporarily this long goes to the mail DLQ"))
    tick_interval: str = field(default="1s", metadata=_meta("how often escalation timers and gauges are checked"))
    max_pending: int = field(default=5000, metadata=_meta("unsent mails in memory before consumption pauses"))
    max_event_ids: int = field(default=20, metadata=_meta("event ids listed in a mail"))
    topic_dlq: str = field(default="mail-dlq", metadata=_meta("mails refused permanently, one record per recipient"))
    topic_state: str = field(default="escalation-state", metadata=_meta("compacted: per-alert mail and timer state"))
    state_retention: str = field(
        default="30d",
        metadata=_meta("acknowledged alerts whose events ended this long before the newest event are forgotten (tombstoned in topic_state)"),
    )
    state_max_alerts: int = field(
        default=100_000, metadata=_meta("alerts kept in memory; beyond it the oldest acknowledged ones are forgotten first")
    )
    state_sweep_interval: str = field(default="1m", metadata=_meta("how often state_retention and state_max_alerts are applied"))

    def validate(self) -> None:
        """Check every value; raises :class:`ConfigError` naming the setting."""
        if self.tls not in TLS_MODES:
            raise ConfigError("mail.tls", f"must be one of {', '.join(TLS_MODES)}")
        if self.language not in LANGUAGES:
            raise ConfigError("mail.language", f"must be one of {', '.join(LANGUAGES)}")
        if not 0 <= self.smtp_port < 65536:
            raise ConfigError("mail.smtp_port", "must be a TCP port")
        if self.timeout <= 0:
            raise ConfigError("mail.timeout", "must be positive")
        if not _ADDRESS.match(self.from_address):
            raise ConfigError("mail.from_address", f"not a mail address: {self.from_address!r}")
        _addresses("mail.hotline", list(self.hotline))
        _addresses("mail.executives", list(self.executives))
        if self.smtp_host and not self.hotline:
            raise ConfigError("mail.hotline", "needs at least one address when smtp_host is set")
        if self.ack_secret and len(self.ack_secret.encode()) < 16:
            raise ConfigError("mail.ack_secret", "must be at least 16 bytes")
        if self.digest_threshold < 0:
            raise ConfigError("mail.digest_threshold", "must be 0 (never bundle) or more")
        if self.max_pending < 1:
            raise ConfigError("mail.max_pending", "must be at least 1")
        if self.max_event_ids < 0:
            raise ConfigError("mail.max_event_ids", "must not be negative")
        if self.state_max_alerts < 1:
            raise ConfigError("mail.state_max_alerts", "must be at least 1")
        for name in (
            "ack_link_ttl", "digest_window", "retry_initial", "retry_max", "retry_give_up", "tick_interval",
            "state_retention", "state_sweep_interval",
        ):
            duration_seconds(f"mail.{name}", getattr(self, name))
        if self.state_sweep_interval_s <= 0:
            raise ConfigError("mail.state_sweep_interval", "must be positive")
        if self.tick_interval_s <= 0:
            raise ConfigError("mail.tick_interval", "must be positive")
        if self.retry_initial_s <= 0 or self.retry_max_s < self.retry_initial_s:
            raise ConfigError("mail.retry_max", "must be at least retry_initial, which must be positive")
        _ = self.parsed_routes, self.parsed_tiers

    # -- parsed views ----------------------------------------------------------------

    @cached_property
    def parsed_routes(self) -> tuple[Route, ...]:
        """``routes`` validated."""
        routes = _structured("mail.routes", self.routes)
        if not isinstance(routes, list):
            raise ConfigError("mail.routes", "must be a list of {severity, rule, department, to}")
        out = []
        for i, spec in enumerate(routes):
            where = f"mail.routes[{i}]"
            if not isinstance(spec, dict):
                raise ConfigError(where, "must be a mapping with 'to' and conditions")
            unknown = set(spec) - _ROUTE_KEYS
            if unknown:
                raise ConfigError(f"{where}.{sorted(unknown)[0]}", f"unknown key (known: {', '.join(sorted(_ROUTE_KEYS))})")
            severity = _condition(f"{where}.severity", spec.get("severity"))
            if severity is not None and not severity <= set(SEVERITIES):
                raise ConfigError(f"{where}.severity", f"values must be among {', '.join(SEVERITIES)}")
            out.append(
                Route(
                    to=_addresses(f"{where}.to", spec.get("to"), required=True),
                    severity=severity,
                    rule=_condition(f"{where}.rule", spec.get("rule")),
                    department=_condition(f"{where}.department", spec.get("department")),
                )
            )
        return tuple(out)

    @cached_property
    def parsed_tiers(self) -> tuple[Tier, ...]:
        """``tiers`` validated, numbered from 1, strictly increasing delays."""
        tiers = _structured("mail.tiers", self.tiers)
        if not isinstance(tiers, list):
            raise ConfigError("mail.tiers", "must be a list of {after, to}")
        out: list[Tier] = []
        for i, spec in enumerate(tiers):
            where = f"mail.tiers[{i}]"
            if not isinstance(spec, dict):
                raise ConfigError(where, "must be a mapping {after, to}")
            unknown = set(spec) - _TIER_KEYS
            if unknown:
                raise ConfigError(f"{where}.{sorted(unknown)[0]}", "unknown key (known: after, to)")
            if "after" not in spec:
                raise ConfigError(f"{where}.after", "required (a duration like 30m)")
            after = duration_seconds(f"{where}.after", spec["after"])
            if out and after <= out[-1].after_s:
                raise ConfigError(f"{where}.after", "must be later than the previous tier")
            out.append(Tier(i + 1, after, _addresses(f"{where}.to", spec.get("to"), required=True)))
        return tuple(out)

    @property
    def enabled(self) -> bool:
        """Whether escalation mail is configured at all."""
        return bool(self.smtp_host)

    @property
    def port(self) -> int:
        """The SMTP port, defaulted by TLS mode."""
        if self.smtp_port:
            return self.smtp_port
        return {"none": 25, "starttls": 587, "implicit": 465}[self.tls]

    @property
    def ack_link_ttl_s(self) -> float:
        return duration_seconds("mail.ack_link_ttl", self.ack_link_ttl)

    @property
    def digest_window_s(self) -> float:
        return duration_seconds("mail.digest_window", self.digest_window)

    @property
    def retry_initial_s(self) -> float:
        return duration_seconds("mail.retry_initial", self.retry_initial)

    @property
    def retry_max_s(self) -> float:
        return duration_seconds("mail.retry_max", self.retry_max)

    @property
    def retry_give_up_s(self) -> float:
        return duration_seconds("mail.retry_give_up", self.retry_give_up)

    @property
    def tick_interval_s(self) -> float:
        return duration_seconds("mail.tick_interval", self.tick_interval)

    @property
    def state_retention_s(self) -> float:
        return duration_seconds("mail.state_retention", self.state_retention)

    @property
    def state_sweep_interval_s(self) -> float:
        return duration_seconds("mail.state_sweep_interval", self.state_sweep_interval)

    def recipients_for(self, severity: str, rule_id: str, department: str | None) -> tuple[str, ...]:
        """Hotline, executives (critical), then every matching route; no duplicates."""
        out = list(self.hotline)
        if severity == "critical":
            out.extend(self.executives)
        for route in self.parsed_routes:
            if route.matches(severity, rule_id, department):
                out.extend(route.to)
        return tuple(dict.fromkeys(out))

    def replace(self, **changes: Any) -> MailSettings:
        """A copy with some values changed (validated)."""
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new
