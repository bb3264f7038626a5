"""``leakwatch produce``: ship exported log files into the input topics.

Reads JSONL/CSV/TSV exports with :class:`schemas.importers.Importer` (the
same validation and pseudonymisation as the stream: no personal number
leaves this machine), keys every message by user (so each user's events stay
in one partition, in order) and sends:

* by default one event per message, as real log shippers do;
* with ``--batch N``, JSON arrays of up to N events of one user per message.

Messages are packed into producer batches per partition (``create_batch`` /
``send_batch``), uncompressed; :class:`KeyedSender` does that and is also
used by the demo, the tests and the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2

from schemas.event import Event, EventCodec
from schemas.mynumber import Pseudonymizer
from streams.config import ConfigError, Settings, load_settings

__all__ = ["KeyedSender", "configure", "partition_for", "produce_events", "run"]


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's default (murmur2) partitioner picks for ``key``."""
    return int(murmur2(key) & 0x7FFFFFFF) % partitions


class KeyedSender:
    """Packs keyed messages into per-partition producer batches and sends them.

    ``await add(key, value)`` as often as needed, then ``await flush()``.
    At most ``max_inflight`` batches are in flight at once.
    """

    __slots__ = ("_batches", "_counts", "_inflight", "_part_cache", "end_offsets", "max_inflight", "messages", "partitions", "producer", "topic")

    def __init__(self, producer: AIOKafkaProducer, topic: str, partitions: int, max_inflight: int = 32) -> None:
        self.producer = producer
        self.topic = topic
        self.partitions = partitions
        self.max_inflight = max_inflight
        self.messages = 0
        self._batches: dict[int, Any] = {}
        self._inflight: list[asyncio.Future[Any]] = []
        self._counts: dict[asyncio.Future[Any], int] = {}
        self._part_cache: dict[bytes, int] = {}
        #: Partition -> offset after the last delivered message (from the produce responses).
        self.end_offsets: dict[int, int] = {}

    @classmethod
    async def create(cls, producer: AIOKafkaProducer, topic: str, max_inflight: int = 32) -> KeyedSender:
        """A sender for ``topic`` (its partition count is looked up)."""
        parts = await producer.partitions_for(topic)
        return cls(producer, topic, len(parts), max_inflight)

    def partition(self, key: bytes) -> int:
        """The partition of ``key`` (cached)."""
        p = self._part_cache.get(key)
        if p is None:
            p = self._part_cache[key] = partition_for(key, self.partitions)
        return p

    async def add(self, key: bytes, value: bytes, headers: list[tuple[str, bytes]] | None = None) -> None:
        """Queue one message; a full batch is sent right away."""
        p = self.partition(key)
        batch = self._batches.get(p)
        if batch is None:
            batch = self._batches[p] = self.producer.create_batch()
        if batch.append(key=key, value=value, timestamp=None, headers=headers or []) is None:
            await self._send(p, batch)
            batch = self._batches[p] = self.producer.create_batch()
            batch.append(key=key, value=value, timestamp=None, headers=headers or [])
        self.messages += 1

    async def _send(self, partition: int, batch: Any) -> None:
        if len(self._inflight) >= self.max_inflight:
            done, _ = await asyncio.wait(self._inflight, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                self._delivered(fut)
            self._inflight = [f for f in self._inflight if not f.done()]
        fut = await self.producer.send_batch(batch, self.topic, partition=partition)
        self._counts[fut] = batch.record_count()
        self._inflight.append(fut)

    def _delivered(self, fut: asyncio.Future[Any]) -> None:
        meta = fut.result()
        end = meta.offset + self._counts.pop(fut, 1)
        if end > self.end_offsets.get(meta.partition, 0):
            self.end_offsets[meta.partition] = end

    async def flush(self) -> None:
        """Send the partial batches and wait until everything is delivered."""
        batches, self._batches = self._batches, {}
        for p, batch in batches.items():
            if batch.record_count():
                await self._send(p, batch)
        inflight, self._inflight = self._inflight, []
        if inflight:
            await asyncio.gather(*inflight)
            for fut in inflight:
                self._delivered(fut)


def _group_by_user(events: Iterable[Event], size: int) -> Iterator[list[Event]]:
    """Per-user lists of up to ``size`` events, each user's order kept."""
    buffers: dict[str, list[Event]] = {}
    for ev in events:
        buf = buffers.get(ev.user)
        if buf is None:
            buf = buffers[ev.user] = []
        buf.append(ev)
        if len(buf) >= size:
            del buffers[ev.user]
            yield buf
    yield from buffers.values()


async def produce_events(
    producer: AIOKafkaProducer,
    topic: str,
    events: Iterable[Event],
    codec: EventCodec,
    *,
    batch: int = 1,
    rate: float = 0.0,
) -> tuple[int, int]:
    """Send events keyed by user; returns (events, messages). ``rate``: events/s cap (0: none)."""
    sender = await KeyedSender.create(producer, topic)
    n_events = 0
    started = time.monotonic()

    async def pace() -> None:
        if rate > 0:
            ahead = n_events / rate - (time.monotonic() - started)
            if ahead > 0.005:
                await sender.flush()
                await asyncio.sleep(ahead)

    if batch <= 1:
        encode = codec.encode
        for ev in events:
            await sender.add(ev.user.encode(), encode(ev))
            n_events += 1
            if rate > 0 and n_events % 100 == 0:
                await pace()
    else:
        for group in _group_by_user(events, batch):
            await sender.add(group[0].user.encode(), codec.encode_batch(group))
            n_events += len(group)
            if rate > 0:
                await pace()
    await sender.flush()
    return n_events, sender.messages


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``leakwatch produce``."""
    parser.add_argument("files", nargs="+", metavar="FILE", type=Path, help="exported log files (JSONL, CSV, TSV; .gz ok)")
    parser.add_argument("--topic", help="target topic (default: the access-events topic of the settings)")
    parser.add_argument("--batch", type=int, default=1, metavar="N", help="events per message (JSON array of one user's events); default 1")
    parser.add_argument("--format", choices=("jsonl", "csv", "tsv"), help="input format (default: from the name or content)")
    parser.add_argument("--mapping", type=Path, metavar="FILE", help="column mapping for CSV/TSV (default: the PPC sample layout)")
    parser.add_argument("--rate", type=float, default=0.0, metavar="EPS", help="at most this many events per second (default: as fast as possible)")
    parser.add_argument("--config", metavar="FILE", help="YAML settings file (brokers, security, pseudonym key)")


async def _produce(args: argparse.Namespace, settings: Settings) -> int:
    from zoneinfo import ZoneInfo

    from schemas.importers import Importer, builtin_mapping, load_mapping

    codec = EventCodec(Pseudonymizer(settings.pseudonym_key_bytes()), ZoneInfo(settings.tz))
    mapping = load_mapping(args.mapping) if args.mapping else builtin_mapping()
    importer = Importer(codec, mapping, args.format)
    topic = args.topic or settings.topic_access
    producer = AIOKafkaProducer(
        **settings.kafka_client_args(), acks="all", linger_ms=20, max_batch_size=256 * 1024, client_id="leakwatch-produce"
    )
    await producer.start()
    total_events = total_messages = 0
    started = time.monotonic()
    try:
        for path in args.files:
            n_events, n_messages = await produce_events(producer, topic, importer.read(path), codec, batch=args.batch, rate=args.rate)
            summary = importer.files[-1]
            total_events += n_events
            total_messages += n_messages
            print(f"{summary.file}: {n_events} events in {n_messages} messages ({summary.bad_rows} rows rejected)")
    finally:
        await producer.stop()
    elapsed = time.monotonic() - started
    for issue in importer.issues[:20]:
        print(f"  {issue}", file=sys.stderr)
    if importer.issue_count > 20:
        print(f"  ... {importer.issue_count - 20} more issues", file=sys.stderr)
    print(f"sent {total_events} events in {total_messages} messages to {topic} in {elapsed:.1f}s")
    return 1 if any(not f.readable for f in importer.files) else 0


def run(args: argparse.Namespace) -> int:
    """Ship the files; 0 when every file was readable."""
    try:
        settings = load_settings(Settings, config_file=args.config)
    except ConfigError as exc:
        print(f"leakwatch produce: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.batch < 1:
        print("leakwatch produce: --batch must be at least 1", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_produce(args, settings))
    except Exception as exc:  # broker unreachable, unknown topic...
        print(f"leakwatch produce: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1

