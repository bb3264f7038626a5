"""The SOC operator console: live alert list, alert detail, actions, overview.

``register(app, settings)`` adds to a worker's Faust web server:

* ``/console`` (alert list, live over SSE), ``/alerts/<id>`` (detail: mails
  link here), ``/console/overview`` (charts and pipeline health),
  ``/console/login``; the pages are static HTML/CSS/JS from
  ``streams/static/`` that render JSON from ``/console/api/...``;
* a :class:`ConsoleService` started and stopped with the worker.

Data
----
The console is a *view*: it reads ``leak-alerts``, the audit topic, ``acks``
and its own ``alert-states`` topic from the beginning, all partitions, with a
manually assigned consumer (no group), into a :class:`ConsoleStore` held in
memory: newest revision per alert id (duplicate ``(alert_id, revision)``
records are harmless), acknowledgment, closure and audit history per alert.

Operator actions are records, so they survive restarts and every worker's
console sees them:

* acknowledge: :func:`streams.ack.publish_ack` with ``via="console"`` (the
  same record the mail's ack link writes, so it stops the timed escalation);
* close as false positive or confirmed incident: one record on
  ``alert-states`` (compacted, key alert id; the state) and one
  ``alert.closed`` record on the audit topic (the trail). Closing an alert
  nobody acknowledged also acknowledges it, so its escalation stops too.
  Closing as a confirmed incident starts the PPC report clock (see
  :func:`ppc_deadlines`);
* reopen a closed alert (a reason is required): an ``open`` record on
  ``alert-states`` and an ``alert.reopened`` record on the audit topic. The
  alert is back among the open ones (still acknowledged: its timed
  escalation does not start again). Closing it again as a confirmed incident
  keeps the PPC clock of the first confirmation.

State records carry a ``version`` (1 for the first closure, +1 for each
reopening or closure after it); a record whose version is not newer than
the one known is a replay, or the loser of two operators acting at once on
different workers, and is ignored.

Access
------
Operators sign in with accounts from the ``console:`` config section
(``users: {name: <scrypt hash>}``, hashes from :func:`hash_password`, e.g.
``python -m streams.console hash-password``), or, behind a reverse proxy
that authenticates, via the ``X-Forwarded-User`` header when
``trust_proxy_header`` is on. Sessions are HMAC-signed cookies (HttpOnly,
SameSite=Strict; Secure when the public URL is https). Every POST needs the
session's CSRF token (``X-CSRF-Token`` header or ``csrf`` form field) and a
same-origin ``Origin`` when the browser sends one. Sign-ins are audited
(``console.signin``; ``console.signin_failed`` with the user name tried and
why, never the password), queued in memory and written to the audit topic in
the background until Kafka has them. Every response carries a
strict CSP (no inline script), ``X-Frame-Options: DENY``, ``nosniff`` and
``Referrer-Policy: same-origin`` (``no-referrer`` would make Chromium send
``Origin: null`` on our own form posts). Whatever is rendered passes
:func:`scrub`, a last line of defence masking personal-number-like digit runs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import getpass
import hashlib
import hmac
import html
import re
import secrets
import sys
import time
from collections import Counter, defaultdict, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, tzinfo
from functools import cached_property
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote
from zoneinfo import ZoneInfo

import orjson
import yaml

from schemas.alert import SEVERITIES, SEVERITY_RANK
from streams.audit import AuditRecord, write_audit
from streams.config import ConfigError, Settings, load_settings
from streams.logging import get_logger
from streams.service_kit import (
    create_missing_topics,
    load_rule_map,
    random_token,
    start_with_app,
    stop_clients,
)

__all__ = [
    "ACTION_CLOSED",
    "ACTION_REOPENED",
    "ACTION_SIGNIN",
    "ACTION_SIGNIN_FAILED",
    "RESOLUTIONS",
    "STATES",
    "ConsoleService",
    "ConsoleSettings",
    "ConsoleStore",
    "LoginThrottle",
    "Session",
    "SessionSigner",
    "configure",
    "hash_password",
    "health_snapshot",
    "ppc_deadlines",
    "register",
    "run",
    "scrub",
    "scrub_tree",
    "verify_password",
]

_log = get_logger("leakwatch.console")

STATIC_DIR: Final = Path(__file__).resolve().parent / "static"
#: Alert states shown in the console, in workflow order.
STATES: Final = ("new", "escalated", "acknowledged", "closed")
#: How an alert can be closed.
RESOLUTIONS: Final = ("false_positive", "confirmed")
#: Audit action of a closure (wording in :data:`_CLOSE_WORDS`).
ACTION_CLOSED: Final = "alert.closed"
#: Audit action of reopening a closed alert.
ACTION_REOPENED: Final = "alert.reopened"
#: Audit actions of console sign-ins.
ACTION_SIGNIN: Final = "console.signin"
ACTION_SIGNIN_FAILED: Final = "console.signin_failed"
#: Sign-in audit records waiting for Kafka at most (the oldest are dropped beyond).
_AUDIT_QUEUE_MAX: Final = 10_000
STATE_SCHEMA_VERSION: Final = 1

_ALERT_ID: Final = re.compile(r"^lw-(?:[0-9a-f]{8}-[0-9a-f]{8}-[0-9a-f]{8}|[0-9a-f]{24})$")
_CLOSE_WORDS: Final = {
    "false_positive": ("クローズ（誤検知）", "closed as false positive"),
    "confirmed": ("クローズ（漏えい等事案と確定）", "closed as confirmed incident"),
}


# --------------------------------------------------------------------------- scrubbing

#: Our own hash ids (alert ids, record pseudonyms) are kept whole; any other run of
#: 12 or more digits (ASCII or full-width, optionally grouped 4-4-4) is masked.
_SCRUB: Final = re.compile(
    r"(lw-[0-9a-f]{8}-[0-9a-f]{8}-[0-9a-f]{8}|lw-[0-9a-f]{24}|mn_[0-9a-f]{8}-[0-9a-f]{8}|mn_[0-9a-f]{20})"
    r"|(\d{4}[ \-　－]?\d{4}[ \-　－]?\d{4}\d*)"
)
_MASK: Final = "［伏字］"


def scrub(text: str) -> str:
    """``text`` with every personal-number-like digit run masked."""
    return _SCRUB.sub(lambda m: m.group(1) or _MASK, text)


def scrub_tree(value: Any) -> Any:
    """A JSON-like value with :func:`scrub` applied to every string (keys included)."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {scrub(str(k)): scrub_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub_tree(v) for v in value]
    return value


# --------------------------------------------------------------------------- settings


def _meta(doc: str, secret: bool = False) -> dict[str, Any]:
    return {"doc": doc, "secret": secret}


@dataclass(frozen=True)
class ConsoleSettings:
    """Operator console settings (``console:`` section, ``LEAKWATCH_CONSOLE_<NAME>``)."""

    enabled: bool = field(default=True, metadata=_meta("serve the operator console on the worker's web server"))
    users: dict[str, str] = field(
        default_factory=dict, metadata=_meta("operator accounts: {name: scrypt hash from hash-password}", secret=True)
    )
    trust_proxy_header: bool = field(
        default=False, metadata=_meta("take the operator's name from a reverse proxy's header (only behind one!)")
    )
    proxy_header: str = field(default="X-Forwarded-User", metadata=_meta("header naming the authenticated operator"))
    session_secret: str = field(
        default="", metadata=_meta("HMAC key of session cookies, same on every worker (>= 16 bytes; default: random per process)", secret=True)
    )
    session_ttl: str = field(default="12h", metadata=_meta("how long a sign-in lasts"))
    cookie_secure: str = field(default="auto", metadata=_meta("Secure cookies: true, false or auto (https public URL)"))
    topic_states: str = field(default="alert-states", metadata=_meta("compacted: closures and reopenings made in the console"))
    max_alerts: int = field(default=100_000, metadata=_meta("alerts kept in memory (oldest forgotten first)"))
    list_limit: int = field(default=500, metadata=_meta("most alerts one list request returns"))
    overview_days: int = field(default=14, metadata=_meta("days shown in the overview charts"))
    health_interval: str = field(default="10s", metadata=_meta("how often pipeline health is sampled for the charts"))
    login_max_failures: int = field(default=5, metadata=_meta("failed sign-ins per account before a 15-minute lock"))
    # PPC report clock (see ppc_deadlines for the source).
    ppc_prompt_days_min: int = field(default=3, metadata=_meta("速報: earliest day of the 'promptly' guidance (days)"))
    ppc_prompt_days: int = field(default=5, metadata=_meta("速報: report 'promptly', at the latest this many days after confirmation"))
    ppc_final_days: int = field(default=30, metadata=_meta("確報: days after confirmation"))
    ppc_final_days_unauthorised: int = field(
        default=60, metadata=_meta("確報 when the leak may have been for an unauthorised purpose (不正の目的)")
    )

    def validate(self) -> None:
        """Check every value; raises :class:`ConfigError` naming the setting."""
        _ = self.accounts
        if self.session_secret and len(self.session_secret.encode()) < 16:
            raise ConfigError("console.session_secret", "must be at least 16 bytes")
        if self.cookie_secure not in ("auto", "true", "false"):
            raise ConfigError("console.cookie_secure", "must be auto, true or false")
        if not re.match(r"^[A-Za-z][A-Za-z0-9-]*$", self.proxy_header):
            raise ConfigError("console.proxy_header", "must be an HTTP header name")
        for name in ("session_ttl", "health_interval"):
            if _seconds(f"console.{name}", getattr(self, name)) <= 0:
                raise ConfigError(f"console.{name}", "must be positive")
        for name in ("max_alerts", "list_limit", "overview_days", "login_max_failures"):
            if getattr(self, name) < 1:
                raise ConfigError(f"console.{name}", "must be at least 1")
        if not 0 < self.ppc_prompt_days_min <= self.ppc_prompt_days:
            raise ConfigError("console.ppc_prompt_days", "must be at least ppc_prompt_days_min, which must be positive")
        if not 0 < self.ppc_final_days <= self.ppc_final_days_unauthorised:
            raise ConfigError("console.ppc_final_days_unauthorised", "must be at least ppc_final_days, which must be positive")

    @cached_property
    def accounts(self) -> dict[str, str]:
        """``users`` validated (from the file, or a JSON/YAML string from the environment)."""
        users: Any = self.users
        if isinstance(users, str):
            try:
                users = yaml.safe_load(users) if users.strip() else {}
            except yaml.YAMLError as exc:
                raise ConfigError("console.users", f"not valid JSON/YAML: {exc}") from None
        if users is None:
            users = {}
        if not isinstance(users, dict):
            raise ConfigError("console.users", "must be a mapping of operator name to password hash")
        out: dict[str, str] = {}
        for name, encoded in users.items():
            try:
                _check_operator(str(name))
            except ValueError as exc:
                raise ConfigError(f"console.users.{name}", str(exc)) from None
            if not isinstance(encoded, str) or _parse_hash(encoded) is None:
                raise ConfigError(f"console.users.{name}", "not a password hash (make one with: python -m streams.console hash-password)")
            out[str(name)] = encoded
        return out

    @property
    def session_ttl_s(self) -> float:
        return _seconds("console.session_ttl", self.session_ttl)

    @property
    def health_interval_s(self) -> float:
        return _seconds("console.health_interval", self.health_interval)


def _seconds(name: str, value: Any) -> float:
    from streams.mail_settings import duration_seconds

    return duration_seconds(name, value)


# --------------------------------------------------------------------------- passwords

_SCRYPT_N: Final = 2**14
_SCRYPT_R: Final = 8
_SCRYPT_P: Final = 1


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, n: int = _SCRYPT_N, r: int = _SCRYPT_R, p: int = _SCRYPT_P) -> str:
    """``scrypt$n$r$p$salt$hash`` of a password (random 16-byte salt, 32-byte key)."""
    if not password:
        raise ValueError("empty password")
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=32, maxmem=256 * 1024 * 1024)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(key)}"


def _parse_hash(encoded: str) -> tuple[int, int, int, bytes, bytes] | None:
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        return None
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, key = _unb64(parts[4]), _unb64(parts[5])
    except ValueError:
        return None
    if n < 2 or n & (n - 1) or not 0 < r <= 64 or not 0 < p <= 16 or len(salt) < 8 or len(key) < 16:
        return None
    return n, r, p, salt, key


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches an ``encoded`` hash (constant-time comparison)."""
    parsed = _parse_hash(encoded)
    if parsed is None:
        return False
    n, r, p, salt, key = parsed
    got = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=len(key), maxmem=256 * 1024 * 1024)
    return hmac.compare_digest(got, key)


#: Verified when the account is unknown, so timing does not tell which names exist.
_DUMMY_HASH: Final = "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA$" + _b64(b"\0" * 32)


def _check_operator(name: str) -> str:
    """An operator name is shown and recorded: short, printable, never a personal number."""
    from streams.ack import check_text

    name = name.strip()
    check_text("operator", name, 100, required=True)
    if any(ch in name for ch in "\n\t"):
        raise ValueError("operator contains control characters")
    return name


# --------------------------------------------------------------------------- sessions


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in operator."""

    user: str
    sid: str
    expires: int
    via: str  # "password" or "proxy"


class SessionSigner:
    """Signed session cookies and the CSRF token bound to each session."""

    COOKIE: Final = "lw_session"
    LOGIN_COOKIE: Final = "lw_login"

    def __init__(self, secret: bytes, ttl_s: float) -> None:
        self._secret = secret
        self.ttl_s = ttl_s

    def _mac(self, purpose: str, payload: bytes) -> str:
        return _b64(hmac.new(self._secret, purpose.encode() + b"\x1f" + payload, hashlib.sha256).digest())

    def issue(self, user: str, now: float, via: str = "password") -> tuple[Session, str]:
        """A new session and its cookie value."""
        session = Session(user, random_token(16), int(now + self.ttl_s), via)
        payload = orjson.dumps({"u": session.user, "s": session.sid, "e": session.expires, "v": via})
        return session, f"{_b64(payload)}.{self._mac('session', payload)}"

    def verify(self, value: str | None, now: float) -> Session | None:
        """The session of a genuine, unexpired cookie value, else None."""
        if not value or value.count(".") != 1:
            return None
        body, mac = value.split(".")
        try:
            payload = _unb64(body)
        except ValueError:
            return None
        if not hmac.compare_digest(mac, self._mac("session", payload)):
            return None
        try:
            doc = orjson.loads(payload)
            session = Session(str(doc["u"]), str(doc["s"]), int(doc["e"]), str(doc.get("v", "password")))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None
        return session if now < session.expires else None

    def csrf_token(self, session: Session) -> str:
        """The CSRF token of a session (derived, so nothing is stored server-side)."""
        return self._mac("csrf", session.sid.encode())[:32]

    def check_csrf(self, session: Session, token: str | None) -> bool:
        """Whether ``token`` is this session's CSRF token."""
        return bool(token) and hmac.compare_digest(str(token), self.csrf_token(session))

    def login_nonce(self, now: float) -> str:
        """A signed nonce for the sign-in form (cookie + hidden field: login CSRF)."""
        payload = f"{random_token(12)}.{int(now + 3600)}".encode()
        return f"{payload.decode()}.{self._mac('login', payload)}"

    def check_login_nonce(self, cookie: str | None, form_value: str | None, now: float) -> bool:
        """Cookie and form carry the same genuine, unexpired nonce."""
        if not cookie or not form_value or not hmac.compare_digest(cookie, form_value):
            return False
        parts = cookie.split(".")
        if len(parts) != 3 or not parts[1].isdigit():
            return False
        payload = f"{parts[0]}.{parts[1]}".encode()
        return hmac.compare_digest(parts[2], self._mac("login", payload)) and now < int(parts[1])


class LoginThrottle:
    """At most ``limit`` failed sign-ins per account per ``window_s``; then locked until the window passes."""

    def __init__(self, limit: int, window_s: float = 900.0) -> None:
        self.limit = limit
        self.window_s = window_s
        self._failures: dict[str, deque[float]] = defaultdict(deque)

    def _recent(self, user: str, now: float) -> deque[float]:
        q = self._failures[user]
        while q and q[0] <= now - self.window_s:
            q.popleft()
        return q

    def locked(self, user: str, now: float) -> bool:
        return len(self._recent(user, now)) >= self.limit

    def failed(self, user: str, now: float) -> None:
        self._recent(user, now).append(now)

    def succeeded(self, user: str) -> None:
        self._failures.pop(user, None)


# --------------------------------------------------------------------------- PPC clock


def ppc_deadlines(confirmed_at: datetime, settings: ConsoleSettings, unauthorised_purpose: bool) -> dict[str, str]:
    """Report deadlines to the PPC once a leak (漏えい等事案) is confirmed.

    Source (as we read them): 個人情報保護委員会「特定個人情報の漏えい等に関する報告等に
    関する規則」(令和3年個人情報保護委員会規則第1号) and the PPC's guideline on the
    corresponding rules of the Personal Information Protection Act (「個人情報の保護に関
    する法律についてのガイドライン（通則編）」3-5-3-3 速報 / 3-5-3-4 確報):
    速報 (preliminary report) "promptly" (速やかに), which the guideline explains as
    roughly 3 to 5 days (概ね3～5日以内) after becoming aware; 確報 (final report)
    within 30 days (60 days when the leak may have been committed for an
    unauthorised purpose, 不正の目的をもって行われたおそれがある事態). The clock
    starts when the agency became aware of the incident; the console takes the
    moment an operator confirmed it. All numbers are settings
    (``ppc_prompt_days_min``, ``ppc_prompt_days``, ``ppc_final_days``,
    ``ppc_final_days_unauthorised``) in case the rules or an agency's reading differ.
    """
    start = confirmed_at.date()
    final_days = settings.ppc_final_days_unauthorised if unauthorised_purpose else settings.ppc_final_days
    return {
        "known_at": confirmed_at.isoformat(timespec="seconds"),
        "prompt_from": (start + timedelta(days=settings.ppc_prompt_days_min)).isoformat(),
        "prompt_due": (start + timedelta(days=settings.ppc_prompt_days)).isoformat(),
        "final_due": (start + timedelta(days=final_days)).isoformat(),
        "final_days": str(final_days),
        "unauthorised_purpose": "yes" if unauthorised_purpose else "no",
    }


# --------------------------------------------------------------------------- the store


def _parse_ts(text: Any) -> float:
    try:
        return datetime.fromisoformat(str(text)).timestamp()
    except ValueError:
        return 0.0


class _Entry:
    """The newest revision of one alert and what the console derives from it."""

    __slots__ = ("doc", "first", "last", "received_at", "revision", "seq")

    def __init__(self, doc: dict[str, Any], received_at: float, seq: int) -> None:
        self.doc = doc
        self.revision = int(doc.get("revision", 0))
        self.first = _parse_ts(doc.get("first_ts"))
        self.last = _parse_ts(doc.get("last_ts"))
        self.received_at = received_at
        self.seq = seq


def _audit_key(doc: Mapping[str, Any]) -> str:
    rid = doc.get("record_id")
    if rid:
        return str(rid)
    return orjson.dumps(
        [doc.get("action"), doc.get("at"), doc.get("actor"), doc.get("alert_ids"), doc.get("detail")],
        option=orjson.OPT_SORT_KEYS,
    ).decode()


class ConsoleStore:
    """Everything the console shows, built from records (pure: no I/O, no clock).

    ``apply_*`` return the alert ids whose view changed (for live updates).
    """

    def __init__(self, max_alerts: int = 100_000) -> None:
        self.max_alerts = max_alerts
        self.alerts: dict[str, _Entry] = {}
        self.acks: dict[str, dict[str, Any]] = {}
        #: The closure of each alert that is closed now.
        self.closures: dict[str, dict[str, Any]] = {}
        #: The last reopening of each alert that is open again.
        self.reopened: dict[str, dict[str, Any]] = {}
        #: Newest state version per alert (closures and reopenings).
        self.state_versions: dict[str, int] = {}
        #: When each alert was first closed as a confirmed incident (the PPC clock's start).
        self.confirmed_at: dict[str, str] = {}
        self.history: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._audit_seen: set[str] = set()
        self._seq = 0
        self.version = 0

    # -- applying records --------------------------------------------------------------

    def apply_alert(self, doc: Mapping[str, Any], received_at: float = 0.0) -> list[str]:
        """An alert revision: the newest revision per alert id wins; replays change nothing."""
        try:
            aid = str(doc["alert_id"])
            revision = int(doc.get("revision", 0))
            _ = doc["rule_id"], doc["severity"], doc["user"], doc["first_ts"], doc["last_ts"]
        except (KeyError, TypeError, ValueError):
            return []
        current = self.alerts.get(aid)
        if current is not None and revision <= current.revision:
            return []
        self._seq += 1
        entry = _Entry(dict(doc), received_at if current is None else current.received_at, self._seq)
        self.alerts[aid] = entry
        if current is None and len(self.alerts) > self.max_alerts:
            self._evict()
        self.version += 1
        return [aid]

    def _evict(self) -> None:
        excess = len(self.alerts) - self.max_alerts
        if excess <= 0:
            return
        # Closed alerts go first, then the oldest by last event.
        order = sorted(self.alerts.values(), key=lambda e: (e.doc["alert_id"] not in self.closures, e.last))
        for entry in order[:excess]:
            aid = entry.doc["alert_id"]
            del self.alerts[aid]
            self.history.pop(aid, None)

    def apply_ack(self, doc: Mapping[str, Any]) -> list[str]:
        """An acknowledgment: the first one per alert counts."""
        aid = doc.get("alert_id")
        if not isinstance(aid, str) or not doc.get("by") or aid in self.acks:
            return []
        self.acks[aid] = {k: doc.get(k, "") for k in ("alert_id", "by", "at", "via", "comment")}
        self.version += 1
        return [aid]

    def apply_state(self, doc: Mapping[str, Any]) -> list[str]:
        """A closure or reopening from ``alert-states``: only a newer ``version`` changes anything.

        Records without a version (written before reopening existed) count as
        version 1, so of two such closures the first counts.
        """
        aid = doc.get("alert_id")
        state = doc.get("state")
        if not isinstance(aid, str) or state not in ("closed", "open"):
            return []
        if state == "closed" and doc.get("resolution") not in RESOLUTIONS:
            return []
        try:
            version = int(doc.get("version", 1))
        except (TypeError, ValueError):
            return []
        if version <= self.state_versions.get(aid, 0):
            return []
        self.state_versions[aid] = version
        if state == "closed":
            self.closures[aid] = dict(doc)
            self.reopened.pop(aid, None)
            if doc.get("resolution") == "confirmed":
                self._confirmed(aid, (doc.get("ppc") or {}).get("known_at") or doc.get("at"))
        else:
            self.closures.pop(aid, None)
            self.reopened[aid] = dict(doc)
        self.version += 1
        return [aid]

    def _confirmed(self, aid: str, at: Any) -> None:
        """Remember the earliest confirmation of an alert as a leak (from state or audit records)."""
        if not at or not _parse_ts(at):
            return
        known = self.confirmed_at.get(aid)
        if known is None or _parse_ts(at) < _parse_ts(known):
            self.confirmed_at[aid] = str(at)

    def apply_audit(self, doc: Mapping[str, Any]) -> list[str]:
        """An audit record: attached to every alert it names (deduplicated by record id)."""
        ids = doc.get("alert_ids")
        if not isinstance(ids, list) or not ids or not doc.get("action") or not doc.get("at"):
            return []  # records about no alert (sign-ins) are not part of any alert's trail
        key = _audit_key(doc)
        if key in self._audit_seen:
            return []
        self._audit_seen.add(key)
        alert_ids = [str(a) for a in ids]
        detail = doc.get("detail") or {}
        if doc["action"] == ACTION_CLOSED and isinstance(detail, dict) and detail.get("resolution") == "confirmed":
            for aid in alert_ids:
                self._confirmed(aid, (detail.get("ppc") or {}).get("known_at") or doc["at"])
        record: dict[str, Any] = {
            "action": str(doc["action"]),
            "at": str(doc["at"]),
            "actor": str(doc.get("actor", "")),
            "via": str(doc.get("via", "")),
            "alert_ids": alert_ids,
            "detail": dict(doc.get("detail") or {}),
            "_t": _parse_ts(doc["at"]),
        }
        changed = []
        for aid in alert_ids:
            hist = self.history[aid]
            hist.append(record)
            if len(hist) > 1 and hist[-2]["_t"] > record["_t"]:
                hist.sort(key=lambda r: r["_t"])
            changed.append(aid)
        if changed:
            self.version += 1
        return changed

    # -- derived views -------------------------------------------------------------------

    def state_of(self, aid: str) -> str:
        """new / escalated / acknowledged / closed."""
        if aid in self.closures:
            return "closed"
        if aid in self.acks:
            return "acknowledged"
        if any(r["action"] in ("mail.sent", "digest.sent", "escalation.step") for r in self.history.get(aid, ())):
            return "escalated"
        return "new"

    def escalation_tier(self, aid: str) -> int:
        """The highest timed-escalation tier mailed (0: none)."""
        tiers = [int(r["detail"].get("tier") or 0) for r in self.history.get(aid, ()) if r["action"] == "escalation.step"]
        return max(tiers, default=0)

    def summary(self, aid: str) -> dict[str, Any]:
        """One row of the alert list."""
        e = self.alerts[aid]
        d = e.doc
        closure = self.closures.get(aid)
        evidence = d.get("evidence") or {}
        return {
            "alert_id": aid,
            "rule_id": d.get("rule_id", ""),
            "title": d.get("title", ""),
            "title_en": d.get("title_en") or d.get("title", ""),
            "severity": d.get("severity", ""),
            "user": d.get("user", ""),
            "department": d.get("department") or "",
            "terminals": list(evidence.get("terminals") or [])[:5],
            "first_ts": d.get("first_ts", ""),
            "last_ts": d.get("last_ts", ""),
            "count": d.get("count", 0),
            "revision": e.revision,
            "state": self.state_of(aid),
            "resolution": closure.get("resolution") if closure else None,
            "tier": self.escalation_tier(aid),
        }

    def query(
        self,
        *,
        severity: Iterable[str] = (),
        rule: str = "",
        department: str = "",
        state: Iterable[str] = (),
        since: float | None = None,
        until: float | None = None,
        search: str = "",
        limit: int = 500,
    ) -> tuple[int, list[dict[str, Any]]]:
        """(matching count, newest-first rows up to ``limit``). Time range overlaps [first, last]."""
        sev = set(severity)
        states = set(state)
        needle = search.strip().lower()
        hits = []
        for aid, e in self.alerts.items():
            d = e.doc
            if sev and d.get("severity") not in sev:
                continue
            if rule and d.get("rule_id") != rule:
                continue
            if department and (d.get("department") or "") != department:
                continue
            if since is not None and e.last < since:
                continue
            if until is not None and e.first > until:
                continue
            if needle and needle not in aid.lower() and needle not in str(d.get("user", "")).lower():
                continue
            if states and self.state_of(aid) not in states:
                continue
            hits.append(e)
        hits.sort(key=lambda e: (e.last, e.seq), reverse=True)
        return len(hits), [self.summary(e.doc["alert_id"]) for e in hits[:limit]]

    def facets(self) -> dict[str, Any]:
        """Values for the filter menus: rules (with titles) and departments."""
        rules: dict[str, tuple[str, str]] = {}
        departments: set[str] = set()
        for e in self.alerts.values():
            d = e.doc
            rules.setdefault(str(d.get("rule_id")), (str(d.get("title", "")), str(d.get("title_en") or d.get("title", ""))))
            if d.get("department"):
                departments.add(str(d["department"]))
        return {
            "rules": [{"id": k, "title": v[0], "title_en": v[1]} for k, v in sorted(rules.items())],
            "departments": sorted(departments),
            "severities": list(SEVERITIES),
            "states": list(STATES),
        }

    def trail(self, aid: str) -> list[dict[str, Any]]:
        """The audit history of one alert, oldest first, with wording in both languages."""
        out = []
        for r in self.history.get(aid, ()):
            ja, en = describe_record(r)
            out.append({k: v for k, v in r.items() if not k.startswith("_")} | {"what": ja, "what_en": en})
        return out

    def overview(self, tz: tzinfo, today: date, days: int) -> dict[str, Any]:
        """Alerts per day by severity and rule, top users and departments, states."""
        day_of: dict[str, date] = {}
        for aid, e in self.alerts.items():
            day_of[aid] = datetime.fromtimestamp(e.first, tz).date() if e.first else today
        end = today
        start = end - timedelta(days=days - 1)
        if day_of and not any(start <= d <= end for d in day_of.values()):
            # Nothing recent (e.g. replayed historical logs): show the latest days that have alerts.
            end = max(day_of.values())
            start = end - timedelta(days=days - 1)
        labels = [(start + timedelta(days=i)).isoformat() for i in range(days)]
        by_sev = {s: [0] * days for s in SEVERITIES}
        by_rule: dict[str, list[int]] = {}
        titles: dict[str, tuple[str, str]] = {}
        users: Counter[tuple[str, str]] = Counter()
        depts: Counter[str] = Counter()
        sev_of_user: dict[tuple[str, str], int] = defaultdict(int)
        states: Counter[str] = Counter()
        total = 0
        for aid, e in self.alerts.items():
            d = e.doc
            states[self.state_of(aid)] += 1
            day = day_of[aid]
            if not start <= day <= end:
                continue
            total += 1
            i = (day - start).days
            sev = str(d.get("severity"))
            if sev in by_sev:
                by_sev[sev][i] += 1
            rid = str(d.get("rule_id"))
            by_rule.setdefault(rid, [0] * days)[i] += 1
            titles.setdefault(rid, (str(d.get("title", rid)), str(d.get("title_en") or d.get("title", rid))))
            key = (str(d.get("user", "")), str(d.get("department") or ""))
            users[key] += 1
            sev_of_user[key] = max(sev_of_user[key], SEVERITY_RANK.get(sev, 0))
            depts[str(d.get("department") or "")] += 1
        return {
            "days": labels,
            "total": total,
            "by_severity": by_sev,
            "by_rule": [
                {"rule_id": rid, "title": titles[rid][0], "title_en": titles[rid][1], "counts": counts}
                for rid, counts in sorted(by_rule.items(), key=lambda kv: -sum(kv[1]))
            ],
            "top_users": [
                {"user": u, "department": dp, "count": n, "max_severity": SEVERITIES[sev_of_user[(u, dp)]]}
                for (u, dp), n in users.most_common(10)
            ],
            "top_departments": [{"department": dp, "count": n} for dp, n in depts.most_common(10)],
            "states": {s: states.get(s, 0) for s in STATES},
        }


def describe_record(record: Mapping[str, Any]) -> tuple[str, str]:
    """(Japanese, English) wording of an audit record."""
    action = record.get("action")
    detail = record.get("detail") or {}
    if action == ACTION_CLOSED:
        ja, en = _CLOSE_WORDS.get(str(detail.get("resolution")), ("クローズ", "closed"))
        if detail.get("comment"):
            ja += f"「{detail['comment']}」"
            en += f' "{detail["comment"]}"'
        return ja, en
    try:
        from streams.audit import AuditRecord, describe

        rec = AuditRecord(
            action=str(action),
            at=str(record.get("at")),
            actor=str(record.get("actor", "")),
            via=str(record.get("via", "")),
            # The trail is the alert's own: a reopening need not name it again.
            alert_ids=() if action == ACTION_REOPENED else tuple(record.get("alert_ids") or ()),
            detail=dict(detail),
        )
        return describe(rec, "ja"), describe(rec, "en")
    except (ValueError, KeyError, TypeError, ImportError):
        return str(action), str(action)


# --------------------------------------------------------------------------- health


def _metric_total(metric: Any, suffix: str = "") -> float:
    total = 0.0
    for family in metric.collect():
        for sample in family.samples:
            if not suffix or sample.name.endswith(suffix):
                total += float(sample.value)
    return total


def health_snapshot() -> dict[str, float]:
    """Current totals from :data:`streams.metrics.REGISTRY` (this worker's process)."""
    from streams import metrics

    return {
        "lag": _metric_total(metrics.CONSUMER_LAG),
        "consumed": _metric_total(metrics.EVENTS_CONSUMED, "_total"),
        "invalid": _metric_total(metrics.EVENTS_INVALID, "_total"),
        "mails_sent": _metric_total(metrics.MAILS_SENT, "_total"),
        "mails_failed": _metric_total(metrics.MAILS_FAILED, "_total"),
        "mails_retried": _metric_total(metrics.MAILS_RETRIED, "_total"),
        "unacknowledged": _metric_total(metrics.ALERTS_UNACKNOWLEDGED),
        "alerts_published": _metric_total(metrics.ALERTS, "_total"),
    }


class HealthSampler:
    """A ring of :func:`health_snapshot` samples turned into rates for sparklines."""

    def __init__(self, size: int = 360) -> None:
        self.samples: deque[tuple[float, dict[str, float]]] = deque(maxlen=size)

    def sample(self, now: float, snap: dict[str, float] | None = None) -> None:
        self.samples.append((now, snap if snap is not None else health_snapshot()))

    def series(self) -> list[dict[str, float]]:
        """Per interval: lag (gauge), DLQ/min, events/s, mails sent and failed in the interval."""
        out = []
        prev: tuple[float, dict[str, float]] | None = None
        for t, s in self.samples:
            if prev is not None:
                dt = max(t - prev[0], 1e-6)
                p = prev[1]
                out.append(
                    {
                        "t": round(t),
                        "lag": s["lag"],
                        "dlq_per_min": max(0.0, s["invalid"] - p["invalid"]) * 60.0 / dt,
                        "events_per_s": max(0.0, s["consumed"] - p["consumed"]) / dt,
                        "mails_sent": max(0.0, s["mails_sent"] - p["mails_sent"]),
                        "mails_failed": max(0.0, s["mails_failed"] - p["mails_failed"]),
                    }
                )
            prev = (t, s)
        return out


# --------------------------------------------------------------------------- the service


class ActionError(Exception):
    """An operator action that cannot be done: HTTP status and a message in both languages."""

    def __init__(self, status: int, ja: str, en: str) -> None:
        super().__init__(en)
        self.status = status
        self.ja = ja
        self.en = en


class ConsoleService:
    """Reads the topics into a :class:`ConsoleStore`, writes operator actions, feeds SSE."""

    def __init__(
        self,
        settings: Settings,
        console: ConsoleSettings,
        *,
        clock: Callable[[], float] = time.time,
        rules: Mapping[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.console = console
        self.clock = clock
        self.tz = ZoneInfo(settings.tz)
        self.store = ConsoleStore(console.max_alerts)
        self.rules: dict[str, Any] = (
            dict(rules) if rules is not None else load_rule_map(settings, _log, "the console lacks rule descriptions")
        )
        secret = console.session_secret.encode() if console.session_secret else secrets.token_bytes(32)
        if not console.session_secret:
            _log.warning("console.session_secret not set: sign-ins do not survive a restart or reach other workers")
        self.signer = SessionSigner(secret, console.session_ttl_s)
        self.throttle = LoginThrottle(console.login_max_failures)
        self.health = HealthSampler()
        self.started = False
        self.caught_up = False
        self._subscribers: set[asyncio.Queue[list[str] | None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._producer: Any = None
        self._consumer: Any = None
        self._admin: Any = None
        self._tps: list[Any] = []
        self._end: dict[Any, int] = {}
        self._lock = asyncio.Lock()
        #: Sign-in audit records not yet on the audit topic (written by the background writer).
        self.audit_queue: deque[AuditRecord] = deque()
        self._audit_wake = asyncio.Event()

    @property
    def topics(self) -> tuple[str, ...]:
        s = self.settings
        return (s.topic_alerts, s.topic_audit, s.topic_acks, self.console.topic_states)

    @property
    def secure_cookies(self) -> bool:
        if self.console.cookie_secure == "auto":
            return self.settings.public_url.startswith("https://")
        return self.console.cookie_secure == "true"

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Create the states topic if needed, assign every partition from the beginning, start reading."""
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
        from aiokafka.admin import AIOKafkaAdminClient

        args = self.settings.kafka_client_args()
        if self.settings.create_topics:
            await self._create_states_topic(args)
        self._producer = AIOKafkaProducer(acks="all", linger_ms=2, **args)
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, auto_offset_reset="earliest", **args)
        await self._consumer.start()
        self._admin = AIOKafkaAdminClient(**args)
        await self._admin.start()
        self.started = True
        self._tasks.append(asyncio.create_task(self._read_loop(), name="console-reader"))
        self._tasks.append(asyncio.create_task(self._health_loop(), name="console-health"))
        self._tasks.append(asyncio.create_task(self._audit_loop(), name="console-audit"))
        _log.info("console started", topics=list(self.topics))

    async def stop(self, timeout: float = 5.0) -> None:
        """End live streams, write the queued audit records (for up to ``timeout``), stop reading, close the clients."""
        self.started = False
        self.close_streams()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks.clear()
        if self._producer is not None and self.audit_queue:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._write_queued_audit(), timeout)
        if self.audit_queue:
            _log.error("console audit records not written", records=len(self.audit_queue))
        await stop_clients(self._consumer, self._producer)
        if self._admin is not None:
            with contextlib.suppress(Exception):
                await self._admin.close()
        _log.info("console stopped")

    async def _create_states_topic(self, args: dict[str, Any]) -> None:
        specs = {self.console.topic_states: (1, {"cleanup.policy": "compact"})}
        await create_missing_topics(args, specs, self.settings.replication_factor)

    async def _assign(self) -> bool:
        """Assign every partition of the topics that exist now (new ones from the beginning)."""
        from aiokafka import TopicPartition

        # Metadata of *all* topics (asking for named ones would auto-create them on
        # some brokers). The consumer's own metadata only covers tracked topics,
        # so the admin client answers; partitions without a leader wait.
        described = await self._admin.describe_topics()
        wanted = set(self.topics)
        tps = sorted(
            (
                TopicPartition(t["topic"], int(p.get("partition", p.get("partition_index", -1))))
                for t in described
                if t.get("topic") in wanted and not t.get("error_code")
                for p in t.get("partitions") or ()
                if p.get("leader", -1) >= 0
            ),
            key=lambda tp: (self.topics.index(tp.topic), tp.partition),
        )
        new = [tp for tp in tps if tp not in set(self._tps)]
        if not new:
            return False
        # assign() forgets positions: keep those of the partitions already being read.
        kept = {tp: await self._consumer.position(tp) for tp in self._tps if tp in set(tps)}
        self._tps = tps
        self._consumer.assign(tps)
        for tp, offset in kept.items():
            self._consumer.seek(tp, offset)
        await self._consumer.seek_to_beginning(*new)
        ends = await self._consumer.end_offsets(new)
        self._end.update(ends)
        self.caught_up = False
        return True

    async def _read_loop(self) -> None:
        last_refresh = 0.0
        while True:
            try:
                now = time.monotonic()
                complete = {tp.topic for tp in self._tps} == set(self.topics)
                if now - last_refresh > (30.0 if complete and self.caught_up else 2.0):
                    last_refresh = now
                    await self._assign()
                if not self._tps:
                    await asyncio.sleep(0.5)
                    continue
                batch = await self._consumer.getmany(timeout_ms=500, max_records=5000)
                changed: list[str] = []
                for tp, messages in batch.items():
                    for msg in messages:
                        changed.extend(self._apply(tp.topic, msg.value))
                if changed:
                    self._publish(list(dict.fromkeys(changed)))
                if not self.caught_up:
                    positions = [await self._consumer.position(tp) for tp in self._tps]
                    if all(pos >= self._end.get(tp, 0) for tp, pos in zip(self._tps, positions, strict=True)):
                        self.caught_up = True
                        self._publish([])
                        _log.info("console caught up", alerts=len(self.store.alerts))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log.warning("console reading failed; retrying", error=repr(exc))
                await asyncio.sleep(1.0)

    def _apply(self, topic: str, value: bytes | None) -> list[str]:
        if not value:
            return []
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError:
            return []
        if not isinstance(doc, dict):
            return []
        s = self.settings
        if topic == s.topic_alerts:
            return self.store.apply_alert(doc, self.clock())
        if topic == s.topic_audit:
            return self.store.apply_audit(doc)
        if topic == s.topic_acks:
            return self.store.apply_ack(doc)
        if topic == self.console.topic_states:
            return self.store.apply_state(doc)
        return []

    # -- audit of sign-ins ------------------------------------------------------------------

    def note_signin(self, user: str, *, ok: bool, reason: str = "", remote: str = "", method: str = "password") -> AuditRecord:
        """Queue the audit record of a sign-in (``reason``: why it failed); written in the background.

        A failed sign-in names the user name that was tried (cleaned: no control
        characters, at most 100 characters, personal-number-like digits masked),
        never the password.
        """
        name = scrub("".join(ch for ch in user.strip() if ch.isprintable())[:100]) or "-"
        detail: dict[str, Any] = {"method": method}
        if reason:
            detail["reason"] = reason
        if remote:
            detail["remote"] = scrub(remote[:100])
        record = AuditRecord(
            action=ACTION_SIGNIN if ok else ACTION_SIGNIN_FAILED,
            at=self._now_iso(),
            actor=name,
            via="console",
            detail=detail,
            record_id=f"{'signin' if ok else 'signin_failed'}:{random_token()}",
        )
        if len(self.audit_queue) >= _AUDIT_QUEUE_MAX:
            dropped = self.audit_queue.popleft()
            _log.error("console audit queue full; oldest record dropped", action=dropped.action, at=dropped.at)
        self.audit_queue.append(record)
        self._audit_wake.set()
        return record

    async def _write_queued_audit(self) -> None:
        """Write what is queued now; records leave the queue only once the broker has them."""
        batch = list(self.audit_queue)
        if not batch:
            return
        await write_audit(self._producer, self.settings.topic_audit, batch)
        written = {id(r) for r in batch}
        while self.audit_queue and id(self.audit_queue[0]) in written:
            self.audit_queue.popleft()

    async def _audit_loop(self) -> None:
        delay = 0.5
        while True:
            await self._audit_wake.wait()
            self._audit_wake.clear()
            try:
                await self._write_queued_audit()
                delay = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log.warning("cannot write console audit records; retrying", error=repr(exc), queued=len(self.audit_queue))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                self._audit_wake.set()

    async def _health_loop(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                self.health.sample(self.clock())
            await asyncio.sleep(self.console.health_interval_s)

    # -- live updates ----------------------------------------------------------------------

    def subscribe(self) -> asyncio.Queue[list[str] | None]:
        q: asyncio.Queue[list[str] | None] = asyncio.Queue(maxsize=100)
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[list[str] | None]) -> None:
        self._subscribers.discard(q)

    def _publish(self, ids: list[str]) -> None:
        for q in list(self._subscribers):
            try:
                q.put_nowait(ids)
            except asyncio.QueueFull:
                # A slow client: drop its backlog, it refetches on the next event anyway.
                with contextlib.suppress(asyncio.QueueEmpty):
                    while True:
                        q.get_nowait()
                q.put_nowait(ids)

    def close_streams(self) -> None:
        """Tell every open SSE stream to end (shutdown)."""
        for q in list(self._subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(None)

    # -- actions ---------------------------------------------------------------------------

    def _now_iso(self) -> str:
        return datetime.fromtimestamp(self.clock(), self.tz).isoformat(timespec="seconds")

    def _require_alert(self, alert_id: str) -> None:
        if not _ALERT_ID.match(alert_id) or alert_id not in self.store.alerts:
            raise ActionError(404, "アラートが見つかりません。", "No such alert.")

    async def acknowledge(self, alert_id: str, operator: str, comment: str) -> dict[str, Any]:
        """Record an acknowledgment (the same record as the mail's ack link, ``via: console``)."""
        from streams.ack import AckRecord, publish_ack

        async with self._lock:
            self._require_alert(alert_id)
            existing = self.store.acks.get(alert_id)
            if existing is not None:
                raise ActionError(409, f"{existing['by']} さんが受領確認済みです。", f"Already acknowledged by {existing['by']}.")
            ack = self._ack_record(AckRecord, alert_id, operator, comment)
            await publish_ack(self._producer, self.settings.topic_acks, self.settings.topic_audit, ack)
            changed = self._applied_ack(ack)
        self._publish(changed)
        _log.info("alert acknowledged", alert_id=alert_id, via="console")
        return self.store.acks[alert_id]

    def _applied_ack(self, ack: Any) -> list[str]:
        """Show a published ack (and its audit record) at once; the copies read back are deduplicated."""
        from streams.ack import ack_audit_record

        return self.store.apply_ack(orjson.loads(ack.to_json())) + self.store.apply_audit(ack_audit_record(ack).to_dict())

    def _ack_record(self, cls: Any, alert_id: str, operator: str, comment: str) -> Any:
        try:
            return cls(alert_id=alert_id, by=operator, at=self._now_iso(), via="console", comment=comment)
        except ValueError as exc:
            raise ActionError(400, _ja_input_error(str(exc)), str(exc)) from None

    def _comment(self, comment: str) -> None:
        """A required reason: at most 1000 characters, no control characters, no personal number."""
        from streams.ack import check_text

        try:
            check_text("comment", comment, 1000, required=True)
        except ValueError as exc:
            raise ActionError(400, _ja_input_error(str(exc)), str(exc)) from None

    async def close(
        self, alert_id: str, operator: str, resolution: str, comment: str, unauthorised_purpose: bool = False
    ) -> dict[str, Any]:
        """Close as false positive or confirmed incident; acknowledges first if nobody did."""
        from streams.ack import AckRecord, publish_ack

        if resolution not in RESOLUTIONS:
            raise ActionError(400, "クローズの種別が不正です。", "resolution must be false_positive or confirmed")
        self._comment(comment)
        async with self._lock:
            self._require_alert(alert_id)
            existing = self.store.closures.get(alert_id)
            if existing is not None:
                raise ActionError(409, f"{existing.get('by')} さんがクローズ済みです。", f"Already closed by {existing.get('by')}.")
            changed: list[str] = []
            if alert_id not in self.store.acks:
                ack = self._ack_record(AckRecord, alert_id, operator, comment)
                await publish_ack(self._producer, self.settings.topic_acks, self.settings.topic_audit, ack)
                changed += self._applied_ack(ack)
            at = self._now_iso()
            doc = self._state_doc(alert_id, "closed", operator, at, comment)
            doc["resolution"] = resolution
            doc["unauthorised_purpose"] = bool(unauthorised_purpose and resolution == "confirmed")
            if resolution == "confirmed":
                # Reopened and confirmed again: the clock of the first confirmation still runs.
                known = self.store.confirmed_at.get(alert_id, at)
                doc["ppc"] = ppc_deadlines(datetime.fromisoformat(known), self.console, doc["unauthorised_purpose"])
            detail = {k: doc[k] for k in ("resolution", "comment", "unauthorised_purpose")} | (
                {"ppc": doc["ppc"]} if "ppc" in doc else {}
            )
            changed += await self._write_state(doc, ACTION_CLOSED, "close", detail)
        self._publish(list(dict.fromkeys(changed)))
        _log.info("alert closed", alert_id=alert_id, resolution=resolution)
        return doc

    async def reopen(self, alert_id: str, operator: str, comment: str) -> dict[str, Any]:
        """Reopen a closed alert (why: ``comment``, required); it is open (and still acknowledged) again."""
        self._comment(comment)
        async with self._lock:
            self._require_alert(alert_id)
            closure = self.store.closures.get(alert_id)
            if closure is None:
                raise ActionError(409, "このアラートはクローズされていません。", "The alert is not closed.")
            doc = self._state_doc(alert_id, "open", operator, self._now_iso(), comment)
            doc["reopened_from"] = {k: closure.get(k) for k in ("resolution", "by", "at")}
            detail = {
                "comment": comment,
                "previous_resolution": closure.get("resolution"),
                "closed_by": closure.get("by"),
                "closed_at": closure.get("at"),
            }
            changed = await self._write_state(doc, ACTION_REOPENED, "reopen", detail)
        self._publish(list(dict.fromkeys(changed)))
        _log.info("alert reopened", alert_id=alert_id)
        return doc

    def _state_doc(self, alert_id: str, state: str, operator: str, at: str, comment: str) -> dict[str, Any]:
        return {
            "schema_version": STATE_SCHEMA_VERSION,
            "alert_id": alert_id,
            "state": state,
            "version": self.store.state_versions.get(alert_id, 0) + 1,
            "by": operator,
            "at": at,
            "via": "console",
            "comment": comment,
        }

    async def _write_state(self, doc: dict[str, Any], action: str, verb: str, detail: dict[str, Any]) -> list[str]:
        """The state record on ``alert-states`` and its audit record; applied once the broker has both."""
        aid = doc["alert_id"]
        audit = {
            "schema_version": 1,
            "record_id": f"{verb}:{aid}:{doc['version']}:{doc['at']}",
            "action": action,
            "at": doc["at"],
            "actor": doc["by"],
            "via": "console",
            "alert_ids": [aid],
            "detail": detail,
        }
        key = aid.encode()
        f1 = await self._producer.send(self.console.topic_states, value=orjson.dumps(doc, option=orjson.OPT_SORT_KEYS), key=key)
        f2 = await self._producer.send(
            self.settings.topic_audit,
            value=orjson.dumps(audit, option=orjson.OPT_SORT_KEYS),
            key=key,
            headers=[("action", action.encode())],
        )
        await f1
        await f2
        return self.store.apply_state(doc) + self.store.apply_audit(audit)

    # -- views for the API ---------------------------------------------------------------

    def detail(self, alert_id: str) -> dict[str, Any] | None:
        """Everything the detail page shows about one alert."""
        entry = self.store.alerts.get(alert_id)
        if entry is None:
            return None
        d = entry.doc
        rule = self.rules.get(str(d.get("rule_id")))
        from detectors.rules import VIEWPOINTS

        vp = VIEWPOINTS.get(str(d.get("viewpoint")), ("", ""))
        closure = self.store.closures.get(alert_id)
        ppc = None
        if closure and closure.get("resolution") == "confirmed":
            ppc = closure.get("ppc") or ppc_deadlines(
                datetime.fromisoformat(str(closure["at"])), self.console, bool(closure.get("unauthorised_purpose"))
            )
            today = datetime.fromtimestamp(self.clock(), self.tz).date()
            ppc = dict(ppc) | {
                "prompt_days_left": (date.fromisoformat(ppc["prompt_due"]) - today).days,
                "final_days_left": (date.fromisoformat(ppc["final_due"]) - today).days,
            }
        return {
            "alert": d,
            "summary": self.store.summary(alert_id),
            "rule": {
                "id": d.get("rule_id"),
                "title": rule.title if rule else d.get("title"),
                "title_en": rule.title_en if rule else d.get("title_en"),
                "description": rule.describe("en") if rule else "",
                "description_ja": rule.describe("ja") if rule else "",
                "falsepositives": list(rule.falsepositives) if rule else [],
                "viewpoint": d.get("viewpoint"),
                "viewpoint_ja": vp[0],
                "viewpoint_en": vp[1],
            },
            "ack": self.store.acks.get(alert_id),
            "closure": closure,
            "reopened": self.store.reopened.get(alert_id) if closure is None else None,
            "ppc": ppc,
            "trail": self.store.trail(alert_id),
        }

    def overview(self, days: int | None = None) -> dict[str, Any]:
        today = datetime.fromtimestamp(self.clock(), self.tz).date()
        out = self.store.overview(self.tz, today, days or self.console.overview_days)
        now = health_snapshot()
        out["health"] = {
            "now": now,
            "series": self.health.series(),
            "console": {"caught_up": self.caught_up, "alerts_known": len(self.store.alerts)},
        }
        return out


def _ja_input_error(text: str) -> str:
    if "12-digit" in text:
        return "12桁の数字（個人番号の可能性）は入力できません。"
    if "required" in text:
        return "コメントを入力してください。"
    if "longer" in text:
        return "入力が長すぎます。"
    if "alert id" in text:
        return "アラートIDが不正です。"
    return "入力に使えない文字が含まれています。"


# --------------------------------------------------------------------------- web

#: Applied to every console response.
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}
_CONTENT_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
_PAGES: Final = {"list": "console.html", "alert": "alert.html", "overview": "overview.html"}


def _headers(extra: Mapping[str, str] | None = None, *, cache: str = "no-store") -> dict[str, str]:
    out = dict(SECURITY_HEADERS)
    out["Cache-Control"] = cache
    if extra:
        out.update(extra)
    return out


def _time_param(text: str | None, tz: tzinfo, end_of_day: bool = False) -> float | None:
    if not text:
        return None
    text = text.strip()
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            moment = datetime.combine(day + timedelta(days=1) if end_of_day else day, datetime.min.time(), tz)
            return moment.timestamp() - (0.001 if end_of_day else 0)
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ActionError(400, "日時の形式が不正です。", f"bad date/time {text!r}") from None
    return (value if value.tzinfo else value.replace(tzinfo=tz)).timestamp()


def register(
    app: Any,
    settings: Settings,
    *,
    console: ConsoleSettings | None = None,
    clock: Callable[[], float] | None = None,
) -> ConsoleService | None:
    """Add the console's pages, API and service to a Faust app (``console.enabled``)."""
    from aiohttp import web
    from faust.web import View

    cs: ConsoleSettings = console if console is not None else load_settings(ConsoleSettings, section="console")
    if not cs.enabled:
        _log.info("operator console disabled")
        return None
    if not cs.accounts and not cs.trust_proxy_header:
        _log.warning("console has no accounts (console.users) and trust_proxy_header is off: nobody can sign in")
    service = ConsoleService(settings, cs, clock=clock or time.time)
    signer = service.signer
    static_files = {p.name: p for p in STATIC_DIR.iterdir() if p.suffix in _CONTENT_TYPES} if STATIC_DIR.is_dir() else {}

    # -- helpers shared by the views ----------------------------------------------------

    def json_response(doc: Any, status: int = 200, extra: Mapping[str, str] | None = None) -> web.Response:
        return web.Response(
            body=orjson.dumps(scrub_tree(doc)),
            status=status,
            content_type="application/json",
            charset="utf-8",
            headers=_headers(extra),
        )

    def error(status: int, ja: str, en: str) -> web.Response:
        return json_response({"error": en, "error_ja": ja}, status)

    def set_session_cookie(resp: web.StreamResponse, value: str) -> None:
        resp.set_cookie(
            SessionSigner.COOKIE,
            value,
            max_age=int(cs.session_ttl_s),
            path="/",
            httponly=True,
            samesite="Strict",
            secure=service.secure_cookies,
        )

    def session_of(request: web.Request) -> tuple[Session | None, str | None]:
        """The request's session; with a trusted proxy header, a (new) cookie value to set."""
        now = service.clock()
        session = signer.verify(request.cookies.get(SessionSigner.COOKIE), now)
        if cs.trust_proxy_header:
            raw = request.headers.get(cs.proxy_header, "")
            if raw:
                try:
                    user = _check_operator(raw)
                except ValueError:
                    return None, None
                if session is not None and session.user == user and session.via == "proxy":
                    return session, None
                fresh, cookie = signer.issue(user, now, via="proxy")
                service.note_signin(user, ok=True, remote=request.remote or "", method="proxy")
                return fresh, cookie
            if session is not None and session.via == "proxy":
                return None, None  # the proxy no longer vouches for this session
        return session, None

    def same_origin(request: web.Request) -> bool:
        origin = request.headers.get("Origin")
        if origin is None:
            return True  # not sent by every browser for same-origin requests; CSRF token still required
        return origin in (f"{request.scheme}://{request.host}", settings.public_url.rstrip("/"))

    def check_post(request: web.Request, session: Session | None, token: str | None) -> web.Response | None:
        if session is None:
            return error(401, "サインインしてください。", "Sign in first.")
        if not same_origin(request):
            return error(403, "別のサイトからの送信は受け付けません。", "Cross-origin request refused.")
        if not signer.check_csrf(session, token):
            return error(403, "CSRFトークンがありません。ページを再読み込みしてください。", "Missing or wrong CSRF token.")
        return None

    def page_response(name: str, request: web.Request) -> web.StreamResponse:
        session, cookie = session_of(request)
        if session is None:
            target = quote(request.path_qs, safe="/?=&-_.")
            raise web.HTTPSeeOther(f"/console/login?next={target}", headers=_headers())
        path = static_files.get(_PAGES[name])
        if path is None:
            return web.Response(text="console assets missing", status=500, headers=_headers())
        resp = web.Response(body=path.read_bytes(), content_type="text/html", charset="utf-8", headers=_headers())
        if cookie:
            set_session_cookie(resp, cookie)
        return resp

    async def api_session(request: web.Request) -> tuple[Session | None, str | None, web.Response | None]:
        session, cookie = session_of(request)
        if session is None:
            return None, None, error(401, "サインインしてください。", "Sign in first.")
        return session, cookie, None

    def with_cookie(resp: web.Response, cookie: str | None) -> web.Response:
        if cookie:
            set_session_cookie(resp, cookie)
        return resp

    # -- pages ---------------------------------------------------------------------------

    @app.page("/console", name="console-list")
    class ListPage(View):
        """The live alert list."""

        async def get(self, request: Any) -> Any:
            return page_response("list", request)

    @app.page("/console/overview", name="console-overview")
    class OverviewPage(View):
        """Charts: alerts per day, top users/departments, pipeline health."""

        async def get(self, request: Any) -> Any:
            return page_response("overview", request)

    @app.page("/alerts/{alert_id}", name="console-alert")
    class AlertPage(View):
        """One alert (mails link here)."""

        async def get(self, request: Any, alert_id: str) -> Any:
            return page_response("alert", request)

    @app.page("/console/static/{name}", name="console-static")
    class StaticFile(View):
        """CSS, JS (no inline script anywhere: the CSP forbids it)."""

        async def get(self, request: Any, name: str) -> Any:
            path = static_files.get(name)
            if path is None or path.suffix == ".html":
                return web.Response(status=404, text="not found", headers=_headers())
            return web.Response(
                body=path.read_bytes(),
                headers=_headers({"Content-Type": _CONTENT_TYPES[path.suffix]}, cache="no-cache"),
            )

    @app.page("/console/login", name="console-login")
    class LoginPage(View):
        """Sign-in form (GET) and sign-in (POST); a signed nonce in cookie and form stops login CSRF."""

        def _form(self, next_url: str, message: str = "", status: int = 200) -> web.Response:
            nonce = signer.login_nonce(service.clock())
            body = _login_html(next_url, nonce, message, bool(cs.accounts))
            resp = web.Response(text=body, content_type="text/html", charset="utf-8", status=status, headers=_headers())
            resp.set_cookie(
                SessionSigner.LOGIN_COOKIE, nonce, max_age=3600, path="/console/login",
                httponly=True, samesite="Strict", secure=service.secure_cookies,
            )
            return resp

        async def get(self, request: Any) -> Any:
            session, cookie = session_of(request)
            next_url = _safe_next(request.query.get("next"))
            if session is not None:
                resp = web.HTTPSeeOther(next_url, headers=_headers())
                if cookie:
                    set_session_cookie(resp, cookie)
                raise resp
            return self._form(next_url)

        async def post(self, request: Any) -> Any:
            form = await request.post()
            now = service.clock()
            next_url = _safe_next(str(form.get("next", "")))
            if not same_origin(request) or not signer.check_login_nonce(
                request.cookies.get(SessionSigner.LOGIN_COOKIE), str(form.get("nonce", "")), now
            ):
                return self._form(next_url, "フォームの有効期限が切れました。もう一度入力してください。 / The form expired; please try again.", 403)
            user = str(form.get("user", "")).strip()
            password = str(form.get("password", ""))
            remote = request.remote or ""
            if service.throttle.locked(user, now):
                service.note_signin(user, ok=False, reason="locked", remote=remote)
                return self._form(next_url, "失敗が続いたため一時的にロックしています。15分後に再度お試しください。 / Too many failures; try again in 15 minutes.", 429)
            encoded = cs.accounts.get(user)
            ok = await asyncio.to_thread(verify_password, password, encoded or _DUMMY_HASH)
            if not ok or encoded is None:
                service.throttle.failed(user, now)
                service.note_signin(user, ok=False, reason="unknown_user" if encoded is None else "wrong_password", remote=remote)
                _log.warning("console sign-in failed")
                return self._form(next_url, "ユーザー名またはパスワードが違います。 / Wrong user name or password.", 401)
            service.throttle.succeeded(user)
            service.note_signin(user, ok=True, remote=remote)
            _, cookie = signer.issue(user, now)
            resp = web.HTTPSeeOther(next_url, headers=_headers())
            set_session_cookie(resp, cookie)
            resp.del_cookie(SessionSigner.LOGIN_COOKIE, path="/console/login")
            _log.info("console sign-in", operator=user)
            raise resp

    @app.page("/console/logout", name="console-logout")
    class Logout(View):
        """Sign out (POST with the CSRF token)."""

        async def post(self, request: Any) -> Any:
            session, _ = session_of(request)
            form = await request.post()
            token = request.headers.get("X-CSRF-Token") or str(form.get("csrf", ""))
            refused = check_post(request, session, token)
            if refused is not None:
                return refused
            resp = web.HTTPSeeOther("/console/login", headers=_headers())
            resp.del_cookie(SessionSigner.COOKIE, path="/")
            raise resp

    # -- API -----------------------------------------------------------------------------

    def api_page(path: str, name: str, doc: str, answer: Callable[..., Any]) -> None:
        """``GET path``: signed in; ``answer(request, session, **match_info)`` is the JSON (ActionError: an error)."""

        @app.page(path, name=name)
        class ApiView(View):
            async def get(self, request: Any, **match: str) -> Any:
                session, cookie, refused = await api_session(request)
                if refused is not None:
                    return refused
                try:
                    body = answer(request, session, **match)
                except ActionError as exc:
                    return error(exc.status, exc.ja, exc.en)
                return with_cookie(json_response(body), cookie)

        ApiView.__doc__ = doc

    def me(_request: Any, session: Session) -> dict[str, Any]:
        return {
            "user": session.user,
            "via": session.via,
            "csrf": signer.csrf_token(session),
            "tz": settings.tz,
            "caught_up": service.caught_up,
            "ppc": {
                "prompt_days_min": cs.ppc_prompt_days_min,
                "prompt_days": cs.ppc_prompt_days,
                "final_days": cs.ppc_final_days,
                "final_days_unauthorised": cs.ppc_final_days_unauthorised,
            },
        }

    def alert_list(request: Any, _session: Session) -> dict[str, Any]:
        q = request.query
        total, rows = service.store.query(
            severity=[s for s in q.get("severity", "").split(",") if s],
            rule=q.get("rule", ""),
            department=q.get("department", ""),
            state=[s for s in q.get("state", "").split(",") if s],
            since=_time_param(q.get("since"), service.tz),
            until=_time_param(q.get("until"), service.tz, end_of_day=True),
            search=q.get("q", "")[:200],
            limit=cs.list_limit,
        )
        return {
            "total": total,
            "alerts": rows,
            "facets": service.store.facets(),
            "caught_up": service.caught_up,
            "version": service.store.version,
        }

    def alert_detail(_request: Any, _session: Session, alert_id: str) -> dict[str, Any]:
        doc = service.detail(alert_id)
        if doc is None:
            raise ActionError(404, "アラートが見つかりません。", "No such alert.")
        return doc

    def overview(request: Any, _session: Session) -> dict[str, Any]:
        try:
            days = max(1, min(int(request.query.get("days", cs.overview_days)), 90))
        except ValueError:
            days = cs.overview_days
        return service.overview(days)

    api_page("/console/api/me", "console-api-me", "Who is signed in, the CSRF token, and what the page needs to know.", me)
    api_page(
        "/console/api/alerts",
        "console-api-alerts",
        "The alert list: filters ``severity``, ``rule``, ``department``, ``state`` (comma-separated where several), "
        "``since``/``until`` (date or datetime), ``q`` (user or alert id).",
        alert_list,
    )
    api_page("/console/api/alerts/{alert_id}", "console-api-alert", "One alert's detail.", alert_detail)
    api_page("/console/api/overview", "console-api-overview", "Data of the overview charts.", overview)

    async def read_action(request: Any) -> tuple[Session | None, dict[str, Any], web.Response | None]:
        session, _ = session_of(request)
        try:
            body = orjson.loads(await request.read() or b"{}")
        except orjson.JSONDecodeError:
            return session, {}, error(400, "不正な要求です。", "Body must be JSON.")
        if not isinstance(body, dict):
            return session, {}, error(400, "不正な要求です。", "Body must be a JSON object.")
        refused = check_post(request, session, request.headers.get("X-CSRF-Token"))
        return session, body, refused

    Action = Callable[[str, str, dict[str, Any]], Awaitable[dict[str, Any]]]

    def action_page(verb: str, answer: str, doc: str, act: Action) -> None:
        """``POST /console/api/alerts/<id>/<verb>``: signed in, CSRF token, JSON body; ``{"ok", answer: ...}``."""

        @app.page(f"/console/api/alerts/{{alert_id}}/{verb}", name=f"console-api-{verb}")
        class ActionView(View):
            async def post(self, request: Any, alert_id: str) -> Any:
                session, body, refused = await read_action(request)
                if refused is not None:
                    return refused
                assert session is not None
                try:
                    result = await act(alert_id, session.user, body)
                except ActionError as exc:
                    return error(exc.status, exc.ja, exc.en)
                return json_response({"ok": True, answer: result})

        ActionView.__doc__ = doc

    def comment_of(body: dict[str, Any]) -> str:
        return str(body.get("comment", "")).strip()

    action_page(
        "ack", "ack", """Acknowledge (JSON body ``{"comment": ...}``).""",
        lambda aid, user, body: service.acknowledge(aid, user, comment_of(body)),
    )
    action_page(
        "close", "closure", """Close (JSON body ``{"resolution", "comment", "unauthorised_purpose"}``).""",
        lambda aid, user, body: service.close(
            aid, user, str(body.get("resolution", "")), comment_of(body), bool(body.get("unauthorised_purpose", False))
        ),
    )
    action_page(
        "reopen", "reopened", """Reopen a closed alert (JSON body ``{"comment": why}``, required).""",
        lambda aid, user, body: service.reopen(aid, user, comment_of(body)),
    )

    @app.page("/console/api/stream", name="console-api-stream")
    class Stream(View):
        """Server-sent events: ``alerts`` with the changed ids whenever the store changes."""

        async def get(self, request: Any) -> Any:
            _session, _, refused = await api_session(request)
            if refused is not None:
                return refused
            resp = web.StreamResponse(
                headers=_headers({"Content-Type": "text/event-stream; charset=utf-8", "X-Accel-Buffering": "no"})
            )
            await resp.prepare(request)
            queue = service.subscribe()
            try:
                await resp.write(b"retry: 3000\nevent: hello\ndata: {}\n\n")
                while True:
                    try:
                        ids = await asyncio.wait_for(queue.get(), 15.0)
                    except TimeoutError:
                        await resp.write(b": keep-alive\n\n")
                        continue
                    if ids is None:
                        break
                    data = orjson.dumps(scrub_tree({"ids": ids[:200], "version": service.store.version}))
                    await resp.write(b"event: alerts\ndata: " + data + b"\n\n")
            except (ConnectionResetError, asyncio.CancelledError):
                pass
            finally:
                service.unsubscribe(queue)
            return resp

    # -- lifecycle -------------------------------------------------------------------------

    async def _on_shutdown(_app: Any) -> None:
        service.close_streams()

    app.web.web_app.on_shutdown.append(_on_shutdown)

    start_with_app(app, service, "ConsoleRunner")
    app.leakwatch_console = service
    return service


def _safe_next(value: str | None) -> str:
    """Only same-site paths are redirect targets."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value or "\n" in value:
        return "/console"
    return value


def _login_html(next_url: str, nonce: str, message: str, has_accounts: bool) -> str:
    e = html.escape
    msg = f'<p class="error" role="alert">{e(message)}</p>' if message else ""
    disabled = "" if has_accounts else '<p class="error">アカウントが設定されていません / No accounts are configured (console.users).</p>'
    return (
        '<!DOCTYPE html><html lang="ja"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>サインイン - leakwatch</title>"
        '<link rel="stylesheet" href="/console/static/console.css"></head>'
        '<body class="login"><main class="login-box">'
        "<h1>leakwatch 監視コンソール</h1><p class=\"muted\">Operator console – sign in</p>"
        f"{msg}{disabled}"
        '<form method="post" action="/console/login">'
        f'<input type="hidden" name="nonce" value="{e(nonce)}">'
        f'<input type="hidden" name="next" value="{e(next_url)}">'
        '<label>ユーザー名 / User<input name="user" autocomplete="username" required maxlength="100" autofocus></label>'
        '<label>パスワード / Password<input name="password" type="password" autocomplete="current-password" required></label>'
        '<button type="submit">サインイン / Sign in</button></form>'
        "</main></body></html>"
    )


# --------------------------------------------------------------------------- CLI


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``hash-password`` (``python -m streams.console hash-password``)."""
    parser.add_argument("--stdin", action="store_true", help="read the password from standard input (no prompt)")


def run(args: argparse.Namespace) -> int:
    """Print the scrypt hash of a password for ``console.users``."""
    if args.stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("passwords differ", file=sys.stderr)
            return 2
    if not password:
        print("empty password", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m streams.console hash-password [--stdin]``."""
    parser = argparse.ArgumentParser(prog="python -m streams.console", description="leakwatch operator console helpers")
    sub = parser.add_subparsers(dest="command", required=True)
    configure(sub.add_parser("hash-password", help="hash an operator password for console.users"))
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
