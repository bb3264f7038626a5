"""Worker settings from ``LEAKWATCH_*`` environment variables and/or a YAML file.

Precedence: built-in default < config file (``--config`` or
``LEAKWATCH_CONFIG``) < environment variable. Every setting has one name;
the environment variable is ``LEAKWATCH_`` + the name in upper case, the
file key is the name itself. Unknown file keys and bad values are errors
naming the setting, never a traceback.

Sections other than the core (mail, console) declare their own dataclass
and read it with :func:`load_settings`, so there is one mechanism for all.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = [
    "ConfigError",
    "Settings",
    "load_settings",
    "read_config_file",
    "settings_table",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting is missing or malformed: which one, and why."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


def _meta(doc: str, secret: bool = False) -> dict[str, Any]:
    return {"doc": doc, "secret": secret}


@dataclass(frozen=True, slots=True)
class Settings:
    """Core worker settings. See the README's settings table (generated from these docs)."""

    brokers: str = field(default="127.0.0.1:9092", metadata=_meta("Kafka bootstrap servers, comma-separated"))
    security_protocol: str = field(default="PLAINTEXT", metadata=_meta("PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"))
    ssl_cafile: str = field(default="", metadata=_meta("CA bundle to verify the brokers (SSL)"))
    ssl_certfile: str = field(default="", metadata=_meta("client certificate (mutual TLS)"))
    ssl_keyfile: str = field(default="", metadata=_meta("client key (mutual TLS)"))
    sasl_mechanism: str = field(default="PLAIN", metadata=_meta("PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"))
    sasl_username: str = field(default="", metadata=_meta("SASL user"))
    sasl_password: str = field(default="", metadata=_meta("SASL password", secret=True))
    group_id: str = field(default="leakwatch", metadata=_meta("consumer group of the workers"))
    topic_access: str = field(default="access-events", metadata=_meta("input topic: access events"))
    topic_operation: str = field(default="operation-events", metadata=_meta("input topic: operation events"))
    topic_dlq: str = field(default="events-dlq", metadata=_meta("dead letters: invalid events with original bytes"))
    topic_alerts: str = field(default="leak-alerts", metadata=_meta("every alert, keyed by alert_id"))
    topic_escalations: str = field(default="escalations", metadata=_meta("alerts at or above escalation_severity"))
    topic_acks: str = field(default="acks", metadata=_meta("acknowledgments of escalated alerts"))
    topic_audit: str = field(default="audit", metadata=_meta("audit trail: mails, acks, escalation steps"))
    topic_checkpoints: str = field(default="leakwatch-checkpoints", metadata=_meta("compacted changelog of detector state"))
    partitions: int = field(default=12, metadata=_meta("partitions of the input topics when leakwatch creates them"))
    replication_factor: int = field(default=1, metadata=_meta("replication of topics leakwatch creates"))
    create_topics: bool = field(default=True, metadata=_meta("create missing topics at start"))
    rules_path: str = field(default="", metadata=_meta("directory of rule files (default: the bundled rules)"))
    overrides_path: str = field(default="", metadata=_meta("the agency's override file"))
    escalation_severity: str = field(default="high", metadata=_meta("lowest severity sent to the escalation topic"))
    pseudonym_key: str = field(default="", metadata=_meta("HMAC key for personal-number pseudonyms (>= 16 bytes)", secret=True))
    tz: str = field(default="Asia/Tokyo", metadata=_meta("time zone for reports, mails and day windows"))
    lateness: str = field(default="1h", metadata=_meta("allowed lateness of out-of-order events"))
    max_ahead: str = field(
        default="1d",
        metadata=_meta("an event time further than this ahead of its Kafka message's timestamp is dead-lettered (a wrong clock); 0 turns the check off"),
    )
    checkpoint_interval: float = field(default=1.0, metadata=_meta("seconds between checkpoints and offset commits"))
    max_batch: int = field(default=20000, metadata=_meta("most messages taken from Kafka in one batch"))
    detection_process: str = field(
        default="auto",
        metadata=_meta(
            "decode, validate and detect in child processes pipelined with the Kafka client: "
            "true (one), a number of them (partitions are spread over them), false, or auto (one per CPU from 2 CPUs, at most 4)"
        ),
    )
    session_timeout: float = field(default=10.0, metadata=_meta("seconds without a heartbeat before a worker's partitions go to another"))
    web_host: str = field(default="127.0.0.1", metadata=_meta("address of the web server (metrics, health, console)"))
    web_port: int = field(default=6066, metadata=_meta("port of the web server"))
    public_url: str = field(default="", metadata=_meta("URL the console is reached at (for links in mail)"))
    worker_name: str = field(default="", metadata=_meta("name of this worker in logs and metrics (default: host-pid)"))
    data_dir: str = field(default="", metadata=_meta("Faust data directory (default: a temp dir)"))
    log_level: str = field(default="info", metadata=_meta("debug, info, warning or error"))
    log_format: str = field(default="auto", metadata=_meta("json, console, or auto (console on a terminal)"))

    def validate(self) -> None:
        """Cross-field checks; raises :class:`ConfigError`."""
        from schemas.alert import SEVERITIES

        if self.security_protocol not in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"):
            raise ConfigError("security_protocol", "must be PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL")
        if self.security_protocol.startswith("SASL") and not self.sasl_username:
            raise ConfigError("sasl_username", "required with a SASL security protocol")
        if self.escalation_severity not in SEVERITIES:
            raise ConfigError("escalation_severity", f"must be one of {', '.join(SEVERITIES)}")
        if self.pseudonym_key and len(self.pseudonym_key.encode()) < 16:
            raise ConfigError("pseudonym_key", "must be at least 16 bytes")
        if self.partitions < 1:
            raise ConfigError("partitions", "must be at least 1")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError("log_level", "must be debug, info, warning or error")
        if self.log_format not in ("json", "console", "auto"):
            raise ConfigError("log_format", "must be json, console or auto")
        if not 1.0 <= self.session_timeout <= 300.0:
            raise ConfigError("session_timeout", "must be between 1 and 300 seconds")
        if not 0 < self.web_port < 65536:
            raise ConfigError("web_port", "must be a TCP port")
        if self.detection_process not in ("auto", "true", "false") and not (
            self.detection_process.isdigit() and self.detection_process.isascii() and 1 <= int(self.detection_process) <= 64
        ):
            raise ConfigError("detection_process", "must be true, false, auto or a number of processes from 1 to 64")

    def detection_processes(self) -> int:
        """How many detection child processes the worker runs (0: detection in the worker process)."""
        value = self.detection_process
        if value == "auto":
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            # One child per CPU from two up (the Kafka client side is light), at most four.
            return min(cpus, 4) if cpus >= 2 else 0
        if value == "true":
            return 1
        if value == "false":
            return 0
        return int(value)

    @property
    def input_topics(self) -> tuple[str, str]:
        """The two input topics."""
        return (self.topic_access, self.topic_operation)

    def pseudonym_key_bytes(self) -> bytes:
        """The configured key, or a random per-process one (tokens then differ per run)."""
        return self.pseudonym_key.encode() if self.pseudonym_key else secrets.token_bytes(32)

    def kafka_client_args(self) -> dict[str, Any]:
        """Keyword arguments for aiokafka clients (brokers, TLS, SASL)."""
        args: dict[str, Any] = {
            "bootstrap_servers": self.brokers,
            "security_protocol": self.security_protocol,
        }
        if self.security_protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            args["ssl_context"] = create_ssl_context(
                cafile=self.ssl_cafile or None,
                certfile=self.ssl_certfile or None,
                keyfile=self.ssl_keyfile or None,
            )
        if self.security_protocol.startswith("SASL"):
            args["sasl_mechanism"] = self.sasl_mechanism
            args["sasl_plain_username"] = self.sasl_username
            args["sasl_plain_password"] = self.sasl_password
        return args


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a mapping (empty file: empty mapping)."""
    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError("config", f"cannot read {p}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError("config", f"{p} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError("config", f"{p} must be a YAML mapping")
    return doc


def _convert(name: str, hint: Any, value: Any) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(name, f"must be true or false, got {value!r}")
    if hint is int:
        try:
            if isinstance(value, bool):
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(name, f"must be an integer, got {value!r}") from None
    if hint is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(name, f"must be a number, got {value!r}") from None
    if hint is str:
        if isinstance(value, dict | list):
            raise ConfigError(name, "must be a single value")
        return str(value)
    origin = typing.get_origin(hint)
    if origin is tuple:
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        if isinstance(value, list):
            return tuple(str(v) for v in value)
        raise ConfigError(name, "must be a list or a comma-separated string")
    # Structured values (routing tables etc.) come from the file as they are.
    return value


def load_settings(
    cls: type[T],
    *,
    config_file: str | Path | None = None,
    section: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> T:
    """Build ``cls`` (a dataclass) from defaults, file, environment and overrides.

    ``section`` selects a sub-mapping of the file (``mail:`` for mail
    settings); environment variables are ``LEAKWATCH_<NAME>`` for the core
    and ``LEAKWATCH_<SECTION>_<NAME>`` for sections.
    """
    env = os.environ if env is None else env
    if config_file is None:
        config_file = env.get("LEAKWATCH_CONFIG") or None
    doc: dict[str, Any] = read_config_file(config_file) if config_file else {}
    if section is not None:
        sub = doc.get(section) or {}
        if not isinstance(sub, dict):
            raise ConfigError(section, "must be a mapping")
        doc = sub
        prefix = f"LEAKWATCH_{section.upper()}_"
    else:
        prefix = "LEAKWATCH_"
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for key, value in doc.items():
        if key not in fields:
            if section is None and isinstance(value, dict):
                continue  # another section (mail:, console:)
            where = f"{section}.{key}" if section else str(key)
            raise ConfigError(where, f"unknown setting (known: {', '.join(sorted(fields))})")
        values[key] = _convert(key, hints[key], value)
    for name in fields:
        raw = env.get(prefix + name.upper())
        if raw is not None:
            values[name] = _convert(prefix + name.upper(), hints[name], raw)
    for key, value in (overrides or {}).items():
        if key not in fields:
            raise ConfigError(key, "unknown setting")
        values[key] = value
    settings = cls(**values)
    validate = getattr(settings, "validate", None)
    if callable(validate):
        validate()
    return settings


def settings_table(cls: type[Any], section: str | None = None) -> str:
    """A Markdown table of a settings class (for the README)."""
    prefix = f"LEAKWATCH_{section.upper()}_" if section else "LEAKWATCH_"
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else ""  # type: ignore[misc]
        )
        shown = "(secret)" if f.metadata.get("secret") and default else repr(default) if default != "" else ""
        rows.append(f"| `{prefix}{f.name.upper()}` | {shown} | {f.metadata.get('doc', '')} |")
    return "\n".join(rows)
