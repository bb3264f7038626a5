"""Throughput and state size of the detector core alone (no Kafka, no codec).

``python -m load_tests.bench_core [--events 1000000] [--staff 1500]``

1. Pre-generates ``--warmup-days`` of the synthetic municipality and then
   ``--events`` events (a realistic mix; ``--staff`` accounts, of which
   about 94 % work on a given day) into lists, so generation is not timed.
2. Seeds a fresh engine running every default rule
   (``detectors.rules.load_rules()`` -> ``Engine``) with the warm-up days
   (``Engine.seed``, not timed), so the timed part sees steady state:
   known terminals, baselines, exporters. Then times ``Engine.process`` over
   the events in this one process (= one core) with ``time.perf_counter``
   (wall) and ``time.process_time`` (CPU, less sensitive to other load on
   the machine); alerts are drained as they come, as the streaming worker
   does. The garbage collector stays enabled. This is repeated ``--repeat``
   times (default 3), each on a freshly seeded engine, and the best run is
   reported, as ``timeit`` does: on a shared machine the other runs measure
   the neighbours as much as the core.
3. Reports state per active user two ways:

   * *snapshot bytes*: the mean ``len(Engine.dump_user(user))``, what the
     streaming layer checkpoints per user;
   * *in-memory bytes*: a recursive ``sys.getsizeof`` walk of each
     ``UserState`` (detector slots, open findings, the ``recent`` evidence
     events it keeps alive; objects shared between users, such as interned
     strings and rules, are counted once), and, as a cross-check, the
     ``tracemalloc`` growth while a fresh engine is seeded with the warm-up
     and processes the first ``--memory-events`` events (this one excludes
     the Event objects, which were allocated before tracing started).

4. With ``--profile``, runs ``cProfile`` over ``--profile-events`` events and
   prints the hottest functions.

The last line is always ``core events/s: N``.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import itertools
import pstats
import sys
import time
import tracemalloc
from collections.abc import Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from detectors.engine import Engine
from detectors.rules import DEFAULT_RULES_DIR, load_rules
from load_tests.generator import generate
from schemas.event import Event

__all__ = ["deep_size", "main", "make_events", "run"]


def make_events(n: int, staff: int, seed: int, start: date, warmup_days: int = 0) -> tuple[list[Event], list[Event]]:
    """(warm-up events of the days before ``start``, the first ``n`` events from ``start``)."""
    log = generate(seed=seed, start=start - timedelta(days=warmup_days), days=warmup_days + 3650, staff=staff)
    cutoff = log.day_ms[warmup_days]
    warm: list[Event] = []
    for ev in log:
        if ev.ts_ms >= cutoff:
            return warm, [ev, *itertools.islice(log, n - 1)]
        warm.append(ev)
    return warm, []  # pragma: no cover - the range is ten years


def deep_size(obj: Any, seen: set[int]) -> int:
    """``sys.getsizeof`` of ``obj`` and everything reachable from it not yet in ``seen``."""
    total = 0
    stack = [obj]
    getsizeof = sys.getsizeof
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        total += getsizeof(o)
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, list | tuple | set | frozenset):
            stack.extend(o)
        elif hasattr(o, "__slots__") and not isinstance(o, type):
            for cls in type(o).__mro__:
                for name in getattr(cls, "__slots__", ()):
                    if hasattr(o, name):
                        stack.append(getattr(o, name))
        elif hasattr(o, "__dict__") and not isinstance(o, type):
            stack.append(o.__dict__)
    return total


def _shared_ids(engine: Engine) -> set[int]:
    """Objects every user refers to but none owns (rules, reasons), so they are not counted."""
    seen: set[int] = set()
    deep_size(engine.rules, seen)
    return seen


def run(warm: Sequence[Event], events: Sequence[Event], rules_dir: Path = DEFAULT_RULES_DIR) -> tuple[Engine, float, float, int]:
    """Seed a fresh engine with ``warm``, then process ``events``; (engine, wall s, CPU s, alerts)."""
    engine = Engine(load_rules(rules_dir))
    engine.seed(warm)
    process = engine.process
    drain = engine.drain
    alerts = 0
    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(events), 10_000):
        for ev in events[i : i + 10_000]:
            process(ev)
        alerts += len(drain())
    return engine, time.perf_counter() - t0, time.process_time() - c0, alerts


def _memory_tracemalloc(warm: Sequence[Event], events: Sequence[Event], rules_dir: Path) -> tuple[int, int]:
    """(bytes allocated by a fresh engine over ``warm`` then ``events``, users) under tracemalloc."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    engine = Engine(load_rules(rules_dir))
    engine.seed(warm)
    for ev in events:
        engine.process(ev)
    engine.drain()
    engine.drain_late()
    engine.clear_dirty()
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return after - before, len(engine.users)


def _profile(warm: Sequence[Event], events: Sequence[Event], rules_dir: Path, top: int) -> str:
    engine = Engine(load_rules(rules_dir))
    engine.seed(warm)
    prof = cProfile.Profile()
    prof.enable()
    for ev in events:
        engine.process(ev)
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m load_tests.bench_core", description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=1_000_000, help="events to process (default 1,000,000)")
    ap.add_argument("--staff", type=int, default=1500, help="accounts in the synthetic town (default 1500)")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--start", type=date.fromisoformat, default=date(2024, 11, 18), help="first timed day")
    ap.add_argument("--warmup-days", type=int, default=15, help="days seeded before the timed events (default 15: past every warm-up)")
    ap.add_argument("--rules", type=Path, default=DEFAULT_RULES_DIR, help="rules directory (default: bundled)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs, each on a freshly seeded engine; the best is reported (default 3)")
    ap.add_argument("--memory-events", type=int, default=200_000, help="events for the tracemalloc cross-check (0: skip)")
    ap.add_argument("--profile", action="store_true", help="also run cProfile and print the hot spots")
    ap.add_argument("--profile-events", type=int, default=200_000)
    ap.add_argument("--top", type=int, default=30, help="functions shown by --profile")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    warm, events = make_events(args.events, args.staff, args.seed, args.start, args.warmup_days)
    gen_s = time.perf_counter() - t0
    users = len({e.user for e in events})
    first, last = events[0].ts_ms, events[-1].ts_ms
    total = len(warm) + len(events)
    print(f"generated {total:,} events in {gen_s:.1f} s ({total / gen_s:,.0f} events/s)")
    print(f"  warm-up: {len(warm):,} events over {args.warmup_days} days (seeded, not timed)")
    print(f"  timed: {len(events):,} events, {users} users, {(last - first) / 86_400_000:.1f} days of event time")
    rules = load_rules(args.rules)
    print(f"rules: {', '.join(r.id for r in rules if r.enabled)}")

    best = 0.0
    engine: Engine | None = None
    alerts = 0
    for i in range(args.repeat):
        engine, elapsed, cpu, alerts = run(warm, events, args.rules)
        rate = len(events) / elapsed
        print(
            f"run {i + 1}: {elapsed:.2f} s wall = {rate:,.0f} events/s; {cpu:.2f} s CPU = {len(events) / cpu:,.0f} events/s; "
            f"{1e6 * elapsed / len(events):.2f} us/event; {alerts} alert revisions"
        )
        best = max(best, rate)
    assert engine is not None

    active = list(engine.users)
    dumps = [len(engine.dump_user(u) or b"") for u in active]
    mean_dump = sum(dumps) / len(dumps) if dumps else 0.0
    seen = _shared_ids(engine)
    deep = [deep_size(engine.users[u], seen) for u in active]
    mean_deep = sum(deep) / len(deep) if deep else 0.0
    print(f"state per active user ({len(active)} users in the engine at the end):")
    print(f"  snapshot (len(Engine.dump_user)): mean {mean_dump:,.0f} B, max {max(dumps, default=0):,} B")
    print(f"  in memory (recursive sys.getsizeof of UserState, incl. recent events): mean {mean_deep:,.0f} B, max {max(deep, default=0):,} B")
    if args.memory_events:
        grown, n_users = _memory_tracemalloc(warm, events[: args.memory_events], args.rules)
        print(
            f"  in memory (tracemalloc growth over the warm-up and {min(args.memory_events, len(events)):,} events, "
            f"excl. Event objects): {grown / max(1, n_users):,.0f} B/user ({n_users} users, incl. calendar cache)"
        )
    if args.profile:
        print(_profile(warm, events[: args.profile_events], args.rules, args.top))
    print(f"core events/s: {best:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
