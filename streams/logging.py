"""Structured logging for the worker: structlog, JSON by default, no personal numbers.

:func:`configure_logging` routes structlog *and* the standard library loggers
(Faust, mode, aiokafka) through one processor chain, so every line has the
same shape: one JSON object per line in production, a readable console line
on a terminal (``log_format: auto``) or with ``log_format: console``.

Context is bound, never formatted into messages: ``worker`` for the whole
process, ``partition`` / ``rule_id`` / ``alert_id`` where they apply
(``get_logger().bind(partition=3)``). Nothing is logged per event.

:func:`scrub_personal_numbers` is the last processor before rendering: any
run of 12 digits (plain or grouped 4-4-4) in any string of the event dict,
including exception text, is replaced by ``<redacted>``. Detection never
logs event contents, so this is a last line of defence, not the mechanism.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, Final

import orjson
import structlog

from schemas.mynumber import MYNUMBER_PATTERN

__all__ = [
    "REDACTED",
    "configure_logging",
    "get_logger",
    "scrub_personal_numbers",
]

REDACTED: Final = "<redacted>"
_LEVELS: Final = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
#: Third-party loggers that are chatty at INFO; kept at WARNING unless debugging.
_NOISY: Final = ("aiokafka", "faust", "mode", "aiohttp.access", "kafka")


def _scrub_value(value: Any) -> Any:
    if type(value) is str:
        return MYNUMBER_PATTERN.sub(REDACTED, value) if any(c.isdigit() for c in value) else value
    if isinstance(value, bytes | bytearray):
        return _scrub_value(bytes(value).decode("utf-8", "replace"))
    if isinstance(value, Mapping):
        return {k: _scrub_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrub_value(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and 10**11 <= abs(value) < 10**12:
        return REDACTED
    if value is None or isinstance(value, bool | int | float):
        return value
    return _scrub_value(str(value))


def scrub_personal_numbers(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: replace every 12-digit run in the event dict."""
    for key, value in list(event_dict.items()):
        event_dict[key] = _scrub_value(value)
    return event_dict


def _orjson_dumps(obj: Any, default: Any = None, **_kw: Any) -> str:
    return orjson.dumps(obj, default=default or str).decode()


def configure_logging(level: str = "info", fmt: str = "auto", *, worker: str | None = None, stream: Any = None) -> None:
    """Set up structlog and the standard library root logger (idempotent).

    ``fmt`` is ``json``, ``console`` or ``auto`` (console when ``stream`` is a
    terminal). ``worker`` is bound to every line of this process.
    """
    stream = sys.stderr if stream is None else stream
    if fmt == "auto":
        isatty = getattr(stream, "isatty", None)
        fmt = "console" if callable(isatty) and isatty() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False) if fmt == "console" else structlog.processors.JSONRenderer(serializer=_orjson_dumps)
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.ExtraAdder(),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            scrub_personal_numbers,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.set_name("leakwatch")
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    numeric = _LEVELS.get(level, logging.INFO)
    root.setLevel(numeric)
    for name in _NOISY:
        logging.getLogger(name).setLevel(numeric if numeric == logging.DEBUG else max(numeric, logging.WARNING))
    structlog.contextvars.clear_contextvars()
    if worker:
        structlog.contextvars.bind_contextvars(worker=worker)


def get_logger(name: str = "leakwatch", **context: Any) -> Any:
    """A structlog logger with ``context`` bound (e.g. ``partition=3``)."""
    log = structlog.get_logger(name)
    return log.bind(**context) if context else log
