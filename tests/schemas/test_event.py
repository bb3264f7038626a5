"""The canonical event contract and its codec."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.event import ACTIONS, RESULTS, Event, EventCodec, EventError, format_ts, parse_ts
from schemas.mynumber import Pseudonymizer, check_digit

CODEC = EventCodec(Pseudonymizer(b"test-key-0123456789"))
SCHEMA = Path(__file__).resolve().parents[2] / "schemas" / "event.schema.json"


def base(**changes: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "event_id": "ev-1",
        "ts": "2019-02-02T22:11:03+09:00",
        "user": "osamu",
        "terminal": "172.16.100.1",
        "action": "search",
        "result": "success",
        "mynumber_ref": True,
    }
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not None}


class TestDecode:
    """Decoding validates every field and names the culprit."""

    def test_round_trip(self) -> None:
        """An event decodes and encodes back to the same canonical object."""
        doc = base(subject="r-1", records=5, department="税務課", location="office")
        (ev,), errors = CODEC.decode(orjson.dumps(doc))
        assert not errors
        assert ev.ts_ms == parse_ts("2019-02-02T13:11:03Z")
        again, _ = CODEC.decode(CODEC.encode(ev))
        assert again == [ev]

    def test_batch_keeps_good_events(self) -> None:
        """A JSON array is a batch; a bad element does not sink the rest."""
        raw = orjson.dumps([base(), base(action="dance"), base(event_id="ev-3")])
        events, errors = CODEC.decode(raw)
        assert [e.event_id for e in events] == ["ev-1", "ev-3"]
        assert [e.field for e in errors] == ["[1].action"]

    @pytest.mark.parametrize(
        ("doc", "field", "words"),
        [
            (base(user=None), "user", "missing"),
            (base(ts="2019-02-02 22:11:03"), "ts", "missing UTC offset"),
            (base(ts="yesterday"), "ts", "RFC 3339"),
            (base(ts="0001-01-01T00:00:00+14:00"), "ts", "out of range"),
            (base(ts="9999-12-31T23:59:59-14:00"), "ts", "out of range"),
            (base(ts="1969-12-31T23:59:59Z"), "ts", "out of range"),
            (base(action=["search"]), "action", "must be one of"),
            (base(result={"ok": 1}), "result", "must be one of"),
            (base(action="dance"), "action", "must be one of"),
            (base(result="ok"), "result", "must be one of"),
            (base(mynumber_ref="yes"), "mynumber_ref", "true or false"),
            (base(records=-1), "records", "negative"),
            (base(records="5"), "records", "integer"),
            (base(subject=5), "subject", "string"),
            (base(colour="red"), "colour", "unknown field"),
            (base(schema_version=2), "schema_version", "unsupported"),
            (base(user=""), "user", "characters"),
        ],
    )
    def test_errors_name_field_and_reason(self, doc: dict[str, object], field: str, words: str) -> None:
        """Each kind of bad input yields an EventError naming the field."""
        events, errors = CODEC.decode(orjson.dumps(doc))
        assert events == []
        assert errors[0].field == field
        assert words in errors[0].reason

    @given(
        st.sampled_from(["event_id", "ts", "user", "terminal", "action", "result", "mynumber_ref", "subject", "records",
                         "bytes", "device", "department", "system", "session", "location", "schema_version", "pii_scrubbed"]),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
            max_leaves=5,
        ),
    )
    def test_any_json_value_in_any_field_is_an_error_or_an_event(self, field: str, value: object) -> None:
        """Whatever JSON a producer puts in a field (lists and objects included), decoding never raises."""
        for scrub in (False, True):
            try:
                CODEC.from_dict(base(**{field: value}) if value is not None else {**base(), field: None}, scrub)
            except EventError as exc:
                assert exc.field and exc.reason

    @pytest.mark.parametrize("raw", [b"", b"{", b"[1,2", b"\xff\xfe", b"null", b"42"])
    def test_garbage_is_an_error_not_a_crash(self, raw: bytes) -> None:
        """Malformed bytes give an error, never an exception."""
        events, errors = CODEC.decode(raw)
        assert events == [] and len(errors) == 1

    def test_personal_numbers_are_pseudonymised(self) -> None:
        """A valid personal number in any field is replaced and the event flagged."""
        number = "12345678901" + str(check_digit("12345678901"))
        doc = base(subject=number, terminal=f"pc-{number}", event_id=number)
        (ev,), _ = CODEC.decode(orjson.dumps(doc))
        assert ev.pii_scrubbed
        text = orjson.dumps(ev.to_dict()).decode()
        assert number not in text
        assert ev.subject is not None and ev.subject.startswith("mn_")

    def test_integer_personal_number_is_pseudonymised(self) -> None:
        """A personal number sent as a JSON integer is replaced too."""
        number = int("12345678901" + str(check_digit("12345678901")))
        (ev,), _ = CODEC.decode(orjson.dumps(base(records=number)))
        assert ev.pii_scrubbed and ev.records is None

    def test_actions_and_results_cover_the_contract(self) -> None:
        """The contract's action and result vocabularies are all accepted."""
        assert {"login", "logout", "search", "view", "update", "export", "print", "print_screen", "usb_connect", "usb_write", "file_copy"} <= ACTIONS
        assert {"success", "failure", "denied"} == RESULTS


class TestTimestamps:
    """Times are event time, timezone-aware."""

    def test_format_in_tokyo(self) -> None:
        """Epoch ms formats in Asia/Tokyo by default."""
        assert format_ts(parse_ts("2019-02-02T13:11:03Z")) == "2019-02-02T22:11:03+09:00"

    def test_millis_kept(self) -> None:
        """Milliseconds survive a round trip."""
        assert format_ts(parse_ts("2019-02-02T13:11:03.250Z")).endswith(".250+09:00")


class TestJsonSchema:
    """The JSON Schema for producers matches the codec."""

    def test_schema_lists_the_fields(self) -> None:
        """Required and optional fields in the schema are the codec's."""
        schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
        assert set(schema["required"]) == {"event_id", "ts", "user", "terminal", "action", "result", "mynumber_ref"}
        assert set(schema["properties"]["action"]["enum"]) == set(ACTIONS)
        assert set(schema["properties"]["result"]["enum"]) == set(RESULTS)
        assert schema["additionalProperties"] is False

    def test_event_equality_is_by_value(self) -> None:
        """Two events with equal fields are equal."""
        a = Event("1", 0, "u", "t", "view", "success", False)
        b = Event("1", 0, "u", "t", "view", "success", False)
        assert a == b
        b.subject = "x"
        assert a != b


class TestTimestampCache:
    """Remembered timestamps give exactly what parsing gives."""

    def test_cache_matches_parse(self) -> None:
        """Repeated and distinct strings (other offsets, millis) decode identically."""
        codec = EventCodec(Pseudonymizer(b"test-key-0123456789"))
        stamps = ["2019-02-02T22:11:03+09:00", "2019-02-02T13:11:03Z", "2019-02-02T22:11:03.5+09:00", "2019-02-02T22:11:03+09:00"]
        for ts in stamps:
            assert codec.from_dict(base(ts=ts)).ts_ms == parse_ts(ts)

    def test_cache_does_not_hide_errors(self) -> None:
        """A bad timestamp is an error every time, not only the first."""
        codec = EventCodec(Pseudonymizer(b"test-key-0123456789"))
        for _ in range(2):
            _, errors = codec.decode(orjson.dumps(base(ts="2019-02-02 22:11:03")))
            assert errors[0].field == "ts"


def _outcome_slow(codec: EventCodec, raw: bytes) -> object:
    """What the precise path makes of one message: an event's fields, or the error."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return "invalid JSON"
    try:
        ev = codec.from_dict(doc, False)
    except EventError as exc:
        return (exc.field, exc.reason)
    return tuple(getattr(ev, name) for name in Event.__slots__)


def _outcome_fast(codec: EventCodec, raw: bytes) -> object:
    try:
        ev = codec.from_json(raw)
    except EventError as exc:
        return (exc.field, exc.reason)
    return None if ev is None else tuple(getattr(ev, name) for name in Event.__slots__)


_ODD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -1]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.text(min_size=510, max_size=515, alphabet="aあ"),
    st.sampled_from(["", "view", "denied", "2024-05-07T10:11:12+09:00", "2024-05-07T10:11:12.5+09:00", "2024-05-07T10:11:60+09:00", "2024-05-07 10:11:12"]),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
_FIELDS = sorted(
    ("event_id", "ts", "user", "terminal", "action", "result", "mynumber_ref", "subject", "records", "bytes", "device",
     "department", "system", "session", "location", "schema_version", "pii_scrubbed", "unknown")
)  # fmt: skip


@st.composite
def _messages(draw: st.DrawFn) -> bytes:
    """Mostly valid events with a few fields replaced, removed or added, in a few JSON spellings."""
    doc: dict[str, object] = {
        "event_id": "ev-1", "ts": draw(st.sampled_from(["2024-05-07T10:11:12+09:00", "2024-05-07T10:11:12.345+09:00", "2024-05-07T01:11:12Z"])),
        "user": "tanaka", "terminal": "pc-01", "action": draw(st.sampled_from(sorted(ACTIONS))),
        "result": draw(st.sampled_from(sorted(RESULTS))), "mynumber_ref": draw(st.booleans()),
    }  # fmt: skip
    for name in draw(st.lists(st.sampled_from(_FIELDS), max_size=3, unique=True)):
        doc[name] = draw(_ODD_VALUES)
    for name in draw(st.lists(st.sampled_from(_FIELDS), max_size=1)):
        doc.pop(name, None)
    raw = json.dumps(doc, ensure_ascii=False, separators=(",", ":") if draw(st.booleans()) else None)
    return draw(st.sampled_from([raw, f" {raw}\n", raw[:-1], f"[{raw}]"])).encode()


class TestFastPath:
    """EventCodec.from_json (msgspec) never disagrees with from_dict: same event, same error, or it steps aside."""

    def test_ordinary_event_takes_the_fast_path(self) -> None:
        """A plain event with optional fields is decoded here, equal to the precise path's event."""
        codec = EventCodec(Pseudonymizer(b"test-key-0123456789"))
        raw = codec.encode(Event("ev-1", parse_ts("2024-05-07T10:11:12.345+09:00"), "tanaka", "pc-01", "export", "success", True,
                                 "r-1", 120, 4096, "usb-9", "税務課", "住基", "s-1", "office"))  # fmt: skip
        fast = _outcome_fast(codec, raw)
        assert fast is not None and fast == _outcome_slow(codec, raw)

    @pytest.mark.parametrize(
        "raw",
        [
            b'{"event_id":"e","ts":"2024-05-07T10:11:12+09:00","user":"u\\u0031","terminal":"t","action":"view","result":"success","mynumber_ref":true}',
            b'[{"event_id":"e"}]',
            b'{"event_id":"e","ts":"2024-05-07T10:11:12+09:00","user":"\xff","terminal":"t","action":"view","result":"success","mynumber_ref":true}',
            b'{"event_id":"e","ts":"2024-05-07T10:11:12+09:00","user":"u","terminal":"t","action":"view","result":"success","mynumber_ref":true,"records":9223372036854775808}',
            b'{"event_id":"e","ts":"2024-05-07T10:11:12+09:00","user":"u","terminal":"t","action":"view","result":"success","mynumber_ref":true,"schema_version":1.0}',
        ],
        ids=["escape", "array", "invalid-utf8", "int-beyond-int64", "version-as-float"],
    )
    def test_steps_aside(self, raw: bytes) -> None:
        """Escapes, arrays, invalid UTF-8 and what only the precise path accepts go the precise way."""
        assert EventCodec(Pseudonymizer(b"test-key-0123456789")).from_json(raw) is None

    def test_bad_ts_is_the_same_error(self) -> None:
        """A well-formed event with an impossible time fails with from_dict's error."""
        codec = EventCodec(Pseudonymizer(b"test-key-0123456789"))
        raw = b'{"event_id":"e","ts":"2024-02-30T10:11:12+09:00","user":"u","terminal":"t","action":"view","result":"success","mynumber_ref":true}'
        with pytest.raises(EventError) as fast:
            codec.from_json(raw)
        assert _outcome_slow(codec, raw) == (fast.value.field, fast.value.reason)

    @given(_messages())
    def test_agrees_with_from_dict(self, raw: bytes) -> None:
        """Whatever it decides on its own is exactly what from_dict decides."""
        codec = EventCodec(Pseudonymizer(b"test-key-0123456789"))
        fast = _outcome_fast(codec, raw)
        assert fast is None or fast == _outcome_slow(codec, raw), raw
