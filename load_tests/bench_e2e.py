"""End-to-end throughput and latency of one streaming worker against a local Apache Kafka.

``python -m load_tests.bench_e2e [--events 1000000] [--partitions 4] [--staff 1500]``

1. Starts a single-node Apache Kafka (:class:`streams.brokers.ApacheKafkaBroker`)
   and creates the worker's topics.
2. Fills the access topic with ``--events`` single-event messages keyed by user
   (the synthetic municipality, all leak scenarios injected; values encoded
   before timing, sent in producer batches).
3. (a) *Ceiling*: a plain aiokafka consumer, ``getmany()`` and one
   ``orjson.loads`` per message over the whole topic; nothing else.
   (b) *Worker*: one ``leakwatch worker`` (Faust app, web server, every
   default rule, checkpoints, alerts out) in a fresh consumer group over the
   same topic; the time from its first consumed event to the last, read
   from its ``/metrics`` every 100 ms. With ``detection_process`` (the
   default on 2+ CPUs) the worker is two processes, the Kafka side and a
   detection child pipelined with it; ``--detection-process false`` runs
   everything in the one process.
4. *Latency*: the same worker then gets live traffic at half of (b)'s rate
   for ``--latency-seconds``, with an injected alerting event (a night-time
   look-up by a fresh account: ``off_hours`` fires on its first event) every
   50 ms; each injection's latency is from just before it is sent to the
   arrival of its alert on ``leak-alerts`` (ingest to alert, wall clock, one
   process measures both ends).

Both (a) and (b) also print their CPU time per event (this process's
``process_time``; the worker's and its child's ``/proc/<pid>/stat``): on a shared 2-core
machine the wall-clock rates depend on what else runs (the broker, the load
generator, other tenants), the CPU cost per event much less.

With ``--profile``, instead profiles the worker's hot path (decode, validate,
engine, bookkeeping) in this process over ``--profile-events`` pre-built
records and prints the hottest functions.

The last line is always
``worker events/s: N ceiling events/s: M ratio: R p99 ms: L``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import itertools
import os
import pstats
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import fields
from datetime import date
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from detectors.base import DAY_MS, HOUR_MS, parse_duration
from detectors.engine import EngineSettings
from schemas.event import Event, EventCodec
from schemas.mynumber import Pseudonymizer
from streams.config import Settings, load_settings

__all__ = ["main"]

KEY = "bench-e2e-pseudonym-key-000000000"
REPO = Path(__file__).resolve().parent.parent
#: Japan's UTC offset (the synthetic municipality's time zone; no daylight saving).
_JST_MS = 9 * HOUR_MS


def make_events(n: int, staff: int, seed: int) -> tuple[list[Event], Iterator[Event]]:
    """The first ``n`` events of the synthetic municipality, and an iterator over the rest."""
    from load_tests.generator import generate

    log = generate(seed=seed, start=date(2024, 11, 18), days=3650, staff=staff, scenarios="all")
    return list(itertools.islice(log, n)), log


def settings_env(settings: Settings) -> dict[str, str]:
    """``LEAKWATCH_*`` variables for a worker process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEAKWATCH_")}
    for f in fields(Settings):
        value = getattr(settings, f.name)
        env[f"LEAKWATCH_{f.name.upper()}"] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return env


async def fill(settings: Settings, values: list[tuple[bytes, bytes]]) -> float:
    """Send pre-encoded (key, value) messages; returns seconds taken."""
    from streams.produce import KeyedSender

    producer = AIOKafkaProducer(bootstrap_servers=settings.brokers, acks=1, linger_ms=5, max_batch_size=1024 * 1024)
    await producer.start()
    started = time.perf_counter()
    try:
        sender = await KeyedSender.create(producer, settings.topic_access, max_inflight=64)
        add = sender.add
        for key, value in values:
            await add(key, value)
        await sender.flush()
    finally:
        await producer.stop()
    return time.perf_counter() - started


async def ceiling(settings: Settings, total: int) -> float:
    """(a): getmany + orjson.loads per message over the topic; events/s (prints its CPU per event)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.brokers,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=4 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(settings.topic_access, p) for p in range(settings.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        loads = orjson.loads
        seen = 0
        started = 0.0
        cpu_started = 0.0
        while seen < total:
            batch = await consumer.getmany(timeout_ms=1000, max_records=settings.max_batch)
            if batch and not started:
                started = time.perf_counter()
                cpu_started = time.process_time()
            for records in batch.values():
                for r in records:
                    loads(r.value)
                seen += len(records)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        print(f"    ceiling CPU {cpu / total * 1e6:.1f} us per event ({cpu / elapsed:.2f} cores)")
        return total / elapsed
    finally:
        await consumer.stop()


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of a process and its live descendants (Linux /proc).

    The worker's detection child processes (``detection_process``) are
    counted with it: that is the worker's cost.
    """
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """(the process's own, its live descendants') user + system CPU seconds so far (Linux /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            parents[int(entry.name)] = int(st[1])
    tree = {pid}
    grew = True
    while grew:
        grew = False
        for child, parent in parents.items():
            if parent in tree and child not in tree:
                tree.add(child)
                grew = True
    own = rest = 0
    for p in tree:
        st = _stat(p)
        if st is not None:
            ticks = int(st[11]) + int(st[12])
            if p == pid:
                own += ticks
            else:
                rest += ticks
    if _stat(pid) is None:
        return float("nan"), float("nan")
    tick = os.sysconf("SC_CLK_TCK")
    return own / tick, rest / tick


def scrape(base: str) -> dict[str, float]:
    """Sample name (with labels folded) -> summed value."""
    with urllib.request.urlopen(base + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def wait_ready(base: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    """Until /readyz is 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"worker exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("worker not ready")


def worker_run(base: str, total: int) -> tuple[float, float]:
    """(b): (events/s, seconds) from the first consumed event to the last, via /metrics."""
    started = 0.0
    last = 0.0
    deadline = time.monotonic() + 3600
    while time.monotonic() < deadline:
        now = time.perf_counter()
        done = scrape(base).get("leakwatch_events_consumed_total", 0.0)
        if done > 0 and not started:
            started = now
        if done >= total:
            last = now
            break
        time.sleep(0.1)
    elapsed = last - started
    return total / elapsed, elapsed


async def latency(
    settings: Settings, codec: EventCodec, background: Iterable[Event], rate: float, seconds: float
) -> tuple[list[tuple[float, float]], float, float]:
    """Ingest-to-alert latencies of injected night look-ups under ``rate`` events/s of background load.

    Returns ([(seconds since start, latency s)], achieved background rate,
    this load generator's CPU in cores while sending).
    Background messages are encoded before the clock starts, so the load
    generator takes as little CPU from the worker as it can.
    """
    from streams.produce import KeyedSender

    need = int(rate * seconds * 1.05) + 1
    events = list(itertools.islice(background, need))
    values = [(ev.user.encode(), codec.encode(ev)) for ev in events]
    producer = AIOKafkaProducer(bootstrap_servers=settings.brokers, acks=1, linger_ms=0, max_batch_size=1024 * 1024)
    await producer.start()
    consumer = AIOKafkaConsumer(
        settings.topic_alerts, bootstrap_servers=settings.brokers, group_id=None, auto_offset_reset="latest", fetch_max_wait_ms=50
    )
    await consumer.start()
    await consumer.seek_to_end()
    await consumer.getmany(timeout_ms=100)
    sent_at: dict[str, float] = {}
    got: dict[str, float] = {}
    tag = uuid.uuid4().hex[:6]

    async def collect() -> None:
        while True:
            batch = await consumer.getmany(timeout_ms=100)
            now = time.perf_counter()
            for records in batch.values():
                for r in records:
                    user = orjson.loads(r.value)["user"]
                    if user in sent_at and user not in got:
                        got[user] = now

    collector = asyncio.ensure_future(collect())
    sender = await KeyedSender.create(producer, settings.topic_access, max_inflight=64)
    tick = 0.02
    per_tick = max(1, int(rate * tick))
    started = time.perf_counter()
    cpu_started = time.process_time()
    n = 0
    sent = 0
    injected = 0
    try:
        while time.perf_counter() - started < seconds and sent < len(values):
            for key, value in values[sent : sent + per_tick]:
                await sender.add(key, value)
            sent += per_tick
            if n % 3 == 0:  # one injection every 60 ms
                user = f"bench-{tag}-{injected}"
                # 23:00 (JST) of the day before the background's current event: a night
                # look-up that never moves the partition's event time ahead (an
                # injection a week ahead made the engine treat the background users
                # as idle, which no real feed does).
                now_ms = events[min(sent, len(events)) - 1].ts_ms
                night = (now_ms + _JST_MS) // DAY_MS * DAY_MS - _JST_MS - HOUR_MS
                ev = Event(f"inj-{tag}-{injected}", night, user, "172.16.250.1", "view", "success", True, subject="r-bench")
                sent_at[user] = time.perf_counter()
                await sender.add(user.encode(), codec.encode(ev))
                injected += 1
            await sender.flush()
            n += 1
            delay = started + n * tick - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        achieved = sent / (time.perf_counter() - started)
        generator_cores = (time.process_time() - cpu_started) / (time.perf_counter() - started)
        deadline = time.perf_counter() + 15
        while len(got) < len(sent_at) and time.perf_counter() < deadline:
            await asyncio.sleep(0.1)
    finally:
        collector.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await collector
        await consumer.stop()
        await producer.stop()
    missing = len(sent_at) - len(got)
    if missing:
        print(f"  latency: {missing} of {len(sent_at)} injected alerts did not arrive within 15 s")
    return [(sent_at[u] - started, got[u] - sent_at[u]) for u in got], achieved, generator_cores


def profile_hot_path(events: list[Event], settings: Settings, top: int = 30) -> None:
    """cProfile of the detection host's hot path (decode, validate, detect) over pre-built values (no Kafka)."""
    from streams.detection import load_rules_for
    from streams.engines import PartitionEngines

    codec = EventCodec(Pseudonymizer(KEY.encode()))
    values: list[bytes | None] = [codec.encode(ev) for ev in events]
    offsets = list(range(len(values)))
    rules = load_rules_for(settings)
    engine_settings = EngineSettings(lateness_ms=parse_duration(settings.lateness))

    def run() -> float:
        host = PartitionEngines(rules, engine_settings, KEY.encode())
        host.restore(0, [], {}, None)
        t0 = time.perf_counter()
        for i in range(0, len(values), 5000):
            host.process(0, settings.topic_access, offsets[i : i + 5000], values[i : i + 5000])
        return time.perf_counter() - t0

    plain = run()
    print(f"hot path without profiler: {len(values) / plain:,.0f} events/s ({plain / len(values) * 1e6:.2f} us/event)")
    prof = cProfile.Profile()
    prof.enable()
    run()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    print(out.getvalue())


async def _prepare(settings: Settings, events: list[Event]) -> float:
    from streams.worker import ensure_topics

    await ensure_topics(settings)
    codec = EventCodec(Pseudonymizer(KEY.encode()))
    values = [(ev.user.encode(), codec.encode(ev)) for ev in events]
    return await fill(settings, values)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints the summary line last."""
    parser = argparse.ArgumentParser(prog="python -m load_tests.bench_e2e", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--staff", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=20000)
    parser.add_argument("--checkpoint-interval", type=float, default=1.0)
    parser.add_argument("--latency-seconds", type=float, default=20.0)
    parser.add_argument(
        "--detection-process",
        default="auto",
        help="the worker's detection_process setting: auto (default: a child process with 2+ CPUs), true, false, or a number of child processes",
    )
    parser.add_argument("--profile", action="store_true", help="profile the hot path in-process instead")
    parser.add_argument("--profile-events", type=int, default=200_000)
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    events, rest = make_events(args.profile_events if args.profile else args.events, args.staff, args.seed)
    print(f"generated {len(events):,} events in {time.perf_counter() - t0:.1f}s")
    workdir = Path(tempfile.mkdtemp(prefix="leakwatch-bench-"))
    base_settings: dict[str, Any] = {
        "partitions": args.partitions,
        "pseudonym_key": KEY,
        "max_batch": args.max_batch,
        "checkpoint_interval": args.checkpoint_interval,
        "detection_process": args.detection_process,
        "log_level": "warning",
        "log_format": "json",
        "data_dir": str(workdir / "faust"),
    }
    if args.profile:
        settings = load_settings(Settings, env={}, overrides=base_settings)
        from streams.detection import tune_gc

        tune_gc()
        profile_hot_path(events, settings)
        return 0

    from streams.brokers import ApacheKafkaBroker, free_port

    load, live = events, rest
    print("starting Apache Kafka...", flush=True)
    with ApacheKafkaBroker(partitions=args.partitions, extra_config={"offsets.topic.num.partitions": 4}) as broker:
        port = free_port()
        settings = load_settings(
            Settings,
            env={},
            overrides={**base_settings, "brokers": broker.bootstrap, "web_port": port, "group_id": f"bench-{uuid.uuid4().hex[:6]}"},
        )
        fill_s = asyncio.run(_prepare(settings, load))
        print(f"filled {settings.topic_access} ({args.partitions} partitions) with {len(load):,} messages in {fill_s:.1f}s")

        ceil = asyncio.run(ceiling(settings, len(load)))
        print(f"(a) ceiling, getmany + orjson.loads per message: {ceil:,.0f} events/s")

        base = f"http://127.0.0.1:{port}"
        log_path = workdir / "worker.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "leakwatch", "worker"],
                env=settings_env(settings),
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            wait_ready(base, proc)
            own0, kids0 = cpu_split(proc.pid)
            broker0 = cpu_seconds(broker.pid) if broker.pid else float("nan")
            worker_eps, elapsed = worker_run(base, len(load))
            own1, kids1 = cpu_split(proc.pid)
            broker_cpu = (cpu_seconds(broker.pid) if broker.pid else float("nan")) - broker0
            cpu_b = own1 + kids1 - own0 - kids0
            m = scrape(base)
            print(
                f"(b) one worker, all default rules: {worker_eps:,.0f} events/s ({len(load):,} events in {elapsed:.1f}s; "
                f"{m.get('leakwatch_alerts_total', 0):.0f} alerts, {m.get('leakwatch_events_invalid_total', 0):.0f} dead letters)"
            )
            print(
                f"    ratio b/a: {worker_eps / ceil:.2f}; worker CPU {cpu_b / len(load) * 1e6:.1f} us per event ({cpu_b / elapsed:.2f} cores): "
                f"worker process {(own1 - own0) / len(load) * 1e6:.1f}, detection children {(kids1 - kids0) / len(load) * 1e6:.1f}; "
                f"broker meanwhile {broker_cpu / elapsed:.2f} cores of {os.cpu_count()}"
            )
            rate = worker_eps / 2
            codec = EventCodec(Pseudonymizer(KEY.encode()))
            consumed0, cpu0 = scrape(base).get("leakwatch_events_consumed_total", 0.0), cpu_seconds(proc.pid)
            timed, achieved, generator_cores = asyncio.run(latency(settings, codec, live, rate, args.latency_seconds))
            live_events = scrape(base).get("leakwatch_events_consumed_total", 0.0) - consumed0
            cpu_live = cpu_seconds(proc.pid) - cpu0
            lat_ms = sorted(x * 1000 for _, x in timed)
            p50 = statistics.median(lat_ms) if lat_ms else float("nan")
            p99 = lat_ms[min(len(lat_ms) - 1, int(len(lat_ms) * 0.99))] if lat_ms else float("nan")
            half = args.latency_seconds / 2
            first = [x * 1000 for t, x in timed if t < half]
            second = [x * 1000 for t, x in timed if t >= half]
            print(
                f"latency, ingest to alert, at {achieved:,.0f} events/s (target {rate:,.0f}; {len(lat_ms)} injected alerts): "
                f"p50 {p50:.0f} ms, p99 {p99:.0f} ms, max {max(lat_ms, default=float('nan')):.0f} ms; "
                f"median first half {statistics.median(first) if first else float('nan'):.0f} ms, "
                f"second half {statistics.median(second) if second else float('nan'):.0f} ms"
            )
            buckets: dict[int, list[float]] = {}
            for t, x in timed:
                buckets.setdefault(int(t // 2), []).append(x * 1000)
            print("    median latency per 2 s: " + " ".join(f"{statistics.median(v):.0f}" for _, v in sorted(buckets.items())) + " ms")
            m2 = scrape(base)
            print(
                f"    worker lag at the end: {m2.get('leakwatch_consumer_lag', 0):.0f} messages; "
                f"worker CPU {cpu_live / max(live_events, 1) * 1e6:.1f} us per event while live; "
                f"this load generator {generator_cores:.2f} cores"
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            print(f"worker stopped with exit status {code} (log: {log_path})")
    print(f"worker events/s: {worker_eps:.0f} ceiling events/s: {ceil:.0f} ratio: {worker_eps / ceil:.2f} p99 ms: {p99:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
