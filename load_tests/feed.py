"""Stream the synthetic municipality into Kafka at a chosen rate.

``python -m load_tests.feed --bootstrap HOST:PORT --rate 5000 --seconds 30``

Time is compressed: events keep their realistic timestamps (a working day
of the town, 08:15 to 18:30, weekends and holidays quiet) but are sent as
fast as ``--rate`` events per second of wall time allows, so at 5,000/s a
200-person town's day passes in about four seconds. Messages are keyed by
user (so one user's events stay in one partition, in order) and hold one
event each by default; ``--batch N`` sends JSON arrays of up to N events of
one user per message (flushed at least every ``--flush-ms``).

The scenarios' ground truth is printed (and written with ``--truth``) so a
demo or an end-to-end test can check the alerts it should see.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from load_tests.generator import DEFAULT_START, TZ, ScenarioTruth, SyntheticLog, generate
from schemas.event import Event

__all__ = ["FeedStats", "days_for", "main", "stream_to_kafka"]

#: Working days are about 5/7 of days, and about 94 % of staff work on one.
_WORKDAY_SHARE = 5 / 7 * 0.94


@dataclass(slots=True)
class FeedStats:
    """What one feed run did."""

    events: int = 0
    messages: int = 0
    errors: int = 0
    seconds: float = 0.0
    first_ts_ms: int = 0
    last_ts_ms: int = 0
    truth: list[ScenarioTruth] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Achieved events per second of wall time."""
        return self.events / self.seconds if self.seconds else 0.0


def days_for(rate: float, duration: float, staff: int, events_per_day: float = 120.0) -> int:
    """Days of the town needed to feed ``rate`` events/s for ``duration`` seconds (with margin)."""
    per_day = staff * events_per_day * _WORKDAY_SHARE
    return max(3, math.ceil(1.3 * rate * duration / per_day) + 2)


def _encode(events: list[Event]) -> bytes:
    if len(events) == 1:
        return orjson.dumps(events[0].to_dict(TZ))
    return orjson.dumps([e.to_dict(TZ) for e in events])


async def stream_to_kafka(
    bootstrap: str,
    topic: str = "access-events",
    rate: float = 5000.0,
    duration: float = 30.0,
    seed: int = 0,
    batch: int = 1,
    *,
    staff: int = 200,
    start: date = DEFAULT_START,
    scenarios: Iterable[str] | str = "all",
    flush_ms: int = 500,
    log: SyntheticLog | None = None,
    producer_options: dict[str, Any] | None = None,
) -> FeedStats:
    """Send the town's events to ``topic`` at ``rate`` events/s for ``duration`` seconds.

    Stops early when the generated range runs out. ``log`` overrides the
    generated town (for tests). Delivery errors are counted, not raised.
    """
    if rate <= 0 or duration <= 0 or batch < 1:
        raise ValueError("rate and duration must be positive and batch at least 1")
    if log is None:
        log = generate(seed=seed, start=start, days=days_for(rate, duration, staff), staff=staff, scenarios=scenarios)
    stats = FeedStats(truth=list(log.scenario_truth), skipped=dict(log.skipped))
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, **(producer_options or {}))
    await producer.start()
    pending: list[asyncio.Future[Any]] = []
    buffers: dict[str, list[Event]] = {}

    async def send(user: str, events: list[Event]) -> None:
        pending.append(await producer.send(topic, _encode(events), key=user.encode()))
        stats.messages += 1

    async def settle() -> None:
        results = await asyncio.gather(*pending, return_exceptions=True)
        stats.errors += sum(isinstance(r, BaseException) for r in results)
        pending.clear()

    limit = int(rate * duration)
    chunk = max(1, min(1000, int(rate / 50)))
    t0 = time.perf_counter()
    last_flush = t0
    try:
        for ev in log:
            if stats.events >= limit:
                break
            if not stats.events:
                stats.first_ts_ms = ev.ts_ms
            stats.last_ts_ms = ev.ts_ms
            stats.events += 1
            if batch == 1:
                await send(ev.user, [ev])
            else:
                buf = buffers.setdefault(ev.user, [])
                buf.append(ev)
                if len(buf) >= batch:
                    await send(ev.user, buffers.pop(ev.user))
            if stats.events % chunk == 0:
                now = time.perf_counter()
                if batch > 1 and (now - last_flush) * 1000 >= flush_ms:
                    for user in list(buffers):
                        await send(user, buffers.pop(user))
                    last_flush = now
                if len(pending) >= 5000:
                    await settle()
                ahead = stats.events / rate - (now - t0)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        for user in list(buffers):
            await send(user, buffers.pop(user))
        await producer.flush()
        await settle()
    finally:
        await producer.stop()
        stats.seconds = time.perf_counter() - t0
    return stats


def _fmt(ts_ms: int) -> str:
    from schemas.event import format_ts

    return format_ts(ts_ms, TZ) if ts_ms else "-"


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m load_tests.feed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers, HOST:PORT")
    ap.add_argument("--topic", default="access-events", help="topic (default access-events)")
    ap.add_argument("--rate", type=float, default=5000.0, help="events per second of wall time (default 5000)")
    ap.add_argument("--seconds", type=float, default=30.0, help="how long to feed (default 30)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=1, help="events per message, one user's (default 1)")
    ap.add_argument("--flush-ms", type=int, default=500, help="with --batch: flush partial batches this often")
    ap.add_argument("--staff", type=int, default=200)
    ap.add_argument("--start", type=date.fromisoformat, default=DEFAULT_START, help="first day of event time")
    ap.add_argument("--scenarios", default="all", help="'all', 'none' or comma-separated scenario names")
    ap.add_argument("--truth", type=Path, help="write the scenarios' ground truth here as JSON lines")
    args = ap.parse_args(argv)
    scenarios: Iterable[str] | str = (
        "all" if args.scenarios == "all" else [] if args.scenarios == "none" else [s for s in args.scenarios.split(",") if s]
    )
    stats = asyncio.run(
        stream_to_kafka(
            args.bootstrap,
            args.topic,
            args.rate,
            args.seconds,
            args.seed,
            args.batch,
            staff=args.staff,
            start=args.start,
            scenarios=scenarios,
            flush_ms=args.flush_ms,
        )
    )
    print(
        f"sent {stats.events:,} events in {stats.messages:,} messages to {args.topic} in {stats.seconds:.1f} s "
        f"({stats.rate:,.0f} events/s; {stats.errors} delivery errors)"
    )
    print(f"event time {_fmt(stats.first_ts_ms)} .. {_fmt(stats.last_ts_ms)}")
    reached = [t for t in stats.truth if t.start_ms <= stats.last_ts_ms]
    print(f"scenarios sent: {len(reached)} of {len(stats.truth)} injected")
    for t in stats.truth:
        state = "sent" if t.start_ms <= stats.last_ts_ms else "not reached"
        print(f"  {t.name:<28} {t.user:<14} {_fmt(t.start_ms)}  expect {','.join(t.expected) or '-':<22} {state}")
    for name, why in stats.skipped.items():
        print(f"  {name:<28} skipped: {why}")
    if args.truth:
        with args.truth.open("wb") as fh:
            for t in stats.truth:
                doc = {
                    "scenario": t.name,
                    "user": t.user,
                    "start": _fmt(t.start_ms),
                    "end": _fmt(t.end_ms),
                    "expected": list(t.expected),
                    "sent": t.start_ms <= stats.last_ts_ms,
                    "note": t.note,
                }
                fh.write(orjson.dumps(doc) + b"\n")
    return 1 if stats.errors else 0


if __name__ == "__main__":
    sys.exit(main())
