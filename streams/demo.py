"""``leakwatch demo``: everything on one machine, no setup.

1. starts the embedded tansu broker (in memory; nothing is kept),
2. creates the topics and starts one worker (``leakwatch worker`` in a
   child process, configured through ``LEAKWATCH_*`` variables),
3. streams the synthetic municipality's log (``load_tests.generator``, with
   every leak scenario injected) into ``access-events``; without the
   generator (an installed package), the PPC sample log is sent instead,
4. prints where to look (metrics, health, the alerts topic, the worker's
   log) and a live tail of the alerts as they arrive,
5. stops cleanly on Ctrl-C, SIGTERM or after ``--duration`` seconds: the
   worker gets SIGTERM (checkpoint, commit, exit), then the broker stops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable
from datetime import date
from pathlib import Path
from typing import Any, Final

import orjson

from schemas.event import Event, EventCodec
from schemas.mynumber import Pseudonymizer
from streams.config import ConfigError, Settings, load_settings

__all__ = ["configure", "demo_events", "run"]

_SEVERITY_JA: Final = {"low": "低", "medium": "中", "high": "高", "critical": "重大"}
_DEMO_KEY: Final = "leakwatch-demo-pseudonym-key-not-for-production"
_REPO: Final = Path(__file__).resolve().parent.parent


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``leakwatch demo``."""
    parser.add_argument("--duration", type=float, default=0.0, metavar="SECONDS", help="stop by itself after this long (default: run until Ctrl-C)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the synthetic municipality (default 7)")
    parser.add_argument("--days", type=int, default=14, help="days of log to generate (default 14)")
    parser.add_argument("--staff", type=int, default=60, help="staff accounts (default 60)")
    parser.add_argument("--rate", type=float, default=5000.0, metavar="EPS", help="events per second sent to the broker (default 5000)")
    parser.add_argument("--web-port", type=int, default=0, help="worker web port (default: 6066 if free, else any free port)")
    parser.add_argument("--quiet", action="store_true", help="do not print each alert")


def demo_events(seed: int = 7, days: int = 14, staff: int = 60) -> tuple[Iterable[Event], str]:
    """The feed: the synthetic municipality if available, else the PPC sample log."""
    try:
        from load_tests import generator
    except ImportError:
        generator = None  # type: ignore[assignment]  # an installed package ships no load_tests
    if generator is not None:
        generate = generator.generate
        start = date(2024, 11, 18)
        log = generate(seed=seed, start=start, days=days, staff=staff, scenarios="all")
        return log, f"synthetic municipality (seed {seed}, {staff} staff, {days} days from {start}, all leak scenarios)"
    sample = _REPO / "samples" / "ppc_log_sample.tsv"
    if sample.is_file():
        from schemas.importers import Importer

        codec = EventCodec(Pseudonymizer(_DEMO_KEY.encode()))
        return Importer(codec).read(sample), f"PPC sample log ({sample})"
    raise SystemExit("leakwatch demo: neither load_tests.generator nor samples/ppc_log_sample.tsv is available")


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _format_alert(doc: dict[str, Any]) -> str:
    sev = doc.get("severity", "")
    window = doc.get("window", {})
    return (
        f"[{_SEVERITY_JA.get(sev, sev)}] {doc.get('title')}  "
        f"user={doc.get('user')} count={doc.get('count')} rev={doc.get('revision')} "
        f"window={window.get('start', '')[:16]}  ({doc.get('rule_id')}, {doc.get('alert_id')})"
    )


async def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 90.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        await asyncio.sleep(0.5)
    return False


async def _tail_alerts(settings: Settings, quiet: bool, seen: Counter[str], stop: asyncio.Event) -> None:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        settings.topic_alerts, bootstrap_servers=settings.brokers, group_id=None, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    latest: dict[tuple[str, int], bool] = {}
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=300)
            for records in batch.values():
                for r in records:
                    doc = orjson.loads(r.value)
                    ident = (doc["alert_id"], doc["revision"])
                    if ident in latest:
                        continue  # a replayed revision
                    latest[ident] = True
                    if doc["revision"] == 1:
                        seen[doc["rule_id"]] += 1
                    if not quiet:
                        print("  " + _format_alert(doc), flush=True)
    finally:
        await consumer.stop()


async def _demo(args: argparse.Namespace) -> int:
    from streams.brokers import TansuBroker, free_port
    from streams.worker import ensure_topics

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    print("leakwatch demo: starting the embedded broker (tansu, in memory)...", flush=True)
    broker = await TansuBroker().start_async()
    workdir = Path(tempfile.mkdtemp(prefix="leakwatch-demo-"))
    port = args.web_port or (6066 if _port_free(6066) else free_port())
    overrides = {
        "brokers": broker.bootstrap,
        "web_port": port,
        "partitions": 4,
        "group_id": "leakwatch-demo",
        "worker_name": "demo-worker",
        "data_dir": str(workdir / "faust"),
        "log_format": "json",
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEAKWATCH_")}
    env.update({f"LEAKWATCH_{k.upper()}": str(v) for k, v in overrides.items()})
    env.setdefault("LEAKWATCH_PSEUDONYM_KEY", os.environ.get("LEAKWATCH_PSEUDONYM_KEY", _DEMO_KEY))
    settings = load_settings(Settings, env=env)
    proc: subprocess.Popen[bytes] | None = None
    tail: asyncio.Task[None] | None = None
    seen: Counter[str] = Counter()
    log_path = workdir / "worker.log"
    code = 0
    try:
        await ensure_topics(settings)
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "leakwatch", "worker"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        base = f"http://127.0.0.1:{port}"
        print("leakwatch demo: starting the worker...", flush=True)
        if not await _wait_ready(base + "/readyz", proc):
            print(f"leakwatch demo: the worker did not become ready; see {log_path}", file=sys.stderr)
            return 1
        events, source = demo_events(args.seed, args.days, args.staff)
        print(
            "\n".join(
                [
                    "",
                    "leakwatch demo is running.",
                    f"  metrics:       {base}/metrics",
                    f"  health:        {base}/healthz   readiness: {base}/readyz",
                    f"  broker:        {broker.bootstrap}  (Kafka protocol; any Kafka client works)",
                    f"  alerts topic:  {settings.topic_alerts}   escalations: {settings.topic_escalations}   dead letters: {settings.topic_dlq}",
                    f"  worker log:    {log_path}",
                    f"  feed:          {source}, {args.rate:.0f} events/s into {settings.topic_access}",
                    "  Ctrl-C stops the demo." if not args.duration else f"  stopping after {args.duration:.0f} s.",
                    "",
                    "alerts as they arrive:",
                ]
            ),
            flush=True,
        )
        tail = asyncio.ensure_future(_tail_alerts(settings, args.quiet, seen, stop))
        feed = asyncio.ensure_future(_feed(settings, events, args.rate))
        waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(stop.wait()), feed]
        deadline = args.duration or None
        started = time.monotonic()
        while not stop.is_set():
            remaining = None if deadline is None else max(0.0, deadline - (time.monotonic() - started))
            done, _ = await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            if feed in done:
                waiters.remove(feed)
                sent = feed.result()
                print(f"leakwatch demo: feed finished ({sent} events sent); still watching for alerts", flush=True)
            if deadline is not None and time.monotonic() - started >= deadline:
                break
            if proc.poll() is not None:
                print(f"leakwatch demo: the worker exited ({proc.returncode}); see {log_path}", file=sys.stderr)
                code = 1
                break
        if not feed.done():
            feed.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await feed
    finally:
        stop.set()
        print("leakwatch demo: stopping...", flush=True)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if tail is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(tail, 5)
        await asyncio.to_thread(broker.stop)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    total = sum(seen.values())
    summary = ", ".join(f"{rule}: {n}" for rule, n in sorted(seen.items())) or "none"
    print(f"leakwatch demo: {total} alerts ({summary}); worker exit status {proc.returncode if proc else '-'}", flush=True)
    if proc is not None and proc.returncode not in (0, None):
        code = 1
    return code


async def _feed(settings: Settings, events: Iterable[Event], rate: float) -> int:
    from aiokafka import AIOKafkaProducer

    from streams.produce import produce_events

    producer = AIOKafkaProducer(bootstrap_servers=settings.brokers, linger_ms=10, client_id="leakwatch-demo-feed")
    await producer.start()
    codec = EventCodec(Pseudonymizer(settings.pseudonym_key_bytes()))
    try:
        sent, _ = await produce_events(producer, settings.topic_access, events, codec, rate=rate)
    finally:
        await producer.stop()
    return sent


def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 on a clean stop."""
    try:
        return asyncio.run(_demo(args))
    except ConfigError as exc:
        print(f"leakwatch demo: configuration error: {exc}", file=sys.stderr)
        return 2
