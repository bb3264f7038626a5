"""Window arithmetic and the sliding-window counter."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detectors.windows import SlidingWindow, tumbling_end, tumbling_start

HOUR = 3_600_000
JST = 9 * HOUR


class TestTumbling:
    """Tumbling windows are aligned and contain their timestamp."""

    @given(st.integers(min_value=0, max_value=2**41), st.integers(min_value=1, max_value=10**9), st.integers(min_value=0, max_value=10**8))
    def test_contains(self, ts: int, size: int, offset: int) -> None:
        """start <= ts < end, and end - start == size."""
        start = tumbling_start(ts, size, offset)
        assert start <= ts < tumbling_end(ts, size, offset)
        assert tumbling_end(ts, size, offset) - start == size

    def test_local_midnight(self) -> None:
        """With the JST offset, day windows start at 00:00 Tokyo (15:00 UTC)."""
        ts = 1549113063000  # 2019-02-02T22:11:03+09:00
        assert tumbling_start(ts, 24 * HOUR, JST) == 1549033200000  # 2019-02-02T00:00+09:00


def fired_set(times: list[int], size: int, threshold: int) -> set[int]:
    window = SlidingWindow()
    out: set[int] = set()
    for t in times:
        out.update(t_ for t_, _ in window.add(t, size, threshold))
    return out


def brute_force(times: list[int], size: int, threshold: int) -> set[int]:
    return {t for t in times if sum(1 for x in times if t - size < x <= t) >= threshold}


class TestSlidingWindow:
    """The sliding rule fires on exactly the events whose window reaches the threshold."""

    @pytest.mark.parametrize(
        ("times", "size", "threshold", "expected"),
        [
            ([0, 10, 20], 100, 3, {20}),
            ([0, 10, 200], 100, 3, set()),
            ([0, 100, 150], 100, 2, {150}),  # 0 is outside (50, 150]... but 100 is in
            ([0, 99, 198], 100, 2, {99, 198}),
            ([5, 5, 5], 1, 3, {5}),
        ],
    )
    def test_table(self, times: list[int], size: int, threshold: int, expected: set[int]) -> None:
        """Hand-checked cases at the window edges."""
        assert fired_set(times, size, threshold) == expected

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(st.integers(min_value=0, max_value=1000), min_size=1, max_size=40),
        st.integers(min_value=1, max_value=300),
        st.integers(min_value=1, max_value=6),
        st.randoms(use_true_random=False),
    )
    def test_arrival_order_does_not_matter(self, times: list[int], size: int, threshold: int, rnd: random.Random) -> None:
        """Any permutation fires the same set, and it matches brute force."""
        shuffled = list(times)
        rnd.shuffle(shuffled)
        expected = brute_force(times, size, threshold)
        assert fired_set(sorted(times), size, threshold) == expected
        assert fired_set(shuffled, size, threshold) == expected

    def test_weights_sum(self) -> None:
        """Weighted events fire on the sum of weights."""
        window = SlidingWindow()
        assert window.add(0, 100, 1000, weight=600) == []
        assert window.add(50, 100, 1000, weight=500) == [(50, 1100)]

    def test_prune_and_round_trip(self) -> None:
        """Pruning forgets old events; dump/load round-trips."""
        window = SlidingWindow()
        for t in (1, 2, 3, 50):
            window.add(t, 10, 2)
        window.prune(3)
        assert window.times == [50]
        again = SlidingWindow.load(window.dump())
        assert again.dump() == window.dump()
