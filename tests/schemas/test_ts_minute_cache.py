"""The codec's timestamp fast path agrees with the reference parser on every input."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.event import EventCodec, EventError, parse_ts
from schemas.mynumber import Pseudonymizer


def _parse(fn: object, ts: str) -> object:
    try:
        return fn(ts)  # type: ignore[operator]
    except EventError as exc:
        return ("error", str(exc))


_offsets = st.integers(min_value=-14 * 60, max_value=14 * 60).map(lambda m: timezone(timedelta(minutes=m)))
_times = st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2100, 1, 1), timezones=_offsets)
_fracs = st.one_of(
    st.just(""),
    st.text(alphabet="0123456789", min_size=1, max_size=9).map(lambda d: "." + d),
    # milliseconds (the 29-character fast path), some of them corrupted
    st.text(alphabet="0123456789x \u0661", min_size=3, max_size=3).map(lambda d: "." + d),
)
_noise = st.text(alphabet="0123456789.:+-TZ ,x\u0661", min_size=0, max_size=4)


@st.composite
def _stamps(draw: st.DrawFn) -> str:
    """RFC 3339 strings of one minute's seconds, some of them corrupted."""
    dt = draw(_times)
    head = dt.strftime("%Y-%m-%dT%H:%M:")
    sec = draw(st.one_of(st.integers(0, 61).map(lambda s: f"{s:02d}"), _noise))
    off = dt.isoformat()[-6:]
    return head + sec + draw(_fracs) + draw(st.one_of(st.just(off), _noise))


class TestMinuteCache:
    """``EventCodec`` parses timestamps through a per-minute cache."""

    @settings(max_examples=400, deadline=None)
    @given(st.lists(_stamps(), min_size=1, max_size=12))
    def test_same_as_reference(self, stamps: list[str]) -> None:
        """Every string parses to the same epoch ms (or the same error) as ``parse_ts``, cached or not."""
        codec = EventCodec(Pseudonymizer(b"k" * 32))
        for ts in stamps * 2:
            assert _parse(codec._parse_ts, ts) == _parse(parse_ts, ts), ts

    def test_minute_reused_for_other_seconds(self) -> None:
        """A second string of a minute seen before is read from the cache, exactly."""
        codec = EventCodec(Pseudonymizer(b"k" * 32))
        codec._parse_ts("2024-11-18T08:30:12.250+09:00")
        assert len(codec._minutes) == 1
        expected = int((datetime(2024, 11, 17, 23, 30, 59, 999000, tzinfo=UTC)).timestamp() * 1000)
        assert codec._parse_ts("2024-11-18T08:30:59.9999+09:00") == expected
        assert len(codec._minutes) == 1

    def test_milliseconds_read_from_cache(self) -> None:
        """``ss.fff`` strings of a known minute are read from the cache; bad digits still fail as in ``parse_ts``."""
        codec = EventCodec(Pseudonymizer(b"k" * 32))
        codec._parse_ts("2024-11-18T08:30:00+09:00")
        minute = codec._minutes["2024-11-18T08:30:+09:00"]
        assert codec._parse_ts("2024-11-18T08:30:07.042+09:00") == minute + 7042
        assert codec._parse_ts("2024-11-18T08:30:59.999+09:00") == minute + 59999
        for bad in ("2024-11-18T08:30:60.000+09:00", "2024-11-18T08:30:07.0x2+09:00", "2024-11-18T08:30:07.\u0661\u0662\u0663+09:00"):
            assert _parse(codec._parse_ts, bad) == _parse(parse_ts, bad)
            assert isinstance(_parse(codec._parse_ts, bad), tuple), bad
