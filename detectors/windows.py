"""Window arithmetic on integer milliseconds, and a sliding-window counter.

Small pure functions, as in quixstreams: every window is identified by its
start, so an alert's id depends on the events only, never on arrival order.

The sliding rule used by count/sum detectors: an event at ``t`` *fires*
when the weight of the events in ``(t - size, t]`` reaches the threshold.
A late event can make later events fire too; :class:`SlidingWindow.add`
returns every event that newly fires, so the final set of findings is the
same whatever order the events arrived in within the allowed lateness.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import Any

__all__ = [
    "SlidingWindow",
    "tumbling_end",
    "tumbling_start",
]


def tumbling_start(ts_ms: int, size_ms: int, offset_ms: int = 0) -> int:
    """Start of the tumbling window of ``size_ms`` holding ``ts_ms``.

    ``offset_ms`` aligns windows to local time: with Asia/Tokyo's +9 h,
    ``offset_ms=9*3600*1000`` makes day windows start at local midnight.
    """
    return (ts_ms + offset_ms) // size_ms * size_ms - offset_ms


def tumbling_end(ts_ms: int, size_ms: int, offset_ms: int = 0) -> int:
    """End (exclusive) of the tumbling window holding ``ts_ms``."""
    return tumbling_start(ts_ms, size_ms, offset_ms) + size_ms


class SlidingWindow:
    """Timestamps (with weights) of one key, sorted, with the events that fired.

    State is two parallel lists and a set of fired timestamps: plain data,
    cheap to snapshot (:meth:`dump` / :meth:`load`).
    """

    __slots__ = ("fired", "times", "weights")

    def __init__(self) -> None:
        self.times: list[int] = []
        self.weights: list[int] = []
        self.fired: set[int] = set()

    def __len__(self) -> int:
        return len(self.times)

    def total(self, start_exclusive: int, end_inclusive: int) -> int:
        """Sum of weights with ``start < t <= end``."""
        times = self.times
        lo = bisect_right(times, start_exclusive)
        hi = bisect_right(times, end_inclusive)
        return sum(self.weights[lo:hi]) if lo < hi else 0

    def add(self, ts_ms: int, size_ms: int, threshold: int, weight: int = 1) -> list[tuple[int, int]]:
        """Insert one event; return ``(t, total)`` for each event that newly fires."""
        times = self.times
        if not times or ts_ms >= times[-1]:
            times.append(ts_ms)
            self.weights.append(weight)
            in_order = True
        else:
            idx = bisect_right(times, ts_ms)
            times.insert(idx, ts_ms)
            self.weights.insert(idx, weight)
            in_order = False
        fired = self.fired
        out: list[tuple[int, int]] = []
        if in_order:
            total = self.total(ts_ms - size_ms, ts_ms)
            if total >= threshold and ts_ms not in fired:
                fired.add(ts_ms)
                out.append((ts_ms, total))
            return out
        # A late event raises the totals of every later event within size_ms.
        hi = bisect_left(times, ts_ms + size_ms)
        for t in sorted(set(times[bisect_left(times, ts_ms) : hi])):
            if t in fired:
                continue
            total = self.total(t - size_ms, t)
            if total >= threshold:
                fired.add(t)
                out.append((t, total))
        return out

    def prune(self, before_ms: int) -> None:
        """Forget events at or before ``before_ms`` (outside any open window)."""
        times = self.times
        cut = bisect_right(times, before_ms)
        if cut:
            del times[:cut]
            del self.weights[:cut]
            if self.fired:
                self.fired = {t for t in self.fired if t > before_ms}

    def dump(self) -> list[Any]:
        """Plain JSON-able state."""
        return [self.times, self.weights, sorted(self.fired)]

    @classmethod
    def load(cls, data: list[Any]) -> SlidingWindow:
        """Inverse of :meth:`dump`."""
        window = cls()
        window.times = [int(t) for t in data[0]]
        window.weights = [int(w) for w in data[1]]
        window.fired = {int(t) for t in data[2]}
        return window
