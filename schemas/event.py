"""The canonical access/operation event and its JSON codec.

One event is one operation by one staff account, as the PPC's sample log has
it (日時, 職員名, 端末番号, 操作内容, 処理結果, 個人番号参照), plus optional context.
Producers send JSON objects with exactly the field names below; see
``event.schema.json`` beside this module for the JSON Schema.

Decoding validates every field and raises :class:`EventError` naming the
field and the reason. Values that look like personal numbers are replaced by
keyed pseudonyms (see :mod:`schemas.mynumber`) and the event is flagged
``pii_scrubbed``: nothing that leaves the pipeline carries one.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, tzinfo
from typing import Annotated, Any, Final, Literal, NoReturn, get_args
from zoneinfo import ZoneInfo

import msgspec
import orjson

from schemas.mynumber import Pseudonymizer, contains_twelve_digits

__all__ = [
    "ACTIONS",
    "DEFAULT_TZ",
    "EXPORT_ACTIONS",
    "LOOKUP_ACTIONS",
    "MEDIA_ACTIONS",
    "OPTIONAL_INT_FIELDS",
    "OPTIONAL_STR_FIELDS",
    "REQUIRED_FIELDS",
    "RESULTS",
    "SCHEMA_VERSION",
    "Event",
    "EventCodec",
    "EventError",
    "format_ts",
    "parse_ts",
]

#: Version of the event contract. Bumped on any incompatible change.
SCHEMA_VERSION: Final = 1

DEFAULT_TZ: Final[tzinfo] = ZoneInfo("Asia/Tokyo")

#: The values of ``action`` and ``result`` (typed for msgspec, see :class:`_Wire`).
_WireAction = Literal[
    "login", "logout", "search", "view", "update", "export", "print", "print_screen", "usb_connect", "usb_write", "file_copy",
]  # fmt: skip
_WireResult = Literal["success", "failure", "denied"]
ACTIONS: Final[frozenset[str]] = frozenset(get_args(_WireAction))
RESULTS: Final[frozenset[str]] = frozenset(get_args(_WireResult))
#: Actions that look a resident's record up.
LOOKUP_ACTIONS: Final = frozenset({"search", "view"})
#: Actions that write records out of the system (書き出し).
EXPORT_ACTIONS: Final = frozenset({"export", "print", "file_copy"})
#: Actions on removable media.
MEDIA_ACTIONS: Final = frozenset({"usb_connect", "usb_write"})

REQUIRED_FIELDS: Final = ("event_id", "ts", "user", "terminal", "action", "result", "mynumber_ref")
OPTIONAL_STR_FIELDS: Final = ("subject", "device", "department", "system", "session", "location")
OPTIONAL_INT_FIELDS: Final = ("records", "bytes")
_KNOWN_FIELDS: Final = frozenset(
    (*REQUIRED_FIELDS, *OPTIONAL_STR_FIELDS, *OPTIONAL_INT_FIELDS, "schema_version", "pii_scrubbed")
)
_MAX_STR = 512
#: Accepted event times (epoch ms, UTC): 1970-01-01 up to the end of 2199.
TS_MIN_MS: Final = 0
TS_MAX_MS: Final = 7_258_118_400_000
_TS_CACHE_SIZE = 65_536
#: Optional field -> its JSON type.
_OPTIONAL_KIND: Final[dict[str, type]] = {
    **{name: str for name in OPTIONAL_STR_FIELDS},
    **{name: int for name in OPTIONAL_INT_FIELDS},
}
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MS: Final = timedelta(milliseconds=1)


class EventError(ValueError):
    """An event that does not meet the contract: which field, and why."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason

    @property
    def code(self) -> str:
        """A short, bounded label for metrics: ``field.reason-kind``."""
        return f"{self.field}.{self.reason.split(' ', 1)[0].rstrip(':')}"


def parse_ts(value: str) -> int:
    """RFC 3339 timestamp with a UTC offset to epoch milliseconds."""
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise EventError("ts", f"not an RFC 3339 timestamp: {value[:40]!r}") from None
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise EventError("ts", "missing UTC offset (naive timestamps are ambiguous)")
    ts_ms = (dt - _EPOCH) // _MS
    if not TS_MIN_MS <= ts_ms < TS_MAX_MS:
        # Far outside any log's life, and beyond what local-time arithmetic
        # (days, windows, holidays) can take: year 1 at +14:00 is year 0 in UTC.
        raise EventError("ts", f"out of range: must be from 1970 up to 2199 (UTC), got {value[:40]!r}")
    return ts_ms


def format_ts(ts_ms: int, tz: tzinfo = DEFAULT_TZ) -> str:
    """Epoch milliseconds to RFC 3339 in ``tz`` (second precision unless ms are set)."""
    dt = (_EPOCH + timedelta(milliseconds=ts_ms)).astimezone(tz)
    spec = "milliseconds" if ts_ms % 1000 else "seconds"
    return dt.isoformat(timespec=spec)


class Event:
    """One validated, pseudonymised event. Times are epoch milliseconds (UTC)."""

    __slots__ = (
        "action",
        "bytes",
        "department",
        "device",
        "event_id",
        "location",
        "mynumber_ref",
        "pii_scrubbed",
        "records",
        "result",
        "session",
        "subject",
        "system",
        "terminal",
        "ts_ms",
        "user",
    )

    def __init__(
        self,
        event_id: str,
        ts_ms: int,
        user: str,
        terminal: str,
        action: str,
        result: str,
        mynumber_ref: bool,
        subject: str | None = None,
        records: int | None = None,
        bytes: int | None = None,
        device: str | None = None,
        department: str | None = None,
        system: str | None = None,
        session: str | None = None,
        location: str | None = None,
        pii_scrubbed: bool = False,
    ) -> None:
        self.event_id = event_id
        self.ts_ms = ts_ms
        self.user = user
        self.terminal = terminal
        self.action = action
        self.result = result
        self.mynumber_ref = mynumber_ref
        self.subject = subject
        self.records = records
        self.bytes = bytes
        self.device = device
        self.department = department
        self.system = system
        self.session = session
        self.location = location
        self.pii_scrubbed = pii_scrubbed

    def __repr__(self) -> str:
        return f"Event({self.event_id!r}, {format_ts(self.ts_ms)}, {self.user!r}, {self.action}/{self.result})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Event):
            return NotImplemented
        return all(getattr(self, s) == getattr(other, s) for s in Event.__slots__)

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self, tz: tzinfo = DEFAULT_TZ) -> dict[str, Any]:
        """The canonical JSON object (optional fields only when set)."""
        out: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "event_id": self.event_id,
            "ts": format_ts(self.ts_ms, tz),
            "user": self.user,
            "terminal": self.terminal,
            "action": self.action,
            "result": self.result,
            "mynumber_ref": self.mynumber_ref,
        }
        for name in (*OPTIONAL_STR_FIELDS, *OPTIONAL_INT_FIELDS):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.pii_scrubbed:
            out["pii_scrubbed"] = True
        return out


def _req_str(obj: dict[str, Any], name: str) -> str:
    value = obj.get(name)
    if value is None:
        raise EventError(name, "required field is missing")
    if type(value) is not str:
        raise EventError(name, f"must be a string, got {type(value).__name__}")
    if not value or len(value) > _MAX_STR:
        raise EventError(name, f"must be 1..{_MAX_STR} characters")
    return value


def _optional_error(obj: dict[str, Any]) -> NoReturn:
    """Raise the :class:`EventError` of the first invalid optional field of ``obj``."""
    for name, value in obj.items():
        kind = _OPTIONAL_KIND.get(name)
        if kind is None or value is None:
            continue
        if kind is str:
            if type(value) is not str:
                raise EventError(name, f"must be a string, got {type(value).__name__}")
            if len(value) > _MAX_STR:
                raise EventError(name, f"longer than {_MAX_STR} characters")
        else:
            if type(value) is not int:
                raise EventError(name, f"must be an integer, got {type(value).__name__}")
            if value < 0:
                raise EventError(name, "must not be negative")
    raise AssertionError("no invalid optional field")  # pragma: no cover - callers checked there is one


#: msgspec bounds must fit an int64; larger counts (up to 2**64 - 1, which orjson still reads as ints) go the precise way.
_MAX_JSON_INT: Final = 2**63 - 1
_WireId = Annotated[str, msgspec.Meta(min_length=1, max_length=_MAX_STR)]
_WireStr = Annotated[str, msgspec.Meta(max_length=_MAX_STR)]
_WireInt = Annotated[int, msgspec.Meta(ge=0, le=_MAX_JSON_INT)]


class _Wire(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """One event object exactly as :meth:`EventCodec.from_dict` accepts it, checked by msgspec in C.

    Stricter, never looser: whatever this rejects goes the precise way, which
    either accepts it (``schema_version`` 1.0, ``pii_scrubbed`` of any type)
    or names the field and the reason.
    """

    event_id: _WireId
    ts: str
    user: _WireId
    terminal: _WireId
    action: _WireAction
    result: _WireResult
    mynumber_ref: bool
    subject: _WireStr | None = None
    records: _WireInt | None = None
    bytes: _WireInt | None = None
    device: _WireStr | None = None
    department: _WireStr | None = None
    system: _WireStr | None = None
    session: _WireStr | None = None
    location: _WireStr | None = None
    schema_version: Literal[1] | None = None
    pii_scrubbed: bool | None = None


_WIRE_DECODE: Final = msgspec.json.Decoder(_Wire).decode


class EventCodec:
    """Validates, pseudonymises, encodes and decodes canonical events.

    ``decode`` accepts one JSON object or a JSON array of objects (a batch) and
    returns the events plus one :class:`EventError` per bad element, so one bad
    event in a batch does not sink the others.
    """

    __slots__ = ("_minutes", "pseudonymizer", "tz")

    def __init__(self, pseudonymizer: Pseudonymizer, tz: tzinfo = DEFAULT_TZ) -> None:
        self.pseudonymizer = pseudonymizer
        self.tz = tz
        #: ``"YYYY-MM-DDThh:mm:" + offset`` -> epoch ms of that minute (see :meth:`_parse_ts`).
        self._minutes: dict[str, int] = {}

    def from_dict(self, obj: Any, scrub: bool = True) -> Event:
        """Validate one decoded JSON object into an :class:`Event`.

        This is on every event's path, so the common case (valid, required
        fields plus a few optional ones) is straight-line code; every check
        that fails falls through to the precise error.
        """
        if type(obj) is not dict:
            raise EventError("$", f"an event must be a JSON object, got {type(obj).__name__}")
        if scrub:
            obj = self._scrub(obj)
        if not obj.keys() <= _KNOWN_FIELDS:
            raise EventError(sorted(obj.keys() - _KNOWN_FIELDS)[0], "unknown field")
        get = obj.get
        version = get("schema_version")
        if version is not None and version != SCHEMA_VERSION:
            raise EventError("schema_version", f"unsupported version {version!r} (expected {SCHEMA_VERSION})")
        ts_ms = self._parse_ts(get("ts"))
        action = get("action")
        if type(action) is not str or action not in ACTIONS:  # (a list or object is unhashable)
            raise EventError("action", f"must be one of {', '.join(sorted(ACTIONS))}; got {str(action)[:40]!r}")
        result = get("result")
        if type(result) is not str or result not in RESULTS:
            raise EventError("result", f"must be one of {', '.join(sorted(RESULTS))}; got {str(result)[:40]!r}")
        ref = get("mynumber_ref")
        if type(ref) is not bool:
            raise EventError("mynumber_ref", "must be true or false" if ref is not None else "required field is missing")
        event_id = get("event_id")
        user = get("user")
        terminal = get("terminal")
        if not (
            type(event_id) is str
            and type(user) is str
            and type(terminal) is str
            and 0 < len(event_id) <= _MAX_STR
            and 0 < len(user) <= _MAX_STR
            and 0 < len(terminal) <= _MAX_STR
        ):
            event_id, user, terminal = _req_str(obj, "event_id"), _req_str(obj, "user"), _req_str(obj, "terminal")
        # Optional fields: read by name (no loop, no setattr) and checked in one
        # expression; anything off falls through to the precise error.
        subject = get("subject")
        department = get("department")
        system = get("system")
        session = get("session")
        location = get("location")
        device = get("device")
        records = get("records")
        nbytes = get("bytes")
        if not (
            (subject is None or (type(subject) is str and len(subject) <= _MAX_STR))
            and (department is None or (type(department) is str and len(department) <= _MAX_STR))
            and (system is None or (type(system) is str and len(system) <= _MAX_STR))
            and (session is None or (type(session) is str and len(session) <= _MAX_STR))
            and (location is None or (type(location) is str and len(location) <= _MAX_STR))
            and (device is None or (type(device) is str and len(device) <= _MAX_STR))
            and (records is None or (type(records) is int and records >= 0))
            and (nbytes is None or (type(nbytes) is int and nbytes >= 0))
        ):
            _optional_error(obj)
        return Event(
            event_id, ts_ms, user, terminal, action, result, ref,
            subject, records, nbytes, device, department, system, session, location,
            get("pii_scrubbed") is True,
        )  # fmt: skip

    def from_json(self, raw: bytes) -> Event | None:
        """One plain event object's bytes to an :class:`Event`, fast; ``None`` when they need :meth:`from_dict`.

        The fast path takes messages with no backslash (so no JSON escapes
        to read) that :class:`_Wire` validates in one C pass; it does not
        pseudonymise, so callers first rule out 12-digit runs
        (:func:`schemas.mynumber.contains_twelve_digits`). It gives the same
        event as ``from_dict(orjson.loads(raw), scrub=False)`` and raises the
        same :class:`EventError` for a bad ``ts``; for anything else off
        (arrays, invalid JSON, a wrong field) it returns ``None``.
        """
        if b"\\" in raw:
            return None
        try:
            w = _WIRE_DECODE(raw)
        except (msgspec.MsgspecError, ValueError):  # (invalid UTF-8 is a UnicodeDecodeError)
            return None
        return Event(
            w.event_id, self._parse_ts(w.ts), w.user, w.terminal, w.action, w.result, w.mynumber_ref,
            w.subject, w.records, w.bytes, w.device, w.department, w.system, w.session, w.location,
            w.pii_scrubbed is True,
        )  # fmt: skip

    def _parse_ts(self, ts: Any) -> int:
        """Parse (and remember the minute of) one timestamp string.

        Log lines share minutes: a string of the form ``YYYY-MM-DDThh:mm:ss[.fff...]``
        plus a ``+hh:mm``/``-hh:mm`` offset whose minute and offset were seen
        before only needs its seconds read. Anything else goes through
        :func:`parse_ts` (and teaches the minute cache).
        """
        if type(ts) is not str:
            raise EventError("ts", "required field is missing" if ts is None else "must be a string")
        n = len(ts)
        if n == 25:
            # The most common shapes, ``YYYY-MM-DDThh:mm:ss+hh:mm`` and (below)
            # ``YYYY-MM-DDThh:mm:ss.fff+hh:mm``: the general path, shortened.
            base = self._minutes.get(ts[:17] + ts[19:])
            sec = ts[17:19]
            if base is not None and sec.isdigit() and sec.isascii() and sec < "60":
                return base + int(sec) * 1000
        elif n == 29 and ts[19] == ".":
            base = self._minutes.get(ts[:17] + ts[23:])
            ms = ts[17:19] + ts[20:23]  # seconds and milliseconds: "ssfff"
            if base is not None and ms.isdigit() and ms.isascii() and ms < "60000":
                return base + int(ms)
        if n >= 25 and ts[n - 6] in "+-":
            key = ts[:17] + ts[n - 6 :]
            sec = ts[17:19]
            frac = ts[19 : n - 6]
            if sec.isdigit() and sec.isascii() and sec < "60" and (not frac or (frac[0] == "." and len(frac) > 1 and frac[1:].isdigit() and frac.isascii())):
                offset_ms = int(sec) * 1000 + (int(frac[1:4].ljust(3, "0")) if frac else 0)
                base = self._minutes.get(key)
                if base is not None:
                    ts_ms = base + offset_ms
                else:
                    ts_ms = parse_ts(ts)
                    minutes = self._minutes
                    if len(minutes) >= _TS_CACHE_SIZE:
                        minutes.clear()
                    minutes[key] = ts_ms - offset_ms
            else:
                ts_ms = parse_ts(ts)
        else:
            ts_ms = parse_ts(ts)
        return ts_ms

    def _scrub(self, obj: dict[str, Any]) -> dict[str, Any]:
        scrubbed = False
        out: dict[str, Any] | None = None
        for key, value in obj.items():
            if type(value) is str:
                new, hit = self.pseudonymizer.scrub(value)
                if hit:
                    if out is None:
                        out = dict(obj)
                    out[key] = new
                    scrubbed = True
            elif type(value) is int and 10**11 <= value < 10**12:
                if out is None:
                    out = dict(obj)
                # Counts never legitimately look like a personal number: drop it.
                out[key] = None if key in OPTIONAL_INT_FIELDS else self.pseudonymizer.token(str(value))
                scrubbed = True
        if out is None:
            return obj
        if scrubbed:
            out["pii_scrubbed"] = True
        return out

    def decode(self, raw: bytes) -> tuple[list[Event], list[EventError]]:
        """One message's bytes to events; malformed elements become errors."""
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return [], [EventError("$", f"invalid JSON: {str(exc)[:80]}")]
        scrub = contains_twelve_digits(raw)
        items = doc if type(doc) is list else (doc,)
        events: list[Event] = []
        errors: list[EventError] = []
        from_dict = self.from_dict
        for index, item in enumerate(items):
            try:
                events.append(from_dict(item, scrub))
            except EventError as exc:
                if type(doc) is list:
                    exc = EventError(f"[{index}].{exc.field}", exc.reason)
                errors.append(exc)
        return events, errors

    def encode(self, event: Event) -> bytes:
        """One event as canonical JSON bytes."""
        return orjson.dumps(event.to_dict(self.tz))

    def encode_batch(self, events: list[Event]) -> bytes:
        """Several events as one JSON array message."""
        tz = self.tz
        return orjson.dumps([e.to_dict(tz) for e in events])
